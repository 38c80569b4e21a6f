"""The node's shared-memory object store: segments (``shm``) and accounting (``ObjectStore``).

What these tests promise:

- Large values round-trip through a segment, and NumPy / Arrow data read back as zero-copy,
  read-only views of the shared memory.
- A reader's mapping outlives the segment's name: unlinking never pulls memory from under it.
- The store keeps shared memory within its capacity by spilling least-recently-used objects
  to disk and restores them byte for byte; it refuses an object only when spilling cannot
  help, with a message naming the sizes.
- Nothing is left in /dev/shm: every test checks that its session left no segment behind.
"""

from __future__ import annotations

import errno
import glob
import mmap
import os
import uuid

import numpy as np
import posix_ipc
import pytest

from skate._private.object_store import shm
from skate._private.object_store.serialization import deserialize, serialize
from skate._private.object_store.store import ObjectStore
from skate.exceptions import ObjectStoreFullError

pytestmark = pytest.mark.timeout(60)

MB = 1024 * 1024


@pytest.fixture
def session():
    """A fresh session id; fails the test if any of its segments survive it."""
    sid = "test" + uuid.uuid4().hex[:12]
    lock = shm.hold_session_lock(sid)   # alive, like a node's session: not reaped as orphan
    yield sid
    lock.close()
    os.unlink(lock.name)
    leftover = glob.glob(f"/dev/shm/skate-{sid}-*")
    shm.cleanup_session(sid)  # clean up before failing, so one failure does not leak
    assert not leftover, f"segments left in /dev/shm: {leftover}"


@pytest.fixture
def store(session, tmp_path):
    st = ObjectStore(session, capacity=25 * MB, spill_dir=str(tmp_path / "spill"))
    yield st
    st.shutdown()


def oid(n: int) -> bytes:
    return n.to_bytes(4, "big") + b"\x00" * 24


def put(store: ObjectStore, object_id: bytes, value) -> int:
    """What a client does to put a large object: reserve, create the segment, seal."""
    sobj = serialize(value)
    store.reserve(object_id, sobj.total_size())
    size = shm.create_and_write(store.session, object_id, sobj)
    store.seal(object_id, size)
    return size


def get(session: str, object_id: bytes):
    mv = shm.open_readonly(session, object_id)
    assert mv is not None, f"segment of {object_id.hex()} missing"
    return deserialize(mv)


def segment_exists(session: str, object_id: bytes) -> bool:
    return os.path.exists("/dev/shm" + shm.segment_name(session, object_id))


def address(obj) -> int:
    return np.frombuffer(obj, dtype=np.uint8).ctypes.data


# -- segments ---------------------------------------------------------------------------


def test_segment_name_has_skate_prefix_session_and_hex_id():
    assert shm.segment_name("s1", b"\x01\xab") == "/skate-s1-01ab"


def test_numpy_array_reads_back_as_zero_copy_read_only_view(session):
    arr = np.arange(100_000, dtype=np.float64)
    size = shm.create_and_write(session, oid(1), serialize(arr))
    assert os.path.getsize("/dev/shm" + shm.segment_name(session, oid(1))) == size

    mv = shm.open_readonly(session, oid(1))
    out = deserialize(mv)
    np.testing.assert_array_equal(out, arr)
    assert not out.flags.writeable

    # The base chain ends in the mapping itself, not in a copy.
    base = out
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)

    # A write through another, writable mapping of the segment shows up in the array.
    offset = out.ctypes.data - address(mv)
    seg = posix_ipc.SharedMemory(shm.segment_name(session, oid(1)))
    with mmap.mmap(seg.fd, 0) as writable:
        seg.close_fd()
        writable[offset:offset + 8] = np.float64(-7.5).tobytes()
    assert out[0] == -7.5
    shm.unlink(session, oid(1))


def test_200mb_array_round_trips(session):
    arr = np.random.default_rng(0).random(25_000_000)  # 200 MB
    sobj = serialize(arr)
    assert shm.create_and_write(session, oid(1), sobj) == sobj.total_size() > 200_000_000
    out = get(session, oid(1))
    assert out.shape == arr.shape and out.dtype == arr.dtype
    assert np.array_equal(out, arr)
    assert shm.unlink(session, oid(1))


