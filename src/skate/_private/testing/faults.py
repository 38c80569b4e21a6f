r"""Test-only fault injection: disturbed messages in the transport, and kill points.

Nothing here runs unless ``SKATE_FAULTS`` is set (``protocol/transport.py`` imports this
module and calls :func:`install_from_env` only then) or a test calls :func:`install`.
The environment of the driver is inherited by the node process, the zygote and every
worker, so one variable arms the whole embedded cluster.

``SKATE_FAULTS`` is JSON::

    {"seed": 7,
     "kinds": {"TASK_DONE": {"delay": 0.2, "delay_ms": [1, 30], "duplicate": 0.1},
               "PUSH_TASK": {"drop": 0.02, "roles": ["driver"]},
               "STORE_SEAL": {"kill": 0.05}},
     "injector": "/tmp/.../injector.sock",
     "log": "/tmp/.../faults.log"}

Per message kind (the names of ``protocol/messages.py``, or ``"*"`` for every kind), each
action has a probability per message sent:

``delay``      the message, and every later one on the same connection, leaves after a
               delay drawn from ``delay_ms`` (a stream keeps its order: a slow link, not
               a reordering one).
``duplicate``  the message is sent twice, back to back. Allowed only for the kinds the
               protocol must treat as idempotent (``DUPLICABLE``): replies and
               notifications whose second copy finds nothing left to do.
``drop``       the connection is cut at this message: it and whatever follows on the
               connection are lost and both ends see the connection close. This is what
               a lost link does to a reliable stream; a message never vanishes from a
               stream that stays up.
``kill``       the sending process SIGKILLs itself instead of sending (a process dying
               at that exact point: e.g. at ``STORE_SEAL``, after writing a result into
               shared memory and before sealing it; at ``TASK_DONE``, after sealing it
               and before the caller hears of it).

``roles`` (optional, per kind) limits a rule to processes of those roles: ``driver``,
``node``, ``worker``.

Determinism: each process draws its decisions from a stream of its own, a function of
the seed, its role, its start order among workers (the zygote forks them one at a time)
and the message's rank among the messages of that kind the process sent. Re-running
with the same seed replays the same decisions for the same sequence of messages; how
tasks land on workers still depends on timing.

With ``"log"`` set, every process appends one line per fault it injects (``role ordinal
pid action KIND``), so a test can count and show what was done across processes.

Kill points: with ``"injector"`` set (the path of a Unix socket a test listens on), code
running in a worker may call :func:`kill_point` ``(label, phase)``; the process reports
there and blocks until the injector answers "go" — or SIGKILLs it. Tasks name
themselves with :func:`enter_task`, and two kill points fire from the transport for the
task being answered: ``seal`` (a worker about to seal a result in shared memory) and
``reply`` (about to send ``TASK_DONE``).

May call: protocol.transport, protocol.messages; nothing that would import user code.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
import threading

from skate._private.protocol import messages as M
from skate._private.protocol import transport

ENV_VAR = "SKATE_FAULTS"

KINDS: dict[str, int] = {name: value for name, value in vars(M).items()
                         if name.isupper() and isinstance(value, int) and not name.startswith("RESULT_")}
KIND_NAMES: dict[int, str] = {value: name for name, value in KINDS.items()}

# Kinds whose receivers must ignore a second copy: a REPLY resolves its rid once; a
# TASK_DONE finds its task done; ACTOR_STATE repeats a state; borrowers are a set; a
# second STORE_SEAL of a sealed object is a touch; LEASE_WANTED asks for what is idle.
DUPLICABLE = frozenset({"REPLY", "TASK_DONE", "ACTOR_STATE", "ADD_BORROWER", "REMOVE_BORROWER",
                        "STORE_SEAL", "LEASE_WANTED"})
ACTIONS = ("delay", "duplicate", "drop", "kill")
ROLES = ("driver", "node", "worker")


class FaultPlan:
    """What to do to which message: parsed and checked from ``SKATE_FAULTS``."""

    def __init__(self, seed: int = 0, kinds: dict | None = None, injector: str | None = None,
                 log: str | None = None):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{ENV_VAR}: seed={seed!r} is not an integer")
        self.seed = seed
        self.injector = injector
        self.log = log
        self.kinds = dict(kinds or {})      # as given (JSON-able)
        self.rules: dict[int, dict] = {}
        for name in self.kinds:
            if name != "*" and name not in KINDS:
                raise ValueError(f"{ENV_VAR}: unknown message kind {name!r}; known: {', '.join(sorted(KINDS))}")
        star = self.kinds.get("*")
        if star is not None:
            _check_rule("*", star)
        for name, kind in KINDS.items():
            raw = {}
            if star is not None:
                raw.update(star)
                if name not in DUPLICABLE:
                    raw.pop("duplicate", None)   # "*" duplicates only what may be duplicated
            raw.update(self.kinds.get(name, {}))
            if raw:
                self.rules[kind] = _check_rule(name, raw)

    @classmethod
    def from_json(cls, text: str) -> "FaultPlan":
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{ENV_VAR} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{ENV_VAR} must be a JSON object, got {type(raw).__name__}")
        unknown = set(raw) - {"seed", "kinds", "injector", "log"}
        if unknown:
            raise ValueError(f"{ENV_VAR}: unknown key(s) {sorted(unknown)}; expected seed, kinds, injector, log")
        kinds = raw.get("kinds") or {}
        if not isinstance(kinds, dict):
            raise ValueError(f"{ENV_VAR}: kinds must be an object of kind name -> rule")
        return cls(raw.get("seed", 0), kinds, raw.get("injector"), raw.get("log"))

    def to_json(self) -> str:
        return json.dumps({"seed": self.seed, "kinds": self.kinds, "injector": self.injector, "log": self.log})


def _check_rule(name: str, rule) -> dict:
    if not isinstance(rule, dict):
        raise ValueError(f"{ENV_VAR}: the rule for {name} must be an object, got {rule!r}")
    unknown = set(rule) - set(ACTIONS) - {"delay_ms", "roles"}
    if unknown:
        raise ValueError(f"{ENV_VAR}: unknown field(s) {sorted(unknown)} in the rule for {name}; "
                         f"expected {', '.join(ACTIONS)}, delay_ms, roles")
    out = {}
    for action in ACTIONS:
        p = rule.get(action, 0.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{ENV_VAR}: {name}.{action}={p!r} is not a probability in [0, 1]")
        out[action] = float(p)
    if out["duplicate"] and name != "*" and name not in DUPLICABLE:
        raise ValueError(f"{ENV_VAR}: {name} cannot be duplicated: its receiver is not idempotent "
                         f"(duplicable kinds: {', '.join(sorted(DUPLICABLE))})")
    lo, hi = rule.get("delay_ms", (1, 10))
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 <= lo <= hi):
        raise ValueError(f"{ENV_VAR}: {name}.delay_ms={rule.get('delay_ms')!r} is not a [low, high] range in ms")
    out["delay_ms"] = (float(lo), float(hi))
    roles = rule.get("roles", ROLES)
    if isinstance(roles, str) or not all(r in ROLES for r in roles):
        raise ValueError(f"{ENV_VAR}: {name}.roles={roles!r}: expected a list of {', '.join(ROLES)}")
    out["roles"] = frozenset(roles)
    return out


# --- the transport hook -------------------------------------------------------------------

class _State:
    """This process's fault state: its plan, role, decision counters, delayed streams."""

    def __init__(self, plan: FaultPlan, role: str):
        self.plan = plan
        self.role = role
        self.ordinal = 0                # start order among the zygote's workers
        self.forks = 0
        self.lock = threading.Lock()
        self.sent: dict[int, int] = {}  # kind -> messages of that kind seen so far
        self.held: dict[int, list] = {} # id(conn) -> messages waiting behind a delay
        self.cut: set = set()           # id(conn) of connections this process cut
        self.counts = {a: 0 for a in ACTIONS}

    def draw(self, kind: int) -> random.Random:
        n = self.sent.get(kind, 0)
        self.sent[kind] = n + 1
        return random.Random(f"{self.plan.seed}/{self.role}/{self.ordinal}/{kind}/{n}")


