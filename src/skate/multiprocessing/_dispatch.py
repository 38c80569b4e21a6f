r"""The pool's dispatcher: pending units, batches, at most ``processes`` in flight.

::

    task handler thread --add(unit)--> [pending units] --_pump--> batch --> run_batch.remote()
         (blocks while pending is full)        ^                             |
                                               |  units a batch left unrun    | on_ref_ready
                                               |  (maxtasksperchild), or a    v
                                               \-- crashed batch, one by one -- _on_done
                                                                (callback thread): slot freed,
                                                                next batch sent, then each
                                                                unit's outcome to its result

1. Units arrive in the order of the pool's jobs (the task handler walks each job's
   units, as the standard library's does) and wait in ``pending``.
2. While fewer than ``processes`` batches of this pool are in flight, ``_pump`` takes the
   next units off ``pending`` as one batch and submits it as one skate task. A batch
   holds as many units as run in about ``_TARGET_BATCH_S`` (measured: the worker reports
   how long its units took), but never more than leaves every slot work to do, so slow
   units still go one per worker. Many tiny units then cost one round trip, not one each.
3. When a batch's result is ready its slot is freed and the next batch sent first, then
   each unit's outcome goes to its job's result object (``cache[job]._set(i, outcome)``,
   the standard library's own result classes), which runs the user's callbacks.

Failures: a batch whose worker died is split, each of its units rerun alone (with the
pool's ``max_retries``), so a unit that kills its worker fails only itself, with
``WorkerCrashedError``. Arguments that cannot be pickled fail their unit only.

Thread-safety: ``_lock`` guards ``pending`` and the in-flight set; pickling and
submitting happen outside it; results are delivered outside it (callbacks may call the
pool).

May call: the public API (``skate.get``, ``skate.cancel``), the core worker's
``on_ref_ready``, and ``_runner``'s constants.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections import deque
from functools import partial

import skate
from skate import exceptions as exc_mod
from skate._private import runtime
from skate.multiprocessing._runner import dumps, loads

_TARGET_BATCH_S = 0.02         # aim: a batch takes about this long on its worker
_MAX_BATCH = 20_000            # units
_MAX_PENDING = 50_000          # units waiting before the task handler blocks
_RAISE = -1                    # a unit standing for an exception of the input iterable


class Function:
    """A job's function, pickled once for all its batches."""

    __slots__ = ("fn", "_blob", "_error")

    def __init__(self, fn):
        self.fn = fn
        self._blob = None
        self._error = None

    def blob(self) -> bytes:
        """The pickled function; raises the pickling error (every unit of the job fails
        with it, as each of the standard library's tasks would)."""
        if self._blob is None and self._error is None:
            try:
                self._blob = dumps(self.fn)
            except Exception as e:  # noqa: BLE001
                self._error = e
        if self._error is not None:
            raise self._error
        return self._blob

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", None) or repr(self.fn)


class _Batch:
    __slots__ = ("units", "ref", "alone")

    def __init__(self, units: list, alone: bool):
        self.units = units      # [(job, index, Function, kind, payload)]
        self.ref = None
        self.alone = alone      # a unit rerun alone after its batch's worker died


