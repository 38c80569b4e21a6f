"""The worker side of ``skate.multiprocessing.Pool``: runs one batch of a pool's work.

A *unit* is what the standard library calls a task: one ``apply`` call, one ``map``
chunk, one ``imap`` item. A *batch* is what one skate task carries: one or more units of
one pool, each with its own outcome, so a failing unit fails only itself (as in the
standard library, where each unit is a separate message).

::

    run_batch(pool_id, init, max_tasks, functions, units)
        initializer, once per process and pool ---> each unit in order:
        value, or the exception wrapped with its traceback (multiprocessing.pool's own
        ExceptionWithTraceback, so the caller sees RemoteTraceback as __cause__)
        ---> (outcomes pickled, units run, seconds)

    run_batch(pool_id, init, None, (), b"")     the pool's warm-up: nothing to run, but
                                                 the worker is started and initialized

Values and arguments are pickled here and in the pool with cloudpickle, once per batch:
lambdas and classes defined in ``__main__`` travel, and the skate task itself carries
only ``bytes`` (the runtime's fast path). A value that cannot be pickled becomes the
standard library's ``MaybeEncodingError`` for its unit only.

Per-process state, keyed by the pool's id (the last ``_MAX_POOLS`` pools a process served):
whether the pool's initializer ran in this process; how many of the pool's units this
process ran (``maxtasksperchild``: at the limit the worker retires after replying and the
node manager starts a fresh one; units of the batch beyond the limit are handed back
unrun, to go elsewhere); the pool's unpickled functions; and one globals namespace per
``__main__``-like module, shared by the initializer and the tasks (see
``_PoolState.share_globals``).

May call: the public API (``skate.get`` for a large initializer payload) and
``runtime.retire_worker_after_task``. ``run_batch`` runs inside skate workers; the pool
imports this module for its constants and pickling functions.
"""

from __future__ import annotations

import functools
import sys
import time
import types
from collections import OrderedDict
from itertools import starmap
from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError

import cloudpickle

# Unit kinds: what to do with a unit's payload.
CALL = 0      # payload (args, kwds): fn(*args, **kwds)       apply, apply_async
ONE = 1       # payload x: fn(x)                              imap, imap_unordered (chunksize=1)
MAP = 2       # payload chunk: list(map(fn, chunk))           map, imap with chunksize
STARMAP = 3   # payload chunk: list(starmap(fn, chunk))       starmap

_MAX_POOLS = 16                # pools whose state a process keeps (least recently used go)
_MAX_FUNCTIONS = 256           # unpickled functions a pool keeps per process

dumps = cloudpickle.dumps
loads = cloudpickle.loads


class _PoolState:
    """What one process remembers of one pool."""

    __slots__ = ("initialized", "units_run", "functions", "namespaces")

    def __init__(self):
        self.initialized = False
        self.units_run = 0
        self.functions: dict = {}      # pickled function -> function
        self.namespaces: dict = {}     # module name -> the globals its functions share here

    def function(self, blob: bytes):
        fn = self.functions.get(blob)
        if fn is None:
            if len(self.functions) >= _MAX_FUNCTIONS:
                self.functions.clear()
            fn = self.functions[blob] = self.share_globals(loads(blob))
        return fn

    def share_globals(self, fn):
        """Functions of a module that is not importable here (``__main__``: cloudpickle
        ships them by value) each arrive with their own copy of the module's globals, so
        what the initializer sets (``global model; model = ...``) would be invisible to
        the tasks. Rebinding them to one namespace per module and pool gives the
        standard library's behaviour: one module namespace per worker process, where the
        values first seen are kept (like a forked child's snapshot)."""
        if isinstance(fn, functools.partial):
            inner = self.share_globals(fn.func)
            return fn if inner is fn.func else functools.partial(inner, *fn.args, **fn.keywords)
        if type(fn) is not types.FunctionType:
            return fn
        g = fn.__globals__
        module = sys.modules.get(fn.__module__)
        if module is not None and getattr(module, "__dict__", None) is g:
            return fn                      # imported by reference: already the real module
        shared = self.namespaces.setdefault(fn.__module__, g)
        if shared is g:
            return fn
        for name, value in g.items():
            if name not in shared:
                shared[name] = _rebound(value, g, shared)
        return _rebound(fn, g, shared)


