"""POSIX shared-memory segments: one segment per object.

This module owns the naming, creation, mapping and removal of the segments that hold
large objects on a node. A segment is named ``/skate-{session}-{object_id hex}`` and
appears on Linux as ``/dev/shm/skate-{session}-{hex}``; the ``skate-`` prefix is what leak
checks look for, and the session part lets :func:`cleanup_session` remove everything a
session left behind, even after a crash.

Life of a segment::

    creator (worker / node manager)          readers (any process on the node)
    -------------------------------          ---------------------------------
    create_and_write / write_bytes  ------>  open_readonly -> memoryview -> deserialize
      O_CREAT|O_EXCL, reserve pages,           (read-only mapping; zero-copy arrays keep
      write, unmap                              it alive after the segment is unlinked)
                          unlink  (by the node's ObjectStore, on free or spill)

Writers reserve the pages with ``posix_fallocate`` before mapping: on tmpfs a plain
``ftruncate`` reserves nothing, and running out of space while writing through the
mapping would kill the process with SIGBUS instead of raising an error.

The bookkeeping of which segments exist, capacity and spilling is the ``ObjectStore``'s
job (``store.py``); this module only touches the segments. It imports nothing from the
runtime except the error type users see.
"""

from __future__ import annotations

import errno
import mmap
import os

import posix_ipc

from skate.exceptions import ObjectStoreFullError

SHM_DIR = "/dev/shm"
PREFIX = "skate-"

_HEX = frozenset("0123456789abcdef")
_NO_SPACE = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG)


def segment_name(session: str, object_id: bytes) -> str:
    """The POSIX shared-memory name of an object's segment."""
    return f"/{PREFIX}{session}-{object_id.hex()}"


def _full_error(size: int, name: str, detail: str) -> ObjectStoreFullError:
    return ObjectStoreFullError(
        f"cannot create shared-memory segment {name} of {size} bytes: {detail}. "
        f"Free memory on this node (drop references to large objects, or make "
        f"{SHM_DIR} larger), or give skate.init() a larger object_store_memory so "
        f"spilling to disk starts sooner."
    )


def _create(session: str, object_id: bytes, size: int, fill) -> int:
    """Creates the segment exclusively with ``size`` bytes and calls ``fill(mv)``.

    Shared by :func:`create_and_write` and :func:`write_bytes`; any failure after the
    segment exists unlinks it, so no partial segment is ever left visible.
    """
    name = segment_name(session, object_id)
    length = max(size, 1)  # mmap cannot map an empty file
    # Cheap early check with a clear message; posix_fallocate below is the real guard
    # (another process may take the space between the two).
    st = os.statvfs(SHM_DIR)
    free = st.f_bavail * st.f_frsize
    if length > free:
        raise _full_error(size, name, f"only {free} bytes are free in {SHM_DIR}")
    try:
        seg = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
    except posix_ipc.ExistentialError:
        raise FileExistsError(errno.EEXIST, "shared-memory segment already exists", name) from None
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise _full_error(size, name, os.strerror(exc.errno)) from exc
        raise
    try:
        try:
            # Sizes the file and reserves its pages, so running out shows up here as
            # ENOSPC rather than as SIGBUS while writing.
            os.posix_fallocate(seg.fd, 0, length)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise _full_error(size, name, os.strerror(exc.errno)) from exc
            raise
        mm = mmap.mmap(seg.fd, length)  # MAP_SHARED, read-write
        seg.close_fd()
        try:
            mv = memoryview(mm)
            try:
                fill(mv)
            finally:
                mv.release()
        finally:
            mm.close()
    except BaseException:
        seg.close_fd()  # no-op when already closed
        _unlink_name(name)
        raise
    return size


_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


LOCK_DIR = "/tmp/skate-session-locks"


def hold_session_lock(session: str):
    """Marks ``session`` alive for as long as this process (or a child it forks) lives:
    an ``flock`` on ``LOCK_DIR/<session>``. Returns the open file; keep it."""
    import fcntl
    os.makedirs(LOCK_DIR, mode=0o1777, exist_ok=True)
    f = open(os.path.join(LOCK_DIR, session), "w")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def reap_orphans() -> int:
    """Unlinks the segments of sessions no live process holds the lock of (a node that
    was SIGKILLed cannot clean up after itself; the next node on the machine does)."""
    import fcntl
    sessions = set()
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if name.startswith(PREFIX):
            parts = name.split("-")
            if len(parts) == 3:
                sessions.add(parts[1])
    reaped = 0
    for session in sessions:
        path = os.path.join(LOCK_DIR, session)
        try:
            f = open(path, "a")
        except OSError:
            continue
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue          # held: the session is alive
            reaped += cleanup_session(session)
            try:
                os.unlink(path)
            except OSError:
                pass
        finally:
            f.close()
    return reaped


