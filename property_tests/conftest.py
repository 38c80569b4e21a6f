"""Fixtures and Hypothesis profiles of the property tests.

Profiles (``SKATE_SOAK_SECONDS`` picks the soak):

- ``ci`` (default): each test draws a bounded number of examples, derandomized (the same
  examples every run, so a red run is reproducible), no example database; sized so this
  directory adds about 2-3 minutes to ``./scripts/test.sh`` on 2 cores.
- ``soak``: ``SKATE_SOAK_SECONDS=600 .venv/bin/python -m pytest property_tests`` runs the
  ci tests, then ``test_soak.py`` draws random fault programs for that many seconds,
  keeps going after a failure, and prints the summary line (programs run, faults
  injected, wrong results, hangs, leaks) at the end of the session.

Clusters: the session's ``PropertyClusters`` keeps at most one embedded cluster up, reused
by the tests of a module while their configuration is the same, shut down (and checked
for leftover processes and shared-memory segments, with ``tests/skate_harness.py``'s
``LeakTracker``) when a module ends or asks for another configuration.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
_TESTS = os.path.join(os.path.dirname(_HERE), "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)       # the runtime tests' harness, reused by import
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# Sessions in a temp dir of this run's own (the runtime tests' conftest may have made it
# already when both directories run in one session), set before skate is imported.
_OWN_TEMP = "SKATE_TEMP_DIR" not in os.environ
if _OWN_TEMP:
    os.environ["SKATE_TEMP_DIR"] = tempfile.mkdtemp(prefix="skp-")  # short: socket paths
_TEMP_DIR = os.environ["SKATE_TEMP_DIR"]

import cloudpickle  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

import embedded_clusters  # noqa: E402
import invariants  # noqa: E402
import kill_injector  # noqa: E402
import known_bugs  # noqa: E402
import task_programs  # noqa: E402
import value_strategies  # noqa: E402
from skate_harness import LeakTracker  # noqa: E402

# What runs inside tasks is defined in these modules: workers get it by value (they cannot
# import modules that only pytest put on the driver's sys.path).
for _module in (task_programs, value_strategies, invariants, known_bugs, kill_injector):
    cloudpickle.register_pickle_by_value(_module)

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
            HealthCheck.filter_too_much]
settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("soak", deadline=None, derandomize=False, database=None, print_blob=True,
                          suppress_health_check=_SLOW_OK,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])
SOAK = invariants.soak_seconds() > 0
settings.load_profile("soak" if SOAK else "ci")


def pytest_collection_modifyitems(session, config, items):
    for module in {getattr(item, "module", None) for item in items} - {None}:
        if getattr(module, "__file__", "").startswith(_HERE):
            cloudpickle.register_pickle_by_value(module)


_TRACKER = LeakTracker(_TEMP_DIR)
_CLUSTERS = embedded_clusters.PropertyClusters(_TRACKER, _TEMP_DIR)


@pytest.fixture(scope="session")
def clusters():
    yield _CLUSTERS
    problems = _CLUSTERS.close()
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module", autouse=True)
def _one_cluster_per_module(clusters):
    """A module's cluster goes at its end; what it left behind fails the module."""
    yield
    problems = clusters.stop()
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="session", autouse=True)
def _session_end():
    yield
    problems = _CLUSTERS.close()
    _TRACKER.assert_clean("at the end of the property tests", timeout=10.0)
    if _OWN_TEMP:
        shutil.rmtree(_TEMP_DIR, ignore_errors=True)
    assert not problems, "\n".join(problems)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    stats = invariants.STATS
    if SOAK or stats.programs:
        terminalreporter.write_sep("=", "skate property tests")
        terminalreporter.write_line(stats.summary())
        for what, reproducer in stats.failures[:20]:
            terminalreporter.write_line(f"--- failed program ---\n{what}\n{reproducer}")