def _rebound(value, old: dict, new: dict):
    if type(value) is not types.FunctionType or value.__globals__ is not old:
        return value
    fn = types.FunctionType(value.__code__, new, value.__name__, value.__defaults__, value.__closure__)
    fn.__kwdefaults__ = value.__kwdefaults__
    fn.__dict__.update(value.__dict__)
    fn.__qualname__ = value.__qualname__
    fn.__module__ = value.__module__
    fn.__doc__ = value.__doc__
    fn.__annotations__ = value.__annotations__
    return fn


_pools: OrderedDict = OrderedDict()    # pool id -> _PoolState, most recently used last


def _state(pool_id: bytes) -> _PoolState:
    state = _pools.get(pool_id)
    if state is None:
        state = _pools[pool_id] = _PoolState()
        if len(_pools) > _MAX_POOLS:
            _pools.popitem(last=False)
    else:
        _pools.move_to_end(pool_id)
    return state


def _initialize(state: _PoolState, init) -> BaseException | None:
    """Runs the pool's initializer once in this process; returns its error, if any."""
    if state.initialized:
        return None
    try:
        if type(init) is tuple:            # large payload: put in the object store once
            import skate
            init = skate.get(init[0])
        initializer, initargs = loads(init)
        state.share_globals(initializer)(*initargs)
    except BaseException as e:  # noqa: BLE001 - reported to the caller as each unit's error
        return e
    state.initialized = True
    return None


def run_batch(pool_id: bytes, init, max_tasks, functions: tuple, units_blob: bytes):
    """Runs a batch; returns ``(outcomes_blob, units_run, seconds)``.

    ``outcomes_blob`` unpickles to ``(values, errors)``: a value per unit run (None for
    a failed one) and ``{unit index: exception}``.
    """
    start = time.perf_counter()
    state = _state(pool_id)
    if not units_blob:      # warm-up: this worker starts (and initializes) before work arrives
        if init is not None:
            _initialize(state, init)
        return b"", 0, 0.0
    units = loads(units_blob)
    n = len(units)
    if max_tasks is not None:
        done = state.units_run
        n = max(1, min(n, max_tasks - done))
        state.units_run = done + n
        if done + n >= max_tasks:
            from skate._private import runtime
            runtime.retire_worker_after_task()
    values = [None] * n
    errors = {}
    init_error = None if init is None else _initialize(state, init)
    if init_error is not None:
        wrapped = ExceptionWithTraceback(init_error, init_error.__traceback__)
        errors = dict.fromkeys(range(n), wrapped)
    else:
        fns = [state.function(b) for b in functions]
        for i in range(n):
            fi, kind, payload = units[i]
            fn = fns[fi]
            try:
                if kind == ONE:
                    values[i] = fn(payload)
                elif kind == MAP:
                    values[i] = list(map(fn, payload))
                elif kind == CALL:
                    values[i] = fn(*payload[0], **payload[1])
                else:
                    values[i] = list(starmap(fn, payload))
            except BaseException as e:  # noqa: BLE001 - the unit's outcome, as the stdlib's worker
                errors[i] = ExceptionWithTraceback(e, e.__traceback__)
    return _pack(values, errors), n, time.perf_counter() - start


def _pack(values: list, errors: dict) -> bytes:
    try:
        return dumps((values, errors))
    except Exception:  # noqa: BLE001 - find the units that cannot be sent
        pass
    for i, v in enumerate(values):
        if i in errors:
            continue
        try:
            dumps(v)
        except Exception as e:  # noqa: BLE001
            errors[i] = MaybeEncodingError(e, v)
            values[i] = None
    for i, err in list(errors.items()):
        try:
            dumps(err)
        except Exception as e:  # noqa: BLE001
            errors[i] = MaybeEncodingError(e, err)
    return dumps((values, errors))