def rename(session: str, old_id: bytes, new_id: bytes) -> None:
    """Gives a segment another object id (how the store recycles freed segments: their
    pages stay allocated, so the next writer only copies)."""
    os.rename(os.path.join(SHM_DIR, segment_name(session, old_id)[1:]),
              os.path.join(SHM_DIR, segment_name(session, new_id)[1:]))


def write_existing(session: str, object_id: bytes, sobj) -> int:
    """Writes a ``SerializedObject`` into the object's existing (recycled) segment,
    resizing it to fit: shrinking frees the tail's pages, growing reserves new ones."""
    name = segment_name(session, object_id)
    size = sobj.total_size()
    length = max(size, 1)
    seg = posix_ipc.SharedMemory(name)
    try:
        old = seg.size
        if length > old:
            try:
                os.posix_fallocate(seg.fd, old, length - old)
            except OSError as exc:
                if exc.errno in _NO_SPACE:
                    raise _full_error(size, name, os.strerror(exc.errno)) from exc
                raise
        elif length < old:
            os.ftruncate(seg.fd, length)
        # The pages exist already: map them all at once instead of one fault per page.
        mm = mmap.mmap(seg.fd, length, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        seg.close_fd()
        try:
            mv = memoryview(mm)
            try:
                sobj.write_into(mv)
            finally:
                mv.release()
        finally:
            mm.close()
    except BaseException:
        seg.close_fd()
        _unlink_name(name)
        raise
    return size


def create_and_write(session: str, object_id: bytes, sobj) -> int:
    """Creates the object's segment and writes a ``SerializedObject`` into it.

    Returns the object's size in bytes. Raises ``FileExistsError`` if the segment
    already exists, ``ObjectStoreFullError`` if shared memory has no room for it.
    """
    return _create(session, object_id, sobj.total_size(), sobj.write_into)


def write_bytes(session: str, object_id: bytes, data) -> int:
    """Creates the object's segment holding ``data``, an already laid-out object.

    Used when restoring a spilled object. ``data`` is any bytes-like object (``bytes``,
    ``memoryview``, a read-only ``mmap`` of the spill file). Same errors as
    :func:`create_and_write`.
    """
    view = memoryview(data)
    src = view if view.ndim == 1 and view.format == "B" else view.cast("B")
    try:
        size = src.nbytes

        def fill(mv: memoryview) -> None:
            mv[:size] = src

        return _create(session, object_id, size, fill)
    finally:
        # Released at once, so a caller may close the mmap it passed in right after.
        src.release()
        view.release()


def open_readonly(session: str, object_id: bytes) -> memoryview | None:
    """A read-only memoryview of the whole segment, or None if it does not exist.

    The view (and every slice of it, including NumPy arrays deserialized from it) keeps
    the mapping alive, even after the segment is unlinked. On the get path: keep it to
    one open, one mmap and one close.
    """
    try:
        seg = posix_ipc.SharedMemory(segment_name(session, object_id), read_only=True)
    except posix_ipc.ExistentialError:
        return None
    try:
        mm = mmap.mmap(seg.fd, 0, access=mmap.ACCESS_READ)
    finally:
        seg.close_fd()
    return memoryview(mm)


def read_bytes(session: str, object_id: bytes) -> bytes | None:
    """A copy of the segment's bytes, or None if it does not exist."""
    mv = open_readonly(session, object_id)
    if mv is None:
        return None
    mm = mv.obj
    try:
        return mv.tobytes()
    finally:
        mv.release()
        mm.close()


def _unlink_name(name: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True


def unlink(session: str, object_id: bytes) -> bool:
    """Removes the object's segment; False if it did not exist.

    Existing mappings stay valid: the memory is returned once the last one is gone.
    """
    return _unlink_name(segment_name(session, object_id))


def cleanup_session(session: str) -> int:
    """Unlinks every segment of ``session`` found in /dev/shm; returns how many.

    Only names of the exact form ``skate-{session}-{hex}`` match, so a session whose id
    extends this one (``{session}-x``) is left alone.
    """
    prefix = f"{PREFIX}{session}-"
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        rest = entry[len(prefix):]
        if rest and _HEX.issuperset(rest) and _unlink_name("/" + entry):
            removed += 1
    return removed
