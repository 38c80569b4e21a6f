r"""Random task programs, their serial oracle, and the checker that judges a run.

A ``Program`` is plain data (its ``repr`` pastes into ``@example``): nodes submitted in
order, driver steps interleaved between them, and a kill schedule::

    Program(nodes=(Node(kind="put", const=3),
                   Node(kind="task", const=1, inputs=(Input(0, mode="nested"),)),
                   Node(kind="actor", inputs=(Input(1),), actor=0)),
            steps=(Step(after=1, op="wait", nodes=(0, 1), num_returns=1, timeout=0.1),),
            actors=(ActorSpec(max_restarts=1),),
            kills=(Kill(node=1, phase="run"),))

- A node's value is ``(total, padding)``: ``total`` is its constant plus the totals of
  its inputs, ``padding`` is ``pad`` zero bytes (sizes on both sides of the 100 KiB
  inline threshold, so results travel inline or through shared memory). A second return
  is ``(total + 1, b"")``.
- ``put`` nodes are ``skate.put`` by the driver; ``task`` nodes run ``run_node``;
  ``actor`` nodes call ``NodeActor.run`` on one of the program's actors.
- Inputs reach a node as a top-level ref argument (``arg``, ``kwarg``: resolved by the
  runtime), a ref inside a list argument (``nested``: the task calls ``get``), or a ref
  inside an object the driver put (``boxed``: the box is dropped by the driver at once,
  so only the runtime's reference counting keeps it alive).
- ``nested`` nodes compute their sum in a child task they submit themselves; ``fail``
  nodes raise ``ValueError``; ``sleep_ms`` keeps a node running (for waits and cancels).
- Steps: ``get``, ``wait`` (random ``num_returns`` and timeout), ``cancel`` (optionally
  ``force``), ``drop`` (the driver deletes its refs), ``kill_actor``.

The oracle evaluates the program serially in the test process, and says for every ref
what it may hold: its value, or which errors are allowed (the node's own ValueError,
TaskCancelledError where cancelled, WorkerCrashedError when more workers died than the
task has retries, ActorDiedError when its actor was killed — each passed on to the nodes
that depend on it). The checker compares each outcome with that, measures every call
against its deadline (a call that waits past it is a hang), and after the program
checks that the store's accounting and the driver's reference counts return to zero.
"""

from __future__ import annotations

import gc
import operator
import os
import time
from dataclasses import dataclass

import hypothesis.strategies as st

import skate
from skate._private.config import CONFIG
from skate._private.testing import faults
from skate.exceptions import (ActorDiedError, GetTimeoutError, ObjectLostError, TaskCancelledError,
                              WorkerCrashedError)

import known_bugs
from invariants import Verdict, baseline, check_drained, leaked_refs, same, store_stats
from kill_injector import PHASES

THRESHOLD = CONFIG.inline_threshold
PADS = (0, 100, THRESHOLD - 300, THRESHOLD + 300, 3 * THRESHOLD)
GET_TIMEOUT = 20.0      # seconds; a get that needs longer is a hang
INNER_TIMEOUT = 15.0    # gets inside tasks
SLACK = 2.0             # how late a wait(timeout=t) may return on a loaded 2-core machine
MODES = ("arg", "kwarg", "nested", "boxed")


# --- the program ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Input:
    node: int
    ret: int = 0
    mode: str = "arg"


@dataclass(frozen=True)
class Node:
    kind: str = "task"          # put | task | actor
    const: int = 0
    inputs: tuple = ()
    pad: int = 0
    fail: bool = False
    sleep_ms: int = 0
    num_returns: int = 1
    max_retries: int = 3
    nested: bool = False
    actor: int = 0


@dataclass(frozen=True)
class Step:
    after: int                  # runs right after node ``after`` was submitted
    op: str                     # get | wait | cancel | drop | kill_actor
    nodes: tuple = ()
    num_returns: int = 0
    timeout: float | None = None
    force: bool = False
    actor: int = 0


@dataclass(frozen=True)
class ActorSpec:
    max_restarts: int = 0
    max_task_retries: int = 0


