r"""The pool's dispatcher: pending units, batches, at most ``processes`` running.

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
2. While fewer than ``window`` batches of this pool are in flight, ``_pump`` takes the
   next units off ``pending`` as one batch and submits it as one skate task. ``window``
   is ``processes``, so at most that many run at once; or twice that when the cluster
   has no more CPUs than ``processes`` (it cannot run more at once anyway, and each
   worker then finds its next batch waiting, with no round trip to the pool between).
   A batch holds as many items as run in about ``_TARGET_BATCH_S`` (measured: the worker
   reports how long its units took; a map chunk counts its length), but no more than
   leaves every process two batches of the work pending, so slow units still spread
   over the workers; work under ``_MIN_SPLIT_S`` is not split at all. Many tiny units
   then cost one round trip, not one each, and a small ``map`` is one task.
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
from skate.multiprocessing._runner import MAP, dumps, loads

_TARGET_BATCH_S = 0.01         # aim: a batch takes about this long on its worker
_MIN_SPLIT_S = 0.001           # ... but work shorter than this is not split across workers
_MAX_BATCH = 20_000            # units in a batch at most
_MAX_PENDING = 50_000          # units waiting before the task handler blocks
_GROUP = 1024                  # items of an in-memory input added at once
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
    __slots__ = ("units", "ref")

    def __init__(self, units: list):
        self.units = units      # [(job, index, Function, kind, payload)]
        self.ref = None


class Dispatcher:
    def __init__(self, pool_id: bytes, processes: int, window: int, remote_fn, cache, *, init=None,
                 max_tasks=None, max_retries: int = 3):
        self._pool_id = pool_id
        self._processes = processes
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
        self._pending_items = 0               # items in pending (a map chunk: its length)
        self._item_s = None                   # moving average of an item's run time
        self.terminated = False
        self._core = runtime.core_or_init()

    def warm_up(self, workers: int) -> None:
        """Gets ``workers`` workers started (and initialized) in the background, as the
        standard library starts its processes in ``Pool()``: the first map then finds
        them ready instead of waiting for them to start."""
        for _ in range(workers):
            self._remote_alone.remote(self._pool_id, self._init, None, (), b"")

    # --- task handler thread ----------------------------------------------------------
    def add(self, unit) -> None:
        """One unit of a lazy input: sent as soon as a slot is free."""
        self.add_group([unit])

    def add_all(self, units):
        """The units of an input already in memory (a list, a range, a call's arguments),
        added in groups of ``_GROUP`` items, so that the first batches already hold
        several small units while a big map chunk leaves as soon as it is cut. Returns
        the last unit."""
        unit = None
        group = []
        items = 0
        for unit in units:
            group.append(unit)
            items += _items(unit)
            if items >= _GROUP:
                self.add_group(group)
                group = []
                items = 0
                if self.terminated:
                    return unit
        self.add_group(group)
        return unit

    def add_group(self, units: list) -> None:
        if units and units[-1][3] == _RAISE:       # the input broke: its last unit
            self.add_group(units[:-1])
            self._deliver_one(units[-1], (False, units[-1][4]))
            return
        if not units:
            return
        with self._lock:
            while len(self._pending) >= _MAX_PENDING and not self.terminated:
                self._space.wait()
            if self.terminated:
                return
            self._pending.extend(units)
            self._pending_items += sum(map(_items, units))
            if len(self._inflight) >= self._slots:
                return
        self._pump()

    # --- batches ----------------------------------------------------------------------
    def _batch_items(self) -> int:
        """How many items the next batch should hold."""
        item_s = self._item_s
        if item_s is None:
            return 1
        item_s = max(item_s, 1e-8)
        size = int(_TARGET_BATCH_S / item_s) or 1
        # Leave work for every process, twice over, so uneven units still balance out;
        # but never split work so small that the round trip would cost more than it.
        fair = max(-(-self._pending_items // (2 * self._processes)), int(_MIN_SPLIT_S / item_s))
        return max(min(size, fair), 1)

    def _take_batch(self) -> list:
        pending = self._pending
        unit = pending.popleft()
        units = [unit]
        items = _items(unit)
        budget = self._batch_items()
        most = _MAX_BATCH if self._max_tasks is None else min(_MAX_BATCH, self._max_tasks)
        while pending and len(units) < most:
            n = _items(pending[0])
            if items + n > budget:
                break
            units.append(pending.popleft())
            items += n
        self._pending_items -= items
        return units

    def _pump(self) -> None:
        while True:
            with self._lock:
                if self.terminated or len(self._inflight) >= self._slots:
                    return
                if self._alone:
                    batch = _Batch([self._alone.popleft()])
                elif self._pending:
                    batch = _Batch(self._take_batch())
                    if len(self._pending) < _MAX_PENDING:
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
                if runtime._core is not self._core:
                    raise RuntimeError("skate was shut down (skate.shutdown()) under this "
                                       "skate.multiprocessing.Pool: create a new pool")
                ref = remote.remote(self._pool_id, self._init, self._max_tasks, tuple(functions), blob)
            except Exception as e:  # noqa: BLE001 - the batch's units fail with it
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
        except BaseException as e:  # noqa: BLE001 - fail the batch's units with it (after
            # terminate(), TaskCancelledError: nothing is delivered then)
            cause = getattr(e, "cause", None) if isinstance(e, exc_mod.TaskError) else None
            errors = dict.fromkeys(range(len(units)), cause if cause is not None else e)
        else:
            try:
                values, errors = loads(blob)
            except Exception as e:  # noqa: BLE001 - e.g. a result's class cannot be imported here
                values, errors = None, dict.fromkeys(range(n_run), e)
            if n_run < len(units):      # the worker retired (maxtasksperchild): rest unrun
                rest = units[n_run:]
                with self._lock:
                    self._pending.extendleft(reversed(rest))
                    self._pending_items += sum(map(_items, rest))
                units = units[:n_run]
            item_s = seconds / max(sum(map(_items, units)), 1)
            self._item_s = item_s if self._item_s is None else 0.7 * self._item_s + 0.3 * item_s
        batch.units = None              # the arguments are not kept alive past their results
        with self._lock:
            self._inflight.discard(batch)
            terminated = self.terminated
        if terminated:
            return
        self._pump()
        # Each job's outcomes go to its result object in one call (one lock, one wake-up
        # per batch for an imap iterator), else one ``_set`` each, as the stdlib does.
        by_job: dict = {}
        if not errors:
            if values is None:
                return
            for unit, value in zip(units, values):
                job = by_job.get(unit[0])
                if job is None:
                    job = by_job[unit[0]] = []
                job.append((unit[1], (True, value)))
        else:
            for i, unit in enumerate(units):
                outcome = (False, errors[i]) if i in errors else (True, values[i])
                by_job.setdefault(unit[0], []).append((unit[1], outcome))
        cache = self._cache
        for job, outcomes in by_job.items():
            result = cache.get(job)
            if result is None:
                continue
            set_many = getattr(result, "_set_many", None)
            if set_many is not None:
                set_many(outcomes)
                continue
            for i, outcome in outcomes:
                try:
                    cache[job]._set(i, outcome)
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
            self._pending_items = 0
            self._alone.clear()
            refs = [b.ref for b in self._inflight if b.ref is not None]
            self._space.notify_all()
        for ref in refs:
            _cancel(ref)


def _items(unit) -> int:
    """A unit's size in items: a map chunk's length, else 1."""
    return len(unit[4]) if unit[3] >= MAP else 1


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