def test_arrow_table_round_trips_zero_copy(session):
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"x": np.arange(200_000), "name": [f"row{i}" for i in range(200_000)]})
    shm.create_and_write(session, oid(1), serialize(table))
    mv = shm.open_readonly(session, oid(1))
    out = deserialize(mv)
    assert out.equals(table)
    # The column's data buffer lies inside the mapping.
    data_addr = out.column("x").chunk(0).buffers()[1].address
    assert 0 <= data_addr - address(mv) < len(mv)
    shm.unlink(session, oid(1))


def test_missing_segment_reads_as_none_and_unlinks_as_false(session):
    assert shm.open_readonly(session, oid(9)) is None
    assert shm.read_bytes(session, oid(9)) is None
    assert shm.unlink(session, oid(9)) is False


def test_creating_an_existing_segment_raises_and_keeps_the_original(session):
    shm.write_bytes(session, oid(1), b"original")
    with pytest.raises(FileExistsError):
        shm.create_and_write(session, oid(1), serialize(np.zeros(10)))
    with pytest.raises(FileExistsError):
        shm.write_bytes(session, oid(1), b"other")
    assert shm.read_bytes(session, oid(1)) == b"original"
    shm.unlink(session, oid(1))


def test_write_bytes_and_read_bytes_round_trip_including_empty(session):
    payload = os.urandom(3 * MB + 17)
    assert shm.write_bytes(session, oid(1), memoryview(payload)) == len(payload)
    assert shm.read_bytes(session, oid(1)) == payload
    assert shm.write_bytes(session, oid(2), b"") == 0
    assert shm.open_readonly(session, oid(2)) is not None
    assert shm.unlink(session, oid(1)) and shm.unlink(session, oid(2))


def test_unlinked_segment_stays_readable_through_existing_mapping(session):
    arr = np.arange(1_000_000, dtype=np.int64)
    shm.create_and_write(session, oid(1), serialize(arr))
    out = get(session, oid(1))
    assert shm.unlink(session, oid(1)) is True
    assert shm.open_readonly(session, oid(1)) is None
    assert not segment_exists(session, oid(1))
    np.testing.assert_array_equal(out, arr)


def test_no_space_in_dev_shm_raises_store_full_and_leaves_no_segment(session, monkeypatch):
    real_statvfs = os.statvfs

    class Tiny:
        f_bavail = 10
        f_frsize = 4096

    monkeypatch.setattr(shm.os, "statvfs", lambda path: Tiny)
    with pytest.raises(ObjectStoreFullError, match=r"1048576 bytes.*object_store_memory"):
        shm.write_bytes(session, oid(1), bytes(MB))
    assert not segment_exists(session, oid(1))

    # Space taken by someone else between the check and the write: posix_fallocate fails.
    monkeypatch.setattr(shm.os, "statvfs", real_statvfs)

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm.os, "posix_fallocate", no_space)
    with pytest.raises(ObjectStoreFullError, match="1048576 bytes"):
        shm.write_bytes(session, oid(1), bytes(MB))
    assert not segment_exists(session, oid(1))


def test_cleanup_session_removes_only_that_sessions_segments(session):
    for i in range(3):
        shm.write_bytes(session, oid(i), b"x")
    other = session + "-x"  # a session id that extends this one must be left alone
    shm.write_bytes(other, oid(1), b"y")
    try:
        assert shm.cleanup_session(session) == 3
        assert shm.read_bytes(other, oid(1)) == b"y"
    finally:
        assert shm.cleanup_session(other) == 1


# -- the store ------------------------------------------------------------------------


