r"""The task submitter: leases, pipelined pushes, retries. The caller's hot path.

::

    submit(spec) --deps owned here ready?--> class queue --> push to a leased worker
         |                                      |             (PUSH_TASK, batched per tick)
         \--wait on memory store--/             \--no worker with room--> REQUEST_LEASE
    TASK_DONE --> results into the memory store, waiters woken, next task pushed
    worker connection lost --> its in-flight tasks retried (max_retries) or failed

Tasks are grouped by *scheduling class* (their resource shape): a lease granted for a
class is reused for every queued task of that class, so while leases are held the node
manager is off the per-task path. Each leased worker gets up to ``depth`` tasks in
flight; the depth adapts to how long the class's tasks take (short tasks: deep pipeline,
one frame carries many; long tasks: one at a time, so no task waits behind another while
a worker idles). An idle lease is kept ``lease_idle_s`` so a submit/get loop does not pay
a lease round trip per task; the node manager's LEASE_WANTED takes idle leases back at
once when someone else needs the resources.

Confined to the I/O thread: every method here runs there (``submit`` is reached through
``loop.call_soon``), so there are no locks.

May call: protocol, the core worker's memory store and reference counter (through the
core worker it is given).
"""

from __future__ import annotations

import time
from collections import deque

from skate import exceptions as exc_mod
from skate._private.config import CONFIG
from skate._private.object_store import serialization
from skate._private.protocol import messages as M
from skate._private.worker.memory_store import ERROR, IN_STORE, INLINE

_MAX_LEASE_REQUESTS = 4


class TaskSpec:
    """A task as its caller tracks it."""

    __slots__ = ("task_id", "fn_id", "fn_blob", "name", "args_blob", "top_refs", "arg_refs",
                 "num_returns", "return_ids", "resources", "sched_key", "retries_left",
                 "retry_exceptions", "prefetched", "cancelled", "worker", "deps_left",
                 "done")

    def __init__(self):
        self.prefetched = None
        self.cancelled = False
        self.worker = None
        self.deps_left = 0
        self.done = False

    def wire(self):
        return (self.task_id, self.fn_id, self.name, self.args_blob, self.prefetched,
                self.num_returns)


class _Leased:
    __slots__ = ("worker_id", "conn", "inflight", "idle_since", "functions", "stealing")

    def __init__(self, worker_id, conn):
        self.worker_id = worker_id
        self.conn = conn
        self.inflight: dict = {}
        self.idle_since = time.monotonic()
        self.functions: set = set()
        self.stealing = False         # a STEAL is on its way to this worker


class _Class:
    __slots__ = ("key", "resources", "queue", "workers", "requests", "avg_s")

    def __init__(self, key, resources):
        self.key = key
        self.resources = resources
        self.queue: deque = deque()
        self.workers: dict = {}       # worker_id -> _Leased
        self.requests = 0             # lease requests outstanding at the node manager
        self.avg_s = None             # moving average of task run time

    def depth(self) -> int:
        if self.avg_s is None:
            return 1
        return max(1, min(CONFIG.max_inflight_per_worker, int(0.002 / max(self.avg_s, 1e-6)) + 1))


