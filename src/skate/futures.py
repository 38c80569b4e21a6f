r"""``concurrent.futures`` on skate: change one import, run ``ProcessPoolExecutor`` code on
the embedded default cluster, or on a cluster named by ``SKATE_ADDRESS`` / ``address=``.

``ProcessPoolExecutor`` (also exported as ``Executor``) behaves like CPython's where
users can see it: future states and callbacks, ``cancel()``, ``map`` with ``chunksize``
and ``timeout``, ``shutdown(wait, cancel_futures)``, the errors. It does better where
CPython breaks: lambdas and closures work (cloudpickle), and a worker that dies
mid-task has its task retried (``max_retries``) instead of breaking the pool.

How a work item flows (compare CPython's ``concurrent/futures/process.py``)::

    submit(fn, *args) ---> _WorkItem(future, fn, args, kwargs)
                                 |
                                 v
     +--------------------------------------------------+
     | pending (deque)   futures PENDING: cancel() works |  <-- map(): chunks added while
     +--------------------------------------------------+      pending is short (feeder)
                                 | claim: future.set_running_or_notify_cancel()
                                 v        (an item cancelled meanwhile is dropped here)
     +--------------------------------------------------+
     | claimed           futures RUNNING                |  RUNNING (claimed + in skate)
     +--------------------------------------------------+  <= "window"
                                 | start: task.remote(chunked, args, kwargs)
                                 v        in skate <= "cap"
     skate task on a worker: _Runner runs the initializer (once per process), then fn;
                             what fn raised comes back as a _Raised value
                                 |
                                 v
     core.on_ref_ready --> _on_ready, on skate's callback thread: the freed slot claims
                           and starts the next item, then the future gets its outcome

Steps in words:

1. ``submit`` makes a ``_WorkItem`` and appends it to *pending*. Its future stays PENDING
   there, so ``cancel()`` succeeds, as in CPython before an item enters its call queue.
2. Claiming marks futures RUNNING, up to the window; starting makes claimed items skate
   tasks, up to the cap. CPython's RUNNING futures are those its processes run plus
   those in its call queue (``max_workers + EXTRA_QUEUED_CALLS`` slots): up to
   ``2 * max_workers + 1``. If the cluster has no more CPUs than ``max_workers``, window
   and cap are that: the extra tasks wait at the workers, which then never idle between
   two calls. If it has more, the cap is ``max_workers`` (so no more than that many
   calls run at once) and the window ``max_workers + 1``.
3. Each task is a call of a ``RemoteFunction`` around ``_Runner`` (one per executor),
   or around a ``_BoundRunner`` for a function submitted again and again (pickled and
   shipped to each worker once). The runner runs the initializer once in each worker
   process before its first call there, and counts calls for ``max_tasks_per_child``.
   Functions pickled by value share one module namespace per executor in each worker
   (``_ShippingPickler``), so what the initializer sets, the calls see.
4. When a task's result is ready, ``_on_ready`` frees its slot (the next item starts),
   then settles the future: the result (a writable copy, as CPython's), or the
   exception the function raised with the remote traceback as ``__cause__``.
5. A worker that dies mid-call: skate retries the task (``max_retries``). When retries
   are spent the future raises ``WorkerCrashedError`` (also a ``BrokenProcessPool``) and
   the executor keeps working; with ``max_retries=0`` the executor breaks as CPython's
   does: ``BrokenProcessPool`` for every unfinished future, and for later submits.
6. Inside a skate task (an executor used by a call), waiting on a future (``result``,
   ``exception``, ``map``'s iteration) lends the task's CPU back, as ``skate.get`` does.

``map`` chops its input into chunks as CPython does, but reads it lazily: chunks are
taken while *pending* holds fewer than a window of them (first in the calling thread,
then in a feeder thread), so an input of any length is read as fast as workers take it,
not all at once. Every chunk still runs whether or not its results are read, and
``shutdown(wait=True)`` waits for all of them, as in CPython. Chunks have no futures
users can see, so they may fill a deeper queue at the workers (``_map_cap``).

May call: the public API (``skate``), ``skate._private.runtime``, and, to copy results
out of skate's serialized form, ``object_store.serialization`` and the core worker's
memory store (``_own_value``).
"""

from __future__ import annotations

