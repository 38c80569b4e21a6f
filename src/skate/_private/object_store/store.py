"""The node's object store: accounting, capacity and spilling of shared-memory objects.

The node manager owns one ``ObjectStore``. Clients (workers, drivers) create and read the
segments themselves through ``shm``; the store only decides whether a new object may be
created, keeps count of the bytes held in shared memory, and moves objects between shared
memory and disk so the node stays within its capacity.

Life of an object in the store::

    reserve --> PENDING --seal--> IN MEMORY --spill (LRU, under pressure)--> SPILLED
                   |                ^   |                                      |   |
                 abort              |   +-----------> free <-------------------+   |
                                    +------------- ensure_local -------------------+

Policy:

- Capacity counts every byte in shared memory, pending reservations included, so two
  clients cannot both be promised the last free bytes.
- When a reservation (or a restore) does not fit, sealed in-memory objects are spilled in
  least-recently-used order (``reserve``, ``seal``, ``touch`` and ``ensure_local`` mark an
  object used) until it does. Spilling writes the segment's bytes to
  ``{spill_dir}/{object_id hex}`` and unlinks the segment; readers that already mapped it
  keep their mapping. Pending objects are never spilled: their bytes are not complete.
- ``ObjectStoreFullError`` is raised only when spilling cannot help: the object is larger
  than the whole store, or pending reservations leave no room for it. Nothing is lost
  then: the caller is refused before anything is written.
- A seal is accepted even when it overflows the capacity (the bytes already exist; refusing
  them helps nobody): the store spills what it can and runs over capacity until frees
  bring it back.

Secondary copies (pulled from other nodes) are dropped rather than spilled by the layer
above; this class does not know about them.

Every method is called from the node manager's event loop thread: no locks, no threads,
no network. It calls ``shm`` and the filesystem, nothing else of the runtime.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import time
from collections import OrderedDict

from skate.exceptions import ObjectStoreFullError

from . import shm

logger = logging.getLogger(__name__)

_PENDING = "pending"
_IN_MEMORY = "in_memory"
_SPILLED = "spilled"


class _Entry:
    __slots__ = ("size", "state")

    def __init__(self, size: int, state: str):
        self.size = size
        self.state = state


_MIN_SPARE = 1 << 20   # smaller segments are cheap to make: not worth keeping
SPARE_IDLE_S = 5.0     # a spare unused this long goes back to the OS


class ObjectStore:
    """Accounting of one session's shared-memory objects on one node (see module doc)."""

    def __init__(self, session: str, capacity: int, spill_dir: str):
        self.session = session
        self.capacity = capacity
        self.spill_dir = spill_dir
        self._entries: dict[bytes, _Entry] = {}
        # Sealed objects in shared memory, least recently used first: the spill candidates.
        self._lru: OrderedDict[bytes, None] = OrderedDict()
        self._used = 0            # bytes in shared memory, pending included
        self._spillable = 0       # bytes of the objects in _lru
        self._spilled_bytes = 0
        self._spilled_total = 0
        self._restored_total = 0
        self._spill_dir_made = False
        # Freed segments kept for reuse, smallest first: (size, spare id). Allocating a
        # fresh tmpfs segment costs more than copying into it (100 MB: ~90 ms of page
        # allocation vs ~12 ms of memcpy), so a put that fits one takes it over.
        self._spares: list = []
        self._spare_bytes = 0
        self.spare_limit = capacity // 4
        # Pending objects freed before their seal came (e.g. their owner died while a
        # worker was writing its result): the seal, when it comes, is dropped instead
        # of creating an entry nobody would free.
        self._freed_pending: set = set()

    # -- creation -------------------------------------------------------------------

    def reserve(self, object_id: bytes, size: int) -> bool:
        """Counts ``size`` bytes for a segment a client is about to create.

        Spills least-recently-used objects if needed. Raises ``ObjectStoreFullError`` when
        the object cannot fit even after spilling, ``ValueError`` if ``object_id`` is
        already known with another size. Re-reserving a known id with its size is a no-op.
        """
        self._freed_pending.discard(object_id)
        entry = self._entries.get(object_id)
        if entry is not None:
            if entry.size != size:
                raise ValueError(
                    f"object {object_id.hex()} is already in the store with {entry.size} "
                    f"bytes; cannot reserve it again with {size} bytes"
                )
            self.touch(object_id)
            return False
        self._make_room(size, object_id)
        recycled = self._take_spare(object_id, size)
        self._entries[object_id] = _Entry(size, _PENDING)
        self._used += size
        return recycled

    # -- recycling ---------------------------------------------------------------------

    def _take_spare(self, object_id: bytes, size: int) -> bool:
        """Renames the smallest spare segment that holds ``size`` bytes to ``object_id``.
        True when the client is to write into that existing segment."""
        for i, (spare_size, spare_id, _) in enumerate(self._spares):
            if spare_size >= size:
                del self._spares[i]
                self._spare_bytes -= spare_size
                try:
                    shm.rename(self.session, spare_id, object_id)
                except OSError:
                    return False
                return True
        return False

    def _keep_spare(self, object_id: bytes, size: int) -> bool:
        if size < _MIN_SPARE or self._spare_bytes + size > self.spare_limit:
            return False
        spare_id = os.urandom(len(object_id))
        try:
            shm.rename(self.session, object_id, spare_id)
        except OSError:
            return False
        self._spares.append((size, spare_id, time.monotonic()))
        self._spares.sort()
        self._spare_bytes += size
        return True

    def _drop_spares(self, need: int) -> None:
        """Spares are the first memory given up when room is needed (largest first)."""
        while self._spares and self._used + self._spare_bytes + need > self.capacity:
            size, spare_id, _ = self._spares.pop()
            self._spare_bytes -= size
            shm.unlink(self.session, spare_id)

    def trim_spares(self, max_idle_s: float = SPARE_IDLE_S) -> int:
        """Gives back to the OS the spares unused for ``max_idle_s``: a put/drop loop
        keeps reusing its segments, an idle store holds no freed memory for long."""
        now = time.monotonic()
        keep, dropped = [], 0
        for entry in self._spares:
            if now - entry[2] >= max_idle_s:
                self._spare_bytes -= entry[0]
                shm.unlink(self.session, entry[1])
                dropped += 1
            else:
                keep.append(entry)
        self._spares = keep
        return dropped

    def abort(self, object_id: bytes) -> None:
        """Forgets a pending reservation whose creator failed, and unlinks its segment.

        Ignored for unknown ids and for objects already sealed (those go through ``free``).
        """
        self._freed_pending.discard(object_id)
        entry = self._entries.get(object_id)
        if entry is None or entry.state != _PENDING:
            return
        del self._entries[object_id]
        self._used -= entry.size
        shm.unlink(self.session, object_id)

    def seal(self, object_id: bytes, size: int) -> None:
        """The object's segment now exists and is complete: it becomes spillable.

        Works without a prior reservation too. Never raises for lack of space: the bytes
        already exist, so the store spills what it can and may run over capacity.
        """
        if object_id in self._freed_pending:
            self._freed_pending.discard(object_id)
            shm.unlink(self.session, object_id)
            return
        entry = self._entries.get(object_id)
        if entry is None:
            self._make_room_best_effort(size)
            entry = self._entries[object_id] = _Entry(size, _IN_MEMORY)
            self._used += size
        elif entry.state == _PENDING:
            if size != entry.size:  # the creator wrote more or less than it reserved
                self._make_room_best_effort(size - entry.size)
                self._used += size - entry.size
                entry.size = size
            entry.state = _IN_MEMORY
        elif entry.state == _SPILLED:
            # The object was created again (e.g. re-executed) while its old copy sat on
            # disk: the new segment wins and the spill file goes.
            self._make_room_best_effort(size)
            self._spilled_bytes -= entry.size
            self._remove_spill_file(object_id)
            entry.size = size
            entry.state = _IN_MEMORY
            self._used += size
        else:  # already sealed: a duplicate seal
            self.touch(object_id)
            return
        self._lru[object_id] = None
        self._spillable += entry.size

    # -- access ---------------------------------------------------------------------

    def ensure_local(self, object_id: bytes) -> bool:
        """Makes a sealed object readable from shared memory, restoring it if spilled.

        Returns True when the segment can be opened now, False when the object is unknown
        or not sealed yet (or its spill file is gone, which is logged). Restoring may spill
        other objects (never this one) and raises ``ObjectStoreFullError`` when even that
        cannot make room.
        """
        entry = self._entries.get(object_id)
        if entry is None or entry.state == _PENDING:
            return False
        if entry.state == _IN_MEMORY:
            self._lru.move_to_end(object_id)
            return True
        return self._restore(object_id, entry)

    def touch(self, object_id: bytes) -> None:
        """Marks an object as recently used, so it is spilled last."""
        if object_id in self._lru:
            self._lru.move_to_end(object_id)

    def contains(self, object_id: bytes) -> bool:
        """True for a sealed object, whether in shared memory or spilled."""
        entry = self._entries.get(object_id)
        return entry is not None and entry.state != _PENDING

    def is_spilled(self, object_id: bytes) -> bool:
        entry = self._entries.get(object_id)
        return entry is not None and entry.state == _SPILLED

    def size_of(self, object_id: bytes) -> int | None:
        """The object's size in bytes (pending ones included), None if unknown."""
        entry = self._entries.get(object_id)
        return None if entry is None else entry.size

    # -- release --------------------------------------------------------------------

    def free_owned_by(self, owner_prefix: bytes) -> int:
        """The owner process is gone: frees every object it owned (an object id starts
        with its owner's worker id). Returns how many."""
        doomed = [oid for oid in self._entries if oid.startswith(owner_prefix)]
        for oid in doomed:
            self.free(oid)
        return len(doomed)

    def free(self, object_id: bytes) -> None:
        """The owner dropped the last reference: removes the segment and any spill file."""
        entry = self._entries.pop(object_id, None)
        if entry is None:
            return
        if entry.state == _PENDING:
            self._freed_pending.add(object_id)
        if entry.state == _SPILLED:
            self._spilled_bytes -= entry.size
            self._remove_spill_file(object_id)
            return
        self._used -= entry.size
        if entry.state == _IN_MEMORY:
            del self._lru[object_id]
            self._spillable -= entry.size
            if self._keep_spare(object_id, entry.size):
                return
        shm.unlink(self.session, object_id)

    def stats(self) -> dict:
        num_in_memory = len(self._lru)
        num_spilled = sum(1 for e in self._entries.values() if e.state == _SPILLED)
        return {
            "capacity": self.capacity,
            "used": self._used,
            "num_objects": len(self._entries),
            "num_in_memory": num_in_memory,
            "num_pending": len(self._entries) - num_in_memory - num_spilled,
            "num_spilled": num_spilled,
            "spilled_bytes": self._spilled_bytes,
            "spilled_total": self._spilled_total,
            "restored_total": self._restored_total,
            "spare_bytes": self._spare_bytes,
            "num_spares": len(self._spares),
        }

    def shutdown(self) -> None:
        """Unlinks every segment of the session and removes the spill directory."""
        for object_id, entry in self._entries.items():
            if entry.state != _SPILLED:
                shm.unlink(self.session, object_id)
        # Also segments this store never heard of (a client died between create and seal).
        shm.cleanup_session(self.session)
        self._spares.clear()
        self._spare_bytes = 0
        shutil.rmtree(self.spill_dir, ignore_errors=True)
        self._entries.clear()
        self._lru.clear()
        self._used = self._spillable = self._spilled_bytes = 0

    # -- spilling -------------------------------------------------------------------

    def _make_room(self, size: int, object_id: bytes) -> None:
        """Spills LRU objects until ``size`` more bytes fit, or raises without spilling."""
        self._drop_spares(size)
        if self._used + size <= self.capacity:
            return
        if size > self.capacity:
            raise ObjectStoreFullError(
                f"object {object_id.hex()} of {size} bytes is larger than the object "
                f"store's capacity of {self.capacity} bytes; start skate with a larger "
                f"object_store_memory, or split the object into smaller pieces"
            )
        # Check first, so a hopeless request does not spill objects for nothing.
        unspillable = self._used - self._spillable
        if unspillable + size > self.capacity:
            raise ObjectStoreFullError(
                f"object {object_id.hex()} of {size} bytes does not fit in the object "
                f"store (capacity {self.capacity} bytes, {self._used} bytes used, of which "
                f"{unspillable} bytes are objects being created and cannot be spilled); "
                f"retry when they are sealed, or start skate with a larger "
                f"object_store_memory"
            )
        while self._used + size > self.capacity and self._lru:
            victim = next(iter(self._lru))
            try:
                self._spill(victim)
            except OSError as exc:
                raise ObjectStoreFullError(
                    f"object {object_id.hex()} of {size} bytes does not fit in the object "
                    f"store (capacity {self.capacity} bytes, {self._used} bytes used) and "
                    f"spilling to {self.spill_dir} failed: {exc}; free disk space there "
                    f"or start skate with a larger object_store_memory"
                ) from exc

    def _make_room_best_effort(self, size: int) -> None:
        while self._used + size > self.capacity and self._lru:
            try:
                self._spill(next(iter(self._lru)))
            except OSError as exc:
                logger.warning("object store over capacity: spilling failed: %s", exc)
                return

    def _spill_path(self, object_id: bytes) -> str:
        return os.path.join(self.spill_dir, object_id.hex())

    def _spill(self, object_id: bytes) -> None:
        """Moves one sealed object from shared memory to its spill file."""
        entry = self._entries[object_id]
        mv = shm.open_readonly(self.session, object_id)
        if mv is None:
            # Someone removed the segment behind the store's back; the bytes are gone.
            logger.error("object %s vanished from shared memory before it could be spilled",
                         object_id.hex())
            self._forget_in_memory(object_id, entry)
            return
        if not self._spill_dir_made:
            os.makedirs(self.spill_dir, exist_ok=True)
            self._spill_dir_made = True
        path = self._spill_path(object_id)
        tmp = path + ".tmp"
        mm = mv.obj
        try:
            # Written straight from the mapping (no copy in this process), then renamed so
            # a crash never leaves a truncated file under the object's name.
            with open(tmp, "wb") as f:
                f.write(mv[:entry.size])
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        finally:
            mv.release()
            mm.close()
        shm.unlink(self.session, object_id)
        del self._lru[object_id]
        self._spillable -= entry.size
        self._used -= entry.size
        entry.state = _SPILLED
        self._spilled_bytes += entry.size
        self._spilled_total += 1

    def _restore(self, object_id: bytes, entry: _Entry) -> bool:
        """Moves one spilled object back into shared memory."""
        path = self._spill_path(object_id)
        # The object is not in _lru while spilled, so making room never spills it.
        self._make_room(entry.size, object_id)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            logger.error("spill file %s of object %s is missing", path, object_id.hex())
            del self._entries[object_id]
            self._spilled_bytes -= entry.size
            return False
        with f:
            try:
                if entry.size == 0:
                    shm.write_bytes(self.session, object_id, b"")
                else:
                    # Copied once, from the file's pages into the segment.
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                        shm.write_bytes(self.session, object_id, data)
            except FileExistsError:
                pass  # already recreated by a client; its copy is as good as ours
        self._remove_spill_file(object_id)
        self._spilled_bytes -= entry.size
        entry.state = _IN_MEMORY
        self._used += entry.size
        self._lru[object_id] = None
        self._spillable += entry.size
        self._restored_total += 1
        return True

    def _forget_in_memory(self, object_id: bytes, entry: _Entry) -> None:
        del self._entries[object_id]
        del self._lru[object_id]
        self._spillable -= entry.size
        self._used -= entry.size

    def _remove_spill_file(self, object_id: bytes) -> None:
        try:
            os.unlink(self._spill_path(object_id))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                logger.warning("could not remove spill file of %s: %s", object_id.hex(), exc)
