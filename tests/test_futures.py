"""skate.futures: CPython's ProcessPoolExecutor, running its calls as skate tasks.

What these tests promise:

- ``skate.futures.ProcessPoolExecutor`` (also ``Executor``) is a ``concurrent.futures.Executor``
  with CPython's constructor, and rejects bad arguments with CPython's errors.
- Where users can see it, it behaves as CPython's executor, run in the same test:
  results and the exceptions ``result()`` raises (original type, remote traceback as the
  cause); ``map`` with a failing item, with chunks, with a timeout; ``cancel()`` of calls
  that have not started; ``shutdown(cancel_futures=True)``; submit after shutdown; a
  crashed worker with ``max_retries=0`` (``BrokenProcessPool``); a failing initializer.
- Its futures work with ``concurrent.futures.wait`` and ``as_completed``, and their
  done-callbacks run once.
- ``map`` reads its input lazily: an endless input does not keep it from returning.
- ``initializer`` runs once in each worker the executor uses, and the globals it sets are
  seen by the calls (also for functions of ``__main__``); ``max_tasks_per_child=1`` gives
  each call a fresh process; ``max_workers=1`` never runs two calls at once.
- Better than CPython: lambdas, closures and ``__main__`` functions work; a worker killed
  mid-call has its call retried; when retries are spent the call fails with
  ``WorkerCrashedError`` (also a ``BrokenProcessPool``) and the executor keeps working.
- A driver that exits without ``shutdown()`` still runs what it submitted (as CPython);
  ``address=`` / ``SKATE_ADDRESS`` join a running cluster.

CPython's executor runs with the "forkserver" start method: this process has skate's
threads, and forking it would copy them half-way.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import itertools
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from functools import partial

import numpy as np
import pytest

import skate
import skate.futures as sf
from skate._private import runtime
from skate_harness import describe, run_driver, session_segments, wait_for

pytestmark = pytest.mark.timeout(120)

WAIT = 60          # seconds: a wait this long means a hang
CTX = multiprocessing.get_context("forkserver")


@pytest.fixture(scope="module", autouse=True)
def cluster(clusters):
    """``skate.init(num_cpus=2)`` for the module; shut down (and checked for leaks) at its end."""
    info = clusters.start("shared", num_cpus=2)
    yield info
    clusters.stop()


def cpython(**kwargs):
    return cf.ProcessPoolExecutor(mp_context=CTX, **kwargs)


def on_skate(**kwargs):
    return sf.ProcessPoolExecutor(**kwargs)


def on_both(scenario, *args, skate_kwargs=None):
    """Runs ``scenario(make_executor, *args)`` with CPython's executor and with skate's;
    both must give the same outcome, which is returned."""
    expected = scenario(cpython, *args)
    got = scenario(partial(on_skate, **(skate_kwargs or {})), *args)
    assert got == expected
    return got


# --- what the calls run ---------------------------------------------------------------

class CustomError(Exception):
    pass


def identity(x):
    return x


def square(x):
    return x * x


def add(a, b=0, *, c=0):
    return a + b + c


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def raise_(exc):
    raise exc


def touch(path):
    with open(path, "w"):
        pass


def wait_for_file(path, value=None, limit=WAIT):
    """Blocks until ``path`` exists (how a test holds a call running)."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.01)
    return value


def block(started, release, value):
    touch(started)
    return wait_for_file(release, value)


def crash_once(marker, value):
    if not os.path.exists(marker):
        touch(marker)
        os._exit(1)
    return value


def crash():
    os._exit(1)


def pid_of(_=None):
    return os.getpid()


def unpicklable_result():
    return threading.Lock()


def big_array(n):
    return np.arange(n, dtype=np.int64)


_INIT_STATE = None


def record_init(directory, tag):
    global _INIT_STATE
    _INIT_STATE = tag
    with open(os.path.join(directory, str(os.getpid())), "a") as f:
        f.write("init\n")


def tag_and_pid(_):
    return _INIT_STATE, os.getpid()


