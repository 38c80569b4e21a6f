"""Runs CPython's own ``concurrent.futures`` tests against ``skate.futures.ProcessPoolExecutor``.

The venv's Python (3.11) has no ``test_concurrent_futures`` installed on this machine; the
newest installed copy of the suite (CPython 3.13's package ``test/test_concurrent_futures/``
under pyenv, or the directory given with ``--suite``) is loaded from where it is, nothing
copied into this repository:

- the package is imported under the name ``cpython_futures_suite`` with this
  interpreter's ``test.support``; the two names 3.13 added that its tests use
  (``Py_GIL_DISABLED``, ``requires_gil_enabled``) are filled in, as on a GIL build;
- its process-pool mixins (``ProcessPoolForkMixin`` and the forkserver and spawn ones)
  get ``executor_type = skate.futures.ProcessPoolExecutor``; skate ignores ``mp_context``,
  so the three start methods would run the same code: only the spawn variant runs
  (``--all-start-methods`` runs the three);
- the suite's modules are pickled by value (cloudpickle), as skate's workers cannot
  import them by name;
- the thread-pool classes and the tests of ``Future`` alone are not run: they do not use
  a process pool.

Each test gets ``--timeout`` seconds (SIGALRM). Prints a line per test, then the counts
and the reason of each failure (the documented ones are in docs/compat-futures.md).

    python compat/run_futures_suite.py [-v] [--json FILE] [--suite DIR] [name substring ...]

Exit status: 0 when the run finished (failures are reported, not fatal), 2 when the suite
cannot be found or loaded. The embedded default cluster is used unless ``SKATE_ADDRESS``
names one.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
import unittest

import cloudpickle

import skate.futures

PACKAGE = "cpython_futures_suite"

# Tests that cannot exercise skate's executor, with the reason (reported as skipped).
_CHILD = ("runs `from concurrent.futures import ProcessPoolExecutor` in a child interpreter: "
          "it tests the standard library's executor, not skate's")
NOT_APPLICABLE = {
    "test_interpreter_shutdown": _CHILD,
    "test_submit_after_interpreter_shutdown": _CHILD,
    "test_hang_gh83386": _CHILD,
    "test_cancel_futures_wait_false": "runs a ThreadPoolExecutor in a child interpreter",
    "test_python_finalization_error": "needs threading._start_joinable_thread (Python 3.13); "
                                      "this interpreter is older than the suite",
}
PROCESS_MIXINS = ("ProcessPoolForkMixin", "ProcessPoolForkserverMixin", "ProcessPoolSpawnMixin")


def find_suite() -> str | None:
    """The newest installed ``test/test_concurrent_futures`` package directory."""
    roots = {os.path.dirname(sys.base_prefix), os.path.expanduser("~/.pyenv/versions"),
             "/root/.pyenv/versions", "/usr/lib"}
    found = []
    for root in roots:
        for path in glob.glob(os.path.join(root, "*", "lib", "python3*", "test", "test_concurrent_futures")):
            if os.path.exists(os.path.join(path, "util.py")):
                found.append(path)
        for path in glob.glob(os.path.join(root, "python3*", "test", "test_concurrent_futures")):
            if os.path.exists(os.path.join(path, "util.py")):
                found.append(path)

    def version(path):
        name = os.path.basename(os.path.dirname(os.path.dirname(path)))   # python3.13
        try:
            return tuple(int(x) for x in name.replace("python", "").split("."))
        except ValueError:
            return (0,)
    return max(found, key=version) if found else None


def _shim_test_support() -> None:
    """What the newer suite asks of ``test.support`` that this interpreter's lacks: the
    free-threading names, and ``thread=`` (TSAN) in the sanitizer checks (no TSAN here)."""
    import inspect

    from test import support
    if not hasattr(support, "Py_GIL_DISABLED"):
        support.Py_GIL_DISABLED = False
    if not hasattr(support, "requires_gil_enabled"):
        support.requires_gil_enabled = lambda msg="needs the GIL enabled": (lambda f: f)
    if "thread" not in inspect.signature(support.check_sanitizer).parameters:
        check, skip = support.check_sanitizer, support.skip_if_sanitizer

        def check_sanitizer(*, address=False, memory=False, ub=False, thread=False):
            return check(address=address, memory=memory, ub=ub) if (address or memory or ub) else False

        def skip_if_sanitizer(reason=None, *, address=False, memory=False, ub=False, thread=False):
            if address or memory or ub:
                return skip(reason, address=address, memory=memory, ub=ub)
            return lambda f: f

        support.check_sanitizer = check_sanitizer
        support.skip_if_sanitizer = skip_if_sanitizer


def load_suite(directory: str) -> list:
    """Imports the suite's modules (skate's executor in its process-pool mixins)."""
    _shim_test_support()
    spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(directory, "__init__.py"),
                                                  submodule_search_locations=[directory])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    util = importlib.import_module(f"{PACKAGE}.util")
    for name in PROCESS_MIXINS:
        getattr(util, name).executor_type = skate.futures.ProcessPoolExecutor
    modules = [util]
    for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
        name = os.path.basename(path)[:-3]
        if name == "__init__" or name == "util":
            continue
        modules.append(importlib.import_module(f"{PACKAGE}.{name}"))
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    return modules


def process_pool_tests(modules, all_start_methods: bool, names) -> unittest.TestSuite:
    loader = unittest.TestLoader()
    variants = ("ProcessPoolFork", "ProcessPoolForkserver", "ProcessPoolSpawn") if all_start_methods \
        else ("ProcessPoolSpawn",)
    suite = unittest.TestSuite()
    for module in modules:
        for attr in sorted(dir(module)):
            cls = getattr(module, attr)
            if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)):
                continue
            if cls.__module__ != module.__name__ or not attr.startswith(variants):
                continue
            for test in loader.loadTestsFromTestCase(cls):
                if names and not any(n in test.id() for n in names):
                    continue
                reason = NOT_APPLICABLE.get(test.id().rsplit(".", 1)[-1])
                if reason is not None:
                    method = getattr(test, test._testMethodName)
                    setattr(test, test._testMethodName, unittest.skip(reason)(method))
                suite.addTest(test)
    return suite


class _Timeout(Exception):
    pass


class Result(unittest.TextTestResult):
    """Records each test's outcome; a test running longer than ``timeout`` is interrupted."""

    timeout = 120

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcomes: dict = {}
        self._started = 0.0

    def startTest(self, test):
        self._started = time.monotonic()
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.alarm(self.timeout)
        super().startTest(test)

    def stopTest(self, test):
        signal.alarm(0)
        # A test that failed half-way may leave a child behind (a Manager's server): it
        # would keep multiprocessing's resource tracker, and so the module's cleanup,
        # waiting for ever.
        for child in multiprocessing.active_children():
            child.terminate()
            child.join(5)
        super().stopTest(test)

    @staticmethod
    def _on_alarm(signum, frame):
        raise _Timeout(f"the test ran longer than {Result.timeout} s")

    def _note(self, test, kind, err=None):
        reason = ""
        if err is not None:
            exc_type, exc, tb = err
            reason = "".join(traceback.format_exception_only(exc_type, exc)).strip().splitlines()[-1]
        self.outcomes[test.id()] = {"outcome": kind, "reason": reason,
                                    "seconds": round(time.monotonic() - self._started, 2)}

    def addSuccess(self, test):
        super().addSuccess(test)
        self._note(test, "pass")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._note(test, "fail", err)

    def addError(self, test, err):
        super().addError(test, err)
        self._note(test, "error", err)

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self.outcomes[test.id()] = {"outcome": "skip", "reason": reason, "seconds": 0}

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._note(test, "pass")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._note(test, "fail")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only tests whose id contains one of these")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--json", help="write the per-test outcomes to this file")
    parser.add_argument("--suite", help="the test_concurrent_futures package directory")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per test")
    parser.add_argument("--all-start-methods", action="store_true")
    args = parser.parse_args(argv)

    directory = args.suite or find_suite()
    if directory is None:
        print("no installed test_concurrent_futures package found; pass --suite DIR", file=sys.stderr)
        return 2
    try:
        modules = load_suite(directory)
    except Exception:  # noqa: BLE001
        print(f"cannot load the suite at {directory}:", file=sys.stderr)
        traceback.print_exc()
        return 2
    suite = process_pool_tests(modules, args.all_start_methods, args.names)
    print(f"CPython's suite from {directory}: {suite.countTestCases()} process-pool tests, "
          f"executor = skate.futures.ProcessPoolExecutor", flush=True)

    Result.timeout = args.timeout
    runner = unittest.TextTestRunner(verbosity=2 if args.verbose else 1, resultclass=Result,
                                     stream=sys.stdout)
    result = runner.run(suite)
    outcomes = result.outcomes
    counts = {k: sum(1 for o in outcomes.values() if o["outcome"] == k)
              for k in ("pass", "fail", "error", "skip")}
    print("\n" + ", ".join(f"{k}: {v}" for k, v in counts.items()), flush=True)
    for test_id, o in sorted(outcomes.items()):
        if o["outcome"] in ("fail", "error"):
            print(f"  {o['outcome'].upper():5s} {test_id.replace(PACKAGE + '.', '')}: {o['reason'][:200]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"suite": directory, "counts": counts, "tests": outcomes}, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
