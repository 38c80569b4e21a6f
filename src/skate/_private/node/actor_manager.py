r"""The node's actor manager: the life of every actor placed on this node.

::

    CREATE_ACTOR --> PENDING_CREATION --resources free, a worker dedicated--> BECOME_ACTOR
        worker: constructor ok --> ALIVE        constructor raised --> DEAD (its traceback)
    worker process dies --> restarts left? RESTARTING --> (new worker) --> ALIVE
                                        \--> DEAD ("the actor's process died ...")
    KILL_ACTOR(no_restart) --> DEAD ("killed"), or killed and restarted
    ACTOR_EXITING (exit_actor / terminate) --> DEAD, never restarted
    owner gone (non-detached) --> DEAD ("its owner exited")

Each actor gets a worker of its own (an idle pool worker if one is free, the pool then
refilled by the zygote), holds its ``num_cpus``/resources for its lifetime (0 CPU by
default, as in Ray) and is restarted here, where its death is seen first. Every state
change goes to the local processes watching the actor (``ACTOR_STATE`` over their node
connection: no GCS on this path) and to the GCS's actor table (through ``report``),
which serves name lookups, other nodes and state listings.

Runs on the node manager's I/O thread. May call: the node manager it belongs to.
"""

from __future__ import annotations

import time
from collections import deque

from skate._private.protocol import messages as M

PENDING, ALIVE, RESTARTING, DEAD = "PENDING_CREATION", "ALIVE", "RESTARTING", "DEAD"


class _Actor:
    __slots__ = ("spec", "actor_id", "state", "worker", "num_restarts", "cause", "watchers",
                 "holding", "exiting", "no_restart", "start_time")

    def __init__(self, spec):
        self.spec = spec
        self.actor_id = spec["actor_id"]
        self.state = PENDING
        self.worker = None
        self.num_restarts = 0
        self.cause = None           # str or serialized error (constructor failure)
        self.watchers: set = set()
        self.holding = False        # whether it holds its resources now
        self.exiting = None         # cause of an intentional exit under way
        self.no_restart = False
        self.start_time = time.time()

    def record(self, node_id) -> dict:
        w = self.worker
        return {
            "actor_id": self.actor_id,
            "state": self.state,
            "class_name": self.spec.get("class_name"),
            "name": self.spec.get("name"),
            "namespace": self.spec.get("namespace"),
            "detached": self.spec.get("detached", False),
            "node_id": node_id,
            "worker_id": w.worker_id if w is not None and self.state == ALIVE else None,
            "socket_path": w.socket_path if w is not None and self.state == ALIVE else None,
            "pid": w.pid if w is not None else None,
            "num_restarts": self.num_restarts,
            "max_restarts": self.spec.get("max_restarts", 0),
            "cause": self.cause,
            "meta": self.spec.get("meta"),
            "owner": self.spec.get("owner"),
            "start_time": self.start_time,
        }