@dataclass(frozen=True)
class Kill:
    node: int
    phase: str = "run"
    occurrence: int = 1         # the n-th time the node's code reaches the phase


@dataclass(frozen=True)
class Program:
    nodes: tuple
    steps: tuple = ()
    actors: tuple = ()
    kills: tuple = ()


# --- what runs in the workers -----------------------------------------------------------------

class NodeCall:
    """What one task of the program computes. Unpickling it (the first thing a worker
    does with the task's arguments) names the task for the kill points."""

    def __init__(self, label, const, modes, kwnames, pad, fail, sleep_ms, num_returns, nested,
                 max_retries, probe):
        self.label = label
        self.const = const
        self.modes = modes
        self.kwnames = kwnames
        self.pad = pad
        self.fail = fail
        self.sleep_ms = sleep_ms
        self.num_returns = num_returns
        self.nested = nested
        self.max_retries = max_retries
        self.probe = probe

    def __reduce__(self):
        return (_enter_call, (self.__dict__,))


def _enter_call(state):
    faults.enter_task(state["label"])
    call = NodeCall.__new__(NodeCall)
    call.__dict__.update(state)
    return call


class FetchProbe:
    """Put once per program and passed to every task: deserializing it, while the task's
    arguments are fetched, is the ``fetch`` kill point."""

    def __reduce__(self):
        return (_fetched, ())


def _fetched():
    faults.kill_point(None, "fetch")
    return FetchProbe()