class Dispatcher:
    def __init__(self, pool_id: bytes, window: int, remote_fn, cache, *, init=None,
                 max_tasks=None, max_retries: int = 3):
        self._pool_id = pool_id
        self._slots = window                  # batches in flight at most
        self._cache = cache
        self._init = init
        self._max_tasks = max_tasks
        # One RemoteFunction; batches of several units are not retried as a whole (their
        # units are, one by one), so only one-unit batches carry the pool's max_retries.
        self._remote_alone = remote_fn.options(max_retries=max_retries)
        self._remote_batch = remote_fn.options(max_retries=0)
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._pending: deque = deque()
        self._alone: deque = deque()          # units to run one per batch (crash isolation)
        self._inflight: set = set()
        self._unit_s = None                   # moving average of a unit's run time
        self.terminated = False
        self._core = runtime.core_or_init()

    # --- task handler thread ----------------------------------------------------------
    def add(self, unit) -> None:
        if unit[3] == _RAISE:
            self._deliver_one(unit, (False, unit[4]))
            return
        with self._lock:
            while len(self._pending) >= _MAX_PENDING and not self.terminated:
                self._space.wait()
            if self.terminated:
                return
            self._pending.append(unit)
            if len(self._inflight) >= self._slots:
                return
        self._pump()

    # --- batches ----------------------------------------------------------------------
    def _batch_size(self) -> int:
        if self._unit_s is None:
            size = 1
        else:
            size = int(_TARGET_BATCH_S / max(self._unit_s, 1e-7)) or 1
        # Leave work for every free slot, so slow units are not queued behind each other.
        fair = -(-len(self._pending) // self._slots)
        size = min(size, fair, _MAX_BATCH)
        if self._max_tasks is not None:
            size = min(size, self._max_tasks)
        return max(size, 1)

    def _pump(self) -> None:
        while True:
            with self._lock:
                if self.terminated or len(self._inflight) >= self._slots:
                    return
                if self._alone:
                    batch = _Batch([self._alone.popleft()], alone=True)
                elif self._pending:
                    pending = self._pending
                    size = self._batch_size()
                    if size == 1:
                        units = [pending.popleft()]
                    else:
                        units = [pending.popleft() for _ in range(min(size, len(pending)))]
                    batch = _Batch(units, alone=False)
                    if len(pending) < _MAX_PENDING:
                        self._space.notify()
                else:
                    return
                self._inflight.add(batch)
            self._submit(batch)

    def _submit(self, batch: _Batch) -> None:
        functions, index = [], {}
        sent, wire, failed = [], [], []
        for unit in batch.units:
            fn = unit[2]
            fi = index.get(id(fn))
            if fi is None:
                try:
                    blob = fn.blob()
                except Exception as e:  # noqa: BLE001
                    failed.append((unit, e))
                    continue
                fi = index[id(fn)] = len(functions)
                functions.append(blob)
            sent.append(unit)
            wire.append((fi, unit[3], unit[4]))
        blob = None
        if wire:
            try:
                blob = dumps(wire)
            except Exception:  # noqa: BLE001 - find the units whose arguments cannot be sent
                blob, sent, wire = self._drop_unpicklable(sent, wire, failed)
        batch.units = sent
        if blob is not None:
            remote = self._remote_alone if len(sent) == 1 else self._remote_batch
            try:
                ref = remote.remote(self._pool_id, self._init, self._max_tasks, tuple(functions), blob)
            except Exception as e:  # noqa: BLE001 - e.g. skate was shut down under the pool
                failed.extend((u, e) for u in sent)
                blob = None
            else:
                with self._lock:
                    batch.ref = ref
                    cancel = self.terminated
                if cancel:
                    _cancel(ref)
                else:
                    self._core.on_ref_ready(ref, partial(self._on_done, batch))
        if blob is None:
            with self._lock:
                self._inflight.discard(batch)
        for unit, err in failed:
            self._deliver_one(unit, (False, err))
        if blob is None:
            self._pump()

    @staticmethod
    def _drop_unpicklable(units, wire, failed):
        keep_units, keep_wire = [], []
        for unit, w in zip(units, wire):
            try:
                dumps(w)
            except Exception as e:  # noqa: BLE001 - the unit fails with it, as in the stdlib
                failed.append((unit, e))
            else:
                keep_units.append(unit)
                keep_wire.append(w)
        return (dumps(keep_wire) if keep_wire else None), keep_units, keep_wire

    # --- results (callback thread) ----------------------------------------------------
    def _on_done(self, batch: _Batch, ref) -> None:
        units = batch.units
        values = errors = None          # values: every unit succeeded
        try:
            blob, n_run, seconds = skate.get(ref)
        except exc_mod.WorkerCrashedError as e:
            if len(units) > 1:          # rerun each alone: only a unit that kills its worker fails
                with self._lock:
                    self._alone.extendleft(reversed(units))
            else:
                errors = {0: _crash_error(units[0], e)}
        except exc_mod.TaskCancelledError:
            pass                        # terminate()
        except BaseException as e:  # noqa: BLE001 - fail the batch's units with it
            cause = getattr(e, "cause", None) if isinstance(e, exc_mod.TaskError) else None
            errors = dict.fromkeys(range(len(units)), cause if cause is not None else e)
        else:
            values, errors = loads(blob)
            if n_run < len(units):      # the worker retired (maxtasksperchild): rest unrun
                with self._lock:
                    self._pending.extendleft(reversed(units[n_run:]))
                units = units[:n_run]
            unit_s = seconds / max(n_run, 1)
            self._unit_s = unit_s if self._unit_s is None else 0.7 * self._unit_s + 0.3 * unit_s
        batch.units = None              # the arguments are not kept alive past their results
        ref = None
        with self._lock:
            self._inflight.discard(batch)
            terminated = self.terminated
        if terminated:
            return
        self._pump()
        cache = self._cache
        if not errors:
            if values is not None:
                for unit, value in zip(units, values):
                    try:
                        cache[unit[0]]._set(unit[1], (True, value))
                    except KeyError:
                        pass
            return
        for i, unit in enumerate(units):
            outcome = (False, errors[i]) if i in errors else (True, values[i])
            try:
                cache[unit[0]]._set(unit[1], outcome)
            except KeyError:
                pass

    def _deliver_one(self, unit, outcome) -> None:
        try:
            self._cache[unit[0]]._set(unit[1], outcome)
        except KeyError:
            pass

    # --- the pool's end ---------------------------------------------------------------
    def terminate(self) -> None:
        """Drops pending units and kills what runs (the standard library's terminate())."""
        with self._lock:
            self.terminated = True
            self._pending.clear()
            self._alone.clear()
            refs = [b.ref for b in self._inflight if b.ref is not None]
            self._space.notify_all()
        for ref in refs:
            _cancel(ref)


def _cancel(ref) -> None:
    try:
        skate.cancel(ref, force=True)
    except Exception:  # noqa: BLE001 - skate already shut down: nothing runs any more
        pass


def _crash_error(unit, err) -> exc_mod.WorkerCrashedError:
    fn = unit[2].name
    return exc_mod.WorkerCrashedError(
        f"the worker process running {fn}() for a skate.multiprocessing.Pool died (its process "
        f"exited or was killed) and its retries are spent; the pool carries on. Raise "
        f"Pool(max_retries=...) to retry more. Cause: {err}")


def guard_callback(callback, kind: str):
    """A user callback whose exception is reported, not fatal: in the standard library it
    kills the result thread and the pool hangs; here the result still becomes ready."""
    if callback is None:
        return None

    def guarded(value):
        try:
            callback(value)
        except Exception:  # noqa: BLE001
            sys.stderr.write(f"Exception in the {kind} of a skate.multiprocessing.Pool result:\n")
            traceback.print_exc()
    return guarded