import io
import itertools
import multiprocessing
import pickle
import threading
import time
import traceback
import uuid
import weakref
from collections import deque
from concurrent.futures import (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, BrokenExecutor,
                                CancelledError, Future, InvalidStateError, ThreadPoolExecutor,
                                TimeoutError, as_completed, wait)
from concurrent.futures import _base
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from functools import partial
from types import BuiltinFunctionType, FunctionType

import cloudpickle

import skate
from skate import exceptions
from skate._private import runtime
from skate._private.object_store import serialization
from skate._private.worker.memory_store import IN_STORE, INLINE

# As in CPython: how many more calls than workers are claimed (their futures RUNNING and
# no longer cancellable). A larger number keeps workers busier, a smaller one lets
# Future.cancel() succeed more often.
EXTRA_QUEUED_CALLS = 1

_BROKEN_MESSAGE = "A child process terminated abruptly, the process pool is not usable anymore"
_BROKEN_FUTURE_MESSAGE = ("A process in the process pool was terminated abruptly while the "
                          "future was running or pending.")


class WorkerCrashedError(exceptions.WorkerCrashedError, BrokenProcessPool):
    """The worker running the call died (its process exited or was killed) and the task's
    retries (``max_retries``) are spent.

    Both skate's ``WorkerCrashedError`` and ``BrokenProcessPool``, so code written for
    CPython's executor (``except BrokenProcessPool``) still catches it. Unlike CPython,
    the executor keeps working: only this call failed.
    """


# --- the worker side ------------------------------------------------------------------
# Per worker process: which executors' initializers ran here, how many tasks each
# executor ran here (for max_tasks_per_child), and the module namespaces of the functions
# each executor shipped by value (see _ShippingPickler).
_initialized: set = set()
_task_counts: dict = {}
_namespaces: dict = {}


def _namespace(key, module_attrs: dict) -> dict:
    """The one namespace, in this worker, of a module whose functions came by value."""
    ns = _namespaces.get(key)
    if ns is None:
        ns = _namespaces[key] = dict(module_attrs)
    return ns


class _NamespaceRef:
    """Pickles as the worker's namespace for (executor, module), not as a new dict."""

    __slots__ = ("key", "attrs")

    def __init__(self, key, attrs: dict):
        self.key = key
        self.attrs = attrs

    def __reduce__(self):
        return (_namespace, (self.key, self.attrs))


def _setstate_keeping_namespace(func, state) -> None:
    """cloudpickle's function state setter, except that globals the worker's namespace
    already has keep their value there: what the initializer (or an earlier call) set in
    this worker is not overwritten by the driver's value of the same name."""
    st, slotstate = state
    known = func.__globals__
    slotstate = dict(slotstate)
    slotstate["__globals__"] = {k: v for k, v in slotstate["__globals__"].items() if k not in known}
    cloudpickle.cloudpickle._function_setstate(func, (st, slotstate))


class _ShippingPickler(cloudpickle.Pickler):
    """cloudpickle, but every function pickled by value (defined in ``__main__``, a
    lambda, a closure) gets, in the worker, the one namespace of its module for this
    executor, as functions of an imported module share their module's globals.

    Plain cloudpickle gives each unpickled function a fresh globals dict, so a global
    that ``initializer`` sets (``global model; model = load()``) would be invisible to
    the calls: the main use of ``initializer`` in CPython's executor.
    """

    def __init__(self, file, executor_id: str):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._executor_id = executor_id
        self._namespace_refs: dict = {}

    def _function_getnewargs(self, func):
        code, base_globals, name, argdefs, closure = super()._function_getnewargs(func)
        ref = self._namespace_refs.get(id(base_globals))
        if ref is None:
            ref = _NamespaceRef((self._executor_id, base_globals.get("__name__")), dict(base_globals))
            self._namespace_refs[id(base_globals)] = ref
        return code, ref, name, argdefs, closure

    def _dynamic_function_reduce(self, func):
        newargs = self._function_getnewargs(func)
        state = cloudpickle.cloudpickle._function_getstate(func)
        return (cloudpickle.cloudpickle._make_function, newargs, state, None, None,
                _setstate_keeping_namespace)