class ReturnProbe:
    """Wraps a return value: serializing it is the ``return`` kill point; it unpickles
    as the bare value, so the caller never sees the wrapper."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        faults.kill_point(None, "return")
        return (operator.itemgetter(0), ((self.value,),))


@skate.remote
def add_up(const, totals):
    return const + sum(totals)


def compute(call: NodeCall, args, kwargs):
    faults.kill_point(call.label, "run")
    if call.sleep_ms:
        time.sleep(call.sleep_ms / 1000.0)
    args = list(args)
    if call.probe:
        args.pop(0)
    totals = []
    for mode, a in zip(call.modes, args):
        if mode == "arg":
            totals.append(a[0])
        else:   # nested: [ref]; boxed: the box's value, [ref]
            totals.append(skate.get(a[0], timeout=INNER_TIMEOUT)[0])
    totals += [kwargs[k][0] for k in call.kwnames]
    if call.nested:
        total = skate.get(add_up.options(max_retries=call.max_retries).remote(call.const, totals),
                          timeout=INNER_TIMEOUT)
    else:
        total = call.const + sum(totals)
    if call.fail:
        raise ValueError(f"node {call.label} fails on purpose")
    first = ReturnProbe((total, bytes(call.pad)))
    return first if call.num_returns == 1 else (first, ReturnProbe((total + 1, b"")))


@skate.remote
def run_node(call, *args, **kwargs):
    return compute(call, args, kwargs)


@skate.remote
class NodeActor:
    def __init__(self):
        self.calls = 0

    def run(self, call, *args, **kwargs):
        self.calls += 1
        return compute(call, args, kwargs)


# --- drawing programs -------------------------------------------------------------------------

@st.composite
def programs(draw, max_nodes: int = 7, kills: bool = False, actors: bool = False):
    """Programs of up to ``max_nodes`` nodes; ``kills``: with a kill schedule; ``actors``:
    with up to two actors (their calls, ``kill_actor`` steps)."""
    n_actors = draw(st.integers(0, 2)) if actors else 0
    actor_specs = tuple(ActorSpec(draw(st.sampled_from((0, 0, 1))), draw(st.sampled_from((0, 1))))
                        for _ in range(n_actors))
    n = draw(st.integers(1, max_nodes))
    kinds = ["put", "task", "task"] + (["actor"] * 2 if n_actors else [])
    nodes, program_steps = [], []
    alive: list[int] = []
    killed_actors: set = set()
    for i in range(n):
        kind = draw(st.sampled_from(kinds))
        inputs = []
        if kind != "put" and alive:
            for _ in range(draw(st.integers(0, min(3, len(alive))))):
                j = draw(st.sampled_from(alive))
                ret = draw(st.integers(0, nodes[j].num_returns - 1))
                modes = MODES
                if nodes[j].kind != "put" and known_bugs.avoid("unflushed-reply-deadlock"):
                    modes = ("arg", "kwarg")   # a get in a task of a result may deadlock
                inputs.append(Input(j, ret, draw(st.sampled_from(modes))))
        node = Node(
            kind=kind,
            const=draw(st.integers(-5, 5)),
            inputs=tuple(inputs),
            pad=draw(st.sampled_from(PADS)),
            fail=kind != "put" and draw(st.integers(0, 9)) == 0,
            sleep_ms=draw(st.sampled_from((0, 0, 0, 20, 200))) if kind != "put" else 0,
            num_returns=draw(st.sampled_from((1, 1, 2))) if kind != "put" else 1,
            max_retries=draw(st.sampled_from((0, 1, 3))) if kind == "task" else 3,
            nested=kind == "task" and draw(st.integers(0, 4)) == 0,
            actor=draw(st.integers(0, n_actors - 1)) if kind == "actor" else 0,
        )
        nodes.append(node)
        alive.append(i)
        for _ in range(draw(st.integers(0, 2))):
            op = draw(st.sampled_from(("get", "wait", "wait", "cancel", "drop")
                                      + (("kill_actor",) if n_actors else ())))
            if op == "kill_actor":
                a = draw(st.integers(0, n_actors - 1))
                if a not in killed_actors:
                    killed_actors.add(a)
                    program_steps.append(Step(after=i, op=op, actor=a))
                continue
            if not alive:
                continue
            if op == "get":
                program_steps.append(Step(after=i, op=op, nodes=(draw(st.sampled_from(alive)),)))
            elif op == "wait":
                chosen = draw(st.lists(st.sampled_from(alive), min_size=1, max_size=4, unique=True))
                n_refs = sum(nodes[j].num_returns for j in chosen)
                program_steps.append(Step(after=i, op=op, nodes=tuple(chosen),
                                          num_returns=draw(st.integers(0, n_refs)),
                                          timeout=draw(st.sampled_from((0.0, 0.01, 0.1, None)))))
            elif op == "cancel":
                tasks = [j for j in alive if nodes[j].kind == "task"]
                if tasks:
                    program_steps.append(Step(after=i, op=op, nodes=(draw(st.sampled_from(tasks)),),
                                              force=draw(st.integers(0, 3)) == 0))
            elif op == "drop":
                j = draw(st.sampled_from(alive))
                alive.remove(j)
                program_steps.append(Step(after=i, op=op, nodes=(j,)))
    program_kills = []
    if kills:
        targets = [i for i, nd in enumerate(nodes) if nd.kind != "put"]
        if targets:
            for _ in range(draw(st.integers(1, 3))):
                program_kills.append(Kill(node=draw(st.sampled_from(targets)),
                                          phase=draw(st.sampled_from(PHASES)),
                                          occurrence=draw(st.sampled_from((1, 1, 2)))))
    return Program(tuple(nodes), tuple(program_steps), actor_specs, tuple(program_kills))


# --- the oracle ---------------------------------------------------------------------------------

@dataclass
class Expect:
    value: object              # None: no value is possible
    errors: frozenset          # exception types allowed instead


def expectations(program: Program, cancelled: dict, actor_deaths: dict, kills: int, cuts: int = 0,
                 blind_kills: int = 0) -> dict:
    """What each ``(node, return)`` may hold, evaluating the program serially.

    ``cancelled``: node -> force; ``actor_deaths``: actor -> index of the first node
    submitted after it was killed (or -1 when only the injector killed it); ``kills``: how
    many processes the run killed and links it cut (injected kills, force-cancels, cut
    connections): a task with at least that many retries must not fail with
    WorkerCrashedError; ``cuts``: links cut, after which a fetch from an owner may fail
    with OwnerDiedError (the link to the owner is all a borrower knows of it);
    ``blind_kills``: processes killed by the transport plan, which may be actors.
    """
    out: dict = {}
    for i, node in enumerate(program.nodes):
        if node.kind == "put":
            out[(i, 0)] = Expect((node.const, bytes(node.pad)), frozenset())
            continue
        ins = [out[(inp.node, inp.ret)] for inp in node.inputs]
        errors = frozenset().union(*(e.errors for e in ins)) if ins else frozenset()
        possible = all(e.value is not None for e in ins)
        total = node.const + (sum(e.value[0] for e in ins) if possible else 0)
        if node.fail:
            errors |= {ValueError}
            possible = False
        if cuts:
            errors |= {ObjectLostError}
        if node.kind == "task":
            if i in cancelled:
                errors |= {TaskCancelledError}
            if kills > node.max_retries:
                errors |= {WorkerCrashedError}
        else:
            death = actor_deaths.get(node.actor, -1 if blind_kills or cuts else None)
            if death is not None:
                errors |= {ActorDiedError}
                if 0 <= death <= i:
                    possible = False
            if node.nested and kills > node.max_retries:
                errors |= {WorkerCrashedError}
        values = [(total, bytes(node.pad)), (total + 1, b"")]
        for r in range(node.num_returns):
            out[(i, r)] = Expect(values[r] if possible else None, errors)
    return out


# --- running and judging ------------------------------------------------------------------------

@dataclass
class Outcome:
    value: object = None
    error: type | None = None
    message: str = ""
    seconds: float = 0.0

    @classmethod
    def of_get(cls, ref, timeout: float = GET_TIMEOUT) -> "Outcome":
        start = time.monotonic()
        try:
            value = skate.get(ref, timeout=timeout)
            return cls(value=value, seconds=time.monotonic() - start)
        except Exception as exc:  # noqa: BLE001 - judged by the checker
            outcome = cls(error=type(exc), message=str(exc), seconds=time.monotonic() - start)
            exc.__traceback__ = None
            return outcome

    def is_hang(self) -> bool:
        # An inner get that timed out shows as a TaskError whose cause is a GetTimeoutError.
        return self.error is not None and issubclass(self.error, GetTimeoutError)

    def describe(self) -> str:
        if self.error is None:
            return f"value {_short(self.value)}"
        return f"{self.error.__name__}: {self.message[:400]}"


def _short(value) -> str:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], bytes):
        return f"({value[0]!r}, <{len(value[1])} bytes>)"
    return repr(value)[:200]


class ProgramRun:
    """One run of a program on the current cluster."""

    _counter = 0

    def __init__(self, program: Program, injector=None, fault_log: str | None = None):
        ProgramRun._counter += 1
        self.program = program
        self.prefix = f"p{ProgramRun._counter}"
        self.injector = injector
        self.fault_log = fault_log
        self.transport_faults: list[str] = []   # lines of the fault log written during the run
        self.verdict = Verdict()
        self.refs: dict = {}            # (node, ret) -> ObjectRef held by the driver
        self.outcomes: dict = {}        # (node, ret) -> [Outcome, ...]
        self.cancelled: dict = {}
        self.actor_deaths: dict = {}
        self.force_kills = 0
        self.killed = 0                 # processes killed and links cut during the run

    def label(self, i: int) -> str:
        return f"{self.prefix}.n{i}"

    def reproducer(self) -> str:
        lines = [f"program = {self.program!r}"]
        if self.injector is not None and self.program.kills:
            lines.append(self.injector.describe())
        if self.fault_log is not None:
            lines.append(f"transport faults injected ({len(self.transport_faults)}; role ordinal pid action kind):")
            lines += [f"  {line}" for line in self.transport_faults[:60]]
        return "\n".join(lines)

    # --- running ---
    def run(self) -> Verdict:
        program = self.program
        before = baseline()
        log_start = _size(self.fault_log)
        if self.injector is not None:
            schedule: dict = {}
            for k in program.kills:
                schedule.setdefault((self.label(k.node), k.phase), set()).add(k.occurrence)
            self.injector.set_schedule(schedule)
        actors = [NodeActor.options(max_restarts=a.max_restarts, max_task_retries=a.max_task_retries).remote()
                  for a in program.actors]
        probe = skate.put(FetchProbe()) if program.kills else None
        steps = {}
        for s in program.steps:
            steps.setdefault(s.after, []).append(s)
        try:
            for i, node in enumerate(program.nodes):
                self._submit(i, node, actors, probe)
                for s in steps.get(i, ()):
                    self._step(s, actors)
            for key in sorted(self.refs):
                self.outcomes.setdefault(key, []).append(Outcome.of_get(self.refs[key]))
        finally:
            self.transport_faults = _read_from(self.fault_log, log_start)
            # Every process killed and every link cut may cost a task in flight one retry.
            kills = (self.injector.kills if self.injector is not None else 0) + self.force_kills + sum(
                1 for line in self.transport_faults if line.split()[3] in ("kill", "drop"))
            self.verdict.faults += (self.injector.kills if self.injector is not None else 0) + \
                self.force_kills + len(self.transport_faults)
            self.killed = kills
            self._judge(kills, sum(1 for line in self.transport_faults if line.split()[3] == "drop"),
                        sum(1 for line in self.transport_faults if line.split()[3] == "kill"))
            # Everything the program held goes: the store must drain.
            self.refs.clear()
            del actors, probe
            gc.collect()
        if self.verdict.clean:
            leaks = check_drained(before)
            if leaks:
                errors = {c.__name__ for outs in self.outcomes.values() for o in outs if o.error is not None
                          for c in o.error.__mro__}
                bug = known_bugs.explain_leak(leaked_refs(before), store_stats(), errors,
                                              bool(self.killed or self.actor_deaths), bool(self.cancelled))
                if bug is not None:
                    self.verdict.known.append(f"{bug.id}: " + "; ".join(leaks))
                else:
                    self.verdict.leaks += leaks
        return self.verdict

    def _submit(self, i: int, node: Node, actors, probe) -> None:
        if node.kind == "put":
            self.refs[(i, 0)] = skate.put((node.const, bytes(node.pad)))
            return
        args, kwargs, modes, kwnames, boxes = [], {}, [], [], []
        if probe is not None:
            args.append(probe)
        for j, inp in enumerate(node.inputs):
            ref = self.refs[(inp.node, inp.ret)]
            if inp.mode == "kwarg":
                kwnames.append(f"k{j}")
                kwargs[f"k{j}"] = ref
                continue
            modes.append(inp.mode)
            if inp.mode == "arg":
                args.append(ref)
            elif inp.mode == "nested":
                args.append([ref])
            else:
                box = skate.put([ref])
                boxes.append(box)
                args.append(box)
        call = NodeCall(self.label(i), node.const, tuple(modes), tuple(kwnames), node.pad, node.fail,
                        node.sleep_ms, node.num_returns, node.nested, node.max_retries, probe is not None)
        if node.kind == "task":
            out = run_node.options(num_returns=node.num_returns, max_retries=node.max_retries).remote(
                call, *args, **kwargs)
        else:
            out = actors[node.actor].run.options(num_returns=node.num_returns).remote(call, *args, **kwargs)
        del boxes   # dropped at once: the task's reference must keep them alive
        for r, ref in enumerate([out] if node.num_returns == 1 else out):
            self.refs[(i, r)] = ref

    def _step(self, s: Step, actors) -> None:
        if s.op == "get":
            key = (s.nodes[0], 0)
            self.outcomes.setdefault(key, []).append(Outcome.of_get(self.refs[key]))
        elif s.op == "drop":
            for key in [k for k in self.refs if k[0] == s.nodes[0]]:
                del self.refs[key]
        elif s.op == "cancel":
            self.cancelled[s.nodes[0]] = s.force
            if s.force:
                self.force_kills += 1
            skate.cancel(self.refs[(s.nodes[0], 0)], force=s.force)
        elif s.op == "kill_actor":
            self.actor_deaths[s.actor] = s.after + 1
            skate.kill(actors[s.actor])
        elif s.op == "wait":
            self._wait(s)

    def _wait(self, s: Step) -> None:
        refs = [self.refs[k] for k in sorted(self.refs) if k[0] in s.nodes]
        if not refs:
            return
        k = min(s.num_returns, len(refs))
        timeout = GET_TIMEOUT if s.timeout is None else s.timeout
        start = time.monotonic()
        ready, not_ready = skate.wait(refs, num_returns=k, timeout=timeout)
        took = time.monotonic() - start
        where = f"wait({len(refs)} refs of nodes {s.nodes}, num_returns={k}, timeout={s.timeout})"
        if took > timeout + SLACK:
            self.verdict.hangs.append(f"{where} returned after {took:.2f} s")
        ids = [r.id for r in refs]
        if sorted(r.id for r in ready + not_ready) != sorted(ids):
            self.verdict.wrong.append(f"{where}: ready + not_ready is not a partition of the refs")
        for part, name in ((ready, "ready"), (not_ready, "not_ready")):
            ranks = [ids.index(r.id) for r in part]
            if ranks != sorted(ranks):
                self.verdict.wrong.append(f"{where}: {name} lost the order of object_refs")
        if len(ready) > k:
            self.verdict.wrong.append(f"{where}: {len(ready)} ready, more than num_returns")
        if s.timeout is None and len(ready) < k:
            self.verdict.hangs.append(f"{where}: only {len(ready)} ready after {took:.2f} s")
        if ready:
            again, _ = skate.wait(ready, num_returns=len(ready), timeout=0)
            if len(again) != len(ready):
                self.verdict.wrong.append(f"{where}: a ref it called ready is not ready")

    # --- judging ---
    def _judge(self, kills: int, cuts: int, blind_kills: int) -> None:
        expect = expectations(self.program, self.cancelled, self._actor_deaths(), kills, cuts, blind_kills)
        for key, outcomes in sorted(self.outcomes.items()):
            exp = expect[key]
            where = f"node {key[0]} ({self.program.nodes[key[0]].kind}) return {key[1]}"
            for o in outcomes:
                if o.seconds > GET_TIMEOUT + SLACK:
                    self.verdict.hangs.append(f"get of {where} took {o.seconds:.2f} s")
                if o.is_hang():
                    self.verdict.hangs.append(f"{where}: {o.describe()}")
                elif o.error is None:
                    if exp.value is None or not same(o.value, exp.value):
                        self.verdict.wrong.append(
                            f"{where}: got {o.describe()}, expected "
                            f"{_short(exp.value) if exp.value is not None else 'no value'}"
                            f"{' or ' + str(sorted(e.__name__ for e in exp.errors)) if exp.errors else ''}")
                elif not any(issubclass(o.error, e) for e in exp.errors):
                    bug = known_bugs.match(o.error, o.message)
                    if bug is not None:
                        self.verdict.known.append(f"{where}: {bug.id}")
                    else:
                        self.verdict.wrong.append(
                            f"{where}: got {o.describe()}; expected {_short(exp.value)} or "
                            f"{sorted(e.__name__ for e in exp.errors) or 'no error'}")
            if len(outcomes) == 2 and outcomes[0].error is None and outcomes[1].error is None \
                    and not same(outcomes[0].value, outcomes[1].value):
                self.verdict.wrong.append(f"{where}: two gets gave two different values")
            if len(outcomes) == 2 and outcomes[0].error is not outcomes[1].error:
                self.verdict.wrong.append(f"{where}: two gets gave {outcomes[0].describe()} then "
                                          f"{outcomes[1].describe()}")

    def _actor_deaths(self) -> dict:
        """Actors killed by a step (from the next node on, calls cannot succeed), and
        actors whose process the injector may kill (through their own calls only: an
        actor's worker runs nothing else), whose calls may fail from any point on."""
        deaths = dict(self.actor_deaths)
        for k in self.program.kills:
            node = self.program.nodes[k.node]
            if node.kind == "actor":
                deaths.setdefault(node.actor, -1)
        return deaths


def _size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:
        return 0


def _read_from(path: str | None, offset: int) -> list[str]:
    if not path:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def run_program(program: Program, injector=None, fault_log: str | None = None) -> tuple[Verdict, str]:
    run = ProgramRun(program, injector, fault_log)
    verdict = run.run()
    return verdict, run.reproducer()
