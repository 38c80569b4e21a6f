"""``skate.multiprocessing.Pool``: the standard library's Pool, run on skate.

What these tests promise:

- Every method (``apply``, ``apply_async``, ``map``, ``map_async``, ``imap``,
  ``imap_unordered``, ``starmap``, ``starmap_async``, ``close``, ``terminate``, ``join``,
  the context manager) gives what ``multiprocessing.Pool`` gives, run side by side in the
  same test: the same results in the same order, the same exception types and arguments
  (with the remote traceback as ``__cause__``), the same callbacks and error callbacks,
  the same ``AsyncResult`` states and ``multiprocessing.TimeoutError``, the same errors
  for misuse (``ValueError: Pool not running`` ...), the same ``map`` chunk size.
- At most ``processes`` tasks of a pool run at once.
- ``initializer`` runs once in each worker process the pool uses, and what it sets in
  module globals is seen by the tasks, even for functions defined in ``__main__``;
  ``maxtasksperchild=1`` gives a new process per task.
- A pool in another program runs on the cluster named by ``Pool(address=...)`` or by
  ``SKATE_ADDRESS``, with no code change.
- Where the standard library breaks, skate does better: a worker killed mid-task
  (``os._exit``) is retried and the pool keeps working, or the task fails with
  ``WorkerCrashedError`` after its retries, failing only itself; lambdas work; a
  callback that raises does not break the pool; a task may use a pool of its own.

The standard library's pools use the ``forkserver`` context here: forking this
multi-threaded process (skate's I/O and callback threads) would be unsafe.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import multiprocessing.pool
import os
import pickle
import threading
import time
import uuid

import numpy as np
import pytest

import skate
import skate.multiprocessing as smp
from skate._private import runtime
from skate.exceptions import WorkerCrashedError
from skate_harness import describe, run_driver

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("skate_cluster")]

STD = multiprocessing.get_context("forkserver")


# --- functions the pools run (module level: the standard library pickles them by name) ---
def sqr(x):
    return x * x


def mul(x, y):
    return x * y


def fail_on(x, bad=3):
    if x == bad:
        raise ValueError("bad item", x)
    return x * 10


def raise_key_error():
    raise KeyError("key")


def kwargs_echo(a, b=2, *, c=3):
    return (a, b, c)


def wait_for_file(path, value=None):
    """Blocks until ``path`` exists: the tests' way to hold a task running."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def sleep_then(x, seconds=0.05):
    time.sleep(seconds)
    return x


def getpid(_x=None):
    return os.getpid()


def count_running(directory, x):
    """How many tasks run at this moment (itself included), seen through marker files."""
    mark = os.path.join(directory, f"{os.getpid()}-{uuid.uuid4().hex}")
    open(mark, "w").close()
    try:
        seen = len(os.listdir(directory))
        time.sleep(0.05)
        return max(seen, len(os.listdir(directory)))
    finally:
        os.unlink(mark)


def exit_first_time(marker, value):
    """Kills its worker the first time it runs (``marker`` records that it did)."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return value


def exit_on(x, bad=2):
    if x == bad:
        os._exit(1)
    return x


def return_lock():
    return threading.Lock()


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")


_initialized_with = None
_initializer_calls = 0


def remember(value):
    global _initialized_with, _initializer_calls
    _initialized_with = value
    _initializer_calls += 1


def read_initialized(_x):
    return (os.getpid(), _initialized_with, _initializer_calls)


def exceptions_raising(n, when):
    for i in range(n):
        if i == when:
            raise OSError("the input broke", i)
        yield i


# --- helpers ---------------------------------------------------------------------------
def both(processes=2, **kwargs):
    """A standard library pool and a skate pool with the same arguments."""
    return STD.Pool(processes, **kwargs), smp.Pool(processes, **kwargs)


def close_all(*pools):
    for p in pools:
        p.terminate()
        p.join()


def outcome(fn, *args, **kwargs):
    """What a call gave: ("ok", value) or ("raised", type, args)."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as e:  # noqa: BLE001
        return ("raised", type(e), e.args)