class _Shipped:
    """Wraps a user callable (or the initializer with its arguments) so that it travels
    pickled by ``_ShippingPickler``; it unpickles as the object itself.

    It also carries the driver's multiprocessing authkey, set in the worker before the
    call's arguments are unpickled: CPython's workers inherit it, and a
    ``multiprocessing.Manager`` proxy passed as an argument connects to its manager with it.
    """

    __slots__ = ("obj", "executor_id")

    def __init__(self, obj, executor_id: str):
        self.obj = obj
        self.executor_id = executor_id

    def __reduce__(self):
        buf = io.BytesIO()
        _ShippingPickler(buf, self.executor_id).dump(self.obj)
        return (_unship, (buf.getvalue(), bytes(multiprocessing.current_process().authkey)))


def _unship(blob: bytes, authkey: bytes):
    process = multiprocessing.current_process()
    if process.authkey != authkey:
        process.authkey = authkey
    return pickle.loads(blob)


class _Raised:
    """What a call that raised returns through skate: the exception, pickled as CPython
    pickles it (``_ExceptionWithTraceback``), so it arrives with the remote traceback as
    its ``__cause__``. A wrapper, so a function that *returns* an exception is not taken
    for one that raised it."""

    __slots__ = ("exc",)

    def __init__(self, exc):
        self.exc = exc

    def __reduce__(self):
        return (_Raised, (self.exc,))


class _InitializerFailed:
    """What a task returns when the executor's initializer raised in its worker."""

    __slots__ = ()

    def __reduce__(self):
        return (_InitializerFailed, ())


class _Runner:
    """Runs the calls of one executor in a worker: its initializer first, once per
    process, then the call. This is the task of calls whose function travels with them."""

    def __init__(self, executor_id: str, initializer, initargs, max_tasks_per_child):
        self.executor_id = executor_id
        self.initializer = initializer
        self.initargs = initargs
        self.max_tasks_per_child = max_tasks_per_child

    def __call__(self, fn, chunked, args, kwargs):
        return self.run(fn, chunked, args, kwargs)

    def run(self, fn, chunked, args, kwargs):
        key = self.executor_id
        if self.initializer is not None and key not in _initialized:
            try:
                self.initializer(*self.initargs)
            except BaseException:  # noqa: BLE001 - as CPython: log, and the pool breaks
                _base.LOGGER.critical("Exception in initializer:", exc_info=True)
                # This process may be half-initialized: leave, a fresh one replaces it.
                runtime.retire_worker_after_task()
                return _InitializerFailed()
            _initialized.add(key)
        if self.max_tasks_per_child is not None:
            n = _task_counts.get(key, 0) + 1
            _task_counts[key] = n
            if n >= self.max_tasks_per_child:
                runtime.retire_worker_after_task()
        try:
            if chunked:   # one chunk of map(): args is a tuple of argument tuples
                return [fn(*a) for a in args]
            return fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - the future carries whatever fn raised
            from concurrent.futures.process import _ExceptionWithTraceback
            return _Raised(_ExceptionWithTraceback(e, e.__traceback__))

    def __reduce__(self):
        shipped = _Shipped((self.initializer, self.initargs), self.executor_id)
        return (_make_runner, (self.executor_id, shipped, self.max_tasks_per_child))


def _make_runner(executor_id, init, max_tasks_per_child) -> _Runner:
    return _Runner(executor_id, init[0], init[1], max_tasks_per_child)


class _BoundRunner:
    """A runner bound to one function: skate pickles it once and ships it to each worker
    once, instead of pickling the function into every call (for a lambda or a function
    of ``__main__``, pickling by value costs more than the rest of the call)."""

    def __init__(self, runner: _Runner, fn):
        self.runner = runner
        self.fn = fn

    def __call__(self, chunked, args, kwargs):
        return self.runner.run(self.fn, chunked, args, kwargs)

    def __reduce__(self):
        return (_BoundRunner, (self.runner, _Shipped(self.fn, self.runner.executor_id)))


def _get_chunks(*iterables, chunksize):
    it = zip(*iterables)
    while True:
        chunk = tuple(itertools.islice(it, chunksize))
        if not chunk:
            return
        yield chunk


def _chain_from_iterable_of_lists(iterable):
    """``itertools.chain.from_iterable`` that keeps no reference to what it yielded."""
    for element in iterable:
        element.reverse()
        while element:
            yield element.pop()


def _result_or_cancel(fut, timeout=None):
    try:
        try:
            return fut.result(timeout)
        finally:
            fut.cancel()
    finally:
        del fut  # break the reference cycle through the exception's traceback