_state: _State | None = None
_labels: dict[bytes, str] = {}          # task id -> the label its code entered (kill points)
_local = threading.local()


def _hook(conn, msg):
    st = _state
    if st is None:
        return None
    kind = msg[0]
    if st.plan.injector is not None and st.role == "worker":
        _kill_points_of(kind, msg)
    rule = st.plan.rules.get(kind)
    key = id(conn)
    with st.lock:
        if key in st.cut:
            return []                   # the link is down: nothing more leaves on it
        held = st.held.get(key)
        if rule is None or st.role not in rule["roles"]:
            if held is not None:
                held.append(msg)        # behind a delayed message: keep the order
                return []
            return None
        rng = st.draw(kind)
        if rule["kill"] and rng.random() < rule["kill"]:
            _record(st, "kill", kind)
            _die()
        if rule["drop"] and rng.random() < rule["drop"]:
            _record(st, "drop", kind)
            st.cut.add(key)
            st.held.pop(key, None)
            conn.loop.call_soon(_cut, conn)
            return []
        out = [msg, msg] if rule["duplicate"] and rng.random() < rule["duplicate"] else [msg]
        if len(out) == 2:
            _record(st, "duplicate", kind)
        if held is not None:
            held.extend(out)
            return []
        if rule["delay"] and rng.random() < rule["delay"]:
            _record(st, "delay", kind)
            lo, hi = rule["delay_ms"]
            st.held[key] = list(out)
            conn.loop.call_later(rng.uniform(lo, hi) / 1000.0, _release, conn)
            return []
        return out if len(out) == 2 else None


