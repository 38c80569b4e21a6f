"""``ObjectRef``: a reference to an object that exists, or will, somewhere in the cluster.

A ref is an object id plus its owner's address (the owner's worker id and socket). Each
live ``ObjectRef`` counts as one reference in its process; pickling a ref into a task
argument, a ``put`` value or a return value records it as contained there, and
unpickling it elsewhere makes that process a borrower known to the owner.

The counting itself is the core worker's (``_private/worker/reference_counter.py``); this
module reaches it through ``_hooks``, set while skate runs in this process.
"""

from __future__ import annotations

from skate._private.object_store import serialization


class _NoHooks:
    """Before ``init`` and after ``shutdown`` refs count nothing."""

    def add_local(self, oid, owner):
        pass

    def remove_local(self, oid):
        pass

    def on_deserialized(self, oid, owner):
        pass

    def as_future(self, ref):
        raise RuntimeError("skate is not running: call skate.init() first")


_hooks = _NoHooks()


def set_hooks(hooks) -> None:
    global _hooks
    _hooks = hooks if hooks is not None else _NoHooks()


class ObjectRef:
    __slots__ = ("id", "owner", "_counted", "__weakref__")

    def __init__(self, oid: bytes, owner, _count: bool = True):
        self.id = oid
        self.owner = owner           # (worker_id, socket_path)
        self._counted = _count
        if _count:
            _hooks.add_local(oid, owner)

    def __del__(self):
        if self._counted:
            try:
                _hooks.remove_local(self.id)
            except Exception:
                pass

    def __reduce__(self):
        serialization.note_ref(self)
        return (_rebuild, (self.id, self.owner))

    def hex(self) -> str:
        return self.id.hex()

    def binary(self) -> bytes:
        return self.id

    def task_id(self) -> bytes:
        return self.id[:16]

    def __repr__(self) -> str:
        return f"ObjectRef({self.id.hex()})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectRef) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def future(self):
        """A ``concurrent.futures.Future`` that completes with this object's value."""
        return _hooks.as_future(self)

    def __await__(self):
        import asyncio
        return asyncio.wrap_future(self.future()).__await__()


def _rebuild(oid: bytes, owner) -> ObjectRef:
    ref = ObjectRef(oid, owner, _count=True)
    _hooks.on_deserialized(oid, owner)
    return ref