def _call_name(fn) -> str:
    name = getattr(fn, "__name__", None)
    if isinstance(name, str):
        return name
    inner = getattr(fn, "func", None)   # functools.partial
    if inner is not None:
        return _call_name(inner)
    return type(fn).__name__


# --- the driver side ------------------------------------------------------------------

class _Future(Future):
    """``concurrent.futures.Future`` whose waits, inside a skate task, lend the task's CPU
    back (as ``skate.get`` does): a task that waits on the calls of an executor of its own
    cannot starve them of CPUs, even when every CPU is held by such a task."""

    def result(self, timeout=None):
        if self.done():
            return super().result(timeout)
        with runtime.lending_cpu():
            return super().result(timeout)

    def exception(self, timeout=None):
        if self.done():
            return super().exception(timeout)
        with runtime.lending_cpu():
            return super().exception(timeout)


class _WorkItem:
    __slots__ = ("future", "fn", "chunked", "args", "kwargs", "ref")

    def __init__(self, future, fn, chunked, args, kwargs):
        self.future = future
        self.fn = fn
        self.chunked = chunked    # a chunk of map(): args is a tuple of argument tuples
        self.args = args
        self.kwargs = kwargs
        self.ref = None


def _own_value(core, ref):
    """The value of a finished task, as the caller's own copy.

    ``skate.get`` hands out arrays as zero-copy, read-only views of the serialized bytes
    (or of shared memory); CPython's results arrive through a pipe and are writable. So
    deserialize from a private, writable copy of the bytes: one copy, as CPython makes.
    """
    e = core.memory_store.get(ref.id)
    state = e.state if e is not None else None
    if state == INLINE:
        return serialization.deserialize(bytearray(e.data))
    if state == IN_STORE:
        return serialization.deserialize(bytearray(core.read_store(ref.id)))
    return core.get_values([ref], None)[0]   # raises the task's error


def _pickling_error(w):
    """The error the pickler raises for ``w``'s call (CPython's wording), or None."""
    import cloudpickle
    try:
        cloudpickle.dumps((w.fn, w.args, w.kwargs))
    except BaseException as e:  # noqa: BLE001
        return e
    return None


def _settle(future, value=None, exc=None) -> None:
    """Sets a future's outcome unless it already has one (broken pool, cancelled)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass


_global_shutdown = False
_live_executors: weakref.WeakSet = weakref.WeakSet()


def _python_exit() -> None:
    """At interpreter exit, before atexit handlers (so before skate shuts down): wait for
    the work every executor still has, as CPython's executors finish theirs."""
    global _global_shutdown
    _global_shutdown = True
    for ex in list(_live_executors):
        ex._wait_until_idle(at_exit=True)


threading._register_atexit(_python_exit)


