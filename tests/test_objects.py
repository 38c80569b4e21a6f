"""Objects: put, get and wait, zero-copy reads, when objects are freed, and spilling.

What these tests promise:

- ``put``/``get`` round-trip any picklable value; large NumPy arrays and Arrow tables come
  back as zero-copy, read-only views of shared memory (two gets share the same memory).
- An object lives while any reference to it exists: in the driver, as the argument of a
  task that has not finished, or nested inside another object. When the last one goes,
  its shared-memory segment is removed.
- ``wait`` splits refs into ready and not ready, both in the order given, and returns once
  ``num_returns`` are ready or the timeout passes.
- The store has a capacity: putting and dropping 100 MB fifty times in a 1 GB store never
  goes over it, and ten live 100 MB objects in a 200 MB store all read back (spilled to
  disk and restored). Only an object larger than the whole store is refused.
"""

from __future__ import annotations

import gc
import os
import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import skate
from skate.exceptions import ObjectStoreFullError, OwnerDiedError
from skate_harness import mapping_of, segment_path, session_segments, session_shm_bytes, wait_for

pytestmark = pytest.mark.timeout(120)

GET_TIMEOUT = 60
MB = 1024 * 1024


@skate.remote
def wait_for_file(path, result=None):
    while not os.path.exists(path):
        time.sleep(0.01)
    return result


@skate.remote
def array_sum(arr):
    return float(arr.sum())


def touch(path):
    with open(path, "w"):
        pass