def drain(it):
    """Every outcome of an imap iterator, exceptions included, until it ends."""
    seen = []
    while True:
        try:
            seen.append(("ok", next(it)))
        except StopIteration:
            return seen
        except Exception as e:  # noqa: BLE001
            seen.append(("raised", type(e), e.args))


@pytest.fixture
def pools():
    made = []

    def make(processes=2, **kwargs):
        pair = both(processes, **kwargs)
        made.extend(pair)
        return pair
    yield make
    close_all(*made)


# --- apply ------------------------------------------------------------------------------
def test_apply_returns_the_value_and_raises_the_original_exception(pools):
    for p in pools():
        assert p.apply(sqr, (7,)) == 49
        assert p.apply(kwargs_echo, (1,), {"c": 9}) == (1, 2, 9)
        with pytest.raises(KeyError) as info:
            p.apply(raise_key_error)
        assert type(info.value) is KeyError and info.value.args == ("key",)
        cause = info.value.__cause__
        assert type(cause) is multiprocessing.pool.RemoteTraceback
        assert 'raise KeyError("key")' in cause.tb


def test_apply_async_states_and_timeout_error_are_the_standard_librarys(pools, tmp_path):
    for i, p in enumerate(pools()):
        gate = str(tmp_path / f"gate{i}")
        r = p.apply_async(wait_for_file, (gate, "done"))
        assert isinstance(r, multiprocessing.pool.AsyncResult)
        assert not r.ready()
        with pytest.raises(ValueError, match="not ready"):
            r.successful()
        with pytest.raises(multiprocessing.TimeoutError):
            r.get(timeout=0.05)
        assert r.wait(0.01) is None
        open(gate, "w").close()
        assert r.get(timeout=60) == "done"
        assert r.ready() and r.successful()
        bad = p.apply_async(raise_key_error)
        bad.wait(60)
        assert bad.ready() and not bad.successful()


def test_apply_async_callbacks_get_the_value_or_the_exception(pools):
    seen = {}
    for p in pools():
        values, errors = [], []
        ok = p.apply_async(sqr, (4,), callback=values.append, error_callback=errors.append)
        bad = p.apply_async(fail_on, (3,), callback=values.append, error_callback=errors.append)
        assert ok.get(60) == 16
        with pytest.raises(ValueError):
            bad.get(60)
        seen[type(p).__module__] = (values, [(type(e), e.args) for e in errors])
    std, sk = seen.values()
    assert std == sk == ([16], [(ValueError, ("bad item", 3))])


# --- map / starmap ----------------------------------------------------------------------
@pytest.mark.parametrize("chunksize", [None, 1, 7, 1000])
def test_map_gives_the_same_list_as_the_standard_library(pools, chunksize):
    std, sk = pools()
    data = list(range(103))
    assert sk.map(sqr, data, chunksize) == std.map(sqr, data, chunksize) == [x * x for x in data]
    assert sk.map(sqr, (x for x in data), chunksize) == std.map(sqr, iter(data), chunksize)
    assert sk.map(sqr, range(3, 250, 2), chunksize) == std.map(sqr, range(3, 250, 2), chunksize)
    assert sk.map(sqr, []) == std.map(sqr, []) == []


def test_map_chunksize_is_computed_like_the_standard_librarys(pools):
    for processes in (1, 3):
        std, sk = pools(processes)
        for n in (0, 1, 5, 12, 13, 100, 1001):
            a, b = std.map_async(sqr, range(n)), sk.map_async(sqr, range(n))
            assert a._chunksize == b._chunksize
            assert a.get(60) == b.get(60)
        # chunksize=0 on a non-empty input: the standard library returns Nones; so do we
        assert sk.map(sqr, [1, 2], 0) == std.map(sqr, [1, 2], 0)