class ProcessPoolExecutor(_base.Executor):
    """CPython's ``ProcessPoolExecutor`` running its calls as skate tasks.

    Args (CPython's): ``max_workers`` (default: the cluster's CPUs) is how many calls run
    at once; ``mp_context`` is accepted and ignored (skate starts its own workers);
    ``initializer(*initargs)`` runs once in each worker process before its first call of
    this executor; ``max_tasks_per_child`` replaces a worker process after that many calls.
    skate's own: ``address`` joins the cluster there (default: ``SKATE_ADDRESS``, else the
    embedded default started on first use); ``max_retries`` is how often a call whose
    worker died is retried (0: CPython's ``BrokenProcessPool`` behaviour).
    """

    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=(), *,
                 max_tasks_per_child=None, address=None, max_retries=3):
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            elif max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < -1:
            raise ValueError(f"max_retries={max_retries!r} is invalid: expected a non-negative "
                             f"integer (or -1 to retry forever)")
        if mp_context is None:   # as CPython's; skate starts its own workers and ignores it
            mp_context = multiprocessing.get_context("spawn" if max_tasks_per_child is not None else None)
        self._mp_context = mp_context
        self._initializer = initializer
        self._initargs = initargs
        self._max_tasks_per_child = max_tasks_per_child
        self._max_retries = max_retries
        self._address = address
        self._id = uuid.uuid4().hex
        self._runner = _Runner(self._id, initializer, initargs, max_tasks_per_child)
        self._task = skate.remote(max_retries=max_retries)(self._runner)
        self._tasks_lock = threading.Lock()
        self._named_tasks: dict = {}      # call name -> the generic task under that name
        self._bound_tasks: dict = {}      # function -> its _BoundRunner task
        self._seen_once = weakref.WeakSet()   # functions submitted once so far

        self._workers = max_workers       # resolved on first use when None: the cluster's CPUs
        self._window = None               # how many futures may be RUNNING (set on first use)
        self._skate_cap = None            # how many of them may be tasks in skate
        self._map_window = self._map_cap = None     # the same two for chunks of map()
        self._core = None

        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)   # _unfinished reached 0
        self._room = threading.Condition(self._lock)   # pending got shorter (feeders wait)
        self._pending: deque = deque()    # futures PENDING
        self._claimed: deque = deque()    # futures RUNNING, not yet tasks in skate
        self._in_skate: set = set()       # work items whose task is in skate
        self._unfinished = 0              # work items whose future is not settled yet
        self._feeds: set = set()          # map feeds still reading their input
        self._shutdown_thread = False     # CPython's name: no new submits
        self._broken = False              # or CPython's message once a crash broke the pool
        self._broken_error = None         # the BrokenProcessPool its futures got
        if address is not None:
            self._start_runtime()
        _live_executors.add(self)

    # --- public API -----------------------------------------------------------------------
    @property
    def _max_workers(self):
        if self._workers is None:
            self._start_runtime()
        return self._workers

    def submit(self, fn, /, *args, **kwargs):
        return self._submit_item(_WorkItem(_Future(), fn, False, args, kwargs))
    submit.__doc__ = _base.Executor.submit.__doc__

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """Returns an iterator equivalent to ``map(fn, *iterables)``, results in order.

        As CPython's: the input is zipped and chopped into chunks of ``chunksize`` items,
        one task each; ``timeout`` (seconds, from this call) bounds the whole iteration
        with ``TimeoutError``; an exception raised by ``fn`` is raised when its item is
        reached; closing the iterator early cancels the calls not started yet.

        Unlike CPython's, the input is read lazily: chunks are taken as workers have room
        (see the module's docstring), so ``map`` over a long or endless input returns at
        once. An error raised by the input iterator is raised by ``map`` itself if it
        comes among the first chunks, which ``map`` takes before it returns, else at its
        place in the results.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        feed = _MapFeed(self, fn, _get_chunks(*iterables, chunksize=chunksize))
        feed.fill_eagerly()
        return _chain_from_iterable_of_lists(feed.results(end_time, timeout is not None))

    def shutdown(self, wait=True, *, cancel_futures=False):
        cancelled = []
        with self._lock:
            self._shutdown_thread = True
            if cancel_futures:
                # CPython cancels what is not in its call queue yet: pending items, and
                # the chunks map() has not taken yet.
                for feed in self._feeds:
                    feed.stop_locked(CancelledError())
                cancelled = list(self._pending)
                self._pending.clear()
                self._room.notify_all()
        for w in cancelled:
            w.future.cancel()
        if cancelled:
            self._settled(len(cancelled))
        if wait:
            self._wait_until_idle()
    shutdown.__doc__ = _base.Executor.shutdown.__doc__

    # --- internals ------------------------------------------------------------------------
    def _check_open(self) -> None:
        """Raises what CPython's submit raises on a broken or shut-down executor."""
        if self._broken:
            raise BrokenProcessPool(self._broken)
        if self._shutdown_thread:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _global_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _submit_item(self, w: _WorkItem):
        if self._core is None:
            with self._lock:
                self._check_open()
            self._start_runtime()
        start = []
        with self._lock:
            self._check_open()
            self._unfinished += 1
            self._pending.append(w)
            self._fill(start)
        if start:
            self._launch(start)
        return w.future

    def _start_runtime(self) -> None:
        """Joins (or starts) the cluster on first use, and sizes the pool from it."""
        if self._address is not None and not skate.is_initialized():
            try:
                skate.init(address=self._address)
            except RuntimeError:
                if not skate.is_initialized():   # not a lost race with another thread's init
                    raise
        core = runtime.core_or_init()
        cpus = skate.cluster_resources().get("CPU", 1)
        workers = self._workers
        if workers is None:
            workers = max(1, int(cpus))
        # CPython's futures are RUNNING from when they enter its call queue: up to
        # max_workers calls in the processes plus max_workers + EXTRA queued. When the
        # cluster cannot run more than max_workers tasks at once anyway, all of those are
        # tasks in skate (queued at workers, so no worker idles between two calls).
        # Otherwise only max_workers are, so no more than max_workers run at once, and
        # one more waits here, claimed.
        # The chunks of map() have no future users can see or cancel one by one: there,
        # a deeper queue at the workers is not visible, and keeps them busier.
        if cpus <= workers:
            window = cap = 2 * workers + EXTRA_QUEUED_CALLS
            map_window = map_cap = max(4 * workers, 16)
        else:
            window, cap = workers + EXTRA_QUEUED_CALLS, workers
            map_window, map_cap = window, cap
        with self._lock:
            self._core = core
            if self._window is None:
                self._workers = workers
                self._window = window
                self._skate_cap = cap
                self._map_window, self._map_cap = map_window, map_cap

    def _fill(self, start: list) -> None:
        """With the lock held: claims pending items into free slots, and lists the
        claimed items that may become tasks now (the caller starts them, unlocked)."""
        pending, claimed = self._pending, self._claimed
        window, cap = self._window, self._skate_cap
        map_window, map_cap = self._map_window, self._map_cap
        in_skate = len(self._in_skate)
        dropped = 0
        while pending and len(claimed) + in_skate < (map_window if pending[0].chunked else window):
            w = pending.popleft()
            if w.future.set_running_or_notify_cancel():
                claimed.append(w)
            else:
                dropped += 1      # cancelled while pending
        while claimed and in_skate < (map_cap if claimed[0].chunked else cap):
            w = claimed.popleft()
            self._in_skate.add(w)
            in_skate += 1
            start.append(w)
        if dropped:
            self._unfinished -= dropped
            if not self._unfinished:
                self._idle.notify_all()
        if self._feeds and len(pending) < window:
            self._room.notify_all()

    def _task_for(self, fn):
        """The skate task for a call of ``fn``, named after it (in logs and errors).

        A plain (or built-in) function seen a second time gets a task of its own, bound
        to it (pickled once, shipped once per worker); a function seen once (e.g. a lambda
        made per call) travels with its call, so workers do not keep a task per lambda.
        Other callables (bound methods, callable objects) are pickled with each call, as
        CPython does, so each call sees their state at submit time.
        """
        task = self._bound_tasks.get(fn)     # the common case, without the lock
        if task is not None:
            return task, False
        with self._tasks_lock:
            if type(fn) is FunctionType or type(fn) is BuiltinFunctionType:
                task = self._bound_tasks.get(fn)
                if task is not None:
                    return task, False
                if fn in self._seen_once:
                    if len(self._bound_tasks) >= 64:
                        self._bound_tasks.clear()
                    bound = skate.remote(max_retries=self._max_retries)(_BoundRunner(self._runner, fn))
                    task = self._bound_tasks[fn] = bound.options(name=_call_name(fn))
                    self._seen_once.discard(fn)
                    return task, False
                self._seen_once.add(fn)
            name = _call_name(fn)
            task = self._named_tasks.get(name)
            if task is None:
                if len(self._named_tasks) >= 256:
                    self._named_tasks.clear()
                task = self._named_tasks[name] = self._task.options(name=name)
            return task, True

    def _launch(self, start: list) -> None:
        """Makes the listed claimed items skate tasks (unlocked: pickling takes time). An
        item that cannot be one fails its future and frees its slot for the next."""
        i = 0
        while i < len(start):
            w = start[i]
            i += 1
            try:
                task, generic = self._task_for(w.fn)
                if generic:
                    ref = task.remote(_Shipped(w.fn, self._id), w.chunked, w.args, w.kwargs)
                else:
                    ref = task.remote(w.chunked, w.args, w.kwargs)
            except BaseException as e:  # noqa: BLE001 - as CPython: the future carries it
                # CPython's _on_queue_feeder_error: a call that cannot be pickled fails its
                # future with the pickler's error, the traceback of that as its cause.
                e = _pickling_error(w) or e
                tb = traceback.format_exception(type(e), e, e.__traceback__)
                e.__cause__ = _RemoteTraceback('\n"""\n{}"""'.format("".join(tb)))
                with self._lock:
                    self._in_skate.discard(w)
                    self._fill(start)        # appends what may take the slot
                _settle(w.future, exc=e)
                self._settled(1)
                continue
            w.fn = w.args = w.kwargs = None
            w.ref = ref
            core = self._core = runtime.core()
            core.on_ref_ready(ref, partial(self._on_ready, w))

    def _task_done(self, w: _WorkItem) -> None:
        """Frees the slot ``w`` held in skate and starts what may take it."""
        start = []
        with self._lock:
            self._in_skate.discard(w)
            self._fill(start)
        if start:
            self._launch(start)

    def _settled(self, n: int) -> None:
        with self._lock:
            self._unfinished -= n
            if not self._unfinished:
                self._idle.notify_all()

    def _on_ready(self, w: _WorkItem, ref) -> None:
        """On skate's callback thread: the task ended; settle its future."""
        value = exc = None
        try:
            value = _own_value(self._core, ref)
        except exceptions.WorkerCrashedError as e:
            if self._max_retries == 0:
                self._break(e)
            exc = WorkerCrashedError(str(e))
        except exceptions.TaskError as e:
            # Not the call itself (that comes back as _Raised): its arguments or its
            # result could not be (un)pickled. CPython sends that error back the same way.
            cause = e.cause if isinstance(e.cause, BaseException) else None
            exc = cause if cause is not None else e
            exc.__cause__ = _RemoteTraceback('\n"""\n%s"""' % e.traceback_str)
        except BaseException as e:  # noqa: BLE001 - e.g. an object lost: the future carries it
            exc = e
        else:
            t = type(value)
            if t is _Raised:
                exc, value = value.exc, None
            elif t is _InitializerFailed:
                value = None
                exc = self._break(None)
        w.ref = None
        self._task_done(w)
        _settle(w.future, value, exc)
        self._settled(1)

    def _break(self, cause):
        """CPython's terminate_broken: every unfinished future gets BrokenProcessPool, and
        the executor takes no more work. Returns the error given to the futures."""
        with self._lock:
            if self._broken:
                return self._broken_error
            self._broken = _BROKEN_MESSAGE
            self._shutdown_thread = True
            bpe = BrokenProcessPool(_BROKEN_FUTURE_MESSAGE)
            if cause is not None:
                bpe.__cause__ = cause
            self._broken_error = bpe
            for feed in self._feeds:
                feed.stop_locked(bpe)
            waiting = list(self._pending) + list(self._claimed)
            self._pending.clear()
            self._claimed.clear()
            running = list(self._in_skate)
            self._room.notify_all()
        for w in waiting:
            _settle(w.future, exc=bpe)
        if waiting:
            self._settled(len(waiting))
        for w in running:
            _settle(w.future, exc=bpe)
            ref = w.ref
            if ref is not None:   # CPython terminates the other workers; stop their calls
                try:
                    skate.cancel(ref)
                except Exception:  # noqa: BLE001 - already finished or skate is gone
                    pass
        return bpe

    def _wait_until_idle(self, at_exit: bool = False) -> None:
        """Blocks until every work item submitted (and every map input) is settled."""
        core = self._core
        if core is not None and threading.current_thread() is getattr(core, "_callback_thread", None):
            with self._lock:
                busy = self._unfinished or self._feeds
            if busy:
                if at_exit:
                    return
                raise RuntimeError(
                    "shutdown(wait=True) was called from a future's done-callback, which runs "
                    "on skate's callback thread: waiting there would block the results it "
                    "waits for. Call shutdown(wait=False) in callbacks.")
        with self._lock:
            while self._unfinished or self._feeds:
                core = self._core
                if core is not None and core.shut_down:
                    break
                self._idle.wait(0.5)
            else:
                return
        # skate was shut down under this executor: its tasks will never report back.
        lost = exceptions.SkateError("skate was shut down (skate.shutdown()) before this call finished")
        self._break(lost)
        with self._lock:
            running = list(self._in_skate)
            self._in_skate.clear()
        for w in running:
            _settle(w.future, exc=self._broken_error)
        if running:
            self._settled(len(running))