class TaskSubmitter:
    def __init__(self, core):
        self.core = core
        self.loop = core.loop
        self.classes: dict = {}
        self.tasks: dict = {}            # task_id -> TaskSpec, until final
        self._idle_timer = None

    # --- submission ------------------------------------------------------------------
    def submit(self, spec: TaskSpec) -> None:
        self.tasks[spec.task_id] = spec
        store = self.core.memory_store
        me = self.core.worker_id
        pending = [oid for oid, owner in spec.top_refs if owner[0] == me and not store.is_ready(oid)]
        if pending:
            spec.deps_left = len(pending)
            for oid in pending:
                store.on_ready(oid, lambda _e, spec=spec: self.loop.call_soon(self._dep_ready, spec))
            return
        self._deps_resolved(spec)

    def _dep_ready(self, spec: TaskSpec) -> None:
        spec.deps_left -= 1
        if spec.deps_left == 0:
            self._deps_resolved(spec)

    def _deps_resolved(self, spec: TaskSpec) -> None:
        if spec.cancelled or spec.done:
            return
        if spec.top_refs:
            store = self.core.memory_store
            me = self.core.worker_id
            pre = {}
            for oid, owner in spec.top_refs:
                if owner[0] != me:
                    continue
                e = store.get(oid)
                if e is None:
                    self.fail(spec, exc_mod.ObjectLostError(
                        f"argument object {oid.hex()} of task {spec.name}() was freed before the task ran"))
                    return
                if e.state == ERROR:
                    self.fail(spec, e.data)   # a failed dependency fails the task
                    return
                pre[oid] = (M.RESULT_INLINE, e.data) if e.state == INLINE else (M.RESULT_IN_STORE, e.data)
            spec.prefetched = pre or None
        cls = self.classes.get(spec.sched_key)
        if cls is None:
            cls = self.classes[spec.sched_key] = _Class(spec.sched_key, spec.resources)
        cls.queue.append(spec)
        self._pump(cls)

    # --- pushing ---------------------------------------------------------------------
    def _pump(self, cls: _Class) -> None:
        queue = cls.queue
        if queue and cls.workers:
            depth = cls.depth()
            workers = list(cls.workers.values())
            while queue:
                best = min(workers, key=lambda w: len(w.inflight))
                if len(best.inflight) >= depth:
                    break
                spec = queue.popleft()
                if spec.cancelled:
                    continue
                if spec.fn_id not in best.functions:
                    best.functions.add(spec.fn_id)
                    best.conn.send((M.FUNCTION, spec.fn_id, spec.fn_blob))
                spec.worker = best
                best.inflight[spec.task_id] = spec
                best.conn.send((M.PUSH_TASK, spec.wire()))
        elif cls.workers:
            self._steal_for_idle(cls)
        if queue:
            want = min(len(queue), _MAX_LEASE_REQUESTS) - cls.requests
            for _ in range(max(0, want)):
                cls.requests += 1
                self.core.request_lease(cls.resources, lambda ok, val, cls=cls: self.loop.call_soon(
                    self._on_lease, cls, ok, val))
        else:
            self._arm_idle_timer()

    def _steal_for_idle(self, cls: _Class) -> None:
        """A worker of the class idles while another has tasks waiting behind a running
        one (pipelined while tasks looked short): take half of those back to run them on
        the idle worker. Without this a long task holds up short ones queued behind it."""
        workers = cls.workers.values()
        if not any(not w.inflight for w in workers):
            return
        busiest = max(workers, key=lambda w: len(w.inflight))
        waiting = len(busiest.inflight) - 1
        if waiting >= 1 and not busiest.stealing:
            busiest.stealing = True
            busiest.conn.send((M.STEAL, (waiting + 1) // 2))

    def on_stolen(self, conn, task_ids) -> None:
        ref = conn.peer
        if ref is None:
            return
        cls, leased = ref
        leased.stealing = False
        back = []
        for tid in task_ids:
            spec = leased.inflight.pop(tid, None)
            if spec is not None and not spec.done:
                spec.worker = None
                back.append(spec)
        cls.queue.extendleft(reversed(back))
        self._pump(cls)

    def _on_lease(self, cls: _Class, ok: bool, value) -> None:
        cls.requests -= 1
        if not ok:
            reason = value[1] if isinstance(value, tuple) else str(value)
            err = exc_mod.InfeasibleTaskError(reason) if isinstance(value, tuple) and value[0] == "infeasible" \
                else exc_mod.WorkerCrashedError(f"could not lease a worker: {reason}")
            while cls.queue:
                self.fail(cls.queue.popleft(), err)
            return
        worker_id, socket_path = value
        if not cls.queue:
            self.core.return_lease(worker_id)
            return
        try:
            conn = self.core.connect_peer_for_lease(socket_path)
        except ConnectionError:
            self.core.return_lease(worker_id, kill=True)
            self._pump(cls)
            return
        leased = _Leased(worker_id, conn)
        conn.peer = (cls, leased)
        cls.workers[worker_id] = leased
        self._pump(cls)

    # --- replies ---------------------------------------------------------------------
    def on_task_done(self, conn, task_id, results, run_s) -> None:
        ref = conn.peer
        spec = self.tasks.get(task_id)
        if ref is not None:
            cls, leased = ref
            leased.inflight.pop(task_id, None)
            cls.avg_s = run_s if cls.avg_s is None else 0.8 * cls.avg_s + 0.2 * run_s
            if not leased.inflight:
                leased.idle_since = time.monotonic()
        if spec is not None and not spec.done:
            if results and results[0][0] == M.RESULT_ERROR and self._should_retry_error(spec, results[0][1]):
                spec.retries_left -= 1
                spec.worker = None
                cls_ = self.classes[spec.sched_key]
                cls_.queue.appendleft(spec)
            else:
                self.complete(spec, results)
        if ref is not None:
            self._pump(ref[0])

    def _should_retry_error(self, spec: TaskSpec, blob) -> bool:
        if spec.retries_left <= 0 or not spec.retry_exceptions or spec.cancelled:
            return False
        if spec.retry_exceptions is True:
            return True
        try:
            err = serialization.deserialize(blob)
        except Exception:
            return False
        cause = getattr(err, "cause", err)
        return isinstance(cause, tuple(spec.retry_exceptions))

    def complete(self, spec: TaskSpec, results) -> None:
        spec.done = True
        self.tasks.pop(spec.task_id, None)
        core = self.core
        store = core.memory_store
        node_id = core.node_id
        for oid, (kind, payload) in zip(spec.return_ids, results):
            if kind == M.RESULT_INLINE:
                state = INLINE
            elif kind == M.RESULT_IN_STORE:
                state = IN_STORE
            else:
                state = ERROR  # kept serialized; decoded when someone gets it
            if store.get(oid) is None and not core.ref_counter.has(oid):
                # Every ref to it was dropped while the task ran.
                if state == IN_STORE:
                    core.free_in_store([oid])
                continue
            store.set(oid, state, payload, node_id)
        if spec.arg_refs:
            core.ref_counter.remove_submitted(spec.arg_refs)

    def fail(self, spec: TaskSpec, error: BaseException) -> None:
        """Ends a task with ``error`` for every return."""
        if spec.done:
            return
        spec.done = True
        self.tasks.pop(spec.task_id, None)
        for oid in spec.return_ids:
            self.core.memory_store.set(oid, ERROR, error)
        # A worker that died after sealing a return left it in the store: nobody will
        # read it now (the node manager ignores ids it does not hold).
        self.core.free_in_store(spec.return_ids)
        if spec.arg_refs:
            self.core.ref_counter.remove_submitted(spec.arg_refs)

    def on_worker_retiring(self, conn) -> None:
        """The worker leaves on purpose after its last reply: what is still in flight
        there never ran; it goes back to the front of the queue, no retry spent."""
        ref = conn.peer
        if ref is None:
            return
        cls, leased = ref
        conn.peer = None
        cls.workers.pop(leased.worker_id, None)
        requeue = [spec for spec in leased.inflight.values() if not spec.done]
        leased.inflight.clear()
        for spec in reversed(requeue):
            spec.worker = None
            cls.queue.appendleft(spec)
        self._pump(cls)

    def on_worker_lost(self, conn) -> None:
        ref = conn.peer
        if ref is None:
            return
        cls, leased = ref
        cls.workers.pop(leased.worker_id, None)
        # The worker may be alive behind a cut link: give the lease back and have it
        # stopped, or the node keeps it leased and its CPU taken for ever.
        self.core.return_lease(leased.worker_id, kill=True)
        for spec in list(leased.inflight.values()):
            if spec.done:
                continue
            if spec.cancelled:
                self.fail(spec, exc_mod.TaskCancelledError(f"task {spec.name}() was cancelled"))
            elif spec.retries_left > 0:
                spec.retries_left -= 1
                spec.worker = None
                cls.queue.appendleft(spec)
            else:
                self.fail(spec, exc_mod.WorkerCrashedError(
                    f"the worker running task {spec.name}() died unexpectedly (its process exited "
                    f"or was killed) and its retries are spent; raise max_retries to retry more, "
                    f"and check the worker logs for the cause"))
        leased.inflight.clear()
        self._pump(cls)

    # --- leases ------------------------------------------------------------------------
    def on_lease_wanted(self) -> None:
        for cls in self.classes.values():
            for wid, leased in list(cls.workers.items()):
                if not leased.inflight and not cls.queue:
                    self._give_up(cls, leased)

    def _give_up(self, cls: _Class, leased: _Leased) -> None:
        cls.workers.pop(leased.worker_id, None)
        leased.conn.peer = None
        leased.conn.close()
        self.core.return_lease(leased.worker_id)

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(CONFIG.lease_idle_s, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_timer = None
        now = time.monotonic()
        busy = False
        for cls in self.classes.values():
            for leased in list(cls.workers.values()):
                if leased.inflight or cls.queue:
                    busy = True
                elif now - leased.idle_since >= CONFIG.lease_idle_s:
                    self._give_up(cls, leased)
                else:
                    busy = True
        if busy:
            self._arm_idle_timer()

    def return_all_leases(self) -> None:
        for cls in self.classes.values():
            for leased in list(cls.workers.values()):
                self._give_up(cls, leased)

    # --- cancellation ------------------------------------------------------------------
    def cancel(self, task_id: bytes, force: bool, recursive: bool = True) -> None:
        spec = self.tasks.get(task_id)
        if spec is None or spec.done:
            return
        spec.cancelled = True
        if spec.worker is None:
            cls = self.classes.get(spec.sched_key)
            if cls is not None:
                try:
                    cls.queue.remove(spec)
                except ValueError:
                    pass
            self.fail(spec, exc_mod.TaskCancelledError(f"task {spec.name}() was cancelled"))
            return
        leased = spec.worker
        leased.conn.send((M.CANCEL_TASK, task_id, force, recursive))
        if force:
            self.core.kill_worker(leased.worker_id)
