"""Fixtures of the runtime tests: one embedded cluster at a time, and a leak check around each.

- ``skate_cluster``: the cluster most tests share, ``skate.init(num_cpus=2)``, started once
  per module and shut down at the module's end (and checked for leaks then).
- ``start_cluster``: for a test that needs its own init arguments (``object_store_memory``,
  ``num_cpus=1``, ``resources``...). It shuts the shared cluster down first, so only one
  cluster is ever up in the test process, and at the test's end shuts its own down and
  checks for leaks. The next test that asks for ``skate_cluster`` brings the shared one
  back up.
- The leak check: after ``skate.shutdown()``, no process of ours whose command line contains
  ``skate._private`` and no ``/dev/shm/skate-*`` segment of ours may remain (polled for
  up to 5 s). It runs after every cluster shutdown and once more at the end of the session.

Sessions live in a temp dir of their own (``SKATE_TEMP_DIR``), set before skate is imported:
this suite's ``init(address="auto")`` then finds this suite's cluster, not one another suite
on the machine started, and the leak check can tell our processes from theirs.

Remote functions defined in test modules are pickled by value: cloudpickle would otherwise
pickle them by reference to a module named ``test_x``, which pytest put on the driver's
``sys.path`` only, so workers could not import it.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_TEMP_DIR = tempfile.mkdtemp(prefix="skt-")   # short: socket paths must fit in 108 bytes
os.environ["SKATE_TEMP_DIR"] = _TEMP_DIR

import cloudpickle  # noqa: E402
import pytest  # noqa: E402

import skate  # noqa: E402
from skate._private import runtime  # noqa: E402
from skate_harness import LeakTracker  # noqa: E402


def pytest_collection_modifyitems(session, config, items):
    for module in {getattr(item, "module", None) for item in items} - {None}:
        cloudpickle.register_pickle_by_value(module)


class ClusterInfo:
    """The cluster this process is connected to, as the tests see it."""

    def __init__(self, init_kwargs: dict):
        info = runtime.info()
        self.init_kwargs = init_kwargs
        self.session = info["session"]
        self.session_dir = info["session_dir"]
        self.node_pid = info.get("node_pid")

    @property
    def gcs_address(self) -> str:
        return skate.get_runtime_context().gcs_address


class Clusters:
    """Keeps at most one cluster up in this process, and checks each one leaves nothing behind."""

    def __init__(self, tracker: LeakTracker):
        self.tracker = tracker
        self.owner = None          # "shared" or "own" while a cluster is up
        self.current = None

    def start(self, owner: str, **init_kwargs) -> ClusterInfo:
        self.stop()
        skate.init(**init_kwargs)
        self.owner = owner
        self.current = ClusterInfo(init_kwargs)
        self.tracker.note_session(self.current.session)
        return self.current

    def stop(self, check: bool = False) -> None:
        had = check or self.owner is not None or skate.is_initialized()
        owner = self.owner
        self.owner = None
        self.current = None
        if skate.is_initialized():
            skate.shutdown()
        if had:
            self.tracker.assert_clean(f"after skate.shutdown() of the {owner or 'test'}'s cluster")


@pytest.fixture(scope="session")
def leak_tracker():
    return _TRACKER


_TRACKER = LeakTracker(_TEMP_DIR)


@pytest.fixture(scope="session")
def clusters(leak_tracker):
    c = Clusters(leak_tracker)
    yield c
    c.stop()


@pytest.fixture(scope="session", autouse=True)
def _session_leak_check():
    """At the very end: nothing any test of this session started may remain."""
    yield
    try:
        if skate.is_initialized():
            skate.shutdown()
        _TRACKER.assert_clean("at the end of the test session", timeout=10.0)
    finally:
        shutil.rmtree(_TEMP_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def _shared_cluster_for_module(clusters):
    yield
    if clusters.owner == "shared":
        clusters.stop()


@pytest.fixture
def skate_cluster(clusters, _shared_cluster_for_module) -> ClusterInfo:
    """The module's shared cluster: ``skate.init(num_cpus=2)``, up once per module."""
    if clusters.owner != "shared" or not skate.is_initialized():
        clusters.start("shared", num_cpus=2)
    return clusters.current


@pytest.fixture
def start_cluster(clusters):
    """``start_cluster(**init_kwargs)``: this test's own cluster, alone in the process."""
    def start(**init_kwargs) -> ClusterInfo:
        return clusters.start("own", **init_kwargs)
    yield start
    clusters.stop()


@pytest.fixture
def no_cluster(clusters):
    """Makes sure no cluster is up (the shared one is shut down); checks leaks at the end."""
    clusters.stop()
    yield
    clusters.stop(check=True)
