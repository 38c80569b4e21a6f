r"""``skate.multiprocessing.Pool``: the standard library's ``multiprocessing.Pool`` on skate.

Change one import (``from skate.multiprocessing import Pool``) and a program's pool runs
its work as skate tasks: on the embedded default cluster, or on the cluster named by
``SKATE_ADDRESS`` or ``Pool(address=...)``. What users see is the standard library's:
the same methods and signatures, the same result classes (``multiprocessing.pool``'s
``ApplyResult``, ``MapResult``, ``IMapIterator``: ``get``/``wait``/``ready``/``successful``
with ``multiprocessing.TimeoutError``), the same ordering, callbacks, exceptions (the
original type, with the remote traceback as ``__cause__``) and misuse errors.

::

    apply_async / map_async / imap ...  (caller's thread)
        |  a job: a result object in ``_cache``, its units (calls, chunks, items) as a
        v  generator on ``_taskqueue``
    task handler thread: walks each job's units in order ---> Dispatcher (``_dispatch.py``)
        ---> batches, at most ``processes`` running ---> skate tasks: ``_runner.run_batch``
        <--- outcomes, on skate's callback thread ---> ``cache[job]._set(i, outcome)``
             (the result becomes ready; the user's callback runs there, as in the stdlib)

Where skate does better than the standard library (each has a test):

- functions and arguments travel with cloudpickle: lambdas, closures and ``__main__``
  functions work;
- a worker that dies mid-task does not hang the pool: the task is retried
  (``max_retries``, default 3), then its result raises ``WorkerCrashedError``;
- a callback that raises is reported on stderr and the pool carries on (the standard
  library's result thread dies and every later ``get()`` hangs);
- an ``initializer`` that raises fails the tasks that needed it (the standard library
  restarts the worker forever).

May call: the public API, ``skate._private.runtime`` (the process's core worker, to start
the embedded cluster when needed), ``_dispatch`` and ``_runner``.
"""

from __future__ import annotations

import itertools
import operator
import queue
import secrets
import threading
import warnings
import weakref
from multiprocessing.pool import (ApplyResult, IMapIterator, IMapUnorderedIterator, MapResult,
                                  _PoolCache)

import skate
from skate._private import runtime
from skate.multiprocessing import _runner
from skate.multiprocessing._dispatch import _RAISE, Dispatcher, Function, guard_callback

__all__ = ["Pool", "cpu_count"]

INIT = "INIT"
RUN = "RUN"
CLOSE = "CLOSE"
TERMINATE = "TERMINATE"

_MAX_FUNCTIONS = 64         # functions a pool keeps pickled
# initializer + initargs larger than this go to the object store once, not with each batch
_INLINE_INIT_BYTES = 64 * 1024


def _connect(address=None):
    """This process's core worker: the running skate, else a new connection (``address``,
    else ``SKATE_ADDRESS``, else the embedded default)."""
    if not runtime.is_initialized():
        runtime.init(address=address, ignore_reinit_error=True)
    return runtime.core()


def cpu_count() -> int:
    """The number of CPUs of the skate cluster (starting the embedded one if needed)."""
    _connect()
    return max(1, int(skate.cluster_resources().get("CPU", 1)))


def _units(job, fn: Function, kind: int, iterable):
    """A job's units; an exception of ``iterable`` becomes the next unit's outcome (the
    standard library's ``_guarded_task_generation``)."""
    try:
        i = -1
        for i, x in enumerate(iterable):
            yield (job, i, fn, kind, x)
    except Exception as e:  # noqa: BLE001
        yield (job, i + 1, fn, _RAISE, e)


_SLICEABLE = (range, list, tuple)


def _chunks(iterable, size):
    """The standard library's ``Pool._get_tasks``, without the function. A ``range``,
    ``list`` or ``tuple`` is sliced instead: the same items (a range's chunks are ranges,
    not made and pickled int by int here)."""
    if type(iterable) in _SLICEABLE and isinstance(size, int) and size >= 1:
        for start in range(0, len(iterable), size):
            yield iterable[start:start + size]
        return
    it = iter(iterable)
    while 1:
        x = tuple(itertools.islice(it, size))
        if not x:
            return
        yield x


def _handle_tasks(taskqueue, dispatcher: Dispatcher) -> None:
    """The task handler thread: hands each job's units to the dispatcher, job after job
    (``in_memory``: the input is a sequence, its units are added in groups; else each
    unit as soon as the input yields it)."""
    for taskseq, set_length, in_memory in iter(taskqueue.get, None):
        task = None
        try:
            if in_memory:
                task = dispatcher.add_all(taskseq)
            else:
                for task in taskseq:
                    if dispatcher.terminated:
                        break
                    dispatcher.add(task)
            if dispatcher.terminated:
                break
            if set_length:
                idx = task[1] if task else -1
                set_length(idx + 1)
        finally:
            task = taskseq = None


_lending_cpu = runtime.lending_cpu


class _WaitLendsCpu:
    """A result's wait inside a task lends the task's CPU (see ``_lending_cpu``)."""

    def wait(self, timeout=None):
        if self._event.is_set():
            return
        with _lending_cpu():
            super().wait(timeout)