def _record(st: _State, action: str, kind: int) -> None:
    st.counts[action] += 1
    if st.plan.log:
        line = f"{st.role} {st.ordinal} {os.getpid()} {action} {KIND_NAMES.get(kind, kind)}\n".encode()
        try:
            fd = os.open(st.plan.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)   # one write of one short line: appends do not interleave
            finally:
                os.close(fd)
        except OSError:
            pass


def _release(conn) -> None:
    """A delay is over: what waited behind it leaves, in order (on the I/O thread)."""
    st = _state
    if st is None:
        return
    with st.lock:
        held = st.held.pop(id(conn), None)
        if held and not conn.closed:
            for m in held:
                conn.send_raw(m)


def _cut(conn) -> None:
    st = _state
    try:
        conn.close()
    finally:
        if st is not None:
            with st.lock:
                st.cut.discard(id(conn))  # ids are reused by later connections


def _die() -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - dying anyway
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _after_fork_in_parent() -> None:
    if _state is not None:
        _state.forks += 1


def _after_fork_in_child() -> None:
    global _conn, _conn_lock
    _conn = None
    _conn_lock = threading.Lock()   # another thread may have held it at the fork
    st = _state
    if st is None:
        return
    # node --fork--> zygote --fork--> workers, numbered in the order they were forked.
    if st.role == "node":
        st.role = "zygote"
    elif st.role == "zygote":
        st.role = "worker"
        st.ordinal = st.forks + 1
    st.forks = 0
    st.lock = threading.Lock()
    st.sent = {}
    st.held = {}
    st.cut = set()
    st.counts = {a: 0 for a in ACTIONS}


_fork_hooks_registered = False


def _is_node_process() -> bool:
    # Read from /proc: while ``python -m skate._private.node.main`` imports the skate
    # package (where the transport installs this), sys.argv[0] is still "-m".
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return b"skate._private.node.main" in f.read()
    except OSError:
        return bool(sys.argv) and sys.argv[0].endswith(os.path.join("node", "main.py"))


def take_role(role: str) -> None:
    """A process forked to be another part of the cluster (the node forked from its
    driver) draws its decisions as that part."""
    if _state is not None:
        install(_state.plan, role)


def install(plan: FaultPlan | None, role: str | None = None) -> None:
    """Arms ``plan`` in this process (None disarms). ``role`` defaults to what this
    process is: the node process, or a driver."""
    global _state, _fork_hooks_registered
    if plan is None:
        _state = None
        transport.fault_hook = None
        return
    if role is None:
        role = "node" if _is_node_process() else "driver"
    _state = _State(plan, role)
    if not _fork_hooks_registered:
        os.register_at_fork(after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
        _fork_hooks_registered = True
    transport.fault_hook = _hook


def install_from_env() -> None:
    """Reads ``SKATE_FAULTS`` and sets ``transport.fault_hook`` (nothing if unset)."""
    text = os.environ.get(ENV_VAR)
    install(FaultPlan.from_json(text) if text else None)


def counts() -> dict:
    """How many faults of each action this process injected so far."""
    return dict(_state.counts) if _state is not None else {a: 0 for a in ACTIONS}


# --- kill points --------------------------------------------------------------------------

_conn: socket.socket | None = None
_conn_lock = threading.Lock()
KILL_POINT_TIMEOUT_S = 30.0


def enter_task(label: str) -> None:
    """Names the task running on this thread for the kill points that follow."""
    _local.label = label
    try:
        from skate._private import runtime
        ex = runtime.core().executor
        if ex is not None and ex.current is not None:
            _labels[ex.current] = label
    except Exception:  # noqa: BLE001 - outside a task: the thread's label is enough
        pass


def current_label() -> str | None:
    return getattr(_local, "label", None)


def _kill_points_of(kind: int, msg) -> None:
    if kind == M.TASK_DONE:
        label = _labels.pop(msg[1], None)
        if label is not None:
            kill_point(label, "reply")
    elif kind == M.STORE_SEAL:
        label = _labels.get(msg[2][:16])
        if label is not None:
            kill_point(label, "seal")


def kill_point(label: str | None, phase: str) -> None:
    """Reports reaching ``phase`` of the task ``label`` to the injector and waits for its
    verdict: it answers "go", or SIGKILLs this process. A no-op in drivers, without an
    injector, or for an unnamed task."""
    st = _state
    if st is None or st.plan.injector is None or st.role != "worker":
        return
    label = label or current_label()
    if label is None:
        return
    global _conn
    with _conn_lock:
        try:
            if _conn is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(KILL_POINT_TIMEOUT_S)
                s.connect(st.plan.injector)
                _conn = s
            _conn.sendall(json.dumps({"label": label, "phase": phase, "pid": os.getpid()}).encode() + b"\n")
            answer = _conn.recv(16)
        except OSError:
            answer = b""
        except BaseException:
            # Interrupted (a cancelled task's TaskCancelledError): the answer to this
            # report must not be read as the answer to the next one.
            if _conn is not None:
                _conn.close()
            _conn = None
            raise
        if not answer:  # the injector is gone: go on without it
            try:
                if _conn is not None:
                    _conn.close()
            finally:
                _conn = None
