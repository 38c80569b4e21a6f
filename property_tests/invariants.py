"""What must hold after every program, and the tally of a soak.

- ``same(a, b)``: the equality the value properties need: exact types, NaN equal to NaN,
  -0.0 distinct from 0.0, NumPy arrays equal in dtype, shape and bytes, Arrow tables in
  schema and rows, ObjectRefs by id.
- ``Verdict``: what one program's run came to: wrong results, hangs (a call that waited
  past its deadline), leaks (the store's accounting or the driver's reference counts not
  back to zero), and outcomes that match a known, reported runtime bug.
- ``check_drained``: once a program dropped every ref, the node's store holds nothing
  (``used`` and ``num_objects`` back to 0: freed segments kept as spares for reuse do
  not count, they go after 5 s idle) and the driver counts no reference.
- ``STATS``: programs run, faults injected, wrong results, hangs, leaks, for the summary
  line of a soak (printed at the end of the session).
"""

from __future__ import annotations

import gc
import math
import os
import threading
import time
from dataclasses import dataclass, field

import skate
from skate._private import runtime
from skate._private.protocol import messages as M


# --- equality -------------------------------------------------------------------------------

def same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    t = type(a)
    if t is float:
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if t is complex:
        return same(a.real, b.real) and same(a.imag, b.imag)
    if t in (list, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if t is dict:
        return same(list(a), list(b)) and all(same(x, y) for x, y in zip(a.values(), b.values()))
    if t in (set, frozenset):
        if len(a) != len(b):
            return False
        rest = list(b)
        for x in a:
            for i, y in enumerate(rest):
                if same(x, y):
                    del rest[i]
                    break
            else:
                return False
        return True
    if isinstance(a, skate.ObjectRef):
        return a.id == b.id
    mod = t.__module__.split(".")[0]
    if mod == "numpy" and t.__name__ == "ndarray":
        if a.shape != b.shape:
            return False
        if a.dtype != b.dtype:
            # NumPy's own pickling turns a non-contiguous array of non-native byte order
            # into native order (the values are kept); skate serializes with pickle.
            native = a.dtype.newbyteorder("=")
            if native != b.dtype.newbyteorder("="):
                return False
            a, b = a.astype(native), b.astype(native)
        if a.dtype.hasobject:
            return all(same(x, y) for x, y in zip(a.ravel().tolist(), b.ravel().tolist()))
        return a.tobytes() == b.tobytes()
    if mod == "pyarrow" and t.__name__ == "Table":
        return a.schema.equals(b.schema) and same(a.to_pylist(), b.to_pylist())
    return a == b


# --- verdicts ---------------------------------------------------------------------------------

@dataclass
class Verdict:
    wrong: list = field(default_factory=list)
    hangs: list = field(default_factory=list)
    leaks: list = field(default_factory=list)
    known: list = field(default_factory=list)    # outcomes of known, reported runtime bugs
    faults: int = 0

    @property
    def ok(self) -> bool:
        return not (self.wrong or self.hangs or self.leaks)

    @property
    def clean(self) -> bool:
        """Nothing wrong and no known bug met: the cluster can serve the next program."""
        return self.ok and not self.known

    def describe(self) -> str:
        lines = []
        for what, items in (("WRONG", self.wrong), ("HANG", self.hangs), ("LEAK", self.leaks),
                            ("known bug", self.known)):
            lines += [f"{what}: {item}" for item in items]
        return "\n".join(lines) or "ok"


@dataclass
class Stats:
    programs: int = 0
    faults: int = 0
    wrong: int = 0
    hangs: int = 0
    leaks: int = 0
    known: int = 0
    failures: list = field(default_factory=list)   # (what, reproducer) of each failed program
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, verdict: Verdict, reproducer: str) -> None:
        with self.lock:
            self.programs += 1
            self.faults += verdict.faults
            self.wrong += len(verdict.wrong)
            self.hangs += len(verdict.hangs)
            self.leaks += len(verdict.leaks)
            self.known += len(verdict.known)
            if not verdict.ok:
                self.failures.append((verdict.describe(), reproducer))

    def summary(self) -> str:
        return (f"programs run: {self.programs}, faults injected: {self.faults}, wrong results: "
                f"{self.wrong}, hangs: {self.hangs}, leaks: {self.leaks} (known-bug outcomes: {self.known})")


STATS = Stats()


# --- accounting -------------------------------------------------------------------------------

def node_info() -> dict:
    return runtime.core().node_request(M.NODE_INFO, False, timeout=10)


def store_stats() -> dict:
    return node_info()["store"]


@dataclass(frozen=True)
class Baseline:
    """What was held before a program: a failed example's traceback may keep its refs
    alive, and the next example must not be blamed for them."""
    refs: frozenset
    used: int
    objects: int


def baseline() -> Baseline:
    gc.collect()
    store = store_stats()
    return Baseline(frozenset(runtime.core().ref_counter.refs), store["used"], store["num_objects"])


def leaked_refs(before: Baseline | None = None) -> list:
    """The driver's reference counts ``(oid, [local, submitted, contained, borrowers])``
    that were not there ``before``."""
    old = before.refs if before is not None else frozenset()
    return [(oid, counts) for oid, counts in list(runtime.core().ref_counter.refs.items()) if oid not in old]


def check_drained(before: Baseline | None = None, timeout: float = 5.0) -> list[str]:
    """Polls until the store's accounting and the driver's reference counts are back to
    where they were (zero, or ``before``); returns what is still held after ``timeout``
    (empty when drained)."""
    deadline = time.monotonic() + timeout
    core = runtime.core()
    old_refs = before.refs if before is not None else frozenset()
    used0 = before.used if before is not None else 0
    objects0 = before.objects if before is not None else 0
    while True:
        gc.collect()
        store = store_stats()
        held = [(oid, counts) for oid, counts in list(core.ref_counter.refs.items()) if oid not in old_refs]
        problems = []
        if store["used"] > used0 or store["num_objects"] > objects0:
            problems.append(f"the store still accounts {store['used']} bytes in {store['num_objects']} "
                            f"objects ({store['num_pending']} pending, {store['num_spilled']} spilled) "
                            f"after every ref was dropped (before: {used0} bytes in {objects0})")
        if held:
            problems.append(f"the driver still counts {len(held)} references after every ref was dropped "
                            f"(oid, [local, submitted, contained, borrowers]): "
                            f"{[(oid.hex(), counts[:4]) for oid, counts in held[:5]]}")
        if not problems or time.monotonic() >= deadline:
            return problems
        time.sleep(0.05)


def examples(n: int) -> int:
    """How many examples a property test draws (its ``ci`` budget). A soak keeps the ci
    tests at their budget and spends its time in ``test_soak.py``'s loop."""
    return n


def soak_seconds() -> float:
    try:
        return float(os.environ.get("SKATE_SOAK_SECONDS", "0") or 0)
    except ValueError:
        return 0.0
