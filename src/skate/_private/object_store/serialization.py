"""Serialization of values into skate's object format.

Pickle protocol 5 with out-of-band buffers: the pickle stream ("meta") holds the
structure, large contiguous buffers (NumPy arrays, Arrow buffers, bytes-likes wrapped in
``PickleBuffer``) are kept aside and laid out after it, each aligned to 64 bytes. Reading
the layout back from a shared-memory mapping hands those buffers to ``pickle.loads`` as
slices of the mapping, so arrays come back as zero-copy, read-only views.

Layout of one serialized object::

    +-------+---------+----------+---------------------------+------+-----+------+----
    | magic | n_bufs  | meta_len | (offset, length) * n_bufs | meta | pad | buf0 | ...
    | 4 B   | u32     | u64      | u64, u64                  |      |     | (64-B aligned)
    +-------+---------+----------+---------------------------+------+-----+------+----

Functions, classes and closures go through ``cloudpickle``; values made only of plain
built-in types take the faster standard pickler. ObjectRefs met while pickling are
recorded (see :func:`note_ref`), so the owner table knows which refs an object contains.

This module imports nothing from the runtime.
"""

from __future__ import annotations

import pickle
import struct
import threading

import cloudpickle

MAGIC = b"SKT1"
_HEAD = struct.Struct("<4sIQ")
_BUF = struct.Struct("<QQ")
ALIGN = 64

# Values whose pickles never reference user code: the standard pickler is safe for them.
_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex, bytearray})

_ctx = threading.local()


def note_ref(ref) -> None:
    """Called by ``ObjectRef.__reduce__``: records a ref contained in what is pickled."""
    refs = getattr(_ctx, "refs", None)
    if refs is not None:
        refs.append(ref)


def _is_plain(value, depth: int = 0) -> bool:
    # On the hot path for every task's arguments: plain loops, no generators.
    t = type(value)
    if t in _PLAIN:
        return True
    if depth > 2:
        return False
    if t is tuple or t is list:
        for v in value:
            if type(v) not in _PLAIN and not _is_plain(v, depth + 1):
                return False
        return True
    if t is dict:
        for k, v in value.items():
            if type(k) not in _PLAIN or (type(v) not in _PLAIN and not _is_plain(v, depth + 1)):
                return False
        return True
    return False


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class SerializedObject:
    """A value turned into a pickle stream plus out-of-band buffers."""

    __slots__ = ("meta", "buffers", "contained_refs", "_offsets", "_size")

    def __init__(self, meta: bytes, buffers: list, contained_refs: list):
        self.meta = meta
        self.buffers = buffers
        self.contained_refs = contained_refs
        header = _HEAD.size + _BUF.size * len(buffers)
        pos = header + len(meta)
        offsets = []
        for buf in buffers:
            pos = _align(pos)
            offsets.append(pos)
            pos += buf.nbytes
        self._offsets = offsets
        self._size = pos

    def total_size(self) -> int:
        return self._size

    def write_into(self, mv: memoryview) -> None:
        """Writes the layout into ``mv`` (at least ``total_size()`` bytes)."""
        bufs = self.buffers
        _HEAD.pack_into(mv, 0, MAGIC, len(bufs), len(self.meta))
        pos = _HEAD.size
        for off, buf in zip(self._offsets, bufs):
            _BUF.pack_into(mv, pos, off, buf.nbytes)
            pos += _BUF.size
        mv[pos:pos + len(self.meta)] = self.meta
        for off, buf in zip(self._offsets, bufs):
            mv[off:off + buf.nbytes] = buf

    def to_bytes(self) -> bytes:
        if not self.buffers:  # the common small case: header + meta, no padding
            return _HEAD.pack(MAGIC, 0, len(self.meta)) + self.meta
        out = bytearray(self._size)
        self.write_into(memoryview(out))
        return bytes(out)


def serialize(value) -> SerializedObject:
    """Serializes ``value``; raises ``TypeError`` naming the type when it cannot."""
    buffers: list = []
    refs: list = []
    prev = getattr(_ctx, "refs", None)
    _ctx.refs = refs
    try:
        if _is_plain(value):
            meta = pickle.dumps(value, protocol=5)
        else:
            meta = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception as exc:
        raise TypeError(f"cannot serialize a value of type {type(value).__qualname__}: {exc}") from exc
    finally:
        _ctx.refs = prev
    raws = []
    for pb in buffers:
        try:
            raws.append(pb.raw())
        except BufferError:  # non-contiguous: copy into a contiguous buffer
            raws.append(memoryview(bytes(memoryview(pb))).cast("B"))
    return SerializedObject(meta, raws, refs)


def dumps(value) -> bytes:
    """Serializes ``value`` into one ``bytes`` (for inline transport)."""
    return serialize(value).to_bytes()


def deserialize(data) -> object:
    """Reads a value back from ``bytes`` or a ``memoryview`` of the layout.

    When ``data`` is a memoryview over shared memory, out-of-band buffers are slices of
    it: the returned arrays are zero-copy views that keep the mapping alive.
    """
    mv = data if isinstance(data, memoryview) else memoryview(data)
    magic, nbufs, meta_len = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC:
        raise ValueError("not a skate serialized object (bad magic)")
    pos = _HEAD.size
    if nbufs == 0:
        return pickle.loads(mv[pos:pos + meta_len])
    buffers = []
    for _ in range(nbufs):
        off, length = _BUF.unpack_from(mv, pos)
        buffers.append(mv[off:off + length])
        pos += _BUF.size
    return pickle.loads(mv[pos:pos + meta_len], buffers=buffers)
