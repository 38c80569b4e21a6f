"""Hypothesis strategies for the values skate must carry unchanged.

- ``values()``: nested containers (lists, tuples, dicts, sets, frozensets) of Python
  scalars (big ints, NaN and signed zeros, complex, text, bytes), NumPy arrays and Arrow
  tables.
- ``arrays()``: NumPy arrays of every scalar dtype (bool, ints, uints, floats, complex,
  datetime64, timedelta64, bytes, str), structured dtypes and object dtype, of any shape
  up to 3 dimensions including empty and 0-d ones, C or Fortran ordered, and
  non-contiguous views (strided, reversed, transposed).
- ``tables()``: Arrow tables with nullable int, float, string, bool and list columns.
- ``with_refs()``: templates whose ``RefTo(v)`` leaves the test turns into
  ``skate.put(v)``: objects holding ObjectRefs.
- ``near_threshold()``: bytes and arrays whose serialized size is within a few bytes of the
  inline threshold, on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import hypothesis.strategies as st
import numpy as np
import pyarrow as pa
from hypothesis.extra import numpy as hnp

from skate._private.config import CONFIG
from skate._private.object_store import serialization

THRESHOLD = CONFIG.inline_threshold

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2 ** 200), max_value=2 ** 200)
           | st.floats() | st.complex_numbers() | st.text(max_size=20) | st.binary(max_size=40))
hashables = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10)
             | st.binary(max_size=10))

_dtypes = (hnp.scalar_dtypes() | hnp.byte_string_dtypes(max_len=8) | hnp.unicode_string_dtypes(max_len=8)
           | hnp.array_dtypes(subtype_strategy=hnp.scalar_dtypes(), max_size=3))
_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)


def _view(a: np.ndarray, how: str) -> np.ndarray:
    if a.ndim == 0:
        return a
    if how == "strided":
        return a[::2]
    if how == "reversed":
        return a[::-1]
    if how == "transposed":
        return a.T
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "inner-strided":
        return a[..., ::2]
    return a


@st.composite
def object_arrays(draw):
    items = draw(st.lists(scalars | st.lists(scalars, max_size=3), min_size=0, max_size=8))
    a = np.empty(len(items), dtype=object)
    for i, v in enumerate(items):
        a[i] = v
    if len(items) % 2 == 0 and items and draw(st.booleans()):
        a = a.reshape(2, -1)
    return a


@st.composite
def arrays(draw):
    if draw(st.integers(0, 5)) == 0:
        a = draw(object_arrays())
    else:
        a = draw(hnp.arrays(dtype=_dtypes, shape=_shapes))
    return _view(a, draw(st.sampled_from(("none", "strided", "reversed", "transposed", "fortran",
                                          "inner-strided"))))


@st.composite
def tables(draw):
    n = draw(st.integers(0, 6))
    columns = {}
    kinds = draw(st.lists(st.sampled_from(("int", "float", "str", "bool", "list")), min_size=1, max_size=4))
    for i, kind in enumerate(kinds):
        if kind == "int":
            items, typ = draw(st.lists(st.none() | st.integers(-2 ** 63, 2 ** 63 - 1), min_size=n, max_size=n)), pa.int64()
        elif kind == "float":
            items, typ = draw(st.lists(st.none() | st.floats(allow_nan=False), min_size=n, max_size=n)), pa.float64()
        elif kind == "str":
            items, typ = draw(st.lists(st.none() | st.text(max_size=8), min_size=n, max_size=n)), pa.string()
        elif kind == "bool":
            items, typ = draw(st.lists(st.none() | st.booleans(), min_size=n, max_size=n)), pa.bool_()
        else:
            items = draw(st.lists(st.none() | st.lists(st.integers(-100, 100), max_size=3), min_size=n, max_size=n))
            typ = pa.list_(pa.int64())
        columns[f"c{i}_{kind}"] = pa.array(items, type=typ)
    return pa.table(columns)


def values(max_leaves: int = 12):
    leaves = scalars | arrays() | tables()
    return st.recursive(
        leaves,
        lambda children: (st.lists(children, max_size=4) | st.tuples(children, children)
                          | st.dictionaries(hashables, children, max_size=4)
                          | st.frozensets(hashables, max_size=4) | st.sets(hashables, max_size=4)),
        max_leaves=max_leaves)


# --- objects holding refs -------------------------------------------------------------------

@dataclass(frozen=True)
class RefTo:
    """A leaf of a template: becomes ``skate.put(value)`` when the test builds the value."""
    value: object


def with_refs():
    """Containers (``put`` of a bare ref is refused by the API) whose leaves are values
    and ``RefTo`` markers."""
    leaf = st.builds(RefTo, scalars | arrays()) | scalars

    def containers(children):
        return (st.lists(children, min_size=1, max_size=3)
                | st.dictionaries(st.text(max_size=4), children, min_size=1, max_size=3)
                | st.tuples(children, children))
    return containers(st.recursive(leaf, containers, max_leaves=8))


def materialize(template, put, puts: list):
    """``template`` with each ``RefTo(v)`` replaced by ``put(v)``; ``puts`` gets
    ``(ref, v)`` for each."""
    if isinstance(template, RefTo):
        ref = put(template.value)
        puts.append((ref, template.value))
        return ref
    if isinstance(template, list):
        return [materialize(x, put, puts) for x in template]
    if isinstance(template, tuple):
        return tuple(materialize(x, put, puts) for x in template)
    if isinstance(template, dict):
        return {k: materialize(v, put, puts) for k, v in template.items()}
    return template


# --- sizes at the inline threshold ------------------------------------------------------------

def serialized_size(value) -> int:
    return serialization.serialize(value).total_size()


def length_at_threshold(make) -> int:
    """The length n at which ``make(n)`` serializes to exactly THRESHOLD bytes."""
    n = THRESHOLD // 2
    for _ in range(8):   # sizes grow linearly in n once the length's encoding is stable
        a, b = serialized_size(make(n)), serialized_size(make(n + 1))
        step = b - a
        n += (THRESHOLD - a) // step
        if serialized_size(make(n)) == THRESHOLD:
            return n
    return n


MAKERS = {
    "bytes": lambda n: bytes(n),
    "uint8": lambda n: np.arange(n, dtype=np.uint8),
    "float64": lambda n: np.linspace(0, 1, n),
    "int16-strided": lambda n: np.arange(2 * n, dtype=np.int16)[::2],
}


@st.composite
def near_threshold(draw):
    """``(kind, n)``: ``MAKERS[kind](n)`` serializes to THRESHOLD + d bytes for a small d
    of either sign; a value is inline below the threshold, in shared memory from it on."""
    kind = draw(st.sampled_from(sorted(MAKERS)))
    return kind, length_at_threshold(MAKERS[kind]) + draw(st.integers(-3, 3))
