"""The reference counter: when may an object be freed?

For each object this process knows it counts:

- ``local``: live ``ObjectRef`` instances in this process;
- ``submitted``: tasks this process submitted that take the object as an argument and
  have not finished (the worker reads it while the caller keeps it alive);
- ``contained``: live objects owned here whose serialized value contains the ref;
- ``borrowers``: other processes that hold the ref (owned objects only).

When every count is zero an owned object is freed (``on_free(oid)``: the memory store
entry goes, a shared-memory copy is deleted); a borrowed one is released
(``on_release(oid, owner)``: the owner is told this borrower is done).

Decrements from ``ObjectRef.__del__`` may run in any thread at any moment, even inside
a lock of this process. They are therefore only queued (a deque append, safe anywhere)
and applied on the I/O thread; increments apply at once. A late decrement can only delay
a free, never make one early.

May call nothing else of skate; the core worker passes in the callbacks.
"""

from __future__ import annotations

import threading
from collections import deque

_LOCAL, _SUBMITTED, _CONTAINED, _BORROWERS, _OWNER = range(5)


class ReferenceCounter:
    def __init__(self, worker_id: bytes, on_free, on_release, schedule):
        self.worker_id = worker_id
        self._on_free = on_free
        self._on_release = on_release
        self._schedule = schedule          # schedule(fn): run fn on the I/O thread soon
        self._lock = threading.RLock()
        # oid -> [local, submitted, contained, borrowers set|None, owner (None if owned)]
        self.refs: dict[bytes, list] = {}
        self._released: deque = deque()
        self._scheduled = False
        # Contained refs per owned object, released when the object is freed.
        self._contents: dict[bytes, list] = {}

    # --- increments: immediate -------------------------------------------------------
    def add_local(self, oid: bytes, owner) -> None:
        with self._lock:
            r = self.refs.get(oid)
            if r is None:
                self.refs[oid] = [1, 0, 0, None, owner]
            else:
                r[_LOCAL] += 1

    def add_submitted(self, oids) -> None:
        with self._lock:
            for oid, owner in oids:
                r = self.refs.get(oid)
                if r is None:
                    self.refs[oid] = [0, 1, 0, None, owner]
                else:
                    r[_SUBMITTED] += 1

    def add_contents(self, outer: bytes, refs) -> None:
        """``outer`` (owned here) contains ``refs``: keep them alive while it lives."""
        if not refs:
            return
        with self._lock:
            pairs = []
            for ref in refs:
                oid = ref.id
                r = self.refs.get(oid)
                owner = None if ref.owner[0] == self.worker_id else ref.owner
                if r is None:
                    self.refs[oid] = [0, 0, 1, None, owner]
                else:
                    r[_CONTAINED] += 1
                pairs.append(oid)
            self._contents.setdefault(outer, []).extend(pairs)

    def add_borrower(self, oid: bytes, borrower: bytes) -> None:
        with self._lock:
            r = self.refs.get(oid)
            if r is None:
                return  # already freed: the borrower will get ObjectLostError
            if r[_BORROWERS] is None:
                r[_BORROWERS] = set()
            r[_BORROWERS].add(borrower)

    # --- decrements: deferred to the I/O thread --------------------------------------
    def remove_local(self, oid: bytes) -> None:
        self._released.append((oid, _LOCAL, None))
        self._kick()

    def remove_submitted(self, oids) -> None:
        for oid, _owner in oids:
            self._released.append((oid, _SUBMITTED, None))
        self._kick()

    def remove_borrower(self, oid: bytes, borrower: bytes) -> None:
        self._released.append((oid, _BORROWERS, borrower))
        self._kick()

    def remove_borrower_everywhere(self, borrower: bytes) -> None:
        """A borrowing process died: it holds nothing any more."""
        with self._lock:
            oids = [oid for oid, r in self.refs.items() if r[_BORROWERS] and borrower in r[_BORROWERS]]
        for oid in oids:
            self._released.append((oid, _BORROWERS, borrower))
        self._kick()

    def _kick(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._schedule(self.apply_released)

    def apply_released(self) -> None:
        self._scheduled = False
        released = self._released
        free = []
        with self._lock:
            while released:
                oid, kind, who = released.popleft()
                r = self.refs.get(oid)
                if r is None:
                    continue
                if kind == _BORROWERS:
                    if r[_BORROWERS]:
                        r[_BORROWERS].discard(who)
                else:
                    r[kind] -= 1
                if r[_LOCAL] <= 0 and r[_SUBMITTED] <= 0 and r[_CONTAINED] <= 0 and not r[_BORROWERS]:
                    del self.refs[oid]
                    free.append((oid, r[_OWNER]))
        for oid, owner in free:
            if owner is None:
                inner = self._contents.pop(oid, None)
                if inner:
                    for ioid in inner:
                        self._released.append((ioid, _CONTAINED, None))
                self._on_free(oid)
            else:
                self._on_release(oid, owner)
        if released:
            self.apply_released()

    def has_pending_releases(self) -> bool:
        return bool(self._released)

    # --- queries -----------------------------------------------------------------------
    def count(self) -> int:
        return len(self.refs)

    def has(self, oid: bytes) -> bool:
        return oid in self.refs