def test_map_with_a_failing_item_raises_its_exception_and_calls_error_callback(pools):
    seen = []
    for p in pools():
        assert outcome(p.map, fail_on, range(10), 2) == ("raised", ValueError, ("bad item", 3))
        values, errors = [], []
        r = p.map_async(fail_on, range(10), 2, callback=values.append, error_callback=errors.append)
        r.wait(60)
        assert not r.successful()
        seen.append((values, [(type(e), e.args) for e in errors]))
    assert seen[0] == seen[1] == ([], [(ValueError, ("bad item", 3))])


def test_map_async_callback_gets_the_whole_list(pools):
    seen = []
    for p in pools():
        got = []
        assert p.map_async(sqr, range(20), callback=got.append).get(60) == [x * x for x in range(20)]
        seen.append(got)
    assert seen[0] == seen[1] == [[x * x for x in range(20)]]


def test_map_of_an_iterable_that_raises(pools):
    for p in pools():
        # no len(): listed at once, in the caller
        assert outcome(p.map, sqr, exceptions_raising(10, 4)) == ("raised", OSError, ("the input broke", 4))


def test_map_with_an_unpicklable_argument_fails_with_the_pickling_error(pools):
    for p in pools():
        assert outcome(p.map, sqr, [1, Unpicklable(), 3], 1) == ("raised", RuntimeError, ("cannot pickle",))
        assert p.map(sqr, [1, 2, 3]) == [1, 4, 9]       # and the pool still works


def test_an_unpicklable_result_is_maybe_encoding_error_like_the_standard_librarys(pools):
    for p in pools():
        with pytest.raises(multiprocessing.pool.MaybeEncodingError) as info:
            p.apply(return_lock)
        assert "Error sending result" in str(info.value)
        assert p.apply(sqr, (3,)) == 9


@pytest.mark.parametrize("chunksize", [None, 1, 4])
def test_starmap_and_starmap_async_match_the_standard_library(pools, chunksize):
    std, sk = pools()
    pairs = list(zip(range(30), range(30, 0, -1)))
    expected = list(itertools.starmap(mul, pairs))
    assert sk.starmap(mul, pairs, chunksize) == std.starmap(mul, pairs, chunksize) == expected
    assert sk.starmap_async(mul, pairs, chunksize).get(60) == expected
    bad = [(1, 2), (3, "x", "too many")]
    assert outcome(sk.starmap, mul, bad) == outcome(std.starmap, mul, bad)
    assert outcome(sk.starmap, mul, range(3)) == outcome(std.starmap, mul, range(3))


# --- imap / imap_unordered ----------------------------------------------------------------
@pytest.mark.parametrize("chunksize", [1, 3])
def test_imap_yields_in_order_and_keeps_going_after_a_failing_item_like_the_stdlib(pools, chunksize):
    std, sk = pools()
    assert list(sk.imap(sqr, range(50), chunksize)) == list(std.imap(sqr, range(50), chunksize))
    assert drain(sk.imap(fail_on, range(8), chunksize)) == drain(std.imap(fail_on, range(8), chunksize))
    assert drain(sk.imap(sqr, exceptions_raising(9, 5), chunksize)) == \
        drain(std.imap(sqr, exceptions_raising(9, 5), chunksize))
    assert list(sk.imap(sqr, [], chunksize)) == list(std.imap(sqr, [], chunksize)) == []


@pytest.mark.parametrize("chunksize", [1, 5])
def test_imap_unordered_yields_every_result(pools, chunksize):
    std, sk = pools()
    assert sorted(sk.imap_unordered(sqr, range(60), chunksize)) == \
        sorted(std.imap_unordered(sqr, range(60), chunksize)) == [x * x for x in range(60)]
    a, b = drain(sk.imap_unordered(fail_on, range(8))), drain(std.imap_unordered(fail_on, range(8)))
    assert sorted(map(repr, a)) == sorted(map(repr, b))