class _MapFeed:
    """One ``map`` call's input, turned into work items as the executor has room."""

    def __init__(self, executor: ProcessPoolExecutor, fn, chunks):
        self.executor = executor
        self.fn = fn
        self.chunks = chunks
        self.cond = threading.Condition(threading.Lock())
        self.futures: deque = deque()   # made, not yet handed to the result iterator
        self.finished = False           # no more futures will come
        self.error = None               # raised after the last future
        self.stopped = False            # pull no more input

    # --- the input side -------------------------------------------------------------------
    def fill_eagerly(self) -> None:
        """In map()'s caller: submits chunks while the executor has room. Errors (the
        executor is shut down, the input raised) are raised here, as CPython's map does."""
        ex = self.executor
        taken = 0
        while True:
            with ex._lock:
                # Bounded: with fast calls the pending queue may never fill up, and an
                # endless input must not keep map() from returning.
                room = ex._window is None or (len(ex._pending) < ex._window
                                              and taken < ex._map_window + ex._window)
            if not room:
                break
            chunk = next(self.chunks, None)
            if chunk is None:
                self._finish()
                return
            self._push(ex._submit_item(_WorkItem(_Future(), self.fn, True, chunk, None)))
            taken += 1
        # More input than room: a feeder thread takes the rest as room frees up.
        with ex._lock:
            ex._feeds.add(self)
        threading.Thread(target=self._feed, name="skate-futures-map-feeder", daemon=True).start()

    def _feed(self) -> None:
        ex = self.executor
        try:
            while True:
                with ex._lock:
                    while not self.stopped and len(ex._pending) >= ex._window:
                        ex._room.wait()
                    if self.stopped:
                        return
                chunk = next(self.chunks, None)
                if chunk is None:
                    return
                fut = _Future()
                w = _WorkItem(fut, self.fn, True, chunk, None)
                start = []
                with ex._lock:
                    if self.stopped:   # cancelled or broken while the chunk was read
                        return
                    ex._unfinished += 1
                    ex._pending.append(w)
                    ex._fill(start)
                self._push(fut)
                if start:
                    ex._launch(start)
        except BaseException as e:  # noqa: BLE001 - the input's error, raised at its place
            with self.cond:
                if self.error is None:
                    self.error = e
        finally:
            with ex._lock:
                ex._feeds.discard(self)
                if not ex._unfinished and not ex._feeds:
                    ex._idle.notify_all()
            self._finish()

    def stop_locked(self, error) -> None:
        """With the executor's lock held: take no more input; the results end with ``error``."""
        self.stopped = True
        with self.cond:
            if self.error is None:
                self.error = error

    def _push(self, fut) -> None:
        with self.cond:
            self.futures.append(fut)
            self.cond.notify()
            closed = self.finished
        if closed:
            fut.cancel()

    def _finish(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    # --- the result side ------------------------------------------------------------------
    def _next_future(self, end_time):
        with self.cond:
            if self.futures:
                return self.futures.popleft()
        with runtime.lending_cpu(), self.cond:
            while not self.futures:
                if self.finished:
                    if self.error is not None:
                        err, self.error = self.error, None
                        raise err
                    return None
                if end_time is None:
                    self.cond.wait()
                else:
                    left = end_time - time.monotonic()
                    if left <= 0:
                        raise TimeoutError()
                    self.cond.wait(left)
            return self.futures.popleft()

    def results(self, end_time, timed: bool):
        # A generator, so that the first chunks are submitted before the first value is
        # asked for (as CPython's result_iterator).
        def result_iterator():
            try:
                while True:
                    fut = self._next_future(end_time)
                    if fut is None:
                        return
                    if timed:
                        yield _result_or_cancel(fut, end_time - time.monotonic())
                    else:
                        yield _result_or_cancel(fut)
                    del fut
            finally:
                self.close()
        return result_iterator()

    def close(self) -> None:
        """The result iterator is done with (exhausted, timed out, closed, collected):
        read no more input, and cancel the calls that have not started."""
        ex = self.executor
        with ex._lock:
            self.stopped = True
            ex._room.notify_all()
        with self.cond:
            self.finished = True
            rest = list(self.futures)
            self.futures.clear()
        for fut in rest:
            fut.cancel()


Executor = ProcessPoolExecutor

__all__ = [
    "ProcessPoolExecutor", "Executor", "WorkerCrashedError", "BrokenProcessPool",
    "EXTRA_QUEUED_CALLS",
    # concurrent.futures' other names, so `import skate.futures as futures` is a drop-in
    "Future", "wait", "as_completed", "FIRST_COMPLETED", "FIRST_EXCEPTION", "ALL_COMPLETED",
    "CancelledError", "TimeoutError", "BrokenExecutor", "InvalidStateError", "ThreadPoolExecutor",
]