def failing_init():
    raise CustomError("initializer failed")


def exclusive(directory, i):
    """Fails if another call of this executor is inside at the same time."""
    busy = os.path.join(directory, "busy")
    fd = os.open(busy, os.O_CREAT | os.O_EXCL | os.O_WRONLY)   # FileExistsError if busy
    try:
        time.sleep(0.02)
    finally:
        os.close(fd)
        os.unlink(busy)
    return i


def outcome(f):
    """What a finished future shows: its result, what it raised, or that it was cancelled."""
    if f.cancelled():
        return ("cancelled",)
    exc = f.exception(timeout=WAIT)
    if exc is None:
        return ("result", f.result())
    return ("raised", type(exc), exc.args)


def iterate(it):
    """What an iterator yields, then what ended it: None, or (exception type, args)."""
    got = []
    try:
        for x in it:
            got.append(x)
    except Exception as e:  # noqa: BLE001
        return got, (type(e), e.args)
    return got, None


# --- the API ------------------------------------------------------------------------------

def test_it_is_a_concurrent_futures_executor_with_cpythons_constructor():
    assert sf.Executor is sf.ProcessPoolExecutor
    assert issubclass(sf.ProcessPoolExecutor, cf.Executor)
    theirs = list(inspect.signature(cf.ProcessPoolExecutor).parameters)
    ours = list(inspect.signature(sf.ProcessPoolExecutor).parameters)
    assert ours[:len(theirs)] == theirs
    assert ours[len(theirs):] == ["address", "max_retries"]
    with sf.ProcessPoolExecutor(2) as ex:
        f = ex.submit(add, 1, 2, c=3)
        assert isinstance(f, cf.Future)
        assert f.result(timeout=WAIT) == 6
        assert ex._max_workers == 2


def test_max_workers_defaults_to_the_clusters_cpus():
    with sf.ProcessPoolExecutor() as ex:
        assert ex.submit(square, 3).result(timeout=WAIT) == 9
        assert ex._max_workers == 2


@pytest.mark.parametrize("kwargs", [
    dict(max_workers=0), dict(max_workers=-1), dict(initializer=5),
    dict(max_tasks_per_child=0), dict(max_tasks_per_child=1.5), dict(max_tasks_per_child="2"),
])
def test_bad_constructor_arguments_raise_cpythons_errors(kwargs):
    def error(make):
        with pytest.raises(Exception) as info:
            make(**kwargs)
        return type(info.value), str(info.value)
    assert error(sf.ProcessPoolExecutor) == error(cf.ProcessPoolExecutor)


@pytest.mark.parametrize("bad", [-2, 1.5, "3", True])
def test_a_bad_max_retries_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="max_retries"):
        sf.ProcessPoolExecutor(max_retries=bad)


# --- results and exceptions, as CPython's ----------------------------------------------

def _results_and_exceptions(make):
    with make(max_workers=2) as ex:
        fs = [ex.submit(square, 7), ex.submit(add, 1, b=2, c=3), ex.submit(identity, None),
              ex.submit(identity, ValueError("returned, not raised")),
              ex.submit(raise_, ValueError("v")), ex.submit(raise_, KeyError("k")),
              ex.submit(raise_, CustomError("c", 2)), ex.submit(raise_, SystemExit(3)),
              ex.submit(raise_, KeyboardInterrupt())]
        out = []
        for f in fs:
            o = outcome(f)
            if o[0] == "result" and isinstance(o[1], BaseException):
                o = ("result", type(o[1]), o[1].args)
            out.append(o)
        return out


def test_results_and_raised_exceptions_are_cpythons():
    got = on_both(_results_and_exceptions)
    assert got[4] == ("raised", ValueError, ("v",))
    assert got[6] == ("raised", CustomError, ("c", 2))


def _remote_traceback(make):
    with make(max_workers=1) as ex:
        exc = ex.submit(fail_on, 3, 3).exception(timeout=WAIT)
    cause = exc.__cause__
    return type(exc), type(cause), "fail_on" in str(cause), 'raise ValueError(f"bad item {x}")' in str(cause)