class _NextLendsCpu:
    def next(self, timeout=None):
        if self._items:
            return super().next(timeout)
        with _lending_cpu():
            return super().next(timeout)

    __next__ = next


class _ApplyResult(_WaitLendsCpu, ApplyResult):
    """The standard library's ``AsyncResult`` (what ``apply_async`` returns)."""


class _MapResult(_WaitLendsCpu, MapResult):
    """The standard library's ``MapResult`` (what ``map_async`` returns)."""


class _IMapIterator(_NextLendsCpu, IMapIterator):
    """The standard library's ``imap`` iterator, also taking a batch of outcomes at once."""

    def _set_many(self, outcomes) -> None:
        """``_set(i, obj)`` for each ``(i, obj)``, under one lock, waking as many waiters
        as items became available."""
        with self._cond:
            appended = 0
            for i, obj in outcomes:
                if self._index == i:
                    self._items.append(obj)
                    self._index += 1
                    appended += 1
                    while self._index in self._unsorted:
                        self._items.append(self._unsorted.pop(self._index))
                        self._index += 1
                        appended += 1
                else:
                    self._unsorted[i] = obj
            if appended:
                self._cond.notify(appended)
            if self._index == self._length:
                del self._cache[self._job]
                self._pool = None


class _IMapUnorderedIterator(_NextLendsCpu, IMapUnorderedIterator):
    """The standard library's ``imap_unordered`` iterator, also taking a batch at once."""

    def _set_many(self, outcomes) -> None:
        with self._cond:
            self._items.extend(obj for _i, obj in outcomes)
            self._index += len(outcomes)
            self._cond.notify(len(outcomes))
            if self._index == self._length:
                del self._cache[self._job]
                self._pool = None


class _CacheEmpty:
    """The notifier ``_PoolCache`` calls when the last job is done: wakes ``join``."""

    def __init__(self):
        self.cond = threading.Condition()

    def put(self, _item) -> None:
        with self.cond:
            self.cond.notify_all()


def _finalize(taskqueue, dispatcher, changed: _CacheEmpty) -> None:
    dispatcher.terminate()
    taskqueue.put(None)
    changed.put(None)       # a join() waiting for results stops waiting