def test_reserve_beyond_capacity_spills_least_recently_used(session, tmp_path):
    store = ObjectStore(session, capacity=3 * MB + 4096, spill_dir=str(tmp_path / "spill"))
    a, b, c, d = oid(1), oid(2), oid(3), oid(4)
    for i, x in enumerate((a, b, c)):
        put(store, x, np.full(MB // 8, i, dtype=np.int64))
    originals = {x: shm.read_bytes(session, x) for x in (a, b, c)}
    store.touch(a)  # LRU order is now b, c, a

    put(store, d, np.full(MB // 8, 3, dtype=np.int64))
    assert store.is_spilled(b)
    assert not any(store.is_spilled(x) for x in (a, c, d))
    assert not segment_exists(session, b)
    assert os.path.exists(tmp_path / "spill" / b.hex())
    assert store.contains(b)
    assert store.stats()["used"] <= store.capacity

    # Restoring b needs room: c is now the least recently used.
    assert store.ensure_local(b) is True
    assert shm.read_bytes(session, b) == originals[b]
    assert not os.path.exists(tmp_path / "spill" / b.hex())
    assert store.is_spilled(c) and not store.is_spilled(b)
    assert store.ensure_local(c) is True
    assert shm.read_bytes(session, c) == originals[c]
    stats = store.stats()
    assert stats["spilled_total"] == 3 and stats["restored_total"] == 2
    assert stats["used"] <= store.capacity
    store.shutdown()


def test_ten_10mb_objects_in_25mb_store_all_read_back(store):
    values = {oid(i): np.random.default_rng(i).integers(0, 2**62, 10 * MB // 8) for i in range(10)}
    for object_id, value in values.items():
        put(store, object_id, value)
        assert store.stats()["used"] <= store.capacity
    assert store.stats()["num_spilled"] == 8

    views = []
    for object_id, value in values.items():
        assert store.ensure_local(object_id)
        out = get(store.session, object_id)
        np.testing.assert_array_equal(out, value)
        views.append(out)  # kept: spilling later objects must not disturb earlier reads
        assert store.stats()["used"] <= store.capacity
    for out, value in zip(views, values.values()):
        np.testing.assert_array_equal(out, value)
    assert store.stats()["restored_total"] >= 8


def test_object_larger_than_capacity_is_refused_with_sizes(store):
    size = 30 * MB
    with pytest.raises(ObjectStoreFullError) as info:
        store.reserve(oid(1), size)
    message = str(info.value)
    assert str(size) in message and str(store.capacity) in message
    assert "object_store_memory" in message
    assert isinstance(info.value, MemoryError)
    assert store.stats()["used"] == 0 and not store.contains(oid(1))


def test_pending_objects_are_never_spilled_and_refusal_spills_nothing(store):
    put(store, oid(1), np.zeros(5 * MB // 8))  # sealed, spillable
    store.reserve(oid(2), 15 * MB)  # pending: its bytes are being written
    with pytest.raises(ObjectStoreFullError) as info:
        store.reserve(oid(3), 12 * MB)
    assert str(12 * MB) in str(info.value) and str(15 * MB) in str(info.value)
    # Spilling oid(1) could not have helped, so it was left in memory.
    assert not store.is_spilled(oid(1)) and store.stats()["spilled_total"] == 0
    store.abort(oid(2))


def test_reserving_a_known_id_is_a_no_op_with_same_size(store):
    store.reserve(oid(1), MB)
    store.reserve(oid(1), MB)
    assert store.stats()["used"] == MB
    with pytest.raises(ValueError, match="already"):
        store.reserve(oid(1), 2 * MB)
    store.abort(oid(1))


def test_abort_releases_reservation_and_segment(store):
    store.reserve(oid(1), 20 * MB)
    shm.write_bytes(store.session, oid(1), bytes(MB))  # the creator died mid-way
    assert not store.contains(oid(1))
    assert store.ensure_local(oid(1)) is False  # not sealed: nothing to read yet
    store.abort(oid(1))
    assert not segment_exists(store.session, oid(1))
    assert store.size_of(oid(1)) is None
    assert store.stats()["used"] == 0
    store.reserve(oid(2), 25 * MB)  # the whole capacity is available again
    store.abort(oid(2))


def test_seal_without_reservation_is_accounted_and_never_raises(store):
    put(store, oid(1), np.zeros(10 * MB // 8))
    for i in (2, 3):
        size = shm.create_and_write(store.session, oid(i), serialize(np.zeros(10 * MB // 8)))
        store.seal(oid(i), size)
    assert store.is_spilled(oid(1))  # made room for the unannounced seals
    # A seal that can never fit is still accepted: the bytes already exist.
    size = shm.write_bytes(store.session, oid(4), bytes(30 * MB))
    store.seal(oid(4), size)
    assert store.contains(oid(4)) and store.size_of(oid(4)) == size
    assert store.stats()["used"] >= size


def test_free_removes_segment_and_spill_file(store, tmp_path):
    for i in range(3):
        put(store, oid(i), np.full(10 * MB // 8, i))
    assert store.is_spilled(oid(0))
    spill_file = tmp_path / "spill" / oid(0).hex()
    assert spill_file.exists()

    store.free(oid(0))
    assert not spill_file.exists() and not store.contains(oid(0))
    store.free(oid(1))
    assert not segment_exists(store.session, oid(1)) and not store.contains(oid(1))
    store.free(oid(99))  # unknown ids are ignored
    assert store.stats()["num_objects"] == 1


def test_stats_return_to_zero_after_freeing_everything(store):
    for i in range(6):
        put(store, oid(i), np.full(8 * MB // 8, i))
    store.reserve(oid(10), MB)
    stats = store.stats()
    assert stats["num_objects"] == 7 and stats["num_spilled"] > 0 and stats["spilled_bytes"] > 0
    assert stats["num_in_memory"] + stats["num_spilled"] == 6
    assert store.ensure_local(oid(0))
    for i in range(6):
        store.free(oid(i))
    store.abort(oid(10))
    stats = store.stats()
    assert stats["used"] == 0 and stats["num_objects"] == 0
    assert stats["num_in_memory"] == stats["num_spilled"] == stats["spilled_bytes"] == 0
    assert stats["spilled_total"] > 0 and stats["restored_total"] == 1  # cumulative
    assert glob.glob(f"/dev/shm/skate-{store.session}-*") == []
    assert os.listdir(store.spill_dir) == []


def test_shutdown_removes_segments_and_spill_dir(session, tmp_path):
    store = ObjectStore(session, capacity=25 * MB, spill_dir=str(tmp_path / "spill"))
    for i in range(4):
        put(store, oid(i), np.full(10 * MB // 8, i))
    store.reserve(oid(10), MB)
    shm.write_bytes(session, oid(10), b"partial")
    shm.write_bytes(session, oid(11), b"never announced")  # a client died before sealing
    assert os.listdir(tmp_path / "spill")

    store.shutdown()
    assert glob.glob(f"/dev/shm/skate-{session}-*") == []
    assert not os.path.exists(tmp_path / "spill")
    assert store.stats()["used"] == 0 and store.stats()["num_objects"] == 0


# --- recycling of freed segments --------------------------------------------------------------

def _reserve_and_write(store: ObjectStore, session: str, object_id: bytes, value) -> bool:
    sobj = serialize(value)
    recycled = store.reserve(object_id, sobj.total_size())
    if recycled:
        shm.write_existing(session, object_id, sobj)
    else:
        shm.create_and_write(session, object_id, sobj)
    store.seal(object_id, sobj.total_size())
    return recycled


def test_a_freed_segment_is_reused_by_the_next_object_that_fits(store, session):
    first = np.arange(500_000, dtype=np.float64)              # 4 MB (spares: up to 1/4 of 25 MB)
    assert _reserve_and_write(store, session, oid(1), first) is False
    store.free(oid(1))
    assert not segment_exists(session, oid(1))
    assert store.stats()["num_spares"] == 1
    smaller = np.full(250_000, 7.0)
    assert _reserve_and_write(store, session, oid(2), smaller) is True
    assert store.stats()["num_spares"] == 0
    back = get(session, oid(2))
    assert back.shape == (250_000,) and (back == 7.0).all()   # resized, no stale bytes read
    assert os.fstat(posix_ipc.SharedMemory(shm.segment_name(session, oid(2))).fd).st_size \
        == serialize(smaller).total_size()


def test_spares_count_against_capacity_and_are_dropped_first(session, tmp_path):
    store = ObjectStore(session, 40 * 2**20, str(tmp_path / "spill"))
    try:
        _reserve_and_write(store, session, oid(1), np.zeros(1_000_000))   # 8 MB
        store.free(oid(1))
        assert store.stats()["spare_bytes"] > 0
        # 35 MB does not fit beside the 8 MB spare: the spare goes, nothing is spilled.
        _reserve_and_write(store, session, oid(2), np.zeros(35 * 2**20 // 8))
        assert store.stats()["spare_bytes"] == 0
        assert store.stats()["spilled_total"] == 0
    finally:
        store.shutdown()


def test_idle_spares_go_back_to_the_os(store, session):
    _reserve_and_write(store, session, oid(1), np.zeros(500_000))
    store.free(oid(1))
    assert store.trim_spares(max_idle_s=3600) == 0
    assert store.trim_spares(max_idle_s=0) == 1
    assert glob.glob(f"/dev/shm/skate-{session}-*") == []


def test_segments_of_a_session_nobody_holds_are_reaped():
    session = "test" + uuid.uuid4().hex[:12]
    lock = shm.hold_session_lock(session)
    try:
        shm.create_and_write(session, oid(1), serialize(b"x" * 10))
        shm.reap_orphans()
        assert segment_exists(session, oid(1))        # its lock is held: alive
        lock.close()                                  # every process of the session died
        assert shm.reap_orphans() >= 1
        assert not segment_exists(session, oid(1))
    finally:
        lock.close()
        shm.cleanup_session(session)
