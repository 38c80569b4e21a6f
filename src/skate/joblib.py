r"""joblib on skate: a parallel backend registered as ``"skate"``.

``import skate.joblib`` registers it (so does ``skate.joblib.register()``); then::

    with joblib.parallel_config(backend="skate"):       # or parallel_backend("skate")
        Parallel(n_jobs=-1)(delayed(f)(x) for x in xs)  # -1: every CPU of the cluster

scikit-learn's ``n_jobs=...`` estimators run their joblib work on the cluster the same way.

The flow of one batch of calls::

    driver                                                    worker
    Parallel: auto-batching, pre-dispatch
      | submit(batch, callback)
      v
    SkateBackend
      1. pickle the batch (cloudpickle); NumPy arrays larger
         than max_nbytes are put in the shared-memory store
         once per Parallel call and travel as ObjectRefs
      2. window: at most n_jobs batches in the cluster
         (or, when n_jobs covers it, two per CPU slot);
         the next ones wait here already pickled
      3. _run_batch.remote(payload, context, *array_refs) ---> _execute_batch: arrays arrive as
                                                                zero-copy read-only views; run the
                                                                initializer once per process; set
                                                                thread limits; run the calls (nested
                                                                Parallel: threads, then sequential);
                                                                pickle the results (out-of-band)
      4. core.on_ref_ready  <------------------------------ result (inline, or in shared memory)
      5. on skate's callback thread: the window sends the
         next waiting batch, then joblib's callback runs
         retrieve_result_callback (results unpickled into
         writable memory, or the task's ORIGINAL exception
         re-raised) and dispatches more work

What loky does that this backend does too: large arrays arrive as read-only ``np.memmap``
instances (here over the store's shared memory, not a temporary file); native thread
pools in tasks are limited to the cluster's CPUs divided by ``n_jobs`` (or
``inner_max_num_threads``), with the matching ``*_NUM_THREADS`` variables set while a
batch runs; ``initializer(*initargs)`` runs once in each worker process a call uses;
``multiprocessing.Manager`` proxies passed to tasks can connect back (the caller's
authkey travels with the batches that carry a proxy); a failing call re-raises its
original exception with the remote traceback as ``__cause__``; an argument that cannot
be pickled raises ``PicklingError``.

What is skate's own: a worker that dies mid-batch is replaced and the batch re-run
(``max_retries``, default 3) before the call fails with ``WorkerCrashedError``;
``abort_everything`` cancels the batches still queued or running; an explicitly nested
``Parallel(backend="skate")`` inside a task submits nested tasks and lends the task's CPU
back while it waits.

May call: the public API (``skate.api``), ``skate.exceptions``, and the runtime's
``core_or_init``/``core`` for ``on_ref_ready`` and the worker-blocked signal.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import sys
import threading
import weakref
from collections import deque

import cloudpickle
import joblib
from joblib._parallel_backends import (AutoBatchingMixin, FallbackToBackend, ParallelBackendBase,
                                       SequentialBackend)
from joblib.disk import memstr_to_bytes

from skate import api, exceptions
from skate._private import runtime

__all__ = ["SkateBackend", "register", "RemoteTraceback", "BACKEND_NAME"]

BACKEND_NAME = "skate"

# Options of the backend itself (parallel_config(backend="skate", num_cpus=2, ...)): the
# task options of each batch, as in @skate.remote, and loky's worker initializer.
TASK_OPTIONS = ("num_cpus", "num_gpus", "resources", "max_retries")
BACKEND_OPTIONS = TASK_OPTIONS + ("initializer", "initargs")

# The environment variables loky sets in its workers, and the thread pools (threadpoolctl
# internal_api names) they govern in libraries already loaded.
_THREAD_VARS = ParallelBackendBase.MAX_NUM_THREADS_VARS
_POOL_OF_VAR = {"OPENBLAS_NUM_THREADS": "openblas", "MKL_NUM_THREADS": "mkl",
                "BLIS_NUM_THREADS": "blis", "OMP_NUM_THREADS": "openmp"}


# --------------------------------------------------------------------------------------
# Worker side: one task runs one joblib BatchedCalls.
# --------------------------------------------------------------------------------------

_loading = threading.local()     # the arrays of the payload being unpickled
_threadpools = None              # (len(sys.modules), ThreadpoolController) in this process
_initialized: set = set()        # the initializers already run in this process


def _shared_array(index: int, writable: bool):
    """Unpickles the placeholder of a large array: the view the runtime resolved, as a
    read-only ``np.memmap`` like loky's (or a private writable copy)."""
    array = _loading.arrays[index]
    import numpy
    view = array.view(numpy.memmap)
    return view.copy() if writable else view


