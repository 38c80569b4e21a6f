"""The task executor: runs the tasks pushed to a worker, on its main thread.

::

    I/O thread: PUSH_TASK --> enqueue --> [queue] --> main thread: resolve args, run,
                                                       serialize returns, TASK_DONE
    replies are queued without waking the I/O thread and written straight from the main
    thread when the queue runs dry (or every millisecond under load): one syscall
    carries many replies and no thread hop sits on the reply path.

Arguments: top-level ``ObjectRef`` arguments arrive as ``TopRef`` placeholders, with the
values the caller already had (``prefetched``: small values inline, a marker for objects
in the node's shared memory); anything else is fetched from its owner. Returns: small
values inline in TASK_DONE, large ones sealed in shared memory under the return id.

Cancellation: a queued task is dropped; a running one gets ``TaskCancelledError``
raised in the main thread (force-cancel is a SIGKILL by the node manager instead).

May call: the core worker it serves, object_store, protocol.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from skate import exceptions as exc_mod
from skate._private.node.log_monitor import TASK_MARKER
from skate._private.object_store import serialization
from skate._private.protocol import messages as M
from skate._private.worker.core_worker import TopRef
from skate._private.worker.memory_store import IN_STORE, INLINE
from skate.object_ref import ObjectRef

_FLUSH_EVERY_S = 0.001
TERMINATE = "__skate_terminate__"


class ActorExitRequest(BaseException):
    """Raised by ``skate.actor.exit_actor()``: ends the actor once this call returns."""


class TaskExecutor:
    def __init__(self, core):
        self.core = core
        self.queue: deque = deque()
        self.cond = threading.Condition(threading.Lock())
        self.function_blobs: dict = {}
        self.functions: dict = {}
        self.current = None           # task id running now
        self.main_ident = threading.get_ident()
        self._last_name = None
        self._cancel_requested = None
        self.actor = None              # the instance, in an actor's worker
        self.actor_id = None
        self.actor_pool = None         # threaded actor: max_concurrency threads
        self.actor_loop = None         # async actor: its event loop (own thread)
        self._semaphore = None
        self.exit_cause = None
        self.callers: set = set()      # connections that pushed tasks here
        self.retire = False            # leave after the current task (worker recycling)
        self._unflushed: set = set()   # connections holding deferred replies (main thread)
        self._interruptible = False    # a cancel may raise now (the task's own code runs)
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        # Only while the task's own code runs (arguments, the function): once it has
        # returned, its result is being stored, and an exception there would leave a
        # reservation pending or escape the error handlers. A late cancel is a no-op,
        # as for a task that already finished.
        if (self._interruptible and self._cancel_requested is not None
                and self._cancel_requested == self.current):
            self._cancel_requested = None
            raise exc_mod.TaskCancelledError("cancelled")

    # --- I/O thread -------------------------------------------------------------------
    def add_function(self, fn_id, blob) -> None:
        self.function_blobs[fn_id] = blob

    def enqueue(self, conn, wire) -> None:
        if conn is not None:
            self.callers.add(conn)
        with self.cond:
            self.queue.append((conn, wire))
            if len(self.queue) == 1:
                self.cond.notify()

    def cancel(self, conn, task_id, force, recursive=True) -> None:
        with self.cond:
            for item in self.queue:
                if item[1][0] == task_id:
                    self.queue.remove(item)
                    err = serialization.dumps(exc_mod.TaskCancelledError(f"task {item[1][2]}() was cancelled"))
                    conn.send((M.TASK_DONE, task_id, [(M.RESULT_ERROR, err)] * max(item[1][5], 1), 0.0))
                    return
        if self.current == task_id and not force:
            # A real signal, aimed at the main thread: it also interrupts blocking calls
            # such as time.sleep, which an asynchronous exception would wait out.
            self._cancel_requested = task_id
            signal.pthread_kill(self.main_ident, signal.SIGINT)
        if recursive:  # the tasks it submitted go too
            self.core.loop.call_soon(self._cancel_children)

    def _cancel_children(self) -> None:
        for tid in list(self.core.submitter.tasks):
            self.core.submitter.cancel(tid, False, True)

    def give_back(self, conn, n: int) -> None:
        """STEAL from a caller whose other worker idles: hand back up to ``n`` of its
        tasks that have not started, newest first (the oldest are next to run here)."""
        taken = []
        with self.cond:
            if self.actor is not None:
                return
            for item in reversed(self.queue):
                if len(taken) >= n:
                    break
                if item[0] is conn:
                    taken.append(item)
            for item in taken:
                self.queue.remove(item)
        conn.send((M.STOLEN, [wire[0] for _, wire in taken]))

    def caller_gone(self, conn) -> None:
        self.callers.discard(conn)
        with self.cond:
            if any(item[0] is conn for item in self.queue):
                self.queue = deque(item for item in self.queue if item[0] is not conn)

    # --- actors (I/O thread) -------------------------------------------------------------
    def become_actor(self, spec) -> None:
        self.enqueue(None, spec)

    # --- main thread ------------------------------------------------------------------
    def flush_replies(self) -> None:
        """Sends the replies held back, before the main thread blocks in a get or wait:
        the object it waits for may be the result of the task just before, whose
        TASK_DONE is among them (its caller would never learn it is ready)."""
        if self._unflushed and threading.get_ident() == self.main_ident:
            for c in self._unflushed:
                c.flush()
            self._unflushed.clear()

    def run_forever(self) -> None:
        queue = self.queue
        cond = self.cond
        last_flush = time.monotonic()
        unflushed: set = self._unflushed
        self.core.before_block = self.flush_replies
        while True:
            if unflushed and not queue:
                # Replies held back because more tasks were queued: the queue emptied
                # under us (a STEAL, a cancel), so they go now, before we sleep.
                for c in unflushed:
                    c.flush()
                unflushed.clear()
            with cond:
                while not queue:
                    if unflushed:
                        break
                    cond.wait()
                if not queue:
                    continue
                conn, wire = queue.popleft()
                more = bool(queue)
            if conn is None:
                self._construct_actor(wire)
                continue
            if self.actor_pool is not None:       # threaded actor
                self.actor_pool.submit(self._run_and_reply, conn, wire)
                continue
            if self.actor_loop is not None:       # async actor
                asyncio.run_coroutine_threadsafe(self._run_async(conn, wire), self.actor_loop)
                continue
            start = time.perf_counter()
            results = self.execute(wire)
            run_s = time.perf_counter() - start
            if conn.closed:
                continue
            conn.send_deferred((M.TASK_DONE, wire[0], results, run_s))
            unflushed.add(conn)
            now = time.monotonic()
            if not more or now - last_flush > _FLUSH_EVERY_S or self.exit_cause is not None:
                for c in unflushed:
                    c.flush()
                unflushed.clear()
                last_flush = now
            if self.exit_cause is not None:
                self._exit_actor()
            if self.retire:
                self._retire()

    def _retire(self) -> None:
        """Leaves after the task that asked for it (e.g. max_tasks_per_child). RETIRING
        follows the last reply on every caller connection: callers resubmit what they
        still have in flight here elsewhere, without counting a retry. The node manager
        starts a fresh worker in this one's place."""
        for conn in list(self.callers):
            if not conn.closed:
                conn.send_now((M.RETIRING,))
        _exit_process()

    def _function(self, fn_id):
        fn = self.functions.get(fn_id)
        if fn is None:
            # The blob goes only once it unpickled: an import error (or a cancel's SIGINT)
            # there must not make every later task of the function fail with a KeyError.
            fn = self.functions[fn_id] = serialization.deserialize(self.function_blobs[fn_id])
            del self.function_blobs[fn_id]
        return fn

    def _callable(self, fn_id, name):
        if fn_id is not None:
            return self._function(fn_id)
        if self.actor is None:
            raise RuntimeError(f"actor method {name}() was sent to a worker that is not an actor")
        return getattr(self.actor, name)

    def execute(self, wire) -> list:
        task_id, fn_id, name, args_blob, prefetched, num_returns = wire
        self.current = task_id
        try:
            self._mark(name)
            try:
                if fn_id is None and name == TERMINATE:
                    self.exit_cause = "the actor was stopped gracefully (terminate, or every handle to it was dropped)"
                    return self._pack(task_id, name, None, num_returns)
                self._interruptible = True
                try:
                    fn = self._callable(fn_id, name)
                    args, kwargs = serialization.deserialize(args_blob)
                    args, kwargs = self._resolve(args, kwargs, prefetched)
                    value = fn(*args, **kwargs)
                finally:
                    self._interruptible = False
            except exc_mod.TaskCancelledError:
                return self._error(exc_mod.TaskCancelledError(f"task {name}() was cancelled"), num_returns)
            except ActorExitRequest:
                self.exit_cause = "the actor called exit_actor()"
                return self._error(exc_mod.ActorDiedError(
                    f"actor method {name}() called exit_actor(): the actor exited"), num_returns)
            except BaseException as e:  # noqa: BLE001 - user code may raise anything
                return [(M.RESULT_ERROR, _task_error(name, e))] * max(num_returns, 1)
            return self._pack(task_id, name, value, num_returns)
        finally:
            self.current = None

    def _mark(self, name) -> None:
        if name != self._last_name:
            self._last_name = name
            sys.stdout.write(TASK_MARKER + name + "\n")
            sys.stderr.write(TASK_MARKER + name + "\n")

    @staticmethod
    def _error(err, num_returns) -> list:
        return [(M.RESULT_ERROR, serialization.dumps(err))] * max(num_returns, 1)

    def _pack(self, task_id, name, value, num_returns) -> list:
        try:
            if num_returns == 1:
                values = (value,)
            elif num_returns == 0:
                values = (None,)
            else:
                values = tuple(value)
                if len(values) != num_returns:
                    raise ValueError(f"task {name}() declared num_returns={num_returns} but "
                                     f"returned {len(values)} values")
        except BaseException as e:  # noqa: BLE001
            return [(M.RESULT_ERROR, _task_error(name, e))] * max(num_returns, 1)
        core = self.core
        results = []
        for i, v in enumerate(values):
            oid = task_id + i.to_bytes(4, "big")
            try:
                sobj = serialization.serialize(v)
                # Refs this worker owns must outlive the task until the caller borrows
                # them: held (for the worker's life, a known over-retention). Borrowed
                # refs are the owner's to keep; holding them here would pin them for ever.
                mine = [r for r in sobj.contained_refs if r.owner[0] == core.worker_id]
                if mine:
                    core.ref_counter.add_contents(oid, mine)
                results.append(core.store_value(oid, sobj))
                core.memory_store.delete(oid)  # the caller owns it, not us
            except BaseException as e:  # noqa: BLE001
                results.append((M.RESULT_ERROR, _task_error(name, e)))
        return results

    # --- actors (main thread and the actor's threads) ------------------------------------
    def _construct_actor(self, spec) -> None:
        actor_id = spec["actor_id"]
        name = spec.get("class_name", "Actor")
        self._mark(f"{name}.__init__")
        error = None
        try:
            cls = serialization.deserialize(spec["class_blob"])
            args, kwargs = serialization.deserialize(spec["args_blob"])
            args, kwargs = self._resolve(args, kwargs, spec.get("prefetched"))
            self.actor = cls(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            error = _task_error(f"{name}.__init__", e)
        self.actor_id = actor_id
        if error is None:
            self._last_name = None
            concurrency = spec.get("max_concurrency") or 1
            if spec.get("is_async"):
                self._start_async(concurrency)
            elif concurrency > 1:
                self.actor_pool = ThreadPoolExecutor(concurrency, thread_name_prefix="skate-actor")
        self.core.node_conn.send_now((M.ACTOR_CREATED, actor_id, error))

    def _run_and_reply(self, conn, wire) -> None:
        start = time.perf_counter()
        results = self.execute(wire)
        if not conn.closed:
            conn.send((M.TASK_DONE, wire[0], results, time.perf_counter() - start))
        if self.exit_cause is not None:
            conn.flush()
            self._exit_actor()

    def _start_async(self, concurrency: int) -> None:
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(loop)
            self._semaphore = asyncio.Semaphore(concurrency)
            started.set()
            loop.run_forever()
        threading.Thread(target=run, name="skate-actor-loop", daemon=True).start()
        started.wait()
        self.actor_loop = loop

    async def _run_async(self, conn, wire) -> None:
        task_id, fn_id, name, args_blob, prefetched, num_returns = wire
        start = time.perf_counter()
        async with self._semaphore:
            try:
                if name == TERMINATE:
                    self.exit_cause = "the actor was stopped gracefully (terminate, or every handle to it was dropped)"
                    results = self._pack(task_id, name, None, num_returns)
                else:
                    fn = self._callable(fn_id, name)
                    args, kwargs = serialization.deserialize(args_blob)
                    args, kwargs = self._resolve(args, kwargs, prefetched)
                    value = fn(*args, **kwargs)
                    if inspect.isawaitable(value):
                        value = await value
                    results = self._pack(task_id, name, value, num_returns)
            except ActorExitRequest:
                self.exit_cause = "the actor called exit_actor()"
                results = self._error(exc_mod.ActorDiedError(
                    f"actor method {name}() called exit_actor(): the actor exited"), num_returns)
            except BaseException as e:  # noqa: BLE001
                results = [(M.RESULT_ERROR, _task_error(name, e))] * max(num_returns, 1)
        if not conn.closed:
            conn.send((M.TASK_DONE, task_id, results, time.perf_counter() - start))
        if self.exit_cause is not None:
            conn.flush()
            self._exit_actor()

    def _exit_actor(self) -> None:
        """An intentional exit: the node manager records why and does not restart."""
        try:
            self.core.node_conn.send_now((M.ACTOR_EXITING, self.actor_id, self.exit_cause))
        except Exception:
            pass
        _exit_process()

    def _resolve(self, args, kwargs, prefetched):
        if not any(type(a) is TopRef for a in args) and not any(type(v) is TopRef for v in kwargs.values()):
            return args, kwargs
        core = self.core
        if prefetched:
            for oid, (kind, payload) in prefetched.items():
                core.memory_store.set(oid, INLINE if kind == M.RESULT_INLINE else IN_STORE, payload,
                                      overwrite=True)
        tops = [a for a in args if type(a) is TopRef] + [v for v in kwargs.values() if type(v) is TopRef]
        refs = [ObjectRef(t.oid, t.owner, _count=False) for t in tops]
        try:
            values = dict(zip((t.oid for t in tops), core.get_values(refs, None)))
        finally:
            # Argument values are cached only for this call; the caller keeps them alive.
            for t in tops:
                if not core.ref_counter.has(t.oid):
                    core.memory_store.delete(t.oid)
        args = tuple(values[a.oid] if type(a) is TopRef else a for a in args)
        kwargs = {k: (values[v.oid] if type(v) is TopRef else v) for k, v in kwargs.items()}
        return args, kwargs


def _exit_process() -> None:
    """Leaves at once, after the output the task wrote reaches its log."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    os._exit(0)


def _task_error(name: str, e: BaseException) -> bytes:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    err = exc_mod.TaskError(name, tb, e, os.getpid())
    try:
        return serialization.dumps(err)
    except TypeError:
        return serialization.dumps(exc_mod.TaskError(name, tb, None, os.getpid()))