def stays(predicate, seconds: float = 1.0) -> bool:
    """True if ``predicate`` holds all along ``seconds`` (polled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.05)
    return predicate()


# --- put / get -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    0, -1, 3.5, "text", b"\x00bytes", None, True, (1, "a"), [1, [2, [3]]], {"a": {"b": [1, 2]}},
    {1, 2, 3}, b"x" * (2 * MB), "y" * (300 * 1024),
], ids=lambda v: type(v).__name__ + (f"-{len(v)}" if isinstance(v, (bytes, str)) else ""))
def test_put_then_get_returns_an_equal_value(skate_cluster, value):
    assert skate.get(skate.put(value), timeout=GET_TIMEOUT) == value


def test_a_200_mb_array_reads_back_as_a_read_only_view_without_a_copy(skate_cluster):
    original = np.arange(25_000_000, dtype=np.float64)   # 200 MB
    ref = skate.put(original)
    first = skate.get(ref, timeout=GET_TIMEOUT)
    second = skate.get(ref, timeout=GET_TIMEOUT)
    # Both gets read the object's shared-memory segment in place: no copy was made.
    segment = segment_path(skate_cluster.session, ref)
    assert mapping_of(first.ctypes.data) == segment
    assert mapping_of(second.ctypes.data) == segment
    assert not np.shares_memory(first, original)
    assert first.flags.writeable is False
    with pytest.raises(ValueError):
        first[0] = 1.0
    assert first.dtype == original.dtype and first.shape == original.shape
    assert np.array_equal(first, original)
    del first, second


def test_arrays_given_to_tasks_are_read_only_views_too(skate_cluster):
    @skate.remote
    def writeable(arr):
        return arr.flags.writeable

    ref = skate.put(np.ones(1_000_000))
    assert skate.get(writeable.remote(ref), timeout=GET_TIMEOUT) is False
    assert skate.get(array_sum.remote(ref), timeout=GET_TIMEOUT) == 1_000_000.0


def test_a_large_array_returned_by_a_task_reads_back_zero_copy(skate_cluster):
    @skate.remote
    def make(n):
        return np.arange(n, dtype=np.int64)

    ref = make.remote(5_000_000)
    first = skate.get(ref, timeout=GET_TIMEOUT)
    second = skate.get(ref, timeout=GET_TIMEOUT)
    segment = segment_path(skate_cluster.session, ref)
    assert mapping_of(first.ctypes.data) == segment
    assert mapping_of(second.ctypes.data) == segment
    assert first.flags.writeable is False
    assert np.array_equal(first, np.arange(5_000_000, dtype=np.int64))


def test_a_pyarrow_table_round_trips_zero_copy(skate_cluster):
    n = 1_000_000
    table = pa.table({"ints": pa.array(np.arange(n, dtype=np.int64)),
                      "floats": pa.array(np.linspace(0.0, 1.0, n)),
                      "strings": pa.array([f"s{i % 100}" for i in range(n)])})
    ref = skate.put(table)
    first = skate.get(ref, timeout=GET_TIMEOUT)
    second = skate.get(ref, timeout=GET_TIMEOUT)
    assert first.equals(table)
    assert first.schema == table.schema
    buf_first = first.column("ints").chunks[0].buffers()[1]
    buf_second = second.column("ints").chunks[0].buffers()[1]
    # Both gets read the object's shared-memory segment in place: no copy was made.
    segment = segment_path(skate_cluster.session, ref)
    assert mapping_of(buf_first.address) == segment
    assert mapping_of(buf_second.address) == segment
    assert buf_first.is_mutable is False

    @skate.remote
    def summarize(t):
        return t.num_rows, int(pc.sum(t.column("ints")).as_py())

    assert skate.get(summarize.remote(ref), timeout=GET_TIMEOUT) == (n, n * (n - 1) // 2)


def test_a_small_pyarrow_table_round_trips(skate_cluster):
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", None]})
    assert skate.get(skate.put(table), timeout=GET_TIMEOUT).equals(table)


# --- freeing ---------------------------------------------------------------------------------

def test_an_object_is_freed_when_its_last_ref_is_dropped(skate_cluster):
    ref = skate.put(np.zeros(1_000_000))
    path = segment_path(skate_cluster.session, ref)
    assert os.path.exists(path)
    extra = ref                                 # a second reference to the same object
    del ref
    assert stays(lambda: os.path.exists(path), 0.5)
    del extra
    assert wait_for(lambda: not os.path.exists(path), timeout=5)


def test_a_large_task_result_is_freed_when_its_ref_is_dropped(skate_cluster):
    @skate.remote
    def make():
        return np.ones(1_000_000)

    ref = make.remote()
    assert skate.get(ref, timeout=GET_TIMEOUT).sum() == 1_000_000
    path = segment_path(skate_cluster.session, ref)
    assert os.path.exists(path)
    del ref
    assert wait_for(lambda: not os.path.exists(path), timeout=5)


def test_a_large_task_result_nobody_holds_is_freed(skate_cluster):
    @skate.remote
    def make():
        return np.ones(1_000_000)

    ref = make.remote()
    path = segment_path(skate_cluster.session, ref)
    del ref      # dropped before the task even finished
    assert skate.get(array_sum.remote(skate.put(np.ones(10))), timeout=GET_TIMEOUT) == 10.0
    assert wait_for(lambda: not os.path.exists(path), timeout=5)


def test_an_object_held_only_as_a_running_tasks_argument_lives_until_the_task_ends(skate_cluster, tmp_path):
    @skate.remote
    def hold(arr, started, release):
        touch(started)
        while not os.path.exists(release):
            time.sleep(0.01)
        return float(arr.sum())

    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    ref = skate.put(np.full(1_000_000, 2.0))
    path = segment_path(skate_cluster.session, ref)
    out = hold.remote(ref, started, release)
    assert wait_for(lambda: os.path.exists(started), timeout=GET_TIMEOUT)
    del ref
    gc.collect()
    assert stays(lambda: os.path.exists(path), 1.0), "freed while a running task holds it"
    touch(release)
    assert skate.get(out, timeout=GET_TIMEOUT) == 2_000_000.0
    assert wait_for(lambda: not os.path.exists(path), timeout=5)


def test_an_object_passed_to_a_queued_task_survives_the_driver_dropping_its_ref(skate_cluster, tmp_path):
    release = str(tmp_path / "release")
    ref = skate.put(np.full(1_000_000, 3.0))
    path = segment_path(skate_cluster.session, ref)
    # The task cannot start before `gate` is done; the driver drops its ref meanwhile.
    gate = wait_for_file.remote(release)

    @skate.remote
    def total(arr, _gate):
        return float(arr.sum())

    out = total.remote(ref, gate)
    del ref
    gc.collect()
    assert stays(lambda: os.path.exists(path), 0.5)
    touch(release)
    assert skate.get(out, timeout=GET_TIMEOUT) == 3_000_000.0
    assert wait_for(lambda: not os.path.exists(path), timeout=5)


def test_a_ref_nested_in_a_task_argument_survives_the_driver_dropping_its_ref(skate_cluster, tmp_path):
    @skate.remote
    def get_later(refs, started, release):
        touch(started)
        while not os.path.exists(release):
            time.sleep(0.01)
        return float(skate.get(refs[0]).sum())

    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    ref = skate.put(np.full(1_000_000, 4.0))
    path = segment_path(skate_cluster.session, ref)
    out = get_later.remote([ref], started, release)
    assert wait_for(lambda: os.path.exists(started), timeout=GET_TIMEOUT)
    del ref
    gc.collect()
    assert stays(lambda: os.path.exists(path), 1.0)
    touch(release)
    assert skate.get(out, timeout=GET_TIMEOUT) == 4_000_000.0
    assert wait_for(lambda: not os.path.exists(path), timeout=5)


def test_an_object_nested_in_another_put_object_lives_as_long_as_the_outer_one(skate_cluster):
    inner = skate.put(np.full(1_000_000, 5.0))
    inner_path = segment_path(skate_cluster.session, inner)
    outer = skate.put({"payload": [inner]})
    del inner
    gc.collect()
    assert stays(lambda: os.path.exists(inner_path), 0.5)

    # A task can reach the inner object through the outer one.
    @skate.remote
    def through(container):
        return float(skate.get(container["payload"][0]).sum())

    assert skate.get(through.remote(outer), timeout=GET_TIMEOUT) == 5_000_000.0
    got = skate.get(outer, timeout=GET_TIMEOUT)["payload"][0]
    assert float(skate.get(got, timeout=GET_TIMEOUT).sum()) == 5_000_000.0
    del got
    assert stays(lambda: os.path.exists(inner_path), 0.3)
    del outer
    assert wait_for(lambda: not os.path.exists(inner_path), timeout=5)


def test_an_object_returned_inside_a_task_result_lives_while_the_result_does(skate_cluster):
    @skate.remote
    def wrap():
        return [skate.put(np.full(500_000, 6.0))]

    outer = wrap.remote()
    (inner,) = skate.get(outer, timeout=GET_TIMEOUT)
    assert float(skate.get(inner, timeout=GET_TIMEOUT).sum()) == 3_000_000.0


def test_an_object_owned_by_a_worker_that_died_is_freed(skate_cluster):
    @skate.remote
    def put_in_worker():
        return os.getpid(), [skate.put(np.ones(1_000_000))]

    pid, (inner,) = skate.get(put_in_worker.remote(), timeout=GET_TIMEOUT)
    path = segment_path(skate_cluster.session, inner)
    assert os.path.exists(path)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(OwnerDiedError):
        skate.get(inner, timeout=GET_TIMEOUT)
    assert wait_for(lambda: not os.path.exists(path), timeout=5), f"{path} outlived its owner"


# --- wait ------------------------------------------------------------------------------------

def test_wait_returns_the_first_ready_refs_and_keeps_the_given_order(skate_cluster, tmp_path):
    release = str(tmp_path / "release")
    slow_a = wait_for_file.remote(release, "a")
    fast_b = skate.put("b")
    slow_c = wait_for_file.remote(release, "c")
    fast_d = skate.put("d")
    refs = [slow_a, fast_b, slow_c, fast_d]

    ready, not_ready = skate.wait(refs, num_returns=2, timeout=GET_TIMEOUT)
    assert ready == [fast_b, fast_d]
    assert not_ready == [slow_a, slow_c]

    # Asking for all of them with a timeout: returns when it passes, with the same split.
    ready, not_ready = skate.wait(refs, num_returns=4, timeout=0.3)
    assert ready == [fast_b, fast_d]
    assert not_ready == [slow_a, slow_c]

    touch(release)
    ready, not_ready = skate.wait(refs, num_returns=4, timeout=GET_TIMEOUT)
    assert ready == refs
    assert not_ready == []
    assert skate.get(refs, timeout=GET_TIMEOUT) == ["a", "b", "c", "d"]


def test_wait_puts_no_more_than_num_returns_refs_in_ready(skate_cluster):
    refs = [skate.put(i) for i in range(5)]
    ready, not_ready = skate.wait(refs, num_returns=2)
    assert ready == refs[:2]
    assert not_ready == refs[2:]


def test_wait_with_the_default_num_returns_waits_for_one(skate_cluster):
    refs = [array_sum.remote(np.ones(3)) for _ in range(3)]
    ready, not_ready = skate.wait(refs)
    assert len(ready) == 1 and len(not_ready) == 2
    assert set(ready) | set(not_ready) == set(refs)


def test_wait_with_timeout_zero_does_not_block(skate_cluster, tmp_path):
    slow = wait_for_file.remote(str(tmp_path / "never"))
    ready, not_ready = skate.wait([slow], timeout=0)
    assert ready == [] and not_ready == [slow]
    skate.cancel(slow, force=True)


def test_wait_on_an_empty_list_returns_two_empty_lists(skate_cluster):
    assert skate.wait([], num_returns=0) == ([], [])


def test_wait_with_fetch_local_false_is_accepted(skate_cluster):
    ref = skate.put(1)
    assert skate.wait([ref], fetch_local=False) == ([ref], [])


# --- capacity and spilling (each with a cluster of its own) -------------------------------------

def test_putting_and_dropping_100_mb_fifty_times_stays_within_a_1_gb_store(start_cluster):
    cluster = start_cluster(num_cpus=2, object_store_memory=1024 * MB)
    capacity = skate.nodes()[0]["ObjectStoreCapacity"]
    assert capacity == 1024 * MB
    peak = 0
    last = None
    for i in range(50):
        ref = skate.put(np.full(100 * MB // 8, float(i)))
        peak = max(peak, session_shm_bytes(cluster.session))
        value = skate.get(ref, timeout=GET_TIMEOUT)
        assert value[0] == i and value[-1] == i
        last = f"skate-{cluster.session}-{ref.hex()}"
        del ref, value
    assert peak <= capacity
    # Dropped objects were freed, not spilled: nothing went to disk.
    spill_dir = os.path.join(cluster.session_dir, "spill")
    assert not os.path.isdir(spill_dir) or os.listdir(spill_dir) == []
    # The last object's segment is gone at once (its memory may be kept as a spare for
    # the next put); spares left idle go back to the OS within seconds.
    assert wait_for(lambda: last not in session_segments(cluster.session), timeout=5)
    assert wait_for(lambda: session_segments(cluster.session) == [], timeout=15)


def test_ten_live_100_mb_objects_in_a_200_mb_store_all_read_back(start_cluster):
    cluster = start_cluster(num_cpus=2, object_store_memory=200 * MB)
    refs = []
    for i in range(10):
        refs.append(skate.put(np.full(100 * MB // 8, float(i))))
        assert session_shm_bytes(cluster.session) <= 200 * MB
    spill_dir = os.path.join(cluster.session_dir, "spill")
    assert os.path.isdir(spill_dir) and len(os.listdir(spill_dir)) >= 8
    for i, ref in enumerate(refs):
        value = skate.get(ref, timeout=GET_TIMEOUT)
        assert value.shape == (100 * MB // 8,)
        assert np.all(value == float(i)), f"object {i} came back wrong"
        del value
    # Read in another order, through tasks this time.
    sums = skate.get([array_sum.remote(r) for r in reversed(refs)], timeout=GET_TIMEOUT)
    assert sums == [float(i) * (100 * MB // 8) for i in reversed(range(10))]
    del refs, ref
    assert wait_for(lambda: session_segments(cluster.session) == [], timeout=5)
    assert wait_for(lambda: not os.path.isdir(spill_dir) or os.listdir(spill_dir) == [], timeout=5)


def test_large_task_results_beyond_the_store_capacity_all_read_back(start_cluster):
    start_cluster(num_cpus=2, object_store_memory=200 * MB)

    @skate.remote
    def make(i):
        return np.full(60 * MB // 8, float(i))

    refs = [make.remote(i) for i in range(8)]   # 480 MB of live results
    for i, ref in enumerate(refs):
        assert np.all(skate.get(ref, timeout=GET_TIMEOUT) == float(i))


def test_an_object_larger_than_the_whole_store_is_refused(start_cluster):
    cluster = start_cluster(num_cpus=2, object_store_memory=100 * MB)
    with pytest.raises(ObjectStoreFullError) as info:
        skate.put(np.zeros(150 * MB // 8))
    assert isinstance(info.value, MemoryError)
    assert session_segments(cluster.session) == []
    # The store still works.
    ref = skate.put(np.ones(10 * MB // 8))
    assert skate.get(array_sum.remote(ref), timeout=GET_TIMEOUT) == 10 * MB // 8
