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

import signal
import sys
import threading
import time
import traceback
from collections import deque

from skate import exceptions as exc_mod
from skate._private.node.log_monitor import TASK_MARKER
from skate._private.object_store import serialization
from skate._private.protocol import messages as M
from skate._private.worker.core_worker import TopRef
from skate._private.worker.memory_store import IN_STORE, INLINE
from skate.object_ref import ObjectRef

_FLUSH_EVERY_S = 0.001


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
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        if self._cancel_requested is not None and self._cancel_requested == self.current:
            self._cancel_requested = None
            raise exc_mod.TaskCancelledError("cancelled")

    # --- I/O thread -------------------------------------------------------------------
    def add_function(self, fn_id, blob) -> None:
        self.function_blobs[fn_id] = blob

    def enqueue(self, conn, wire) -> None:
        with self.cond:
            self.queue.append((conn, wire))
            if len(self.queue) == 1:
                self.cond.notify()

    def cancel(self, conn, task_id, force) -> None:
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
        # Children it submitted go too (recursive cancel).
        self.core.loop.call_soon(self._cancel_children)

    def _cancel_children(self) -> None:
        for tid in list(self.core.submitter.tasks):
            self.core.submitter.cancel(tid, False)

    def caller_gone(self, conn) -> None:
        with self.cond:
            if any(item[0] is conn for item in self.queue):
                self.queue = deque(item for item in self.queue if item[0] is not conn)

    # --- main thread ------------------------------------------------------------------
    def run_forever(self) -> None:
        queue = self.queue
        cond = self.cond
        last_flush = time.monotonic()
        unflushed: set = set()
        while True:
            with cond:
                while not queue:
                    cond.wait()
                conn, wire = queue.popleft()
                more = bool(queue)
            start = time.perf_counter()
            results = self.execute(wire)
            run_s = time.perf_counter() - start
            if conn.closed:
                continue
            conn.send_deferred((M.TASK_DONE, wire[0], results, run_s))
            unflushed.add(conn)
            now = time.monotonic()
            if not more or now - last_flush > _FLUSH_EVERY_S:
                for c in unflushed:
                    c.flush()
                unflushed.clear()
                last_flush = now

    def _function(self, fn_id):
        fn = self.functions.get(fn_id)
        if fn is None:
            fn = self.functions[fn_id] = serialization.deserialize(self.function_blobs.pop(fn_id))
        return fn

    def execute(self, wire) -> list:
        task_id, fn_id, name, args_blob, prefetched, num_returns = wire
        core = self.core
        self.current = task_id
        try:
            if name != self._last_name:
                self._last_name = name
                sys.stdout.write(TASK_MARKER + name + "\n")
                sys.stderr.write(TASK_MARKER + name + "\n")
            try:
                fn = self._function(fn_id)
                args, kwargs = serialization.deserialize(args_blob)
                args, kwargs = self._resolve(args, kwargs, prefetched)
                value = fn(*args, **kwargs)
                if num_returns == 1:
                    values = (value,)
                elif num_returns == 0:
                    values = (None,)
                else:
                    values = tuple(value)
                    if len(values) != num_returns:
                        raise ValueError(f"task {name}() declared num_returns={num_returns} but "
                                         f"returned {len(values)} values")
            except exc_mod.TaskCancelledError:
                err = serialization.dumps(exc_mod.TaskCancelledError(f"task {name}() was cancelled"))
                return [(M.RESULT_ERROR, err)] * max(num_returns, 1)
            except BaseException as e:  # noqa: BLE001 - user code may raise anything
                if isinstance(e, (SystemExit, KeyboardInterrupt)) and not isinstance(e, Exception):
                    pass
                return [(M.RESULT_ERROR, _task_error(name, e))] * max(num_returns, 1)
            results = []
            for i, v in enumerate(values):
                oid = task_id + i.to_bytes(4, "big")
                try:
                    sobj = serialization.serialize(v)
                    core.ref_counter.add_contents(oid, sobj.contained_refs)
                    results.append(core.store_value(oid, sobj))
                    core.memory_store.delete(oid)  # the caller owns it, not us
                except BaseException as e:  # noqa: BLE001
                    results.append((M.RESULT_ERROR, _task_error(name, e)))
            return results
        finally:
            self.current = None

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


def _task_error(name: str, e: BaseException) -> bytes:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    import os
    err = exc_mod.TaskError(name, tb, e, os.getpid())
    try:
        return serialization.dumps(err)
    except TypeError:
        return serialization.dumps(exc_mod.TaskError(name, tb, None, os.getpid()))