def test_the_exception_carries_the_remote_traceback_as_its_cause_as_in_cpython():
    assert on_both(_remote_traceback) == (ValueError, _RemoteTraceback, True, True)


def test_many_queued_calls_that_cannot_be_pickled_each_fail_alone(tmp_path):
    started, release = tmp_path / "started", tmp_path / "release"
    with sf.ProcessPoolExecutor(1) as ex:
        first = ex.submit(block, str(started), str(release), "first")
        assert wait_for(started.exists, timeout=WAIT)
        fs = [ex.submit(identity, threading.Lock()) for _ in range(3000)]   # queued behind it
        touch(release)
        assert first.result(timeout=WAIT) == "first"
        assert {type(f.exception(timeout=WAIT)) for f in fs} == {TypeError}
        assert ex.submit(square, 3).result(timeout=WAIT) == 9


def _unpicklable(make):
    with make(max_workers=1) as ex:
        arg = ex.submit(identity, threading.Lock()).exception(timeout=WAIT)
        result = ex.submit(unpicklable_result).exception(timeout=WAIT)
        after = ex.submit(square, 5).result(timeout=WAIT)   # the executor still works
    return type(arg), "cannot pickle" in str(arg), type(result), "cannot pickle" in str(result), after


def test_an_argument_or_result_that_cannot_be_pickled_fails_only_its_future():
    assert on_both(_unpicklable) == (TypeError, True, TypeError, True, 25)


def _array_result(make):
    with make(max_workers=1) as ex:
        small, large = ex.submit(big_array, 10).result(WAIT), ex.submit(big_array, 1_000_000).result(WAIT)
    small += 1
    large += 1   # results are the caller's own, writable arrays
    return small.tolist(), int(large.sum()), small.flags.writeable, large.flags.writeable


def test_array_results_are_writable_copies_as_in_cpython():
    on_both(_array_result)


def test_large_results_leave_nothing_in_skates_store_once_their_futures_have_them(cluster):
    with sf.ProcessPoolExecutor(2) as ex:
        fs = [ex.submit(big_array, 2_000_000) for _ in range(8)]     # 16 MB each: shared memory
        seen = set()
        for f in fs:
            seen.update(session_segments(cluster.session))
            assert f.result(timeout=WAIT)[-1] == 1_999_999
        seen.update(session_segments(cluster.session))
        assert seen, "the results never went through shared memory"
        # The futures are alive, their values are copies: the segments of the results go.
        assert wait_for(lambda: not seen & set(session_segments(cluster.session)), timeout=WAIT)


def put_into(queue, x):
    queue.put(x * x)
    return x


def _manager_proxies(make):
    with multiprocessing.Manager() as manager:
        queue, shared = manager.Queue(), manager.dict()
        with make(max_workers=2) as ex:
            returned = list(ex.map(put_into, itertools.repeat(queue), range(6)))
            ex.submit(shared.__setitem__, "key", "value").result(timeout=WAIT)
        return returned, sorted(queue.get(timeout=WAIT) for _ in range(6)), dict(shared)


def test_manager_proxies_passed_as_arguments_reach_their_manager_as_in_cpython():
    # CPython's workers inherit the driver's authkey; skate's get it with the call.
    assert on_both(_manager_proxies) == ([0, 1, 2, 3, 4, 5], [0, 1, 4, 9, 16, 25], {"key": "value"})


# --- map ----------------------------------------------------------------------------------

def _map_in_order(make):
    with make(max_workers=2) as ex:
        return (list(ex.map(square, range(50))),
                list(ex.map(add, range(20), range(100, 117), chunksize=3)),   # zip: shortest wins
                list(ex.map(square, [], chunksize=5)),
                list(ex.map(square, iter(range(31)), chunksize=7)))