def test_imap_next_with_timeout_raises_timeout_error_then_continues(pools, tmp_path):
    for i, p in enumerate(pools()):
        gate = str(tmp_path / f"gate{i}")
        it = p.imap(wait_for_file, [gate])
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=0.05)
        open(gate, "w").close()
        assert it.next(timeout=60) is None
        with pytest.raises(StopIteration):
            it.next(timeout=60)


def test_imap_of_an_endless_generator_yields_its_first_results(pools):
    for p in pools():
        it = p.imap(sqr, itertools.count())
        assert [next(it) for _ in range(10)] == [x * x for x in range(10)]


def test_imap_with_a_chunksize_below_one_is_a_value_error_like_the_stdlib(pools):
    for p in pools():
        assert outcome(p.imap, sqr, [1], 0) == ("raised", ValueError, ("Chunksize must be 1+, not 0",))
        assert outcome(p.imap_unordered, sqr, [1], -1) == ("raised", ValueError, ("Chunksize must be 1+, not -1",))


# --- misuse -------------------------------------------------------------------------------
def misuse_outcomes(make_pool):
    seen = [outcome(make_pool, 0), outcome(make_pool, -1), outcome(make_pool, 1, initializer=1)]
    for bad in (0, -1, 0.5, "12"):
        seen.append(outcome(make_pool, 1, maxtasksperchild=bad))
    p = make_pool(1)
    seen.append(outcome(p.join))                       # still running
    seen.append(outcome(pickle.dumps, p))
    p.close()
    for call in (lambda: p.apply(sqr, (1,)), lambda: p.apply_async(sqr, (1,)), lambda: p.map(sqr, [1]),
                 lambda: p.map_async(sqr, [1]), lambda: p.imap(sqr, [1]), lambda: p.imap_unordered(sqr, [1]),
                 lambda: p.starmap(mul, [(1, 2)]), lambda: p.starmap_async(mul, [(1, 2)])):
        seen.append(outcome(call))
    p.join()
    seen.append(outcome(p.__enter__))
    p.terminate()
    p.join()
    return seen


def test_misuse_raises_the_standard_librarys_errors():
    seen = misuse_outcomes(smp.Pool)
    assert seen == misuse_outcomes(STD.Pool)
    assert ("raised", ValueError, ("Pool not running",)) in seen
    assert ("raised", ValueError, ("Pool is still running",)) in seen


# --- close / terminate / join / context manager --------------------------------------------
def test_close_then_join_waits_for_all_submitted_work(pools):
    for p in pools():
        results = [p.apply_async(sleep_then, (i, 0.01)) for i in range(10)]
        m = p.map_async(sqr, range(100), 3)
        p.close()
        p.join()
        assert all(r.ready() for r in results) and m.ready()
        assert [r.get() for r in results] == list(range(10))
        assert m.get() == [x * x for x in range(100)]


def test_terminate_drops_pending_work_and_frees_the_cpus(tmp_path):
    never = str(tmp_path / "never")
    results = []
    for p in (STD.Pool(2), smp.Pool(2)):
        r = p.map_async(wait_for_file, [never] * 50, 1)
        p.terminate()
        p.join()
        results.append(r.ready())
        assert outcome(p.apply, sqr, (1,)) == ("raised", ValueError, ("Pool not running",))
    assert results == [False, False]       # never completed, as in the standard library
    # The tasks that were running were killed: a new pool gets both CPUs at once.
    with smp.Pool(2) as p:
        assert p.map(sqr, range(10), 1) == [x * x for x in range(10)]


def test_the_context_manager_terminates_on_exit(pools):
    states = []
    for p in pools():
        with p as entered:
            assert entered is p
            assert p.map(sqr, range(5)) == [0, 1, 4, 9, 16]
        states.append(outcome(p.map, sqr, [1]))
        p.join()
    assert states[0] == states[1] == ("raised", ValueError, ("Pool not running",))