class Pool:
    """A process pool whose workers are skate's: ``multiprocessing.Pool``'s interface.

    ``processes`` defaults to the cluster's CPUs; at most ``processes`` tasks of this pool
    run at once. ``initializer(*initargs)`` runs once in each worker process the pool
    uses, before its first task there; ``maxtasksperchild`` replaces a worker process
    after that many tasks. ``context`` is accepted and ignored (skate starts its own
    workers). Skate's own keywords: ``address`` (a cluster to connect to when skate is
    not running yet), ``max_retries`` (how often a task whose worker died is retried
    before its result raises ``skate.exceptions.WorkerCrashedError``).
    """

    def __init__(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None,
                 context=None, *, address=None, max_retries=3):
        self._state = INIT
        self._dispatcher = None
        self._changed = _CacheEmpty()
        self._cache = _PoolCache(notifier=self._changed)
        self._taskqueue = queue.SimpleQueue()
        self._maxtasksperchild = maxtasksperchild
        self._initializer = initializer
        self._initargs = initargs
        self._ctx = context
        self._functions: dict = {}

        if processes is None:
            processes = cpu_count()
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        processes = operator.index(processes)   # the stdlib's range(processes) raises TypeError
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError('initializer must be a callable')
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < -1:
            raise ValueError(f"max_retries={max_retries!r} is invalid: expected a non-negative "
                             f"integer (or -1: retry forever)")
        self._processes = processes
        self._max_retries = max_retries

        _connect(address)
        pool_id = secrets.token_bytes(8)
        init = None
        if initializer is not None:
            init = _runner.dumps((initializer, tuple(initargs)))
            if len(init) > _INLINE_INIT_BYTES:
                init = (skate.put(init),)     # nested: the worker fetches it only when needed
        self._remote = skate.remote(num_cpus=1, max_retries=max_retries)(_runner.run_batch)
        cpus = int(skate.cluster_resources().get("CPU", 0))
        # When the cluster cannot run more than ``processes`` at once anyway, a second
        # batch per process may wait at the worker's caller: the worker starts it the
        # moment it finishes the first, with no round trip to this pool between.
        window = processes * 2 if cpus <= processes else processes
        self._dispatcher = Dispatcher(pool_id, processes, window, self._remote, self._cache, init=init,
                                      max_tasks=maxtasksperchild, max_retries=max_retries)
        self._dispatcher.warm_up(min(processes, cpus))
        self._task_handler = threading.Thread(target=_handle_tasks, args=(self._taskqueue, self._dispatcher),
                                              name="skate-pool-tasks", daemon=True)
        self._task_handler.start()
        # Like the stdlib's Finalize: a pool collected while running stops its thread and work.
        self._finalizer = weakref.finalize(self, _finalize, self._taskqueue, self._dispatcher,
                                           self._changed)
        self._finalizer.atexit = False
        self._state = RUN

    # Copy globals as function locals, as the standard library does: __del__ may run at
    # interpreter shutdown.
    def __del__(self, _warn=warnings.warn, RUN=RUN):
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)

    def __repr__(self):
        cls = self.__class__
        return (f'<{cls.__module__}.{cls.__qualname__} '
                f'state={self._state} '
                f'pool_size={getattr(self, "_processes", 0)}>')

    def __reduce__(self):
        raise NotImplementedError('pool objects cannot be passed between processes or pickled')

    def _check_running(self):
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _function(self, func) -> Function:
        """The pool's record of ``func``, pickled once however many jobs run it. (Like a
        forked worker's copy of the parent, a function shipped by value carries the
        globals it saw when first sent.)"""
        known = self._functions.get(id(func))
        if known is None or known.fn is not func:
            known = Function(func)
            if len(self._functions) >= _MAX_FUNCTIONS:
                self._functions.clear()
            self._functions[id(func)] = known     # holds func: its id is not reused meanwhile
        return known

    # --- the methods ------------------------------------------------------------------
    def apply(self, func, args=(), kwds={}):
        '''Equivalent of `func(*args, **kwds)`. Pool must be running.'''
        return self.apply_async(func, args, kwds).get()

    def map(self, func, iterable, chunksize=None):
        '''Apply `func` to each element in `iterable`, collecting the results in a list.'''
        return self._map_async(func, iterable, _runner.MAP, chunksize).get()

    def starmap(self, func, iterable, chunksize=None):
        '''Like `map()`, with the elements of `iterable` unpacked as arguments.'''
        return self._map_async(func, iterable, _runner.STARMAP, chunksize).get()

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        '''Asynchronous version of `starmap()` method.'''
        return self._map_async(func, iterable, _runner.STARMAP, chunksize, callback, error_callback)

    def imap(self, func, iterable, chunksize=1):
        '''Equivalent of `map()`, lazily: results in order as they are ready.'''
        self._check_running()
        if chunksize == 1:
            result = _IMapIterator(self)
            self._taskqueue.put((_units(result._job, self._function(func), _runner.ONE, iterable),
                                 result._set_length, hasattr(iterable, "__len__")))
            return result
        else:
            if chunksize < 1:
                raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
            result = _IMapIterator(self)
            self._taskqueue.put((_units(result._job, self._function(func), _runner.MAP, _chunks(iterable, chunksize)),
                                 result._set_length, hasattr(iterable, "__len__")))
            return (item for chunk in result for item in chunk)

    def imap_unordered(self, func, iterable, chunksize=1):
        '''Like `imap()` method but ordering of results is arbitrary.'''
        self._check_running()
        if chunksize == 1:
            result = _IMapUnorderedIterator(self)
            self._taskqueue.put((_units(result._job, self._function(func), _runner.ONE, iterable),
                                 result._set_length, hasattr(iterable, "__len__")))
            return result
        else:
            if chunksize < 1:
                raise ValueError("Chunksize must be 1+, not {0!r}".format(chunksize))
            result = _IMapUnorderedIterator(self)
            self._taskqueue.put((_units(result._job, self._function(func), _runner.MAP, _chunks(iterable, chunksize)),
                                 result._set_length, hasattr(iterable, "__len__")))
            return (item for chunk in result for item in chunk)

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):
        '''Asynchronous version of `apply()` method.'''
        self._check_running()
        result = _ApplyResult(self, guard_callback(callback, "callback"),
                             guard_callback(error_callback, "error_callback"))
        self._taskqueue.put(([(result._job, 0, self._function(func), _runner.CALL, (args, kwds))], None, True))
        return result

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        '''Asynchronous version of `map()` method.'''
        return self._map_async(func, iterable, _runner.MAP, chunksize, callback, error_callback)

    def _map_async(self, func, iterable, kind, chunksize=None, callback=None, error_callback=None):
        self._check_running()
        if not hasattr(iterable, '__len__'):
            iterable = list(iterable)

        if chunksize is None:
            chunksize, extra = divmod(len(iterable), self._processes * 4)
            if extra:
                chunksize += 1
        if len(iterable) == 0:
            chunksize = 0

        result = _MapResult(self, chunksize, len(iterable), guard_callback(callback, "callback"),
                           error_callback=guard_callback(error_callback, "error_callback"))
        self._taskqueue.put((_units(result._job, self._function(func), kind, _chunks(iterable, chunksize)), None, True))
        return result

    # --- the pool's end ---------------------------------------------------------------
    def close(self):
        '''No more work may be submitted; what was submitted completes.'''
        if self._state == RUN:
            self._state = CLOSE
            self._taskqueue.put(None)

    def terminate(self):
        '''Stops at once: pending work is dropped, running tasks are killed. Results not
        ready by then never become ready (as in the standard library).'''
        self._state = TERMINATE
        self._finalizer()

    def join(self):
        '''Waits for the submitted work to complete (after close() or terminate()).'''
        if self._state == RUN:
            raise ValueError("Pool is still running")
        elif self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        self._task_handler.join()
        cond = self._changed.cond
        with cond:
            while self._cache and not self._dispatcher.terminated:
                cond.wait()

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.terminate()