def test_map_gives_results_in_input_order_with_and_without_chunks():
    got = on_both(_map_in_order)
    assert got[0] == [x * x for x in range(50)]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_with_a_failing_item_stops_where_cpythons_stops(chunksize):
    def scenario(make):
        with make(max_workers=2) as ex:
            it = ex.map(fail_on, range(10), itertools.repeat(4), chunksize=chunksize)
            return iterate(it), list(it)    # a map that raised is over
    got = on_both(scenario)
    assert got[0][1] == (ValueError, ("bad item 4",))


def test_map_rejects_a_chunksize_below_one_as_cpython():
    def scenario(make):
        with make(max_workers=1) as ex:
            with pytest.raises(ValueError) as info:
                ex.map(square, range(3), chunksize=0)
            return str(info.value)
    on_both(scenario)


def test_map_with_a_timeout_raises_timeout_error_and_cancels_the_rest(tmp_path):
    def scenario(make):
        release = tmp_path / f"release-{time.monotonic_ns()}"
        with make(max_workers=1) as ex:
            it = ex.map(wait_for_file, [str(release)] * 6, timeout=0.3)
            ended = iterate(it)
            touch(release)
            return ended, list(it)     # a map that timed out is over
    assert on_both(scenario) == (([], (TimeoutError, ())), [])


def test_map_reads_an_endless_input_lazily(tmp_path):
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield i

    release = tmp_path / "release"
    with sf.ProcessPoolExecutor(2) as ex:
        it = ex.map(wait_for_file, itertools.repeat(str(release)), endless())
        # The calls cannot finish yet: what map() took is what fits the executor's queues.
        assert len(pulled) < 50
        touch(release)
        first = list(itertools.islice(it, 20))
        assert first == list(range(20))
        it.close()          # stops reading the input
        n = len(pulled)
        time.sleep(0.3)
        assert len(pulled) <= n + 1


def test_map_raises_an_error_of_its_input_at_its_place():
    def failing_input():
        yield from range(30)
        raise CustomError("input broke")

    with sf.ProcessPoolExecutor(2) as ex:
        got, ended = iterate(ex.map(square, failing_input()))
    assert got == [x * x for x in range(30)]
    assert ended == (CustomError, ("input broke",))


# --- cancel and shutdown ----------------------------------------------------------------

def _started_then_queued(make, tmp_path, then):
    """One call holds the only worker; eight more wait behind it; ``then(ex, queued)`` runs
    while they wait. Returns what each future shows at the end."""
    tag = f"{time.monotonic_ns()}"
    started, release = tmp_path / f"started-{tag}", tmp_path / f"release-{tag}"
    ex = make(max_workers=1)
    try:
        first = ex.submit(block, str(started), str(release), "first")
        assert wait_for(started.exists, timeout=WAIT)
        queued = [ex.submit(square, i) for i in range(8)]
        calls = []
        for f in [first] + queued:
            f.add_done_callback(calls.append)
        extra = then(ex, queued)
        touch(release)
        outcomes = [outcome(f) for f in [first] + queued]
    finally:
        ex.shutdown(wait=True)
    assert sorted(map(id, calls)) == sorted(map(id, [first] + queued))   # each callback ran once
    return outcomes, extra


def _check_prefix_then_cancelled(outcomes, flags):
    """CPython keeps up to 2 * max_workers + 1 calls in its call queue (RUNNING, not
    cancellable), how many depends on its threads' timing: so the first few may run or be
    cancelled, the first always runs, the rest are cancelled, in both executors."""
    assert outcomes[0] == ("result", "first")
    ran = [o != ("cancelled",) for o in outcomes[1:]]
    assert ran == sorted(ran, reverse=True)            # some ran, then all cancelled
    assert sum(ran) <= 2
    for i, o in enumerate(outcomes[1:]):
        assert o in (("result", i * i), ("cancelled",))
    if flags is not None:          # what cancel() returned: False for the calls that ran
        assert flags == [not r for r in ran]