def test_repr_names_the_state_and_size():
    p = smp.Pool(3)
    assert "state=RUN" in repr(p) and "pool_size=3" in repr(p)
    p.close()
    assert "state=CLOSE" in repr(p)
    p.join()


# --- how many run at once, processes, cpu_count ----------------------------------------------
@pytest.mark.parametrize("processes", [1, 2])
def test_at_most_processes_tasks_of_a_pool_run_at_once(tmp_path, processes):
    with smp.Pool(processes) as p:
        seen = p.starmap(count_running, [(str(tmp_path), i) for i in range(8)], 1)
    assert max(seen) <= processes


def test_cpu_count_and_the_default_processes_are_the_clusters_cpus():
    assert smp.cpu_count() == int(skate.cluster_resources()["CPU"]) == 2
    p = smp.Pool()
    assert "pool_size=2" in repr(p)
    p.terminate()
    p.join()


def test_the_names_users_import_next_to_pool():
    assert smp.TimeoutError is multiprocessing.TimeoutError
    assert smp.AsyncResult is multiprocessing.pool.AsyncResult
    assert smp.current_process is multiprocessing.current_process
    from skate.multiprocessing.pool import Pool
    assert Pool is smp.Pool


# --- initializer, maxtasksperchild ------------------------------------------------------------
def test_initializer_runs_once_per_worker_and_tasks_see_its_globals(pools):
    for p in pools(2, initializer=remember, initargs=("ready",)):
        seen = p.map(read_initialized, range(40), 1)
        assert {value for _pid, value, _calls in seen} == {"ready"}
        assert {calls for _pid, _value, calls in seen} == {1}


def test_an_initializer_that_raises_fails_the_tasks_instead_of_hanging():
    with smp.Pool(1, initializer=raise_key_error) as p:
        with pytest.raises(KeyError):
            p.apply(sqr, (2,))


def test_maxtasksperchild_1_gives_a_new_process_per_task(pools):
    std, sk = pools(2, maxtasksperchild=1)
    for p in (std, sk):
        pids = p.map(getpid, range(6), 1)
        assert len(set(pids)) == 6
    assert len(set(sk.map(getpid, range(4), 1)) | set(pids)) == 10


def test_maxtasksperchild_counts_tasks_not_batches():
    with smp.Pool(1, maxtasksperchild=3) as p:
        pids = list(p.imap(getpid, range(12)))   # tiny tasks: many go in one batch
    assert max(collections.Counter(pids).values()) <= 3
    assert len(set(pids)) >= 4


# --- where skate does better --------------------------------------------------------------
def test_a_worker_killed_mid_task_is_retried_and_the_pool_keeps_working(tmp_path):
    with smp.Pool(2) as p:
        assert p.apply(exit_first_time, (str(tmp_path / "died"), "second try")) == "second try"
        assert os.path.exists(tmp_path / "died")
        assert p.map(sqr, range(10)) == [x * x for x in range(10)]


def test_a_task_that_always_kills_its_worker_fails_alone_with_worker_crashed_error():
    with smp.Pool(2, max_retries=1) as p:
        with pytest.raises(WorkerCrashedError, match="exit_on"):
            p.apply(exit_on, (2,))
        seen = drain(p.imap(exit_on, range(6)))
        assert [s[0] for s in seen] == ["ok", "ok", "raised", "ok", "ok", "ok"]
        assert seen[2][1] is WorkerCrashedError
        assert p.map(sqr, range(10)) == [x * x for x in range(10)]


def test_lambdas_and_closures_work_where_the_standard_library_cannot_pickle_them():
    offset = 100
    with smp.Pool(2) as p:
        assert p.map(lambda x: x + offset, range(5)) == [100, 101, 102, 103, 104]
        assert p.apply(lambda: "λ") == "λ"
    std = STD.Pool(1)
    try:
        with pytest.raises((pickle.PicklingError, AttributeError)):
            std.map(lambda x: x + offset, range(5))
    finally:
        close_all(std)


