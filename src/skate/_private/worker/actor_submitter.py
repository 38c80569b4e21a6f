"""The actor submitter: a caller's side of its calls to actors.

::

    handle.m.remote() --> actor queue (submission order) --head's deps ready, actor ALIVE-->
        PUSH_TASK straight to the actor's worker --> TASK_DONE --> memory store
    ACTOR_STATE from the node manager: ALIVE (connect, send), RESTARTING (hold calls),
        DEAD (every queued and in-flight call fails with ActorDiedError and the cause)
    connection to the actor lost --> in-flight calls with retries left go back to the
        front of the queue (in order) and wait for the restart; the others fail.
        The node is asked for the actor's state again: a live actor behind a cut link
        is reconnected to (its lost calls are retried or fail the same way)
    DEAD while the actor's connection is open --> calls in flight wait for it to close:
        an actor flushes its last replies before it exits, and the verdict travels on
        another connection, so it can overtake them

Per-caller order: calls leave in submission order on one connection, and the actor runs
them in arrival order, so a caller's calls run in the order it made them. A call whose
ObjectRef arguments are not ready holds back the calls after it (head of line) rather
than being overtaken.

Confined to the I/O thread, like the task submitter. May call: the core worker.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from skate import exceptions as exc_mod
from skate._private.object_store import serialization
from skate._private.protocol import messages as M
from skate._private.worker.memory_store import ERROR, INLINE

ALIVE, DEAD = "ALIVE", "DEAD"
_DEAD_GRACE_S = 2.0   # how long calls in flight on a DEAD actor wait for its connection to close
_ASK_AFTER_S = 0.2    # how long a lost connection waits for the node's verdict before asking


class _Actor:
    __slots__ = ("actor_id", "state", "conn", "worker_id", "queue", "inflight", "cause",
                 "class_name", "watching", "lost", "lost_worker")

    def __init__(self, actor_id):
        self.actor_id = actor_id
        self.state = "PENDING_CREATION"
        self.conn = None
        self.worker_id = None
        self.queue: deque = deque()
        self.inflight: OrderedDict = OrderedDict()
        self.lost: list = []          # in flight when the connection dropped: await the verdict
        self.lost_worker = None       # the worker whose connection dropped
        self.cause = None
        self.class_name = "actor"
        self.watching = False


class ActorSubmitter:
    def __init__(self, core):
        self.core = core
        self.loop = core.loop
        self.actors: dict[bytes, _Actor] = {}

    def _actor(self, actor_id) -> _Actor:
        a = self.actors.get(actor_id)
        if a is None:
            a = self.actors[actor_id] = _Actor(actor_id)
        if not a.watching:
            a.watching = True
            self.core.node_conn.send((M.WATCH_ACTOR, actor_id))
        return a

    def watch(self, actor_id) -> None:
        self._actor(actor_id)

    # --- calls -------------------------------------------------------------------------
    def submit(self, actor_id, spec) -> None:
        a = self._actor(actor_id)
        if a.state == DEAD:
            self.core.submitter.fail(spec, self._died(a))
            return
        a.queue.append(spec)
        store = self.core.memory_store
        me = self.core.worker_id
        pending = [oid for oid, owner in spec.top_refs if owner[0] == me and not store.is_ready(oid)]
        spec.deps_left = len(pending)
        for oid in pending:
            store.on_ready(oid, lambda _e, spec=spec, a=a: self.loop.call_soon(self._dep_ready, a, spec))
        self._pump(a)

    def _dep_ready(self, a: _Actor, spec) -> None:
        spec.deps_left -= 1
        if spec.deps_left == 0:
            self._pump(a)

    def _pump(self, a: _Actor) -> None:
        if a.state != ALIVE or a.conn is None:
            return
        queue = a.queue
        store = self.core.memory_store
        me = self.core.worker_id
        while queue and queue[0].deps_left <= 0:
            spec = queue.popleft()
            if spec.done:
                continue
            if spec.top_refs:
                pre = {}
                failed = None
                for oid, owner in spec.top_refs:
                    if owner[0] != me:
                        continue
                    e = store.get(oid)
                    if e is None or e.state == ERROR:
                        failed = e.data if e is not None else exc_mod.ObjectLostError(
                            f"argument object {oid.hex()} was freed before the call ran")
                        break
                    pre[oid] = (M.RESULT_INLINE, e.data) if e.state == INLINE else (M.RESULT_IN_STORE, e.data)
                if failed is not None:
                    self.core.submitter.fail(spec, failed)
                    continue
                spec.prefetched = pre or None
            a.inflight[spec.task_id] = spec
            a.conn.send((M.PUSH_TASK, spec.wire()))

    def on_task_done(self, a: _Actor, task_id, results) -> None:
        spec = a.inflight.pop(task_id, None)
        if spec is not None and not spec.done:
            self.core.submitter.complete(spec, results)

    # --- state ---------------------------------------------------------------------------
    def on_state(self, record: dict) -> None:
        a = self.actors.get(record["actor_id"])
        if a is None:
            # A creator hears of its actor before it made a call: remember the state.
            a = self.actors[record["actor_id"]] = _Actor(record["actor_id"])
            a.watching = True
        state = record["state"]
        a.class_name = record.get("class_name") or a.class_name
        if state == DEAD:
            a.state = DEAD
            a.cause = record.get("cause")
            err = self._died(a)
            for spec in a.lost + list(a.queue):
                self.core.submitter.fail(spec, err)
            a.queue.clear()
            a.lost = []
            if a.conn is not None and a.inflight:
                # Replies still on their way on the actor's own connection land first;
                # what is in flight when it closes fails then (or after a grace period,
                # should the close itself be lost).
                self.loop.call_later(_DEAD_GRACE_S, self._drop_dead_conn, a, a.conn)
                return
            self._drop_dead_conn(a, a.conn)
            return
        if a.state == "KILLING" and state != DEAD:
            return   # an update from before the kill: wait for the verdict
        if state == ALIVE and record.get("worker_id") and record["worker_id"] != a.worker_id:
            try:
                # Registered, so listening: a refusal means it died (no retry loop
                # here, on the I/O thread).
                conn = self.core.connect_peer_for_lease(record["socket_path"], timeout=0)
            except ConnectionError:
                return  # it died already; the next state update tells what follows
            if a.conn is not None:   # the old connection's close is still on its way
                a.conn.peer = None
                a.conn.close()
                a.lost.extend(a.inflight.values())
                a.inflight.clear()
            self._retry_lost(a, record["worker_id"])
            conn.peer = ("actor", a)
            a.conn = conn
            a.worker_id = record["worker_id"]
            a.state = ALIVE
            self._pump(a)
        elif state != ALIVE:
            a.state = state
            if state == "RESTARTING":
                self._retry_lost(a)

    def _drop_dead_conn(self, a: _Actor, conn) -> None:
        if conn is not None:
            conn.peer = None
            conn.close()
        if a.conn is conn:
            a.conn = None
        if a.state == DEAD and a.inflight:
            err = self._died(a)
            for spec in a.inflight.values():
                self.core.submitter.fail(spec, err)
            a.inflight.clear()

    def on_disconnected(self, a: _Actor) -> None:
        """The actor's worker connection closed: hold its calls for the node's verdict
        (DEAD with a cause, or RESTARTING), and ask for it: if the actor is alive (the
        link was cut, not the process) the answer is ALIVE, and the caller reconnects."""
        if a.state == DEAD:
            self._drop_dead_conn(a, a.conn)
            return
        a.conn = None
        a.lost_worker = a.worker_id
        a.worker_id = None
        a.lost.extend(a.inflight.values())
        a.inflight.clear()
        if a.state == ALIVE:
            a.state = "RECONNECTING"
            # A dead actor's verdict is on its way; ask only if none came meanwhile.
            self.loop.call_later(_ASK_AFTER_S, self._ask_state, a)

    def _ask_state(self, a: _Actor) -> None:
        if a.state == "RECONNECTING":
            self.core.node_conn.send((M.WATCH_ACTOR, a.actor_id))

    def _retry_lost(self, a: _Actor, new_worker=None) -> None:
        """The actor restarts (or is reached again): lost calls with retries left go
        first, in order; the others fail."""
        retry = []
        same = new_worker is not None and new_worker == a.lost_worker
        for spec in a.lost:
            if spec.done:
                continue
            if spec.retries_left > 0:
                spec.retries_left -= 1
                retry.append(spec)
            elif same:
                self.core.submitter.fail(spec, exc_mod.ActorDiedError(
                    f"the connection to the actor {a.class_name} was lost while it ran "
                    f"{spec.name}(); the actor is alive but the call's outcome is unknown and it "
                    f"was not retried: set max_task_retries to retry such calls"))
            else:
                self.core.submitter.fail(spec, exc_mod.ActorDiedError(
                    f"the actor {a.class_name} died while running {spec.name}() (its process exited "
                    f"or was killed) and is restarting; the call was not retried: set "
                    f"max_task_retries to retry calls on a restarted actor"))
        a.lost = []
        a.lost_worker = None
        a.queue.extendleft(reversed(retry))

    def _died(self, a: _Actor) -> exc_mod.ActorDiedError:
        cause = a.cause
        if isinstance(cause, (bytes, bytearray)):
            try:
                err = serialization.deserialize(cause)
                cause = "its constructor raised:\n\n" + getattr(err, "traceback_str", str(err))
            except Exception:  # noqa: BLE001
                cause = "its constructor raised an exception that could not be read back"
        return exc_mod.ActorDiedError(f"the actor {a.class_name} ({a.actor_id.hex()}) is dead: {cause}")

    def kill(self, actor_id, no_restart: bool) -> None:
        a = self._actor(actor_id)
        if no_restart and a.state != DEAD:
            # Nothing more goes out to it: calls made after kill() wait for the node's
            # DEAD verdict and fail with its cause, instead of racing the SIGKILL.
            a.state = "KILLING"
        self.core.node_conn.send((M.KILL_ACTOR, actor_id, no_restart))

    def state_of(self, actor_id):
        a = self.actors.get(actor_id)
        return None if a is None else a.state