def test_cancel_succeeds_for_calls_not_started_as_in_cpython(tmp_path):
    results = {}
    for name, make in (("cpython", cpython), ("skate", on_skate)):
        outcomes, flags = _started_then_queued(make, tmp_path, lambda ex, fs: [f.cancel() for f in fs])
        _check_prefix_then_cancelled(outcomes, flags)
        results[name] = outcomes[3:]
    assert results["skate"] == results["cpython"] == [("cancelled",)] * 6


def test_shutdown_with_cancel_futures_cancels_what_has_not_started_as_in_cpython(tmp_path):
    def shut(ex, fs):
        ex.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(RuntimeError) as info:
            ex.submit(square, 1)
        return str(info.value)

    results = {}
    for name, make in (("cpython", cpython), ("skate", on_skate)):
        outcomes, message = _started_then_queued(make, tmp_path, shut)
        _check_prefix_then_cancelled(outcomes, None)
        results[name] = outcomes[3:], message
    assert results["skate"] == results["cpython"]
    assert results["skate"][1] == "cannot schedule new futures after shutdown"


def _shutdown_waits(make):
    ex = make(max_workers=2)
    fs = [ex.submit(square, i) for i in range(30)]
    ex.shutdown(wait=True)
    done = [f.done() for f in fs]
    errors = []
    for call in (lambda: ex.submit(square, 1), lambda: ex.map(square, [1])):
        with pytest.raises(RuntimeError) as info:
            call()
        errors.append(str(info.value))
    ex.shutdown()   # again: nothing happens
    return all(done), [f.result() for f in fs], errors


def test_shutdown_waits_for_every_call_then_submit_and_map_raise_cpythons_error():
    on_both(_shutdown_waits)


# --- futures with wait / as_completed / callbacks -----------------------------------------

def test_futures_work_with_wait_and_as_completed(tmp_path):
    started, release = tmp_path / "started", tmp_path / "release"
    with sf.ProcessPoolExecutor(2) as ex:
        slow = ex.submit(block, str(started), str(release), "slow")
        fast = ex.submit(square, 3)
        done, not_done = cf.wait([slow, fast], timeout=WAIT, return_when=cf.FIRST_COMPLETED)
        assert fast in done and slow in not_done
        failing = ex.submit(fail_on, 1, 1)
        done, not_done = cf.wait([slow, failing], timeout=WAIT, return_when=cf.FIRST_EXCEPTION)
        assert done == {failing} and not_done == {slow}
        with pytest.raises(cf.TimeoutError):
            slow.result(timeout=0.1)
        seen = []
        with pytest.raises(cf.TimeoutError):
            for f in cf.as_completed([slow, fast], timeout=0.3):
                seen.append(f)
        assert seen == [fast]
        assert slow.running() and not slow.done()
        touch(release)
        assert {f.result() for f in cf.as_completed([slow, fast], timeout=WAIT)} == {"slow", 9}
        done, not_done = cf.wait([slow, fast, failing], timeout=WAIT)
        assert not not_done


def test_done_callbacks_run_once_with_the_future():
    calls = []
    with sf.ProcessPoolExecutor(2) as ex:
        fs = [ex.submit(square, i) for i in range(20)]
        for f in fs:
            f.add_done_callback(calls.append)
        cf.wait(fs, timeout=WAIT)
        late = []
        fs[0].add_done_callback(late.append)    # already done: runs at once
    assert wait_for(lambda: len(calls) == 20, timeout=WAIT)
    assert sorted(map(id, calls)) == sorted(map(id, fs))
    assert late == [fs[0]]


# --- initializer, max_tasks_per_child, max_workers ------------------------------------------

def test_the_initializer_runs_once_in_each_worker_and_its_globals_are_seen(tmp_path):
    with sf.ProcessPoolExecutor(2, initializer=record_init, initargs=(str(tmp_path), "ready")) as ex:
        got = list(ex.map(tag_and_pid, range(200))) + [ex.submit(tag_and_pid, i).result(WAIT) for i in range(20)]
    assert {tag for tag, _ in got} == {"ready"}
    task_pids = {pid for _, pid in got}
    init_pids = {int(p.name) for p in tmp_path.iterdir()}
    assert task_pids <= init_pids
    for p in tmp_path.iterdir():
        assert p.read_text() == "init\n", f"the initializer ran more than once in pid {p.name}"