def _threadpool_controller():
    """A threadpoolctl controller for the native thread pools loaded in this process.

    Rebuilt when modules were imported since (a new library may bring its own pool);
    building one costs milliseconds, using it microseconds.
    """
    global _threadpools
    n = len(sys.modules)
    if _threadpools is None or _threadpools[0] != n:
        try:
            from threadpoolctl import ThreadpoolController
            _threadpools = (n, ThreadpoolController())
        except Exception:  # noqa: BLE001 - no threadpoolctl: no limits
            _threadpools = (n, None)
    return _threadpools[1]


@contextlib.contextmanager
def _caller_authkey(authkey):
    """Unpickles Manager proxies with the caller's authkey, so they can connect back."""
    if authkey is None:
        yield
        return
    import multiprocessing
    proc = multiprocessing.current_process()
    saved = proc.authkey
    proc.authkey = authkey
    try:
        yield
    finally:
        proc.authkey = saved


@contextlib.contextmanager
def _thread_limits(env, limits):
    """The ``*_NUM_THREADS`` variables and native pool sizes of the batch, then back.

    Only what differs is changed (workers usually have the right values already: the
    runtime starts them with one thread per pool), so most batches change nothing.
    """
    if not env:
        yield
        return
    environ = os.environ
    saved_env = [(k, environ.get(k)) for k, v in env.items() if environ.get(k) != v]
    for k, _ in saved_env:
        environ[k] = env[k]
    saved_pools = []
    controller = _threadpool_controller() if limits and "numpy" in sys.modules else None
    if controller is not None:
        for lib in controller.lib_controllers:
            want = limits.get(lib.internal_api)
            if want is not None:
                have = lib.num_threads
                if have != want:
                    lib.set_num_threads(want)
                    saved_pools.append((lib, have))
    try:
        yield
    finally:
        for lib, have in saved_pools:
            lib.set_num_threads(have)
        for k, v in saved_env:
            if v is None:
                environ.pop(k, None)
            else:
                environ[k] = v


_contexts: dict = {}             # pickled batch context -> context (a few per process)


def _context_of(blob: bytes):
    context = _contexts.get(blob)
    if context is None:
        if len(_contexts) > 64:
            _contexts.clear()
        context = _contexts[blob] = pickle.loads(blob)
    return context


def _execute_batch(payload: bytes, context_blob: bytes, *arrays):
    """Runs a pickled joblib batch; returns ``(pickle stream, out-of-band buffers)``.

    ``context_blob`` pickles ``(env, limits, init_key, init_blob, authkey)``, the same
    for every batch of a call: it travels as bytes, which the runtime sends without a
    pickling pass of its own. The results are pickled here, not by the runtime, so that
    the caller can unpickle them into writable memory: values the runtime returns are
    read-only views.
    """
    env, limits, init_key, init_blob, authkey = _context_of(context_blob)
    with _caller_authkey(authkey):
        if init_key is not None and init_key not in _initialized:
            initializer, initargs = pickle.loads(init_blob)
            initializer(*initargs)
            _initialized.add(init_key)
        _loading.arrays = arrays
        try:
            batch = pickle.loads(payload)
        finally:
            _loading.arrays = ()
    with _thread_limits(env, limits):
        results = batch()
    buffers: list = []
    meta = cloudpickle.dumps(results, protocol=5, buffer_callback=buffers.append)
    return meta, buffers


_run_batch = api.remote(name="joblib_batch")(_execute_batch)


# --------------------------------------------------------------------------------------
# Driver side.
# --------------------------------------------------------------------------------------

