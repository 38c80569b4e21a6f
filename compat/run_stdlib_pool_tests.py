"""Runs the standard library's own Pool tests against ``skate.multiprocessing.Pool``.

Loads the installed ``test._test_multiprocessing`` (nothing is copied into this
repository), takes its Pool test classes and runs them with skate's Pool in place of the
standard library's:

- ``_TestPool`` calls ``self.Pool(...)``: it is mixed with the suite's own
  ``ProcessesMixin`` (the attributes its tests expect) whose ``Pool`` is skate's;
- ``_TestPoolWorkerErrors``, ``_TestPoolWorkerLifetime`` and
  ``TestInitializers.test_pool_initializer`` call ``multiprocessing.Pool(...)`` by name:
  the module's ``multiprocessing`` global is swapped for a stand-in that is the real
  package except that its ``Pool`` is skate's.

Two tests hand the pool a classmethod of their test class (``p.apply(self._test_traceback)``),
so workers must find the concrete test classes by name, as the standard library's spawned
children do by importing the test module again: the classes live in this module, and the
embedded cluster's workers get this directory on their ``PYTHONPATH`` (with a cluster named
by ``SKATE_ADDRESS`` those two tests fail to pickle the class instead).

Prints a line per test, then the pass/fail/error/skip counts and each failure's reason.
The embedded default cluster is used unless ``SKATE_ADDRESS`` names one.

    python compat/run_stdlib_pool_tests.py [-v] [test name substring ...]

Exit status: 0 when the run finished (failures are expected and documented in
docs/compat-multiprocessing.md), 2 when the suite cannot be loaded.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import types
import unittest

import skate
import skate.multiprocessing

# Tests that cannot exercise skate's Pool, with the reason (reported as skipped).
NOT_APPLICABLE = {
    "test_worker_finalization_via_atexit_handler_of_multiprocessing":
        "runs `from multiprocessing import Pool` in a child interpreter: it tests the "
        "standard library's Pool, not skate's",
}


class _MultiprocessingWithSkatePool(types.ModuleType):
    """The real ``multiprocessing`` package, but ``Pool`` is skate's."""

    Pool = staticmethod(skate.multiprocessing.Pool)

    def __getattr__(self, name):
        return getattr(multiprocessing, name)


def _make_classes() -> list:
    """The concrete test classes, as module globals (workers import them by name)."""
    try:
        import test._test_multiprocessing as tm
    except (ImportError, unittest.SkipTest):
        return []

    class SkatePoolMixin(tm.ProcessesMixin):
        Pool = staticmethod(skate.multiprocessing.Pool)

    classes = []
    for name in ("_TestPool", "_TestPoolWorkerErrors", "_TestPoolWorkerLifetime"):
        base = getattr(tm, name, None)
        if base is None:
            continue
        cls = type("WithSkate" + name[1:], (base, SkatePoolMixin, unittest.TestCase), {})
        cls.__module__ = _MODULE
        globals()[cls.__name__] = cls
        classes.append(cls)
    return classes


_MODULE = "run_stdlib_pool_tests"
CLASSES = _make_classes()


def load_suite(tm, selectors: list[str]) -> unittest.TestSuite:
    tm.multiprocessing = _MultiprocessingWithSkatePool("multiprocessing")
    classes = CLASSES
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for cls in classes:
        suite.addTests(loader.loadTestsFromTestCase(cls))
    if hasattr(tm, "TestInitializers"):
        suite.addTest(tm.TestInitializers("test_pool_initializer"))

    def wanted(test) -> bool:
        return not selectors or any(s in test.id() for s in selectors)

    out = unittest.TestSuite()
    for test in _flatten(suite):
        if not wanted(test):
            continue
        method = test._testMethodName
        if method in NOT_APPLICABLE:
            setattr(test, method, unittest.skip(NOT_APPLICABLE[method])(getattr(test, method)))
        out.addTest(test)
    return out


def _flatten(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from _flatten(t)
        else:
            yield t


def _reason(trace: str) -> str:
    lines = [ln for ln in trace.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "?"


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    # Workers import this module by name (see the module docstring).
    sys.modules.setdefault(_MODULE, sys.modules[__name__])
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    selectors = [a for a in argv if not a.startswith("-")]
    try:
        import test._test_multiprocessing as tm
    except (ImportError, unittest.SkipTest) as e:
        print(f"cannot load the standard library's multiprocessing tests: {e!r}")
        return 2
    suite = load_suite(tm, selectors)
    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=2 if verbose else 1)
    result = runner.run(suite)

    total = result.testsRun
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = total - failed - skipped - len(result.expectedFailures)
    print()
    print(f"stdlib Pool tests on skate.multiprocessing.Pool: {total} run, {passed} passed, "
          f"{len(result.failures)} failed, {len(result.errors)} errors, {skipped} skipped")
    for kind, items in (("FAIL", result.failures), ("ERROR", result.errors)):
        for test, trace in items:
            print(f"  {kind} {test.id().rsplit('.', 2)[-2:][0]}.{test._testMethodName}: {_reason(trace)}")
    for test, why in result.skipped:
        print(f"  SKIP {test._testMethodName}: {why}")
    if skate.is_initialized():
        skate.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
