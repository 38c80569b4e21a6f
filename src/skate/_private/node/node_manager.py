r"""The node manager (Ray's raylet): worker leases, the worker pool, the object store.

Owns, for one node: the resource accounting, the pool of worker processes (started from
the zygote), the grants of worker leases to callers (the local scheduler), and the
node's shared-memory object store accounting. Everything runs on one I/O thread; no
locks.

::

    caller --REQUEST_LEASE(resources)--> queue --fits? idle worker?--> REPLY(worker)
                                            \--no idle worker--> zygote.spawn()
                                            \--resources held by idle leases--> LEASE_WANTED
    caller --RETURN_LEASE(worker)--> resources back, worker idle, dispatch again
    worker --BLOCKED / UNBLOCKED--> its CPU lent back while it waits in get/wait

A lease that no node could ever satisfy is refused at once with a message naming the
resources, never queued forever. The caller pushes tasks straight to the leased worker:
the node manager is off the per-task path.

May call: object_store.store, node.zygote, protocol. Never the GCS on a lease path.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque

from skate._private.node.actor_manager import ActorManager
from skate._private.protocol import messages as M
from skate._private.protocol.transport import Connection, EventLoop

STARTING, IDLE, LEASED = "STARTING", "IDLE", "LEASED"
_EPS = 1e-9
_REAP_EVERY_S = 1.0
_IDLE_WORKER_S = 5.0


class _Worker:
    __slots__ = ("worker_id", "pid", "conn", "socket_path", "state", "holder", "resources",
                 "blocked", "idle_since", "actor_id")

    def __init__(self, worker_id, pid, conn, socket_path):
        self.worker_id = worker_id
        self.pid = pid
        self.conn = conn
        self.socket_path = socket_path
        self.state = IDLE
        self.idle_since = time.monotonic()
        self.holder = None          # the client Connection holding the lease
        self.resources = None       # resources of the current lease
        self.blocked = False
        self.actor_id = None


class _Client:
    __slots__ = ("worker_id", "pid", "is_driver", "leases", "reservations", "job_id")

    def __init__(self, info):
        self.worker_id = info["worker_id"]
        self.pid = info.get("pid")
        self.is_driver = info.get("is_driver", False)
        self.job_id = info.get("job_id")
        self.leases: set = set()
        self.reservations: set = set()


def pool_size(resources: dict) -> int:
    """How many idle workers a node keeps: one per CPU (at least one)."""
    return max(1, int(resources.get("CPU", 1)))


class NodeManager:
    def __init__(self, loop: EventLoop, *, node_id: bytes, session: str, session_dir: str,
                 resources: dict, store, zygote, embedded: bool, on_shutdown, owner_pid=None):
        self.loop = loop
        self.node_id = node_id
        self.session = session
        self.session_dir = session_dir
        self.total = {k: float(v) for k, v in resources.items() if v}
        self.available = dict(self.total)
        self.store = store
        self.zygote = zygote
        self.embedded = embedded
        self.on_shutdown = on_shutdown
        self.owner_pid = owner_pid        # embedded: the driver the cluster belongs to
        self.socket_path = os.path.join(session_dir, "node.sock")
        self.gcs_address = None
        self.token = None                 # the cluster token, handed to local clients
        self.clients: dict[Connection, _Client] = {}
        self.workers: dict[bytes, _Worker] = {}
        self.idle: deque[_Worker] = deque()
        self.pending: deque = deque()     # (conn, rid, resources)
        self.starting = 0                 # workers asked of the zygote, not registered yet
        self.min_workers = pool_size(self.total)
        self.shutting_down = False
        self._handlers = {
            M.REGISTER: self._on_register,
            M.REQUEST_LEASE: self._on_request_lease,
            M.RETURN_LEASE: self._on_return_lease,
            M.BLOCKED: self._on_blocked,
            M.UNBLOCKED: self._on_unblocked,
            M.STORE_RESERVE: self._on_store_reserve,
            M.STORE_SEAL: self._on_store_seal,
            M.STORE_ENSURE: self._on_store_ensure,
            M.STORE_FREE: self._on_store_free,
            M.STORE_ABORT: self._on_store_abort,
            M.NODE_INFO: self._on_node_info,
            M.KILL_WORKER: self._on_kill_worker,
            M.SHUTDOWN: self._on_shutdown,
            M.FLUSH_LOGS: self._on_flush_logs,
            M.CREATE_ACTOR: lambda conn, rid, spec: self.actors.create(conn, rid, spec),
            M.WATCH_ACTOR: lambda conn, actor_id: self.actors.watch(conn, actor_id),
            M.KILL_ACTOR: lambda conn, actor_id, no_restart: self.actors.kill(actor_id, no_restart),
            M.ACTOR_CREATED: self._on_actor_created,
            M.ACTOR_EXITING: self._on_actor_exiting,
        }
        self.actors = ActorManager(self)
        self.log_monitor = None

    # --- start-up -----------------------------------------------------------------------
    def start(self, listener=None, starting: int = 0) -> None:
        """Listens (on ``listener`` when the driver that forked this process bound the
        socket already) and starts the first workers (``starting``: asked of the
        zygote already)."""
        self.loop.listen_unix(self.socket_path, self._on_accept, listener)
        self.starting += starting
        self._spawn(self.min_workers - starting)
        self.loop.call_later(_REAP_EVERY_S, self._reap_idle)

    def _reap_idle(self) -> None:
        """Workers beyond the CPU count (started for nested tasks that blocked) are
        stopped once they have idled a while; the pool shrinks back to its size."""
        if self.shutting_down:
            return
        self.store.trim_spares()
        now = time.monotonic()
        excess = len(self.workers) - self.min_workers
        for worker in list(self.idle):
            if excess <= 0:
                break
            if now - worker.idle_since >= _IDLE_WORKER_S:
                self.idle.remove(worker)
                worker.state = "STOPPING"
                self._kill(worker)
                excess -= 1
        self.loop.call_later(_REAP_EVERY_S, self._reap_idle)

    def _spawn(self, n: int) -> None:
        if n <= 0 or self.shutting_down:
            return
        self.starting += n
        self.zygote.spawn(n)

    def _on_accept(self, sock) -> None:
        conn = Connection(self.loop, sock, self._dispatch_msg, self._on_close)
        self.loop.add_connection(conn)

    def _dispatch_msg(self, conn: Connection, msg) -> None:
        self._handlers[msg[0]](conn, *msg[1:])

    # --- clients and workers ------------------------------------------------------------
    def _on_register(self, conn, rid, info) -> None:
        client = _Client(info)
        self.clients[conn] = client
        if info.get("is_worker"):
            self.starting = max(0, self.starting - 1)
            worker = _Worker(info["worker_id"], info["pid"], conn, info["socket_path"])
            self.workers[worker.worker_id] = worker
            if not self.actors.take_worker(worker):
                self.idle.append(worker)
            else:
                self.refill_pool()
        conn.send((M.REPLY, rid, True, self._info()))
        self._dispatch()

    def _info(self) -> dict:
        return {
            "node_id": self.node_id,
            "session": self.session,
            "session_dir": self.session_dir,
            "resources": dict(self.total),
            "available": dict(self.available),
            "store_capacity": self.store.stats()["capacity"],
            "gcs_address": self.gcs_address,
            "token": self.token,
            "num_workers": len(self.workers),
        }

    def _on_close(self, conn: Connection) -> None:
        client = self.clients.pop(conn, None)
        if client is None:
            return
        worker = self.workers.get(client.worker_id)
        if worker is not None and worker.conn is conn:
            self._worker_gone(worker)
        self.actors.client_gone(conn, client.worker_id)
        for wid in list(client.leases):
            self._release_lease(wid)
        for oid in client.reservations:
            self.store.abort(oid)
        # Objects live as long as their owner: an owner gone frees what it owned.
        self.store.free_owned_by(client.worker_id)
        self.pending = deque(p for p in self.pending if p[0] is not conn)
        if client.is_driver and self.embedded and client.pid == self.owner_pid:
            # The embedded cluster belongs to the driver that started it: when that one
            # is gone (shutdown, exit or SIGKILL), the node goes too.
            self.shutdown()
            return
        self._dispatch()

    def _worker_gone(self, worker: _Worker) -> None:
        self.workers.pop(worker.worker_id, None)
        try:
            self.idle.remove(worker)
        except ValueError:
            pass
        if worker.state == LEASED:
            self._give_back(worker)
            holder = self.clients.get(worker.holder)
            if holder is not None:
                holder.leases.discard(worker.worker_id)
        if worker.state == "ACTOR":
            worker.state = "DEAD"
            self.actors.worker_gone(worker)
        worker.state = "DEAD"
        self.refill_pool()

    def refill_pool(self) -> None:
        """Keeps the pool of task workers (actor workers aside) at its size."""
        if self.shutting_down:
            return
        pool = sum(1 for w in self.workers.values() if w.state != "ACTOR")
        missing = self.min_workers - pool - self.starting + len(self.actors.waiting_worker)
        if missing > 0:
            self._spawn(missing)

    def resources_freed(self) -> None:
        if self.actors.waiting_resources:
            self.loop.call_soon(self.actors.retry_waiting)
        self.loop.call_soon(self._dispatch)

    def ask_leases_back(self) -> None:
        for c, client in self.clients.items():
            if client.leases and not c.closed:
                c.send((M.LEASE_WANTED,))

    def _on_actor_created(self, conn, actor_id, error) -> None:
        client = self.clients.get(conn)
        worker = self.workers.get(client.worker_id) if client else None
        if worker is not None:
            self.actors.on_created(worker, actor_id, error)

    def _on_actor_exiting(self, conn, actor_id, cause) -> None:
        client = self.clients.get(conn)
        worker = self.workers.get(client.worker_id) if client else None
        if worker is not None:
            self.actors.on_exiting(worker, actor_id, cause)

    # --- leases -------------------------------------------------------------------------
    def _on_request_lease(self, conn, rid, resources) -> None:
        missing = {k: v for k, v in resources.items() if v > self.total.get(k, 0.0) + _EPS}
        if missing:
            have = {k: self.total.get(k, 0.0) for k in missing}
            conn.send((M.REPLY, rid, False, (
                "infeasible",
                f"no node can run this task: it asks for {missing} but the cluster has "
                f"{have}; lower the request (num_cpus/num_gpus/resources) or add a node "
                f"that has them")))
            return
        self.pending.append((conn, rid, resources))
        self._dispatch()

    def _fits(self, resources) -> bool:
        avail = self.available
        for k, v in resources.items():
            if v and avail.get(k, 0.0) + _EPS < v:
                return False
        return True

    def _dispatch(self) -> None:
        if self.shutting_down:
            return
        waiting = 0
        wanted = False
        remaining = deque()
        # Resources as they will be once the requests waiting for a worker get one: only
        # those requests need a new worker started.
        promised = None
        while self.pending:
            conn, rid, resources = self.pending.popleft()
            if conn.closed:
                continue
            if not self._fits(resources):
                remaining.append((conn, rid, resources))
                wanted = True
                continue
            if not self.idle:
                remaining.append((conn, rid, resources))
                if promised is None:
                    promised = dict(self.available)
                if all(promised.get(k, 0.0) + _EPS >= v for k, v in resources.items() if v):
                    for k, v in resources.items():
                        if v:
                            promised[k] = promised.get(k, 0.0) - v
                    waiting += 1
                continue
            worker = self.idle.popleft()
            for k, v in resources.items():
                if v:
                    self.available[k] = self.available.get(k, 0.0) - v
            worker.state = LEASED
            worker.holder = conn
            worker.resources = resources
            worker.blocked = False
            self.clients[conn].leases.add(worker.worker_id)
            conn.send((M.REPLY, rid, True, (worker.worker_id, worker.socket_path)))
        self.pending = remaining
        if waiting > self.starting:
            self._spawn(waiting - self.starting)
        if wanted:
            # Idle leases held by callers may be what blocks these requests.
            self.ask_leases_back()

    def _give_back(self, worker: _Worker) -> None:
        if worker.resources and not worker.blocked:
            for k, v in worker.resources.items():
                if v:
                    self.available[k] = self.available.get(k, 0.0) + v
        worker.resources = None
        worker.holder = None
        worker.blocked = False

    def _release_lease(self, worker_id) -> None:
        worker = self.workers.get(worker_id)
        if worker is None or worker.state != LEASED:
            return
        holder = self.clients.get(worker.holder)
        if holder is not None:
            holder.leases.discard(worker_id)
        self._give_back(worker)
        worker.state = IDLE
        worker.idle_since = time.monotonic()
        if self.actors.waiting_resources:
            self.loop.call_soon(self.actors.retry_waiting)
        if not self.actors.take_worker(worker):
            self.idle.append(worker)
        else:
            self.refill_pool()

    def _on_return_lease(self, conn, worker_id, kill) -> None:
        worker = self.workers.get(worker_id)
        if worker is None or worker.holder is not conn:
            return
        if kill:
            self._kill(worker)
            return
        self._release_lease(worker_id)
        self._dispatch()

    def _on_blocked(self, conn, *_):
        client = self.clients.get(conn)
        worker = self.workers.get(client.worker_id) if client else None
        if worker is None or worker.state != LEASED or worker.blocked:
            return
        worker.blocked = True
        for k, v in (worker.resources or {}).items():
            if k == "CPU" and v:
                self.available[k] = self.available.get(k, 0.0) + v
        self._dispatch()

    def _on_unblocked(self, conn, *_):
        client = self.clients.get(conn)
        worker = self.workers.get(client.worker_id) if client else None
        if worker is None or not worker.blocked:
            return
        worker.blocked = False
        # Take the CPU back even if that oversubscribes for a moment, as Ray does.
        for k, v in (worker.resources or {}).items():
            if k == "CPU" and v:
                self.available[k] = self.available.get(k, 0.0) - v

    def _on_kill_worker(self, conn, worker_id) -> None:
        worker = self.workers.get(worker_id)
        if worker is not None:
            self._kill(worker)

    def _kill(self, worker: _Worker) -> None:
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # --- object store -------------------------------------------------------------------
    def _on_store_reserve(self, conn, rid, oid, size) -> None:
        if self.store.contains(oid):
            # The task that makes it runs again (a retry after its worker died having
            # sealed the result): the new copy replaces the old one.
            self.store.free(oid)
        try:
            recycled = self.store.reserve(oid, size)
        except Exception as exc:
            conn.send((M.REPLY, rid, False, exc))
            return
        client = self.clients.get(conn)
        if client is not None:
            client.reservations.add(oid)
        conn.send((M.REPLY, rid, True, recycled))

    def _on_store_seal(self, conn, rid, oid, size) -> None:
        client = self.clients.get(conn)
        if client is not None:
            client.reservations.discard(oid)
        self.store.seal(oid, size)
        conn.send((M.REPLY, rid, True, None))

    def _on_store_ensure(self, conn, rid, oid) -> None:
        try:
            conn.send((M.REPLY, rid, True, self.store.ensure_local(oid)))
        except Exception as exc:
            conn.send((M.REPLY, rid, False, exc))

    def _on_store_free(self, conn, oids) -> None:
        for oid in oids:
            self.store.free(oid)

    def _on_store_abort(self, conn, oid) -> None:
        client = self.clients.get(conn)
        if client is not None:
            client.reservations.discard(oid)
        self.store.abort(oid)

    def _on_node_info(self, conn, rid, reclaim=False) -> None:
        if reclaim:
            # "Available" means not doing work: idle leases kept by callers for speed are
            # asked back first, and the answer waits a moment for them to return.
            self.ask_leases_back()
            self.loop.call_later(0.05, self._on_node_info, conn, rid)
            return
        info = self._info()
        info["store"] = self.store.stats()
        info["workers"] = [
            {"worker_id": w.worker_id, "pid": w.pid, "state": w.state, "blocked": w.blocked}
            for w in self.workers.values()
        ]
        conn.send((M.REPLY, rid, True, info))

    # --- output -------------------------------------------------------------------------
    def forward_logs(self, lines) -> None:
        """Called on the I/O thread by the log monitor with new worker output lines."""
        for conn, client in self.clients.items():
            if client.is_driver and not conn.closed:
                conn.send((M.LOG_LINES, lines))

    def _on_flush_logs(self, conn, rid) -> None:
        if self.log_monitor is not None:
            self.log_monitor.poll()   # its lines are queued on the loop before this reply
        self.loop.call_soon(conn.send, (M.REPLY, rid, True, None))

    # --- shutdown -----------------------------------------------------------------------
    def _on_shutdown(self, conn, *_):
        self.shutdown()

    def shutdown(self) -> None:
        if self.shutting_down:
            return
        self.shutting_down = True
        self.actors.shutdown()
        for worker in list(self.workers.values()):
            self._kill(worker)
        self.zygote.close()  # the zygote kills what it started and exits
        deadline = time.monotonic() + 2.0
        for worker in list(self.workers.values()):
            while time.monotonic() < deadline:
                try:
                    os.kill(worker.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.005)
        self.store.shutdown()
        self.on_shutdown()