def test_a_callback_that_raises_is_reported_and_the_pool_carries_on(capfd):
    def broken(_value):
        raise RuntimeError("callback broke")
    with smp.Pool(2) as p:
        r = p.apply_async(sqr, (3,), callback=broken)
        assert r.get(60) == 9
        assert p.map(sqr, range(5)) == [0, 1, 4, 9, 16]
    assert "callback broke" in capfd.readouterr().err


def map_in_a_pool_of_its_own(n):
    with smp.Pool(1) as p:
        return p.map(sqr, range(n))


def test_a_task_can_use_a_pool_of_its_own_even_when_every_cpu_waits_on_one():
    # Both CPUs are held by outer tasks; each waits for its inner pool, lending its CPU
    # (the standard library refuses: daemonic processes cannot have children).
    with smp.Pool(2) as p:
        assert p.map(map_in_a_pool_of_its_own, [3] * 4, 1) == [[0, 1, 4]] * 4


def test_numpy_arrays_travel_both_ways():
    arrays = [np.arange(i * 1000, dtype=np.float64) for i in range(1, 6)]
    with smp.Pool(2) as p:
        out = p.map(np.sum, arrays)
        doubled = p.starmap(np.multiply, [(a, 2) for a in arrays])
    assert out == [a.sum() for a in arrays]
    assert all(np.array_equal(d, a * 2) for d, a in zip(doubled, arrays))


# --- a pool left open when the program ends --------------------------------------------------
POOL_LEFT_OPEN = """
from skate.multiprocessing import Pool
problem = None
class A:
    def __init__(self):
        self.pool = Pool(processes=1)
def test():
    global problem
    problem = A()
    problem.pool.map(float, tuple(range(10)))
if __name__ == "__main__":
    test()
    print("DONE", flush=True)
"""


def test_a_pool_never_closed_does_not_hang_the_program_at_exit(tmp_path):
    # The standard library's bpo-38744/bpo-39360 test, with skate's Pool.
    proc = run_driver(tmp_path, POOL_LEFT_OPEN)
    assert proc.returncode == 0 and "DONE" in proc.stdout, describe(proc)


# --- scaling out: another program's pool on this cluster --------------------------------------
POOL_DRIVER = """
import os, skate
from skate._private import runtime
from skate.multiprocessing import Pool, cpu_count

def node_of(x):
    return skate.get_runtime_context().get_node_id()

with Pool(2{address_kwarg}) as p:
    nodes = set(p.map(node_of, range(8), 1))
    squares = p.map(lambda x: x * x, range(5))
print("POOL", runtime.info()["embedded"], cpu_count(), sorted(nodes), squares, flush=True)
"""


@pytest.mark.parametrize("how", ["address", "SKATE_ADDRESS"])
def test_a_pool_in_another_program_runs_on_the_cluster_it_is_pointed_at(skate_cluster, tmp_path,
                                                                        monkeypatch, how):
    address = skate_cluster.gcs_address
    # The cluster's token, as `skate start --head` users pass it (another test's program
    # may have replaced the "latest cluster" file that would otherwise supply it).
    monkeypatch.setenv("SKATE_TOKEN", runtime.info()["token"])
    if how == "address":
        source = POOL_DRIVER.format(address_kwarg=f", address={address!r}")
    else:
        source = POOL_DRIVER.format(address_kwarg="")
        monkeypatch.setenv("SKATE_ADDRESS", address)
    proc = run_driver(tmp_path, source)
    assert proc.returncode == 0, describe(proc)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("POOL"))
    node = skate.get_runtime_context().get_node_id()
    assert line == f"POOL False 2 {[node]} [0, 1, 4, 9, 16]"
