"""Runs joblib's own test suite for Parallel (the installed ``joblib/test/test_parallel.py``)
with skate's backend in place of joblib's process backends, and prints the counts.

    python compat/run_joblib_suite.py [-k EXPR] [--json FILE] [extra pytest args]

How skate is put in: this file is also the pytest plugin (``-p run_joblib_suite``, with
``compat/`` on ``PYTHONPATH``). Before the suite is collected the plugin

- starts skate (the embedded default cluster, every CPU of the machine) and registers the
  ``"skate"`` backend as joblib's default, so every ``Parallel`` that names no backend,
  and every test parametrized with ``backend=None``, runs on skate;
- rewrites the suite's backend parameters (``backend``, ``parent_backend``,
  ``child_backend``, ``inner_backend``, ``outer_backend``): the process backends
  (``"loky"``, ``"multiprocessing"``, a multiprocessing context such as ``"spawn"``, and
  instances of their classes) become ``"skate"`` (or a ``SkateBackend()`` instance),
  ``"threading"`` and ``"sequential"`` stay; duplicates left by the rewrite are dropped;
- deselects the cases that would then run only joblib's thread or sequential backends
  (every backend parameter explicit and not skate): they do not exercise skate.

Python processes the suite starts itself (scripts run with ``check_subprocess_call``) get
the backend registered and made the default through a ``sitecustomize`` module generated
in a temporary directory put first on their ``PYTHONPATH``.

No joblib test code is copied: the suite is loaded from the installed joblib.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

BACKEND_PARAM_NAMES = ("backend", "parent_backend", "child_backend", "inner_backend", "outer_backend")
PROCESS_BACKEND_NAMES = ("loky", "multiprocessing", "spawn", "fork", "forkserver")


# --------------------------------------------------------------------------------------
# The plugin (runs inside the pytest process).
# --------------------------------------------------------------------------------------

def _is_skate(value) -> bool:
    if value is None or value == "skate":
        return True
    from skate.joblib import SkateBackend
    return isinstance(value, SkateBackend)


def _substitute(value):
    """The value a backend parameter takes under this runner."""
    from joblib._parallel_backends import LokyBackend, MultiprocessingBackend
    from skate.joblib import SkateBackend
    if isinstance(value, str):
        return "skate" if value in PROCESS_BACKEND_NAMES else value
    if isinstance(value, (LokyBackend, MultiprocessingBackend)) and type(value).__module__.startswith("joblib."):
        return SkateBackend()
    if hasattr(value, "Pool") and hasattr(value, "Lock"):   # a multiprocessing context
        return "skate"
    return value


def _dedup_key(values):
    return tuple(v if isinstance(v, (str, int, float, bool, type(None))) else type(v).__name__
                 for v in values)


def _rewrite_parametrize(mark):
    """A parametrize mark with the backend parameters rewritten, or ``mark`` unchanged."""
    import pytest
    from _pytest.mark.structures import ParameterSet

    args = list(mark.args)
    kwargs = dict(mark.kwargs)
    argnames = args[0] if args else kwargs["argnames"]
    names = [n.strip() for n in argnames.split(",")] if isinstance(argnames, str) else list(argnames)
    hit = [i for i, n in enumerate(names) if n in BACKEND_PARAM_NAMES]
    if not hit:
        return mark
    argvalues = list(args[1] if len(args) > 1 else kwargs["argvalues"])
    ids = kwargs.get("ids")
    ids = list(ids) if isinstance(ids, (list, tuple)) else None
    seen = set()
    new_values, new_ids = [], []
    for n, raw in enumerate(argvalues):
        pset = raw if isinstance(raw, ParameterSet) else None
        values = list(pset.values) if pset is not None else ([raw] if len(names) == 1 else list(raw))
        for i in hit:
            values[i] = _substitute(values[i])
        key = _dedup_key(values)
        if key in seen:
            continue
        seen.add(key)
        value = values[0] if len(names) == 1 else tuple(values)
        if pset is not None:
            value = pytest.param(*values, marks=pset.marks, id=pset.id)
        new_values.append(value)
        if ids is not None:
            new_ids.append(ids[n])
    if len(args) > 1:
        args[1] = new_values
    else:
        kwargs["argvalues"] = new_values
    if ids is not None:
        kwargs["ids"] = new_ids
    return pytest.mark.parametrize(*args, **kwargs).mark


def pytest_configure(config):
    import skate
    import skate.joblib

    skate.joblib.register(make_default=True)
    if not skate.is_initialized():
        skate.init()


def pytest_unconfigure(config):
    import skate
    if skate.is_initialized():
        skate.shutdown()


def _pytest_generate_tests(metafunc):
    defn = metafunc.definition
    defn.own_markers[:] = [_rewrite_parametrize(m) if m.name == "parametrize" else m
                           for m in defn.own_markers]


def pytest_collection_modifyitems(session, config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        backends = [v for k, v in params.items() if k in BACKEND_PARAM_NAMES]
        (drop if backends and not any(_is_skate(v) for v in backends) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


_REPORT_ENV = "SKATE_JOBLIB_SUITE_REPORT"
_outcomes_seen: dict = {}
_deselected: list = []


def pytest_deselected(items):
    _deselected.extend(items)


def pytest_runtest_logreport(report):
    """Records one outcome per test: passed, failed, error, skipped, xfailed, xpassed."""
    name = report.nodeid.split("::", 1)[-1]
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if hasattr(report, "wasxfail"):
            kind = "xpassed" if report.passed else "xfailed"
        elif report.skipped:
            kind = "skipped"
        elif report.failed:
            kind = "failed" if report.when == "call" else "error"
        else:
            kind = "passed"
        message = ""
        if report.failed or report.skipped:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)
            if isinstance(report.longrepr, tuple):          # skips: (file, line, reason)
                message = report.longrepr[2]
        _outcomes_seen[name] = (kind, message.splitlines()[0][:200] if message else "")
    elif report.when == "teardown" and report.failed and name not in _outcomes_seen:
        _outcomes_seen[name] = ("error", "teardown failed")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(_REPORT_ENV)
    if path:
        with open(path, "w") as f:
            json.dump({"outcomes": _outcomes_seen, "deselected": len(_deselected)}, f)


try:
    import pytest as _pytest_mod
    pytest_generate_tests = _pytest_mod.hookimpl(tryfirst=True)(_pytest_generate_tests)
except ImportError:  # only the runner half is used without pytest
    pass


# --------------------------------------------------------------------------------------
# The runner (a plain script).
# --------------------------------------------------------------------------------------

SITECUSTOMIZE = """\
# Generated by skate's compat/run_joblib_suite.py: Python processes started by joblib's
# test suite use skate's joblib backend by default, as the suite's own process does.
try:
    import skate.joblib as _skate_joblib
    _skate_joblib.register(make_default=True)