class ActorManager:
    def __init__(self, nm, report=None):
        self.nm = nm
        self.report = report                # report(record): to the GCS actor table
        self.actors: dict[bytes, _Actor] = {}
        self.waiting_worker: deque = deque()
        self.waiting_resources: deque = deque()

    def start_reporting(self, report) -> None:
        """The GCS is up: report every actor created before it was, then each change."""
        self.report = report
        for actor in self.actors.values():
            report(actor.record(self.nm.node_id))

    # --- requests -------------------------------------------------------------------------
    def create(self, conn, rid, spec) -> None:
        res = spec.get("resources") or {}
        missing = {k: v for k, v in res.items() if v > self.nm.total.get(k, 0.0) + 1e-9}
        if missing:
            conn.send((M.REPLY, rid, False, (
                "infeasible",
                f"no node can host actor {spec.get('class_name')}: it asks for {missing} but the "
                f"cluster has {({k: self.nm.total.get(k, 0.0) for k in missing})}")))
            return
        actor = _Actor(spec)
        self.actors[actor.actor_id] = actor
        actor.watchers.add(conn)
        conn.send((M.REPLY, rid, True, None))
        self._publish(actor)
        self._place(actor)

    def watch(self, conn, actor_id) -> None:
        actor = self.actors.get(actor_id)
        if actor is None:
            conn.send((M.ACTOR_STATE, {"actor_id": actor_id, "state": DEAD,
                                       "cause": "no such actor on this node (it may never have "
                                                "existed, or its node is gone)"}))
            return
        actor.watchers.add(conn)
        conn.send((M.ACTOR_STATE, actor.record(self.nm.node_id)))

    def kill(self, actor_id, no_restart: bool) -> None:
        actor = self.actors.get(actor_id)
        if actor is None or actor.state == DEAD:
            return
        if no_restart:
            actor.no_restart = True
            self._die(actor, "the actor was killed by skate.kill()")
        elif actor.worker is not None:
            self.nm._kill(actor.worker)

    def client_gone(self, conn, worker_id) -> None:
        for actor in list(self.actors.values()):
            actor.watchers.discard(conn)
            if (actor.state != DEAD and not actor.spec.get("detached")
                    and actor.spec.get("owner") == worker_id):
                actor.no_restart = True
                self._die(actor, "the actor's owner (the process that created it) exited, and the "
                                 "actor is not detached")

    # --- from the actor's worker -------------------------------------------------------
    def on_created(self, worker, actor_id, error) -> None:
        actor = self.actors.get(actor_id)
        if actor is None or actor.worker is not worker:
            return
        if error is not None:
            actor.no_restart = True
            actor.cause = error          # a serialized TaskError with the traceback
            self._die(actor, None)
            return
        actor.state = ALIVE
        self._publish(actor)

    def on_exiting(self, worker, actor_id, cause) -> None:
        actor = self.actors.get(actor_id)
        if actor is not None and actor.worker is worker:
            actor.exiting = cause
            actor.no_restart = True

    def worker_gone(self, worker) -> None:
        actor = self.actors.get(getattr(worker, "actor_id", None) or b"")
        if actor is None or actor.worker is not worker:
            return
        actor.worker = None
        self._release(actor)
        if actor.state == DEAD:
            return
        if actor.exiting is not None:
            self._die(actor, actor.exiting)
            return
        max_restarts = actor.spec.get("max_restarts", 0)
        if not actor.no_restart and actor.state != PENDING and (
                max_restarts == -1 or actor.num_restarts < max_restarts):
            actor.num_restarts += 1
            actor.state = RESTARTING
            self._publish(actor)
            self._place(actor)
            return
        if actor.state == PENDING:
            cause = "the actor's process died while its constructor ran"
        else:
            cause = ("the actor's process died unexpectedly (it exited or was killed; check its "
                     "worker log)" + (f" after {actor.num_restarts} restarts" if actor.num_restarts else ""))
        self._die(actor, cause)

    # --- placement -------------------------------------------------------------------------
    def _place(self, actor: _Actor) -> None:
        res = actor.spec.get("resources") or {}
        if not self.nm._fits(res):
            self.waiting_resources.append(actor)
            self.nm.ask_leases_back()
            return
        self._hold(actor)
        if self.nm.idle:
            self._assign(self.nm.idle.popleft(), actor)
            self.nm.refill_pool()
        else:
            self.waiting_worker.append(actor)
            self.nm._spawn(1)

    def retry_waiting(self) -> None:
        """Called by the node manager when resources or workers free up."""
        for _ in range(len(self.waiting_resources)):
            actor = self.waiting_resources.popleft()
            if actor.state != DEAD:
                self._place(actor)

    def take_worker(self, worker) -> bool:
        """A newly registered worker: give it to an actor waiting for one."""
        while self.waiting_worker:
            actor = self.waiting_worker.popleft()
            if actor.state != DEAD:
                self._assign(worker, actor)
                return True
        return False

    def _assign(self, worker, actor: _Actor) -> None:
        worker.state = "ACTOR"
        worker.actor_id = actor.actor_id
        actor.worker = worker
        spec = actor.spec
        worker.conn.send((M.BECOME_ACTOR, {k: spec[k] for k in (
            "actor_id", "class_blob", "args_blob", "prefetched", "class_name", "max_concurrency",
            "is_async", "meta") if k in spec} | {"num_restarts": actor.num_restarts}))

    def _hold(self, actor: _Actor) -> None:
        if not actor.holding:
            for k, v in (actor.spec.get("resources") or {}).items():
                if v:
                    self.nm.available[k] = self.nm.available.get(k, 0.0) - v
            actor.holding = True

    def _release(self, actor: _Actor) -> None:
        if actor.holding:
            for k, v in (actor.spec.get("resources") or {}).items():
                if v:
                    self.nm.available[k] = self.nm.available.get(k, 0.0) + v
            actor.holding = False
            self.nm.resources_freed()

    def _die(self, actor: _Actor, cause) -> None:
        if cause is not None:
            actor.cause = cause
        actor.state = DEAD
        try:
            self.waiting_worker.remove(actor)
        except ValueError:
            pass
        if actor.worker is not None:
            self.nm._kill(actor.worker)   # worker_gone() releases its resources
        else:
            self._release(actor)
        self._publish(actor)

    def _publish(self, actor: _Actor) -> None:
        record = actor.record(self.nm.node_id)
        for conn in list(actor.watchers):
            if conn.closed:
                actor.watchers.discard(conn)
            else:
                conn.send((M.ACTOR_STATE, record))
        if self.report is not None:
            self.report(record)

    def shutdown(self) -> None:
        for actor in self.actors.values():
            if actor.state != DEAD:
                actor.state = DEAD
                actor.cause = "the node shut down"
