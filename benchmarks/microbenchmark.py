"""skate's microbenchmark, beside Ray and the standard library's process pools.

What it measures
----------------
The workloads of Ray's ``ray microbenchmark`` that apply to a single-node runtime without
actors, plus start-up and idle memory, on the embedded default cluster with
``num_cpus=2``:

==================================  =========  ==============================================
workload                            unit       one call is
==================================  =========  ==============================================
single client get calls             calls/s    ``get`` of a small object made with ``put(0)``
single client put calls             calls/s    ``put(0)``, the ref dropped at once
single client put gigabytes         GB/s       ``put`` of a 100 MiB NumPy array (1 GB = 1e9 B)
single client get 100MB             s/call     ``get`` of a 100 MiB array made by ``put``;
                                               also ``get 1MB`` of a 1 MiB array: the same
                                               time for both sizes means zero-copy reads
tasks sync                          tasks/s    submit one no-op task, ``get`` it; also the
                                               mean round trip in ms
tasks async                         tasks/s    submit 2,000 no-op tasks, ``get`` them all
tasks and get batch                 batches/s  submit 1,000 no-op tasks, ``get`` the list
wait for 1k refs                    rounds/s   Ray's definition: submit 1,000 no-op tasks,
                                               then ``wait(not_ready)`` one at a time until
                                               all 1,000 are ready
wait for 1k finished refs at once   calls/s    ``wait(refs, num_returns=1000)`` over 1,000
                                               refs that are already finished
get object containing 10k refs      calls/s    ``get`` of ``put([put(1) for 10,000])`` (Ray's
                                               own version makes the refs in a task)
init to first result                s          from just before ``init()`` to the value of
                                               the first task, in a fresh process (the
                                               import before it is reported apart)
idle footprint                      MiB        after init with 2 workers and one task run,
                                               sleep 2 s, then the PSS of the driver's child
                                               processes and all their descendants, and of
                                               the driver itself; with the process count
==================================  =========  ==============================================

The no-op task returns ``b"ok"``, as Ray's ``small_value`` does. ``tasks sync``,
``tasks async``, ``init to first result`` and ``idle footprint`` also run on the
standard library's ``concurrent.futures.ProcessPoolExecutor(max_workers=2)`` (``ppe``)
and ``multiprocessing.Pool(2)`` (``mp``), and, when asked for with ``--systems``, on
loky's reusable executor with 2 workers (``loky``); the other workloads have no
counterpart there and show ``-``. Ray runs with ``ray.init(num_cpus=2,
include_dashboard=False)``, skate with ``skate.init(num_cpus=2)``.

How it runs
-----------
::

    parent (this script)                          one fresh child per (system, repeat)
    --------------------                          ------------------------------------
    for repeat in 1..N:                           import the system
      for system in systems (order rotated)  -->  init, first task     -> init to first result
        start child in its own session,           sleep 2 s, PSS        -> idle footprint
        wait for it (with a time limit),          per workload: warm up, then call it until
        read its JSON lines                  <--    the time budget and a minimum count are
                                                    reached; write one JSON line
                                                  shutdown
    median over repeats -> table, targets, --json

Each system gets its own fresh process per repeat, so start-ups and memory do not mix;
systems take turns within each repeat so that noise from other load on the machine falls
on all of them alike. A child that fails or times out is recorded and the run goes on;
its workloads show ``failed``. Processes a child leaves behind in its session after it
exits are counted (``leftover processes`` in the JSON) and then killed.

How to run
----------
::

    .venv/bin/python benchmarks/microbenchmark.py                 # full run, 5 repeats, ~7 min
    .venv/bin/python benchmarks/microbenchmark.py --quick         # 2 repeats, under 2 min
    .venv/bin/python benchmarks/microbenchmark.py --only "tasks sync,tasks async" \\
        --systems skate,ppe,mp,loky --repeats 3 --json /tmp/bench.json
    .venv/bin/python benchmarks/microbenchmark.py --markdown      # table for the docs

Ray is measured only when it is installed (``pip install ray``; for the comparison only,
never a dependency of skate); a system whose package is missing is skipped with a note.

How to read it
--------------
Every figure is the median over the repeats. ``better`` says which way is good: for rates
(``/s``) higher is better, for times, MiB and process counts lower is better. The
``skate/<peer>`` columns divide skate's median by the peer's, so for rates a ratio above 1
means skate is faster, and for times and memory a ratio below 1 means skate is leaner. The
``targets`` section after the table checks issue 2's targets against these medians. The
raw per-repeat figures (and errors) are in the ``--json`` file.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

from _common import (Budget, fmt, fmt_ratio, median, package_version, render_table,
                     timed_calls)
from _common import run_child as _run_child

MiB = 1024 * 1024

SYSTEMS = ("skate", "ray", "ppe", "mp", "loky")
DEFAULT_SYSTEMS = ("skate", "ray", "ppe", "mp")  # loky on request: it keeps --quick short
# The package each system needs; a system whose package is missing is skipped.
SYSTEM_PACKAGE = {"skate": "skate", "ray": "ray", "ppe": None, "mp": None, "loky": "loky"}
PEERS_WITH_RAY_API = ("skate", "ray")


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    better: str  # "higher" or "lower"


# Workload name -> the metrics it reports, in table order.
WORKLOADS: dict[str, tuple[Metric, ...]] = {
    "init to first result": (Metric("init to first result", "s", "lower"),
                             Metric("import module", "s", "lower")),
    "idle footprint": (Metric("idle footprint total", "MiB", "lower"),
                       Metric("idle footprint processes", "count", "lower"),
                       Metric("idle footprint children", "MiB", "lower"),
                       Metric("idle footprint driver", "MiB", "lower")),
    "single client get calls": (Metric("single client get calls", "calls/s", "higher"),),
    "single client put calls": (Metric("single client put calls", "calls/s", "higher"),),
    "single client put gigabytes": (Metric("single client put gigabytes", "GB/s", "higher"),),
    "single client get 100MB": (Metric("single client get 100MB", "s/call", "lower"),
                                Metric("single client get 1MB", "s/call", "lower")),
    "tasks sync": (Metric("tasks sync", "tasks/s", "higher"),
                   Metric("tasks sync round trip", "ms", "lower")),
    "tasks async": (Metric("tasks async", "tasks/s", "higher"),),
    "tasks and get batch": (Metric("tasks and get batch", "batches/s", "higher"),),
    "wait for 1k refs": (Metric("wait for 1k refs", "rounds/s", "higher"),),
    "wait for 1k finished refs at once": (Metric("wait for 1k finished refs at once", "calls/s",
                                                 "higher"),),
    "1:1 actor calls sync": (Metric("1:1 actor calls sync", "calls/s", "higher"),),
    "1:1 actor calls async": (Metric("1:1 actor calls async", "calls/s", "higher"),),
    "1:1 actor calls concurrent": (Metric("1:1 actor calls concurrent", "calls/s", "higher"),),
    "1:n actor calls async": (Metric("1:n actor calls async", "calls/s", "higher"),),
    "n:n actor calls async": (Metric("n:n actor calls async", "calls/s", "higher"),),
    "1:1 async-actor calls async": (Metric("1:1 async-actor calls async", "calls/s", "higher"),),
    "create 100 actors, one call each": (Metric("create 100 actors, one call each", "s", "lower"),),
    "get object containing 10k refs": (Metric("get object containing 10k refs", "calls/s",
                                              "higher"),),
}
POOL_WORKLOADS = ("init to first result", "idle footprint", "tasks sync", "tasks async")
METRICS = {m.name: m for ms in WORKLOADS.values() for m in ms}

ASYNC_TASKS = 2000
BATCH_TASKS = 1000
WAIT_REFS = 1000
CONTAINED_REFS = 10_000
LARGE_ARRAY_BYTES = 100 * MiB
SMALL_ARRAY_BYTES = 1 * MiB
IDLE_SLEEP_S = 2.0


FULL = Budget(warmup_s=0.5, measure_s=1.5, min_calls=3, child_timeout_s=300.0)
QUICK = Budget(warmup_s=0.0, measure_s=0.25, min_calls=1, child_timeout_s=120.0)


def noop():
    return b"ok"


OKS = [b"ok"] * max(ASYNC_TASKS, BATCH_TASKS)  # what a batch of no-op tasks must return


# --------------------------------------------------------------------------------------
# Child side: one system, one repeat, in a fresh process.
# --------------------------------------------------------------------------------------

def idle_footprint() -> dict[str, float]:
    import psutil

    time.sleep(IDLE_SLEEP_S)
    driver = psutil.Process()
    children_pss, children = 0, 0
    for proc in driver.children(recursive=True):
        try:
            children_pss += proc.memory_full_info().pss
            children += 1
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    driver_pss = driver.memory_full_info().pss
    return {"idle footprint total": (children_pss + driver_pss) / MiB,
            "idle footprint processes": children + 1,
            "idle footprint children": children_pss / MiB,
            "idle footprint driver": driver_pss / MiB}


ACTOR_CALLS = 1000   # calls per round in the async actor workloads (as in Ray's ray_perf.py)
MANY_ACTORS = 100


class Server:
    """The actor of the actor workloads: a method that does nothing."""

    def small_value(self):
        return b"ok"


class AsyncServer:
    async def small_value(self):
        return b"ok"


def _client_class(rt):
    class ActorClient:
        def __init__(self, servers):
            self.servers = servers

        def small_value_batch(self, n):
            refs = [s.small_value.remote() for s in self.servers for _ in range(n)]
            rt.get(refs)
            return len(refs)
    return rt.remote(ActorClient)


class RayLikeWorkloads:
    """The workloads on a runtime with Ray's API: skate itself, or Ray."""

    def __init__(self, rt, budget: Budget):
        import numpy as np

        self.rt, self.budget, self.np = rt, budget, np
        self.noop = rt.remote(noop)
        self.server = rt.remote(Server)

    def single_client_get_calls(self):
        value = self.rt.put(0)
        def get():
            assert self.rt.get(value) == 0
        calls, secs = timed_calls(get, self.budget)
        return {"single client get calls": calls / secs}

    def single_client_put_calls(self):
        calls, secs = timed_calls(lambda: self.rt.put(0), self.budget)
        return {"single client put calls": calls / secs}

    def single_client_put_gigabytes(self):
        arr = self.np.zeros(LARGE_ARRAY_BYTES // 8, dtype=self.np.int64)
        assert self.rt.get(self.rt.put(arr)).nbytes == arr.nbytes
        calls, secs = timed_calls(lambda: self.rt.put(arr), self.budget)
        return {"single client put gigabytes": calls * arr.nbytes / secs / 1e9}

    def single_client_get_100mb(self):
        out = {}
        for metric, nbytes in (("single client get 100MB", LARGE_ARRAY_BYTES),
                               ("single client get 1MB", SMALL_ARRAY_BYTES)):
            ref = self.rt.put(self.np.zeros(nbytes // 8, dtype=self.np.int64))

            def get():
                assert self.rt.get(ref).nbytes == nbytes
            calls, secs = timed_calls(get, self.budget)
            out[metric] = secs / calls
            del ref
        return out

    def tasks_sync(self):
        def submit_then_get():
            assert self.rt.get(self.noop.remote()) == b"ok"
        calls, secs = timed_calls(submit_then_get, self.budget)
        return {"tasks sync": calls / secs, "tasks sync round trip": 1000.0 * secs / calls}

    def tasks_async(self):
        def submit_all_then_get():
            refs = [self.noop.remote() for _ in range(ASYNC_TASKS)]
            assert self.rt.get(refs) == OKS[:ASYNC_TASKS]
        calls, secs = timed_calls(submit_all_then_get, self.budget)
        return {"tasks async": ASYNC_TASKS * calls / secs}

    def tasks_and_get_batch(self):
        def batch():
            refs = [self.noop.remote() for _ in range(BATCH_TASKS)]
            assert self.rt.get(refs) == OKS[:BATCH_TASKS]
        calls, secs = timed_calls(batch, self.budget)
        return {"tasks and get batch": calls / secs}

    def wait_for_1k_refs(self):
        # As in Ray's ray_perf.py: fetch_local only on the first wait of a round.
        def one_round():
            not_ready = [self.noop.remote() for _ in range(WAIT_REFS)]
            fetch_local = True
            for _ in range(WAIT_REFS):
                _ready, not_ready = self.rt.wait(not_ready, fetch_local=fetch_local)
                fetch_local = False
            assert not not_ready
        calls, secs = timed_calls(one_round, self.budget)
        return {"wait for 1k refs": calls / secs}

    def wait_for_1k_finished_refs_at_once(self):
        refs = [self.noop.remote() for _ in range(WAIT_REFS)]
        self.rt.get(refs)
        def wait_all():
            ready, _not_ready = self.rt.wait(refs, num_returns=WAIT_REFS)
            assert len(ready) == WAIT_REFS
        calls, secs = timed_calls(wait_all, self.budget)
        return {"wait for 1k finished refs at once": calls / secs}

    # --- actors (issue 3's targets; definitions follow Ray's ray_perf.py) -------------
    def _server(self, **options):
        a = self.server.options(**options).remote() if options else self.server.remote()
        assert self.rt.get(a.small_value.remote()) == b"ok"
        return a

    def actor_calls_1_1_sync(self):
        a = self._server()
        calls, secs = timed_calls(lambda: self.rt.get(a.small_value.remote()), self.budget)
        return {"1:1 actor calls sync": calls / secs}

    def actor_calls_1_1_async(self):
        a = self._server()
        calls, secs = timed_calls(
            lambda: self.rt.get([a.small_value.remote() for _ in range(ACTOR_CALLS)]), self.budget)
        return {"1:1 actor calls async": calls * ACTOR_CALLS / secs}

    def actor_calls_1_1_concurrent(self):
        a = self._server(max_concurrency=16)
        calls, secs = timed_calls(
            lambda: self.rt.get([a.small_value.remote() for _ in range(ACTOR_CALLS)]), self.budget)
        return {"1:1 actor calls concurrent": calls * ACTOR_CALLS / secs}

    def actor_calls_1_n_async(self):
        actors = [self._server() for _ in range(2)]
        calls, secs = timed_calls(
            lambda: self.rt.get([a.small_value.remote() for _ in range(ACTOR_CALLS // 2) for a in actors]),
            self.budget)
        return {"1:n actor calls async": calls * ACTOR_CALLS / secs}

    def actor_calls_n_n_async(self):
        servers = [self._server() for _ in range(2)]
        client_cls = _client_class(self.rt)
        clients = [client_cls.remote(servers) for _ in range(2)]
        per = ACTOR_CALLS // 4   # each client: per calls to each of 2 servers
        calls, secs = timed_calls(
            lambda: self.rt.get([c.small_value_batch.remote(per) for c in clients]), self.budget)
        return {"n:n actor calls async": calls * per * 4 / secs}

    def async_actor_calls_1_1_async(self):
        a = self.rt.remote(AsyncServer).remote()
        assert self.rt.get(a.small_value.remote()) == b"ok"
        calls, secs = timed_calls(
            lambda: self.rt.get([a.small_value.remote() for _ in range(ACTOR_CALLS)]), self.budget)
        return {"1:1 async-actor calls async": calls * ACTOR_CALLS / secs}

    def create_100_actors_one_call_each(self):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            actors = [self.server.remote() for _ in range(MANY_ACTORS)]
            assert self.rt.get([a.small_value.remote() for a in actors]) == OKS[:MANY_ACTORS]
            times.append(time.perf_counter() - start)
            for a in actors:
                self.rt.kill(a)
            del actors
            time.sleep(0.5)
        return {"create 100 actors, one call each": sorted(times)[1]}

    def get_object_containing_10k_refs(self):
        outer = self.rt.put([self.rt.put(1) for _ in range(CONTAINED_REFS)])
        def get():
            assert len(self.rt.get(outer)) == CONTAINED_REFS
        calls, secs = timed_calls(get, self.budget)
        assert self.rt.get(self.rt.get(outer)[-1]) == 1
        return {"get object containing 10k refs": calls / secs}


class PoolWorkloads:
    """``tasks sync`` and ``tasks async`` on a standard-library-style process pool."""

    def __init__(self, submit_and_result, submit_many_and_results, budget: Budget):
        self.submit_and_result = submit_and_result
        self.submit_many_and_results = submit_many_and_results
        self.budget = budget

    def tasks_sync(self):
        def submit_then_result():
            assert self.submit_and_result() == b"ok"
        calls, secs = timed_calls(submit_then_result, self.budget)
        return {"tasks sync": calls / secs, "tasks sync round trip": 1000.0 * secs / calls}

    def tasks_async(self):
        def submit_all_then_results():
            assert self.submit_many_and_results(ASYNC_TASKS) == OKS[:ASYNC_TASKS]
        calls, secs = timed_calls(submit_all_then_results, self.budget)
        return {"tasks async": ASYNC_TASKS * calls / secs}


_METHODS = {
    "1:1 actor calls sync": "actor_calls_1_1_sync",
    "1:1 actor calls async": "actor_calls_1_1_async",
    "1:1 actor calls concurrent": "actor_calls_1_1_concurrent",
    "1:n actor calls async": "actor_calls_1_n_async",
    "n:n actor calls async": "actor_calls_n_n_async",
    "1:1 async-actor calls async": "async_actor_calls_1_1_async",
    "create 100 actors, one call each": "create_100_actors_one_call_each",
}


def method_name(workload: str) -> str:
    return _METHODS.get(workload) or workload.replace(" ", "_").lower()


def start_system(system: str):
    """Imports and starts ``system``, runs its first task; returns (workloads, stop, times)."""
    t_import = time.perf_counter()
    if system in PEERS_WITH_RAY_API:
        if system == "skate":
            import skate as rt

            def start():
                rt.init(num_cpus=2)
        else:
            import ray as rt

            def start():
                rt.init(num_cpus=2, include_dashboard=False)
        import_s = time.perf_counter() - t_import
        remote_noop = rt.remote(noop)  # decorated before init, as a module-level @remote is
        t0 = time.perf_counter()
        start()
        assert rt.get(remote_noop.remote()) == b"ok"
        init_s = time.perf_counter() - t0
        return rt, rt.shutdown, {"init to first result": init_s, "import module": import_s}

    if system == "ppe":
        import concurrent.futures as cf
        import_s = time.perf_counter() - t_import
        t0 = time.perf_counter()
        pool = cf.ProcessPoolExecutor(max_workers=2)
        assert pool.submit(noop).result() == b"ok"
        init_s = time.perf_counter() - t0

        def many(n):
            futures = [pool.submit(noop) for _ in range(n)]
            cf.wait(futures)
            return [f.result() for f in futures]
        handle = (lambda: pool.submit(noop).result(), many)
        stop = pool.shutdown
    elif system == "loky":
        import concurrent.futures as cf

        import loky
        import_s = time.perf_counter() - t_import
        t0 = time.perf_counter()
        pool = loky.get_reusable_executor(max_workers=2)
        assert pool.submit(noop).result() == b"ok"
        init_s = time.perf_counter() - t0

        def many(n):
            futures = [pool.submit(noop) for _ in range(n)]
            cf.wait(futures)
            return [f.result() for f in futures]
        handle = (lambda: pool.submit(noop).result(), many)
        stop = pool.shutdown
    elif system == "mp":
        import multiprocessing
        import_s = time.perf_counter() - t_import
        t0 = time.perf_counter()
        pool = multiprocessing.Pool(2)
        assert pool.apply_async(noop).get() == b"ok"
        init_s = time.perf_counter() - t0

        def many(n):
            results = [pool.apply_async(noop) for _ in range(n)]
            return [r.get() for r in results]

        def stop():
            pool.close()
            pool.join()
        handle = (lambda: pool.apply_async(noop).get(), many)
    else:
        raise ValueError(f"unknown system {system!r}")
    return handle, stop, {"init to first result": init_s, "import module": import_s}


def child_main(system: str, workloads: list[str], budget: Budget, out_path: str) -> int:
    with open(out_path, "a", buffering=1) as out:
        def emit(workload, metrics=None, error=None, seconds=None):
            out.write(json.dumps({"workload": workload, "metrics": metrics or {},
                                  "error": error, "seconds": seconds}) + "\n")

        handle, stop, start_times = start_system(system)
        if "init to first result" in workloads:
            emit("init to first result", start_times)
        if "idle footprint" in workloads:
            emit("idle footprint", idle_footprint())
        if system in PEERS_WITH_RAY_API:
            runner = RayLikeWorkloads(handle, budget)
        else:
            runner = PoolWorkloads(*handle, budget)
        for workload in workloads:
            if workload in ("init to first result", "idle footprint"):
                continue
            measure = getattr(runner, method_name(workload), None)
            if measure is None:
                continue  # no counterpart on this system
            gc.collect()
            started = time.perf_counter()
            try:
                metrics = measure()
            except Exception as exc:  # recorded; the other workloads still run
                emit(workload, error=f"{type(exc).__name__}: {exc!r}"[:2000],
                     seconds=round(time.perf_counter() - started, 2))
            else:
                emit(workload, metrics, seconds=round(time.perf_counter() - started, 2))
        stop()
    return 0


# --------------------------------------------------------------------------------------
# Parent side: repeats, children, medians, table.
# --------------------------------------------------------------------------------------

def run_child(system: str, workloads: list[str], budget: Budget) -> dict:
    """Runs one child; returns its results, error (if any), seconds and leftovers."""
    return _run_child(__file__, ["--child", system, "--child-budget", json.dumps(asdict(budget)),
                                 "--child-workloads", json.dumps(workloads)],
                      budget.child_timeout_s, system)


def table(systems, medians, failed, markdown=False) -> str:
    peers = [s for s in systems if s != "skate"]
    headers = ["metric", "unit", "better"] + list(systems)
    if "skate" in systems:
        headers += [f"skate/{p}" for p in peers]
    rows = []
    for metric in METRICS.values():
        cells = {}
        for s in systems:
            v = medians[s].get(metric.name)
            cells[s] = "failed" if v is None and metric.name in failed[s] else v
        if all(c is None for c in cells.values()):
            continue
        row = [metric.name, metric.unit, metric.better] + [fmt(cells[s]) for s in systems]
        if "skate" in systems:
            row += [fmt_ratio(cells["skate"], cells[p]) for p in peers]
        rows.append(row)
    return render_table(headers, rows, markdown=markdown, left=3)


def target_checks(medians) -> list[tuple[str, str, str]]:
    """Issue 2's targets against the medians: (target, measured, verdict)."""
    sk, ray, ppe = medians.get("skate", {}), medians.get("ray", {}), medians.get("ppe", {})
    checks = []

    def verdict(ok):
        return "met" if ok else "NOT met"

    v = sk.get("init to first result")
    if v is not None:
        checks.append(("init() to first result <= 0.3 s", f"{v:.3f} s", verdict(v <= 0.3)))
    for wl in ("tasks async", "tasks sync"):
        s, r, p = sk.get(wl), ray.get(wl), ppe.get(wl)
        if s is not None and r is not None:
            checks.append((f"{wl}: >= 4x Ray's rate", f"skate/ray {s / r:.2f}x",
                           verdict(s >= 4 * r)))
        if s is not None and p is not None:
            checks.append((f"{wl}: within 1.5x of ProcessPoolExecutor",
                           f"skate/ppe {s / p:.2f}x (needs >= 0.67x)", verdict(s >= p / 1.5)))
    s, r = sk.get("single client put gigabytes"), ray.get("single client put gigabytes")
    if s is not None and r is not None:
        checks.append(("put of 100 MB: at least Ray's GB/s",
                       f"{s:.2f} vs {r:.2f} GB/s, skate/ray {s / r:.2f}x", verdict(s >= r)))
    big, small = sk.get("single client get 100MB"), sk.get("single client get 1MB")
    if big is not None and small is not None:
        checks.append(("get of 100 MB: zero-copy (100 MiB get <= 2x 1 MiB get)",
                       f"{big * 1e6:.0f} us vs {small * 1e6:.0f} us ({big / small:.2f}x)",
                       verdict(big <= 2 * small)))
    v = sk.get("idle footprint total")
    if v is not None:
        n = sk.get("idle footprint processes")
        checks.append(("idle footprint (2 workers) <= 100 MiB PSS in all",
                       f"{v:.0f} MiB in {n:.0f} processes (children "
                       f"{sk.get('idle footprint children', 0):.0f} + driver "
                       f"{sk.get('idle footprint driver', 0):.0f})", verdict(v <= 100)))
    for wl in ("1:1 actor calls sync", "1:1 actor calls async", "1:1 actor calls concurrent",
               "1:n actor calls async", "n:n actor calls async", "1:1 async-actor calls async"):
        s, r = sk.get(wl), ray.get(wl)
        if s is not None and r is not None:
            checks.append((f"{wl}: >= 3x Ray's rate", f"skate/ray {s / r:.2f}x", verdict(s >= 3 * r)))
    s, r = sk.get("create 100 actors, one call each"), ray.get("create 100 actors, one call each")
    if s is not None and r is not None:
        checks.append(("create 100 actors + a call each: >= 3x faster than Ray",
                       f"{s:.2f} s vs {r:.2f} s ({r / s:.1f}x faster)", verdict(r >= 3 * s)))
    return checks


def select_workloads(only: str | None) -> list[str]:
    if not only:
        return list(WORKLOADS)
    patterns = [p.strip().lower() for p in only.split(",") if p.strip()]
    chosen = [w for w in WORKLOADS if any(p in w for p in patterns)]
    unknown = [p for p in patterns if not any(p in w for w in WORKLOADS)]
    if unknown:
        raise SystemExit(f"--only: no workload matches {unknown}; workloads are: "
                         + ", ".join(WORKLOADS))
    return chosen


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="skate's microbenchmark beside Ray, ProcessPoolExecutor, "
                    "multiprocessing.Pool and loky (medians over repeats).")
    parser.add_argument("--repeats", type=int, default=None,
                        help="fresh processes per system (default 5, or 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="one warm-up call, shorter measurement, 2 repeats "
                             "(under 2 minutes in all)")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help="run only the workloads whose names contain one of these")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated, from {','.join(SYSTEMS)} "
                             f"(default: {','.join(DEFAULT_SYSTEMS)})")
    parser.add_argument("--json", metavar="PATH", help="write the raw results here")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table as Markdown (for docs/benchmarks.md)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--child-budget", help=argparse.SUPPRESS)
    parser.add_argument("--child-workloads", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, json.loads(args.child_workloads),
                          Budget(**json.loads(args.child_budget)), args.child_out)

    budget = QUICK if args.quick else FULL
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    workloads = select_workloads(args.only)
    systems, skipped = [], {}
    for s in (x.strip() for x in args.systems.split(",") if x.strip()):
        if s not in SYSTEMS:
            raise SystemExit(f"--systems: unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
        pkg = SYSTEM_PACKAGE[s]
        if pkg and importlib.util.find_spec(pkg) is None:
            skipped[s] = f"package {pkg!r} is not installed"
            print(f"note: skipping {s}: package {pkg!r} is not installed", file=sys.stderr)
            continue
        systems.append(s)
    if not systems:
        raise SystemExit("no system to run")

    per_system = {s: [w for w in workloads if s in PEERS_WITH_RAY_API or w in POOL_WORKLOADS]
                  for s in systems}
    samples = {s: {} for s in systems}
    failed = {s: set() for s in systems}
    runs = {s: [] for s in systems}
    t_start = time.perf_counter()
    for r in range(repeats):
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        for s in order:
            if not per_system[s]:
                continue
            run = run_child(s, per_system[s], budget)
            got = set()
            for item in run["results"]:
                if item["error"]:
                    for m in WORKLOADS[item["workload"]]:
                        failed[s].add(m.name)
                for name, value in item["metrics"].items():
                    samples[s].setdefault(name, []).append(value)
                got.add(item["workload"])
            for w in per_system[s]:  # applicable but missing: the child died before it
                if w not in got:
                    failed[s].update(m.name for m in WORKLOADS[w])
            errors = [f"{i['workload']}: {i['error']}" for i in run["results"] if i["error"]]
            if run["error"]:
                errors.append(run["error"])
            runs[s].append({"repeat": r + 1, "seconds": round(run["seconds"], 2),
                            "workload seconds": {i["workload"]: i["seconds"]
                                                 for i in run["results"] if i["seconds"]},
                            "errors": errors, "leftover processes": run["leftover processes"]})
            note = f", {len(errors)} error(s)" if errors else ""
            if run["leftover processes"]:
                note += f", {len(run['leftover processes'])} leftover process(es)"
            print(f"[repeat {r + 1}/{repeats}] {s}: {run['seconds']:.1f} s{note}",
                  file=sys.stderr, flush=True)
            for e in errors:
                print("    " + e.replace("\n", "\n    "), file=sys.stderr)
    elapsed = time.perf_counter() - t_start

    medians = {s: {m: median(v) for m, v in samples[s].items()} for s in systems}
    print()
    print(f"skate microbenchmark: medians over {repeats} repeats, num_cpus=2, "
          f"{os.cpu_count()} CPUs, {'quick' if args.quick else 'full'} budget, "
          f"{elapsed:.0f} s in all")
    print("systems: " + ", ".join(
        f"{s} {package_version(SYSTEM_PACKAGE[s]) or platform.python_version()}"
        for s in systems) + (f"; skipped: {skipped}" if skipped else ""))
    print()
    print(table(systems, medians, failed, markdown=args.markdown))
    checks = target_checks(medians)
    if checks:
        print()
        print("targets (issue 2)")
        w0 = max(len(c[0]) for c in checks)
        w1 = max(len(c[1]) for c in checks)
        for target, measured, verdict in checks:
            print(f"  {target.ljust(w0)}  {measured.ljust(w1)}  {verdict}")

    if args.json:
        record = {
            "command": [os.path.basename(sys.executable)] + sys.argv,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "versions": {p: package_version(p) for p in ("skate", "ray", "loky", "numpy")},
            "budget": asdict(budget), "repeats": repeats, "workloads": workloads,
            "systems": systems, "skipped": skipped, "seconds": round(elapsed, 1),
            "metrics": {m.name: {"unit": m.unit, "better": m.better} for m in METRICS.values()},
            "samples": samples, "medians": medians, "runs": runs,
            "targets": [{"target": t, "measured": m, "verdict": v} for t, m, v in checks],
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"\nraw results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
