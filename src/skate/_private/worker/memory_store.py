"""The core worker's memory store: the state of every object this process knows.

For objects this process owns (task returns, puts) it holds the status; for objects it
borrows it caches what the owner answered. An entry is PENDING until a value arrives,
then holds one of: inline serialized bytes (small objects live here, in the owner's
memory), a marker that the value is sealed in the node's shared-memory store, or an
error to raise at ``get``.

Waiting is precise: a ``get``/``wait`` registers one waiter counting what it still needs;
each arriving object decrements the counters of its waiters and an event fires once per
waiter, not once per object.

Thread-safe; may call nothing else of skate.
"""

from __future__ import annotations

import threading
from _thread import allocate_lock as _allocate_lock

PENDING, INLINE, IN_STORE, ERROR = 0, 1, 2, 3


class Entry:
    __slots__ = ("state", "data", "waiters", "callbacks", "node_id")

    def __init__(self):
        self.state = PENDING
        self.data = None        # bytes (INLINE), size (IN_STORE), exception (ERROR)
        self.waiters = None     # list[_Waiter] or None
        self.callbacks = None   # list[callable(entry)] or None
        self.node_id = None     # where an IN_STORE object's primary copy is


class _Waiter:
    """One blocked get/wait: a bare lock, held until what it waits for is ready (cheaper
    than an Event, which builds a Condition)."""

    __slots__ = ("remaining", "lock", "fired")

    def __init__(self, remaining: int):
        self.remaining = remaining
        self.lock = _allocate_lock()
        self.lock.acquire()
        self.fired = False

    def fire(self) -> None:
        if not self.fired:
            self.fired = True
            self.lock.release()

    def wait(self, timeout) -> None:
        if timeout is None:
            self.lock.acquire()
        else:
            self.lock.acquire(timeout=max(0.0, timeout))


class MemoryStore:
    def __init__(self):
        self._lock = threading.Lock()
        self.entries: dict[bytes, Entry] = {}

    def add_pending(self, oid: bytes) -> None:
        with self._lock:
            if oid not in self.entries:
                self.entries[oid] = Entry()

    def get(self, oid: bytes) -> Entry | None:
        return self.entries.get(oid)

    def is_ready(self, oid: bytes) -> bool:
        e = self.entries.get(oid)
        return e is not None and e.state != PENDING

    def set(self, oid: bytes, state: int, data, node_id=None, overwrite: bool = False) -> bool:
        """Records a value; wakes its waiters and runs its callbacks. Returns False if the
        entry was already set (a duplicate reply) and ``overwrite`` is not asked."""
        with self._lock:
            e = self.entries.get(oid)
            if e is None:
                e = self.entries[oid] = Entry()
            elif e.state != PENDING and not overwrite:
                return False
            e.state = state
            e.data = data
            e.node_id = node_id
            waiters, e.waiters = e.waiters, None
            callbacks, e.callbacks = e.callbacks, None
            if waiters:
                for w in waiters:
                    w.remaining -= 1
                    if w.remaining <= 0:
                        w.fire()
        if callbacks:
            for cb in callbacks:
                cb(e)
        return True

    def reset(self, oid: bytes) -> None:
        """Back to PENDING (the object is being made again)."""
        with self._lock:
            e = self.entries.get(oid)
            if e is not None and e.state != PENDING:
                e.state = PENDING
                e.data = None

    def on_ready(self, oid: bytes, callback) -> None:
        """Runs ``callback(entry)`` once the object is ready (now, if it is)."""
        with self._lock:
            e = self.entries.get(oid)
            if e is None:
                e = self.entries[oid] = Entry()
            if e.state == PENDING:
                if e.callbacks is None:
                    e.callbacks = []
                e.callbacks.append(callback)
                return
        callback(e)

    def wait(self, oids, num: int, timeout: float | None) -> int:
        """Blocks until ``num`` of ``oids`` are ready (or timeout); returns how many are."""
        with self._lock:
            ready = 0
            missing = []
            for oid in oids:
                e = self.entries.get(oid)
                if e is None:
                    e = self.entries[oid] = Entry()
                if e.state != PENDING:
                    ready += 1
                else:
                    missing.append(e)
            if ready >= num:
                return ready
            waiter = _Waiter(num - ready)
            for e in missing:
                if e.waiters is None:
                    e.waiters = []
                e.waiters.append(waiter)
        waiter.wait(timeout)
        with self._lock:
            for e in missing:
                if e.waiters:
                    try:
                        e.waiters.remove(waiter)
                    except ValueError:
                        pass
            return sum(1 for oid in oids if (x := self.entries.get(oid)) is not None and x.state != PENDING)

    def delete(self, oid: bytes) -> Entry | None:
        with self._lock:
            return self.entries.pop(oid, None)

    def fail_pending(self, oids, exc) -> None:
        for oid in oids:
            self.set(oid, ERROR, exc)