def _failing_initializer(make):
    ex = make(max_workers=1, initializer=failing_init)
    try:
        first = outcome(ex.submit(square, 2))
        with pytest.raises(BrokenProcessPool) as info:
            ex.submit(square, 3)
        return first, str(info.value)
    finally:
        ex.shutdown(wait=True)


def test_a_failing_initializer_breaks_the_pool_as_in_cpython():
    first, message = on_both(_failing_initializer)
    assert first[:2] == ("raised", BrokenProcessPool)


def test_max_tasks_per_child_1_gives_each_call_a_fresh_worker():
    def scenario(make):
        with make(max_workers=1, max_tasks_per_child=1) as ex:
            pids = [ex.submit(pid_of).result(WAIT) for _ in range(4)] + list(ex.map(pid_of, range(4)))
        return len(set(pids))
    assert on_both(scenario) == 8


def test_max_workers_1_never_runs_two_calls_at_once(tmp_path):
    # On a 2-CPU cluster: without the bound two calls would overlap and one would fail.
    with sf.ProcessPoolExecutor(1) as ex:
        assert list(ex.map(exclusive, itertools.repeat(str(tmp_path)), range(12))) == list(range(12))
        fs = [ex.submit(exclusive, str(tmp_path), i) for i in range(12)]
        assert [f.result(WAIT) for f in fs] == list(range(12))


# --- beyond CPython: lambdas, crashes, nesting ----------------------------------------------

def nested(i):
    """A call that runs an executor of its own and waits on it."""
    inner = sf.ProcessPoolExecutor(2)
    try:
        firsts = [inner.submit(square, j).result(timeout=WAIT / 2) for j in range(3)]
        return sum(firsts) + sum(inner.map(square, [i], timeout=WAIT / 2))
    finally:
        inner.shutdown(wait=False, cancel_futures=True)    # a failure must not hang here


def test_calls_that_wait_on_an_executor_of_their_own_lend_their_cpu_and_finish():
    # Two outer calls hold both CPUs while they wait: their inner calls run on lent CPUs.
    ex = sf.ProcessPoolExecutor(2)
    try:
        assert list(ex.map(nested, range(4), timeout=WAIT)) == [5 + i * i for i in range(4)]
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def test_lambdas_and_closures_work_which_cpython_cannot_pickle():
    k = 10

    def closure(x):
        return x + k

    with sf.ProcessPoolExecutor(2) as ex:
        assert ex.submit(lambda x: x * 2, 21).result(timeout=WAIT) == 42
        assert list(ex.map(closure, range(5))) == [10, 11, 12, 13, 14]
        assert [ex.submit(closure, i).result(WAIT) for i in range(5)] == [10, 11, 12, 13, 14]
        assert list(ex.map(lambda a, b: a * b, range(4), range(4), chunksize=2)) == [0, 1, 4, 9]
    with cpython(max_workers=1) as ex:
        with pytest.raises(Exception):
            ex.submit(lambda x: x * 2, 21).result(timeout=WAIT)


def test_a_worker_killed_mid_call_is_retried_and_the_call_succeeds(tmp_path):
    marker = tmp_path / "crashed"
    with sf.ProcessPoolExecutor(2) as ex:
        assert ex.submit(crash_once, str(marker), "survived").result(timeout=WAIT) == "survived"
        assert marker.exists()
        assert ex.submit(square, 4).result(timeout=WAIT) == 16


def test_a_call_whose_retries_are_spent_fails_alone_and_names_the_crash():
    with sf.ProcessPoolExecutor(2, max_retries=1) as ex:
        exc = ex.submit(crash).exception(timeout=WAIT)
        assert isinstance(exc, sf.WorkerCrashedError)
        assert isinstance(exc, skate.exceptions.WorkerCrashedError)
        assert isinstance(exc, BrokenProcessPool)    # what CPython code catches
        assert "crash()" in str(exc) and "died" in str(exc)
        assert ex.submit(square, 5).result(timeout=WAIT) == 25    # the executor keeps working