class RemoteTraceback(Exception):
    """The traceback of an error raised in a task, attached as its ``__cause__``."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class _SharedArrays:
    """The large arrays of one Parallel call, each put in the store once.

    Keyed by ``id()`` with a weak reference to tell a recycled id from the same array
    (arrays built by a generator die and their ids are reused). An entry goes when its
    array dies; tasks that still need the object keep it alive through their arguments.
    """

    def __init__(self):
        self._refs: dict = {}
        self._lock = threading.Lock()

    def ref_for(self, array):
        key = id(array)
        with self._lock:
            entry = self._refs.get(key)
            if entry is not None and entry[0]() is array:
                return entry[1]
        ref = api.put(array)

        def forget(wr, key=key):
            with self._lock:
                e = self._refs.get(key)
                if e is not None and e[0] is wr:
                    del self._refs[key]
        with self._lock:
            self._refs[key] = (weakref.ref(array, forget), ref)
        return ref

    def clear(self) -> None:
        with self._lock:
            self._refs.clear()

    def __len__(self) -> int:
        return len(self._refs)


class _BatchPickler(cloudpickle.Pickler):
    """cloudpickle, with large NumPy arrays replaced by placeholders for store refs, and
    a note of whether a multiprocessing Manager proxy was met."""

    def __init__(self, file, shared: _SharedArrays | None, max_nbytes, writable: bool):
        super().__init__(file, protocol=5)
        numpy = sys.modules.get("numpy")
        self._arrays = (numpy.ndarray, numpy.memmap) if numpy is not None and max_nbytes is not None \
            and shared is not None else ()
        self._shared = shared
        self._max_nbytes = max_nbytes
        self._writable = writable
        managers = sys.modules.get("multiprocessing.managers")
        self._proxy = managers.BaseProxy if managers is not None else None
        self.refs: list = []
        self._index: dict = {}
        self.has_proxy = False

    def reducer_override(self, obj):
        t = type(obj)
        if t in self._arrays and obj.nbytes > self._max_nbytes and not obj.dtype.hasobject:
            i = self._index.get(id(obj))
            if i is None:
                i = self._index[id(obj)] = len(self.refs)
                self.refs.append(self._shared.ref_for(obj))
            return _shared_array, (i, self._writable)
        if self._proxy is not None and isinstance(obj, self._proxy):
            self.has_proxy = True
        return super().reducer_override(obj)


def _pickle(value, shared=None, max_nbytes=None, writable=False):
    """``(pickle, store refs of its large arrays, whether it holds a Manager proxy)``."""
    buf = io.BytesIO()
    pickler = _BatchPickler(buf, shared, max_nbytes, writable)
    pickler.dump(value)
    return buf.getvalue(), pickler.refs, pickler.has_proxy


def _caller_key() -> bytes:
    import multiprocessing
    return bytes(multiprocessing.current_process().authkey)


class _Job:
    """What ``submit`` returns: one batch, waiting to be sent, running or done."""

    __slots__ = ("payload", "args", "callback", "ref", "error", "__weakref__")

    def __init__(self, payload, args, callback):
        self.payload = payload
        self.args = args              # the task's arguments after the payload
        self.callback = callback
        self.ref = None
        self.error = None


class _TaskWindow:
    """The batches of one configured backend: at most ``limit`` in the cluster at once.

    joblib pre-dispatches ``2 * n_jobs`` batches and more as results come back; those
    beyond the limit (``SkateBackend._window_size``) wait here, already pickled, and go
    out from the completion callback of a batch before them. Stands where loky's
    executor stands (``backend._workers``): a new window after an abort.
    """

    def __init__(self, limit: int, run):
        self._limit = max(1, limit)
        self._run = run                 # the remote function, with this backend's options
        self._lock = threading.Lock()
        self._waiting: deque = deque()
        self._running: set = set()
        self._closed = False

    def add(self, job: _Job) -> None:
        with self._lock:
            if self._closed:
                job.error = RuntimeError("this skate joblib backend was aborted or terminated")
            elif len(self._running) >= self._limit:
                self._waiting.append(job)
                return
            else:
                self._running.add(job)
        if job.error is not None:
            job.callback(job)
            return
        self._send(job)

    def _send(self, job: _Job) -> None:
        try:
            job.ref = self._run.remote(job.payload, *job.args)
        except BaseException as e:  # noqa: BLE001 - joblib must hear of it through the job
            job.error = e
            self._done(job)
            return
        finally:
            job.payload = None
        runtime.core().on_ref_ready(job.ref, lambda _ref, job=job: self._done(job))

    def _done(self, job: _Job) -> None:
        nxt = None
        with self._lock:
            self._running.discard(job)
            if self._waiting and not self._closed:
                nxt = self._waiting.popleft()
                self._running.add(nxt)
        if nxt is not None:
            self._send(nxt)       # first, so the worker is busy again while joblib runs
        job.args = ()
        job.callback(job)

    def cancel_all(self) -> None:
        """Drops the waiting batches and cancels the ones in the cluster."""
        with self._lock:
            self._closed = True
            self._waiting.clear()
            running = [job.ref for job in self._running if job.ref is not None]
        for ref in running:
            try:
                api.cancel(ref)
            except Exception:  # noqa: BLE001 - already finished, or skate shut down
                pass

    def __len__(self) -> int:
        return len(self._running) + len(self._waiting)


class SkateBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's parallel backend for skate (registered as ``"skate"``).

    Options, given to ``parallel_config(backend="skate", ...)`` or ``Parallel(backend=
    "skate", ...)``: ``num_cpus``, ``num_gpus``, ``resources`` and ``max_retries`` of
    each batch's task, as in ``@skate.remote``; ``initializer`` and ``initargs``, run once
    in each worker process a call uses, as with loky. ``n_jobs=-1`` means every CPU of
    the cluster (divided by ``num_cpus``).
    """

    supports_retrieve_callback = True
    supports_timeout = True
    supports_return_generator = True
    supports_inner_max_num_threads = True
    supports_sharedmem = False
    uses_threads = False

    def __init__(self, nesting_level=None, inner_max_num_threads=None, **options):
        unknown = set(options) - set(BACKEND_OPTIONS)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for the skate joblib backend; "
                             f"valid options are: {', '.join(BACKEND_OPTIONS)}")
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        self._options = dict(options)
        task_options = {k: v for k, v in options.items() if k in TASK_OPTIONS}
        self._run = _run_batch.options(**task_options) if task_options else _run_batch
        self._cpus_per_task = float(task_options.get("num_cpus", 1) or 1)
        self.parallel = None
        self._workers = None            # the _TaskWindow of the configured call
        self._shared = None              # the _SharedArrays of the running call
        self._n_jobs = 1
        self._max_nbytes = memstr_to_bytes("1M")
        self._writable_arrays = False
        self._context = (None, None, None, None, None)
        self._context_blob = pickle.dumps(self._context)

    # --- pickling the backend itself (nested configs, instances passed to tasks) ---------
    def __getstate__(self):
        return {"nesting_level": self.nesting_level, "inner_max_num_threads": self.inner_max_num_threads,
                "options": self._options}

    def __setstate__(self, state):
        self.__init__(state["nesting_level"], state["inner_max_num_threads"], **state["options"])

    # --- sizing ---------------------------------------------------------------------------
    def _slots(self) -> int:
        """How many of this backend's tasks the cluster can run at once."""
        runtime.core_or_init()
        return max(int(api.cluster_resources().get("CPU", 0) // self._cpus_per_task), 1)

    def effective_n_jobs(self, n_jobs):
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if n_jobs < 0:
            return max(self._slots() + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs=1, parallel=None, prefer=None, require=None, max_nbytes="1M",
                  mmap_mode="r", initializer=None, initargs=None, **_backend_kwargs):
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        self._n_jobs = n_jobs
        self._max_nbytes = memstr_to_bytes(max_nbytes) if isinstance(max_nbytes, str) else max_nbytes
        self._writable_arrays = mmap_mode in ("c", "r+", "w+")
        slots = self._slots()
        self._workers = _TaskWindow(self._window_size(n_jobs, slots, parallel), self._run)
        env, limits = self._thread_env(slots, n_jobs)
        initializer = initializer if initializer is not None else self._options.get("initializer")
        initargs = initargs if initargs is not None else self._options.get("initargs", ())
        init_key = init_blob = init_key_auth = None
        if initializer is not None:
            init_blob, _, has_proxy = _pickle((initializer, tuple(initargs or ())))
            init_key = hashlib.blake2b(init_blob, digest_size=16).digest()
            init_key_auth = _caller_key() if has_proxy else None
        self._context = (env, limits, init_key, init_blob, init_key_auth)
        self._context_blob = pickle.dumps(self._context, protocol=5)
        return n_jobs

    @staticmethod
    def _window_size(n_jobs: int, slots: int, parallel) -> int:
        """How many batches may be in the cluster at once.

        ``n_jobs`` when the cluster has more room than that: joblib's "maximum number of
        concurrently running jobs". When ``n_jobs`` covers the whole cluster, the cluster
        bounds what runs and a few more batches may wait in the runtime's queue, ready
        the moment a worker frees (no round trip through this process): one per slot,
        as loky queues a call ahead per worker. Not for ``generator_unordered``: the
        runtime may queue a batch behind one on a busy worker, and a slow call there
        would hold back a result that unordered delivery promises early.
        """
        if n_jobs < slots or (parallel is not None and not getattr(parallel, "return_ordered", True)):
            return min(n_jobs, slots)
        return 2 * slots

    def _thread_env(self, slots: int, n_jobs: int):
        """loky's worker environment for native thread pools, and the pool limits it means.

        The cluster's CPUs shared among the ``n_jobs`` workers unless the caller set the
        variable; ``inner_max_num_threads`` overrides both.
        """
        explicit = self.inner_max_num_threads
        default = max(int(slots * self._cpus_per_task) // n_jobs, 1)
        env = {}
        for var in _THREAD_VARS:
            env[var] = str(explicit if explicit is not None else os.environ.get(var, default))
        if self.TBB_ENABLE_IPC_VAR not in os.environ:
            env[self.TBB_ENABLE_IPC_VAR] = "1"
        limits = {}
        for var, pool in _POOL_OF_VAR.items():
            try:
                limits[pool] = int(env[var])
            except ValueError:
                pass
        return env, limits

    # --- one Parallel call ----------------------------------------------------------------
    def start_call(self):
        self._shared = _SharedArrays()

    def stop_call(self):
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.clear()

    def submit(self, func, callback=None):
        if self._workers is None:   # used without configure(): e.g. after terminate()
            self._workers = _TaskWindow(self._n_jobs, self._run)
        if self._shared is None:
            self._shared = _SharedArrays()
        callback = callback if callback is not None else (lambda job: None)
        try:
            payload, refs, has_proxy = _pickle(func, self._shared, self._max_nbytes, self._writable_arrays)
        except exceptions.SkateError as e:   # e.g. the store cannot hold a large array
            return self._failed(e, callback)
        except Exception as e:  # noqa: BLE001 - any failure of a __reduce__
            err = pickle.PicklingError("Could not pickle the task to send it to the workers.")
            err.__cause__ = e
            return self._failed(err, callback)
        context = self._context_blob
        if has_proxy and self._context[4] is None:
            context = pickle.dumps(self._context[:4] + (_caller_key(),), protocol=5)
        job = _Job(payload, (context, *refs), callback)
        self._workers.add(job)
        return job

    @staticmethod
    def _failed(error: BaseException, callback) -> _Job:
        """A job that failed before it could be sent: joblib hears of it at once."""
        job = _Job(None, (), callback)
        job.error = error
        callback(job)
        return job

    def retrieve_result_callback(self, out: _Job):
        if out.error is not None:
            raise out.error
        try:
            meta, buffers = api.get(out.ref)
        except exceptions.TaskError as err:
            cause = err.cause
            if not isinstance(cause, BaseException):
                raise
            raise cause from RemoteTraceback(err.traceback_str)
        finally:
            out.ref = None
        # Copies out of the store (or the inline message) into writable memory: what
        # loky returns is writable, and callers do update results in place.
        return pickle.loads(meta, buffers=[bytearray(b) for b in buffers])

    def abort_everything(self, ensure_ready=True):
        workers, self._workers = self._workers, None
        if workers is not None:
            workers.cancel_all()
        if ensure_ready and self.parallel is not None:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel,
                           **self.parallel._backend_kwargs)

    def terminate(self):
        workers, self._workers = self._workers, None
        if workers is not None and len(workers):
            workers.cancel_all()
        self.reset_batch_stats()

    @contextlib.contextmanager
    def retrieval_context(self):
        """Inside a task, waiting for nested tasks lends the task's CPU back to the node,
        so nested skate calls cannot starve their parents of CPUs (dask secedes here)."""
        with runtime.lending_cpu():
            yield


def register(make_default: bool = False) -> None:
    """Registers the backend with joblib as ``"skate"`` (idempotent).

    ``make_default=True`` also makes it joblib's default backend, for code that never
    names a backend.
    """
    joblib.register_parallel_backend(BACKEND_NAME, SkateBackend, make_default=make_default)


register()
