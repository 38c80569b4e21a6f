"""The API as a state machine: any sequence of calls keeps every ref true to a model.

Hypothesis drives ``put``, task submission (refs at top level and inside lists, failing
and slow tasks), ``get``, ``wait``, ``cancel``, dropping refs, creating actors, calling
them, killing them and dropping their handles, in any order, against a model that knows
what each ref must hold and which errors it may raise instead:

- a put holds its value; a task holds the sum of its inputs, or the ValueError of a
  failing task (its own or an input's), or TaskCancelledError once it (or an input) was
  cancelled;
- an actor's calls run in the order they were made: call i returns ``(the sum of the
  amounts of calls 1..i, b"")``; once the actor is killed, calls made afterwards raise
  ActorDiedError, and calls made before it either returned their total or raise it;
- a second get of a ref gives what the first gave; ``wait`` returns a partition of its
  refs, in order, at most ``num_returns`` ready, never later than its timeout;
- at the end, with every ref and handle dropped, the store and the driver's reference
  counts are back where they were.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, multiple, rule

import skate
from skate.exceptions import ActorDiedError, GetTimeoutError, TaskCancelledError

import known_bugs
from invariants import baseline, check_drained, examples, leaked_refs, same, store_stats
from task_programs import PADS

pytestmark = pytest.mark.timeout(600)

GET_TIMEOUT = 20.0
SLACK = 2.0


@pytest.fixture(autouse=True)
def _cluster(clusters):
    clusters.ensure(num_cpus=2)


@skate.remote
def combine(const, top, boxed, sleep_ms, fail, pad):
    if sleep_ms:
        time.sleep(sleep_ms / 1000.0)
    total = const + (top[0] if top is not None else 0)
    for ref in boxed:
        total += skate.get(ref, timeout=GET_TIMEOUT)[0]
    if fail:
        raise ValueError("this task fails on purpose")
    return (total, bytes(pad))


@skate.remote
class Counter:
    def __init__(self):
        self.total = 0

    def add(self, amount, sleep_ms=0):
        if sleep_ms:
            time.sleep(sleep_ms / 1000.0)
        self.total += amount
        return (self.total, b"")


class Ref:
    """A ref of the run and what the model knows of it."""

    def __init__(self, ref, value=None, inputs=(), fail=False, task=False, actor=None, call_no=0):
        self.ref = ref
        self.value = value             # for puts and tasks: (total, padding) if all goes well
        self.inputs = tuple(inputs)
        self.fail = fail
        self.task = task
        self.cancelled = False
        self.actor = actor             # for actor calls: the Actor it was made on
        self.call_no = call_no
        self.seen = None               # the first outcome a get gave

    def __repr__(self):
        return f"Ref({'task' if self.task else 'actor call' if self.actor else 'put'}, {self.value!r:.40})"


class Actor:
    def __init__(self, handle):
        self.handle = handle
        self.total = 0
        self.calls = 0
        self.killed_after = None       # how many calls were made before it was killed

    def __repr__(self):
        return f"Actor(calls={self.calls})"


def allowed(r: Ref):
    """(value or None, error types) the model allows for ``r``."""
    if r.actor is not None:
        a = r.actor
        if a.killed_after is None:
            return (r.value, frozenset())
        if r.call_no > a.killed_after:
            return (None, frozenset({ActorDiedError}))
        return (r.value, frozenset({ActorDiedError}))
    if not r.task:
        return (r.value, frozenset())
    value_possible, errors = True, set()
    for inp in r.inputs:
        v, e = allowed(inp)
        errors |= e
        value_possible = value_possible and v is not None
    if r.fail:
        errors.add(ValueError)
        value_possible = False
    if r.cancelled:
        errors.add(TaskCancelledError)
    return (r.value if value_possible else None, frozenset(errors))


class SkateAPI(RuleBasedStateMachine):
    refs = Bundle("refs")
    actors = Bundle("actors")
    completed = 0          # runs that reached their teardown (the soak counts them)

    @initialize()
    def start(self):
        self.before = baseline()
        self.all_refs: list[Ref] = []
        self.all_actors: list[Actor] = []
        self.errors_seen: set = set()
        self.cancels = 0

    # --- objects and tasks ---
    @rule(target=refs, n=st.integers(-100, 100), pad=st.sampled_from(PADS))
    def put(self, n, pad):
        r = Ref(skate.put((n, bytes(pad))), value=(n, bytes(pad)))
        self.all_refs.append(r)
        return r

    @rule(target=refs, const=st.integers(-5, 5), top=st.none() | refs, boxed=st.lists(refs, max_size=2),
          sleep_ms=st.sampled_from((0, 0, 50)), fail=st.sampled_from((False, False, False, True)),
          pad=st.sampled_from(PADS))
    def submit(self, const, top, boxed, sleep_ms, fail, pad):
        if known_bugs.avoid("unflushed-reply-deadlock") and any(b.task or b.actor for b in boxed):
            return multiple()   # a get in a task of another task's result may deadlock
        inputs = ([top] if top is not None else []) + list(boxed)
        value = None
        if all(i.value is not None for i in inputs):
            value = (const + sum(i.value[0] for i in inputs), bytes(pad))
        ref = combine.remote(const, top.ref if top is not None else None, [b.ref for b in boxed],
                             sleep_ms, fail, pad)
        r = Ref(ref, value=value, inputs=inputs, fail=fail, task=True)
        self.all_refs.append(r)
        return r

    @rule(r=refs)
    def get(self, r):
        self._check_get(r)

    @rule(rs=st.lists(refs, min_size=1, max_size=4, unique_by=id), data=st.data())
    def wait(self, rs, data):
        num = data.draw(st.integers(0, len(rs)))
        timeout = data.draw(st.sampled_from((0.0, 0.05, None)))
        refs = [r.ref for r in rs]
        start = time.monotonic()
        ready, not_ready = skate.wait(refs, num_returns=num, timeout=GET_TIMEOUT if timeout is None else timeout)
        took = time.monotonic() - start
        assert took <= (GET_TIMEOUT if timeout is None else timeout) + SLACK, f"wait took {took:.2f} s"
        ids = [x.id for x in refs]
        assert sorted(x.id for x in ready + not_ready) == sorted(ids)
        for part in (ready, not_ready):
            ranks = [ids.index(x.id) for x in part]
            assert ranks == sorted(ranks), "wait lost the order of object_refs"
        assert len(ready) <= num
        if timeout is None:
            assert len(ready) == num, f"wait(num_returns={num}) returned {len(ready)} ready without a timeout"

    @rule(r=refs, force=st.booleans())
    def cancel(self, r, force):
        if not r.task or force:
            # Force-cancelling kills a worker, which may fail other tasks in flight there:
            # that is the fault-injection tests' business, not this model's.
            return
        r.cancelled = True
        self.cancels += 1
        skate.cancel(r.ref)

    @rule(r=consumes(refs))
    def drop(self, r):
        r.ref = None

    # --- actors ---
    @rule(target=actors)
    def create_actor(self):
        a = Actor(Counter.remote())
        self.all_actors.append(a)
        return a

    @rule(target=refs, a=actors, amount=st.integers(-10, 10), sleep_ms=st.sampled_from((0, 0, 30)))
    def call_actor(self, a, amount, sleep_ms):
        if a.handle is None:
            return multiple()     # nothing to add to the bundle
        a.calls += 1
        a.total += amount
        r = Ref(a.handle.add.remote(amount, sleep_ms), value=(a.total, b""), actor=a, call_no=a.calls)
        self.all_refs.append(r)
        return r

    @rule(a=actors)
    def kill_actor(self, a):
        if a.handle is None or a.killed_after is not None:
            return
        a.killed_after = a.calls
        skate.kill(a.handle)

    @rule(a=consumes(actors))
    def drop_actor(self, a):
        a.handle = None     # calls already made still run; the actor then stops

    @invariant()
    def the_driver_is_connected(self):
        assert skate.is_initialized()

    # --- checking ---
    def _check_get(self, r: Ref):
        if r.ref is None:
            return
        start = time.monotonic()
        try:
            outcome = ("value", skate.get(r.ref, timeout=GET_TIMEOUT))
        except GetTimeoutError:
            raise AssertionError(f"get of {r} did not finish within {GET_TIMEOUT} s (a hang)") from None
        except Exception as exc:  # noqa: BLE001 - judged against the model
            outcome = ("error", type(exc))
            self.errors_seen |= {c.__name__ for c in type(exc).__mro__}
            value, errors = allowed(r)
            if not any(issubclass(type(exc), e) for e in errors) and known_bugs.match(type(exc), str(exc)):
                r.ref = None      # a known, reported bug (test_found_bugs.py): not judged again
                return
        took = time.monotonic() - start
        assert took <= GET_TIMEOUT + SLACK, f"get of {r} took {took:.2f} s"
        value, errors = allowed(r)
        if outcome[0] == "value":
            assert value is not None and same(outcome[1], value), \
                f"{r}: got {outcome[1]!r:.80}, expected {value!r:.80} or {sorted(e.__name__ for e in errors)}"
        else:
            assert any(issubclass(outcome[1], e) for e in errors), \
                f"{r}: got {outcome[1].__name__}, expected {value!r:.80} or {sorted(e.__name__ for e in errors)}"
        if r.seen is not None:
            assert r.seen[0] == outcome[0] and (outcome[0] == "error" or same(r.seen[1], outcome[1])), \
                f"{r}: a second get gave {outcome!r:.80} after {r.seen!r:.80}"
        r.seen = outcome

    def teardown(self):
        if not hasattr(self, "all_refs"):
            return
        SkateAPI.completed += 1
        for r in self.all_refs:
            self._check_get(r)
        for r in self.all_refs:
            r.ref = None
        for a in self.all_actors:
            a.handle = None
        killed = any(a.killed_after is not None for a in self.all_actors)
        self.all_refs = []
        self.all_actors = []
        leaks = check_drained(self.before)
        if leaks and known_bugs.explain_leak(leaked_refs(self.before), store_stats(), self.errors_seen, killed,
                                             self.cancels > 0) is not None:
            return   # a known, reported bug (test_found_bugs.py)
        assert leaks == []


TestSkateAPI = SkateAPI.TestCase
TestSkateAPI.settings = settings(max_examples=examples(60), stateful_step_count=30, deadline=None)