def _crash_breaks_the_pool(make):
    ex = make(max_workers=1)
    try:
        crashed = ex.submit(crash)
        later = [ex.submit(square, i) for i in range(3)]
        outcomes = [outcome(f) for f in [crashed] + later]
        with pytest.raises(BrokenProcessPool) as info:
            ex.submit(square, 1)
        return outcomes, str(info.value)
    finally:
        ex.shutdown(wait=True)


def test_with_max_retries_0_a_crash_breaks_the_pool_as_in_cpython():
    outcomes, message = on_both(_crash_breaks_the_pool, skate_kwargs={"max_retries": 0})
    assert {o[:2] for o in outcomes} == {("raised", BrokenProcessPool)}
    assert message == "A child process terminated abruptly, the process pool is not usable anymore"


# --- drivers of their own -----------------------------------------------------------------------

def test_main_functions_work_and_exit_waits_for_submitted_calls(tmp_path):
    out = tmp_path / "written-at-exit"
    proc = run_driver(tmp_path, f"""
import os, time
import skate.futures as sf

model = None

def load(value):
    global model
    model = value

def predict(x):
    return model, x * x

def write_later(path):
    time.sleep(0.5)
    with open(path, "w") as f:
        f.write("done")

if __name__ == "__main__":
    with sf.ProcessPoolExecutor(2, initializer=load, initargs=("model",)) as ex:
        print(list(ex.map(predict, range(4))), ex.submit(lambda: "lambda").result())
    ex = sf.ProcessPoolExecutor(1)
    ex.submit(write_later, {str(out)!r})     # no shutdown(): exit still waits for it
""")
    assert proc.returncode == 0, describe(proc)
    assert "[('model', 0), ('model', 1), ('model', 4), ('model', 9)] lambda" in proc.stdout, describe(proc)
    assert out.read_text() == "done"


def test_address_and_skate_address_join_a_running_cluster(tmp_path, monkeypatch, cluster):
    address = cluster.gcs_address
    node_id = skate.get_runtime_context().get_node_id()
    source = """
import os, sys
import skate, skate.futures as sf

def node_of(_):
    return skate.get_runtime_context().get_node_id()

if __name__ == "__main__":
    kwargs = {"address": sys.argv[1]} if len(sys.argv) > 1 else {}
    with sf.ProcessPoolExecutor(2, **kwargs) as ex:
        print("nodes", set(ex.map(node_of, range(4))))
"""
    monkeypatch.setenv("SKATE_TOKEN", runtime.info()["token"])
    monkeypatch.setenv("SKATE_ADDRESS", address)
    proc = run_driver(tmp_path, source, name="by_env.py")
    assert proc.returncode == 0, describe(proc)
    assert f"nodes {{{node_id!r}}}" in proc.stdout, describe(proc)

    monkeypatch.delenv("SKATE_ADDRESS")
    path = tmp_path / "by_argument.py"
    path.write_text(source)
    proc = subprocess.run([sys.executable, str(path), address], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=WAIT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, describe(proc)
    assert f"nodes {{{node_id!r}}}" in proc.stdout, describe(proc)


def test_calls_fail_instead_of_hanging_when_skate_is_shut_down_under_the_executor(tmp_path):
    proc = run_driver(tmp_path, f"""
import skate, skate.futures as sf
from concurrent.futures.process import BrokenProcessPool

def wait_forever(path):
    import os, time
    while not os.path.exists(path):
        time.sleep(0.01)

if __name__ == "__main__":
    ex = sf.ProcessPoolExecutor(1)
    f = ex.submit(wait_forever, {str(tmp_path / "never")!r})
    skate.shutdown()
    ex.shutdown(wait=True)
    print("raised", type(f.exception(timeout=5)).__name__)
""")
    assert proc.returncode == 0, describe(proc)
    assert "raised BrokenProcessPool" in proc.stdout, describe(proc)