except Exception:
    pass
"""


def _suite_path() -> str:
    import joblib
    return os.path.join(os.path.dirname(joblib.__file__), "test", "test_parallel.py")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the outcome of every test to this file")
    parser.add_argument("--timeout", type=int, default=120, help="per-test timeout (s)")
    args, extra = parser.parse_known_args(argv)

    here = os.path.dirname(os.path.abspath(__file__))
    work = tempfile.mkdtemp(prefix="skate-joblib-suite-")
    site_dir = os.path.join(work, "site")
    os.makedirs(site_dir)
    with open(os.path.join(site_dir, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    report = os.path.join(work, "report.json")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([site_dir, here] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("SKATE_TEMP_DIR", os.path.join(work, "skate"))
    env[_REPORT_ENV] = report
    cmd = [sys.executable, "-m", "pytest", _suite_path(), "-p", "run_joblib_suite",
           "-p", "no:cacheprovider", "-q", f"--timeout={args.timeout}", "--rootdir", work] + extra
    print("running:", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, env=env, cwd=work)
        if not os.path.exists(report):
            print(f"pytest wrote no report (exit code {proc.returncode})")
            return proc.returncode or 1
        with open(report) as f:
            raw = json.load(f)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out = {k: [] for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    for name, (kind, message) in sorted(raw["outcomes"].items()):
        out[kind].append((name, message))
    print()
    print("joblib test_parallel.py under the skate backend")
    for kind in ("failed", "error", "xpassed"):
        for name, msg in out[kind]:
            print(f"  {kind.upper():7s} {name}: {msg}")
    counts = {k: len(v) for k, v in out.items()}
    counts["deselected"] = raw["deselected"]
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"counts": counts, "tests": out}, f, indent=1)
    return 0 if not (out["failed"] or out["error"]) else 1


if __name__ == "__main__":
    sys.exit(main())
