"""skate's drop-in adapters beside the standard library, loky and Ray's adapters.

What it measures
----------------
Issue 4's targets for ``skate.futures``, ``skate.multiprocessing`` and the joblib backend
``"skate"``, each beside its peers, all on 2 workers, on this machine, in the same run:

- futures: ``skate.futures.ProcessPoolExecutor(max_workers=2)`` (``skate``);
  ``concurrent.futures.ProcessPoolExecutor(max_workers=2)`` (``stdlib``);
  ``loky.get_reusable_executor(max_workers=2)`` (``loky``).
- multiprocessing: ``skate.multiprocessing.Pool(2)`` (``skate``); ``multiprocessing.Pool(2)``
  (``stdlib``); ``ray.util.multiprocessing.Pool(2)`` (``ray``).
- joblib: ``Parallel(n_jobs=2)`` with the backend ``"skate"`` (``import skate.joblib``);
  ``"loky"``, joblib's default (``loky``); ``"ray"`` (``from ray.util.joblib import
  register_ray; register_ray()``).

The names in brackets are the table's columns, and ``--systems`` takes them (or one
system, e.g. ``pool/ray``).

The workloads (``--only`` matches these names):

===========================  ==========  ===================================================
workload                     unit        one call is
===========================  ==========  ===================================================
futures start-up             s           in a fresh process: ``from ... import
pool start-up                              ProcessPoolExecutor`` (or ``Pool``, or ``joblib``
joblib start-up                            and the backend's registration), then create the
                                           executor / pool and get one no-op result
                                           (joblib: ``Parallel(n_jobs=2)`` of one no-op
                                           call). Three rows: the whole (``import + first
                                           result``), the ``import`` alone, and ``create to
                                           first result``
futures submit               tasks/s     ``submit`` 10,000 no-op tasks, then every
                                           ``result()``
futures map                  items/s     ``list(ex.map(inc, range(100_000),
                                           chunksize=100))``
pool map                     items/s     ``pool.map(inc, range(100_000))`` (each pool's
                                           default chunksize)
pool imap                    items/s     ``list(pool.imap(inc, range(100_000)))``: the
                                           default chunksize, 1 (Ray: 5,000 items, see
                                           below)
pool imap chunksize=100      items/s     the same with ``chunksize=100``
joblib small calls           calls/s     ``Parallel(n_jobs=2)(delayed(inc)(i) for i in
                                           range(10_000))`` (joblib's auto-batching on)
joblib 100MB array           calls/s     ``Parallel(n_jobs=2)(delayed(last)(a) for _ in
                                           range(20))``, ``a`` the same 100 MiB float64
                                           array (made once per process), ``last(a)`` =
                                           ``float(a[-1])``
===========================  ==========  ===================================================

The no-op task returns ``b"ok"`` and ``inc(x)`` is ``x + 1``; every call's results are
checked. The functions are defined in the script that runs them (``__main__``), as in a
user's script: the standard library's pools (``fork``) find them by name, skate, loky and
Ray pickle them by value (cloudpickle).

Ray's ``imap`` with chunksize 1 makes one actor call per item, about 1,000 items/s here:
100,000 items would take 90 s a call, so Ray's row is measured over the first 5,000; the
figure is a rate per item all the same. ``--quick`` runs that row over 20,000 items (Ray:
1,000).

skate's adapters start the embedded default cluster themselves, as users get it; it has
one worker per CPU, so on a machine without exactly 2 CPUs the child calls
``skate.init(num_cpus=2)`` first (inside the timed start-up; the JSON records it). Ray
is started as ``microbenchmark.py`` starts it, ``ray.init(num_cpus=2,
include_dashboard=False)``, inside the timed start-up, then the pool is made (Ray's
``Pool(2)`` would otherwise call ``ray.init(num_cpus=2)`` itself, with the dashboard).
Ray has no ``concurrent.futures`` executor, so the futures rows have no Ray column.

How it runs
-----------
As ``microbenchmark.py`` (and with its helpers, in ``_common.py``): one fresh child
process per (system, repeat), where a system is one adapter on one implementation, e.g.
``pool/ray``; systems take turns within each repeat (the order rotated from one repeat
to the next), so noise from other load falls on all of them alike (``--quick`` runs Ray's
systems in the first repeat only: they take seconds to start). In the child, the
start-up comes first (nothing it measures is imported before), then each workload warms
up (0.5 s, at least one call) and is called until 1.5 s have passed (at least once;
``--quick``: one warm-up call, 0.25 s). A child that fails or times out is recorded and
the run goes on; its workloads show ``failed``.
Processes a child leaves behind in its session are counted and killed.

How to run
----------
::

    .venv/bin/python benchmarks/adapters.py                 # full run, 5 repeats, 8-10 min
    .venv/bin/python benchmarks/adapters.py --quick         # 2 repeats (Ray 1), ~1.5 min
    .venv/bin/python benchmarks/adapters.py --only "pool map,start-up" \\
        --systems skate,stdlib --repeats 3 --json /tmp/adapters.json
    .venv/bin/python benchmarks/adapters.py --markdown      # table for docs/benchmarks.md

loky and Ray are measured only when installed (``pip install loky ray``; for the
comparison only, never dependencies of skate); a missing package skips its systems.

How to read it
--------------
Every figure is the median over the repeats. For rates (``/s``) higher is better, for
seconds lower is better. ``skate/<peer>`` divides skate's median by the peer's: for rates
above 1 means skate is faster, for seconds below 1 means skate starts sooner. ``stdlib``
is ``concurrent.futures`` in the futures rows and ``multiprocessing`` in the pool rows.
The ``targets`` section then checks issue 4's targets against the medians; the raw
per-repeat figures (and errors) are in the ``--json`` file.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import gc
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # imported, not run
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (Budget, fmt, fmt_ratio, median, package_version, render_checks,  # noqa: E402
                     render_table, run_child, timed_calls)

MiB = 1024 * 1024
WORKERS = 2
SUBMIT_TASKS = 10_000
MAP_ITEMS = 100_000
MAP_CHUNKSIZE = 100
JOBLIB_CALLS = 10_000
ARRAY_CALLS = 20
ARRAY_BYTES = 100 * MiB
# imap with chunksize=1 is one actor call per item on Ray (about 1,000 items/s): it runs
# over fewer items there, and --quick runs it over fewer items everywhere.
IMAP1_ITEMS = {"full": {"stdlib": MAP_ITEMS, "skate": MAP_ITEMS, "ray": 5_000},
               "quick": {"stdlib": 20_000, "skate": 20_000, "ray": 1_000}}

# A call slower than measure_s is measured once per process (and 5 processes per system).
# The slowest child (pool/ray) takes about 20-30 s: the time limit is for hangs.
FULL = Budget(warmup_s=0.5, measure_s=1.5, min_calls=1, child_timeout_s=90.0)
QUICK = Budget(warmup_s=0.0, measure_s=0.25, min_calls=1, child_timeout_s=60.0)

ADAPTERS = {"futures": "futures", "pool": "multiprocessing", "joblib": "joblib"}
IMPLS = ("skate", "stdlib", "loky", "ray")   # the table's columns, in order
PEERS = ("stdlib", "loky", "ray")
# system -> the packages it needs; a system whose package is missing is skipped.
SYSTEMS = {
    "futures/skate": ("skate",), "futures/stdlib": (), "futures/loky": ("loky",),
    "pool/skate": ("skate",), "pool/stdlib": (), "pool/ray": ("ray",),
    "joblib/skate": ("skate", "joblib"), "joblib/loky": ("joblib",),
    "joblib/ray": ("ray", "joblib"),
}


@dataclass(frozen=True)
class Metric:
    key: str      # unique; what the JSON's samples and medians are keyed by
    label: str    # the table's metric column
    unit: str
    better: str   # "higher" or "lower"


def _startup(adapter):
    return (Metric(f"{adapter} start-up", "start-up: import + first result", "s", "lower"),
            Metric(f"{adapter} import", "start-up: the import alone", "s", "lower"),
            Metric(f"{adapter} create to first result", "start-up: create to first result",
                   "s", "lower"))


# Workload name -> the metrics it reports, in table order; the adapter is the first word.
WORKLOADS: dict[str, tuple[Metric, ...]] = {
    "futures start-up": _startup("futures"),
    "futures submit": (Metric("futures submit", "submit 10k no-op tasks, then all results",
                              "tasks/s", "higher"),),
    "futures map": (Metric("futures map", "map 100k items, chunksize=100", "items/s",
                           "higher"),),
    "pool start-up": _startup("pool"),
    "pool map": (Metric("pool map", "map 100k items", "items/s", "higher"),),
    "pool imap": (Metric("pool imap", "imap, chunksize=1 (the default)", "items/s", "higher"),),
    "pool imap chunksize=100": (Metric("pool imap chunksize=100", "imap 100k items, chunksize=100",
                                       "items/s", "higher"),),
    "joblib start-up": _startup("joblib"),
    "joblib small calls": (Metric("joblib small calls", "Parallel: 10k small calls", "calls/s",
                                  "higher"),),
    "joblib 100MB array": (Metric("joblib 100MB array", "Parallel: 20 calls on one 100 MB array",
                                  "calls/s", "higher"),),
}
METRICS = {m.key: m for ms in WORKLOADS.values() for m in ms}


def adapter_of(workload: str) -> str:
    return workload.split(" ", 1)[0]


# --------------------------------------------------------------------------------------
# Child side: one system, one repeat, in a fresh process. Nothing measured is imported
# at module level.
# --------------------------------------------------------------------------------------

def noop():
    return b"ok"


def inc(x):
    return x + 1


def last(a):
    return float(a[-1])


OKS = [b"ok"] * SUBMIT_TASKS
INCREMENTED = list(range(1, MAP_ITEMS + 1))


def _skate_with_two_cpus() -> bool:
    """skate's adapters start the embedded cluster with one worker per CPU: where that
    is not 2, start it with 2 first. Returns whether it did."""
    if os.cpu_count() == WORKERS or os.environ.get("SKATE_ADDRESS"):
        return False
    import skate
    skate.init(num_cpus=WORKERS)
    return True


def _start_ray():
    import ray
    ray.init(num_cpus=WORKERS, include_dashboard=False)


class FuturesSystem:
    def __init__(self, impl: str, budget: Budget, params: dict):
        self.impl, self.budget, self.notes = impl, budget, {}
        if impl == "skate":
            from skate.futures import ProcessPoolExecutor
            self.make = lambda: ProcessPoolExecutor(max_workers=WORKERS)
        elif impl == "stdlib":
            from concurrent.futures import ProcessPoolExecutor
            self.make = lambda: ProcessPoolExecutor(max_workers=WORKERS)
        elif impl == "loky":
            from loky import get_reusable_executor
            self.make = lambda: get_reusable_executor(max_workers=WORKERS)
        else:
            raise ValueError(impl)

    def start(self):
        if self.impl == "skate":
            self.notes["skate.init(num_cpus=2) first"] = _skate_with_two_cpus()
        self.ex = self.make()
        assert self.ex.submit(noop).result() == b"ok"

    def futures_submit(self):
        def submit_all_then_results():
            futures = [self.ex.submit(noop) for _ in range(SUBMIT_TASKS)]
            assert [f.result() for f in futures] == OKS
        calls, secs = timed_calls(submit_all_then_results, self.budget)
        return {"futures submit": SUBMIT_TASKS * calls / secs}

    def futures_map(self):
        def map_all():
            assert list(self.ex.map(inc, range(MAP_ITEMS), chunksize=MAP_CHUNKSIZE)) == INCREMENTED
        calls, secs = timed_calls(map_all, self.budget)
        return {"futures map": MAP_ITEMS * calls / secs}

    def stop(self):
        self.ex.shutdown(wait=True)
        if self.impl == "skate":
            import skate
            skate.shutdown()


class PoolSystem:
    def __init__(self, impl: str, budget: Budget, params: dict):
        self.impl, self.budget, self.notes = impl, budget, {}
        self.imap1_items = params["imap1_items"][impl]
        if impl == "skate":
            from skate.multiprocessing import Pool
        elif impl == "stdlib":
            from multiprocessing import Pool
        elif impl == "ray":
            import ray  # noqa: F401
            from ray.util.multiprocessing import Pool
        else:
            raise ValueError(impl)
        self.Pool = Pool

    def start(self):
        if self.impl == "skate":
            self.notes["skate.init(num_cpus=2) first"] = _skate_with_two_cpus()
        elif self.impl == "ray":
            _start_ray()
        self.pool = self.Pool(WORKERS)
        assert self.pool.apply_async(noop).get() == b"ok"

    def pool_map(self):
        def map_all():
            assert self.pool.map(inc, range(MAP_ITEMS)) == INCREMENTED
        calls, secs = timed_calls(map_all, self.budget)
        return {"pool map": MAP_ITEMS * calls / secs}

    def pool_imap(self):
        n = self.imap1_items

        def imap_all():
            assert list(self.pool.imap(inc, range(n))) == INCREMENTED[:n]
        calls, secs = timed_calls(imap_all, self.budget)
        return {"pool imap": n * calls / secs}

    def pool_imap_chunksize_100(self):
        def imap_all():
            out = list(self.pool.imap(inc, range(MAP_ITEMS), chunksize=MAP_CHUNKSIZE))
            assert out == INCREMENTED
        calls, secs = timed_calls(imap_all, self.budget)
        return {"pool imap chunksize=100": MAP_ITEMS * calls / secs}

    def stop(self):
        self.pool.close()
        self.pool.join()
        if self.impl == "skate":
            import skate
            skate.shutdown()
        elif self.impl == "ray":
            import ray
            ray.shutdown()


class JoblibSystem:
    def __init__(self, impl: str, budget: Budget, params: dict):
        self.impl, self.budget, self.notes = impl, budget, {}
        if impl == "skate":
            from joblib import Parallel, delayed
            import skate.joblib  # noqa: F401  (registers "skate")
        elif impl == "loky":
            from joblib import Parallel, delayed
        elif impl == "ray":
            from joblib import Parallel, delayed
            from ray.util.joblib import register_ray
            register_ray()
        else:
            raise ValueError(impl)
        self.Parallel, self.delayed = Parallel, delayed
        self.array = None

    def parallel(self):
        return self.Parallel(n_jobs=WORKERS, backend=self.impl)

    def start(self):
        if self.impl == "skate":
            self.notes["skate.init(num_cpus=2) first"] = _skate_with_two_cpus()
        elif self.impl == "ray":
            _start_ray()
        assert self.parallel()([self.delayed(noop)()]) == [b"ok"]

    def joblib_small_calls(self):
        def small_calls():
            out = self.parallel()(self.delayed(inc)(i) for i in range(JOBLIB_CALLS))
            assert out == INCREMENTED[:JOBLIB_CALLS]
        calls, secs = timed_calls(small_calls, self.budget)
        return {"joblib small calls": JOBLIB_CALLS * calls / secs}

    def joblib_100mb_array(self):
        import numpy as np

        if self.array is None:
            self.array = np.ones(ARRAY_BYTES // 8, dtype=np.float64)
        a = self.array

        def calls_on_array():
            assert self.parallel()(self.delayed(last)(a) for _ in range(ARRAY_CALLS)) == \
                [1.0] * ARRAY_CALLS
        calls, secs = timed_calls(calls_on_array, self.budget)
        return {"joblib 100MB array": ARRAY_CALLS * calls / secs}

    def stop(self):
        if self.impl == "skate":
            import skate
            skate.shutdown()
        elif self.impl == "ray":
            import ray
            ray.shutdown()


SYSTEM_CLASSES = {"futures": FuturesSystem, "pool": PoolSystem, "joblib": JoblibSystem}


def method_name(workload: str) -> str:
    return workload.replace(" ", "_").replace("-", "_").replace("=", "_").lower()


def child_main(system: str, workloads: list[str], budget: Budget, params: dict,
               out_path: str) -> int:
    adapter, impl = system.split("/")
    # A child about to hit its time limit prints every thread's stack (into the error).
    faulthandler.dump_traceback_later(max(1.0, budget.child_timeout_s - 5))
    with open(out_path, "a", buffering=1) as out:
        def emit(workload, metrics=None, error=None, seconds=None, notes=None):
            out.write(json.dumps({"workload": workload, "metrics": metrics or {},
                                  "error": error, "seconds": seconds, "notes": notes}) + "\n")

        t0 = time.perf_counter()
        runner = SYSTEM_CLASSES[adapter](impl, budget, params)
        t1 = time.perf_counter()
        runner.start()
        t2 = time.perf_counter()
        if f"{adapter} start-up" in workloads:
            emit(f"{adapter} start-up", {f"{adapter} start-up": t2 - t0,
                                         f"{adapter} import": t1 - t0,
                                         f"{adapter} create to first result": t2 - t1},
                 seconds=round(t2 - t0, 3), notes=runner.notes)
        for workload in workloads:
            if workload.endswith("start-up"):
                continue
            gc.collect()
            started = time.perf_counter()
            try:
                metrics = getattr(runner, method_name(workload))()
            except Exception as exc:  # recorded; the other workloads still run
                emit(workload, error=f"{type(exc).__name__}: {exc!r}"[:2000],
                     seconds=round(time.perf_counter() - started, 2))
            else:
                emit(workload, metrics, seconds=round(time.perf_counter() - started, 2),
                     notes=runner.notes or None)
        runner.stop()
    return 0


# --------------------------------------------------------------------------------------
# Parent side: repeats, children, medians, table, targets.
# --------------------------------------------------------------------------------------

def table(medians, failed, counts, systems, workloads, markdown=False) -> str:
    """``counts``: system -> metric -> (samples, children run); a median of fewer samples
    than children (some failed) is marked with ``*``."""
    columns = [i for i in IMPLS if any(s.endswith("/" + i) for s in systems)]
    peers = [p for p in columns if p != "skate"]
    headers = ["adapter", "metric", "unit", "better"] + columns
    if "skate" in columns:
        headers += [f"skate/{p}" for p in peers]
    rows = []
    for workload in workloads:
        adapter = adapter_of(workload)
        for metric in WORKLOADS[workload]:
            cells, shown = {}, {}
            for impl in columns:
                system = f"{adapter}/{impl}"
                v = medians[system].get(metric.key) if system in systems else None
                cells[impl] = shown[impl] = v
                if system not in systems:
                    continue
                got, runs = counts[system].get(metric.key, (0, 0))
                if v is None and metric.key in failed[system]:
                    cells[impl] = shown[impl] = "failed"
                elif v is not None and got < runs:
                    shown[impl] = f"{fmt(v)} *"
            if all(c is None for c in cells.values()):
                continue
            row = [ADAPTERS[adapter], metric.label, metric.unit, metric.better]
            row += [fmt(shown[i]) for i in columns]
            if "skate" in columns:
                row += [fmt_ratio(cells["skate"], cells[p]) for p in peers]
            rows.append(row)
    return render_table(headers, rows, markdown=markdown, left=4)


def target_checks(medians) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Issue 4's targets against the medians: (target, measured, verdict), and notes."""
    checks, notes = [], []

    def get(system, key):
        v = medians.get(system, {}).get(key)
        return v if isinstance(v, (int, float)) else None

    def verdict(ok):
        return "met" if ok else "NOT met"

    peer_names = {"futures": {"stdlib": "ProcessPoolExecutor", "loky": "loky"},
                  "pool": {"stdlib": "multiprocessing.Pool", "ray": "Ray's Pool"},
                  "joblib": {"loky": "loky backend", "ray": "Ray's backend"}}
    for workload, metrics in WORKLOADS.items():
        adapter = adapter_of(workload)
        if workload.endswith("start-up"):
            continue
        key = metrics[0].key
        s = get(f"{adapter}/skate", key)
        if s is None:
            continue
        for impl, name in peer_names[adapter].items():
            p = get(f"{adapter}/{impl}", key)
            if p is None:
                continue
            need = 3.0 if impl == "ray" else 1.0
            label = f"{metrics[0].label}: " + (f">= 3x {name}" if impl == "ray" else
                                                f">= {name}")
            checks.append((label, f"skate/{impl} {s / p:.2f}x (needs >= {need:g}x)",
                           verdict(s >= need * p)))
    # Start-up: at most the standard library's (joblib has none: its default, loky).
    for adapter, peer, name in (("futures", "stdlib", "ProcessPoolExecutor"),
                                ("pool", "stdlib", "multiprocessing.Pool"),
                                ("joblib", "loky", "loky backend (joblib's default)")):
        s = get(f"{adapter}/skate", f"{adapter} start-up")
        p = get(f"{adapter}/{peer}", f"{adapter} start-up")
        if s is None or p is None:
            continue
        s0 = get(f"{adapter}/skate", f"{adapter} create to first result")
        p0 = get(f"{adapter}/{peer}", f"{adapter} create to first result")
        measured = f"{s:.3f} s vs {p:.3f} s ({s / p:.1f}x)"
        if s0 is not None and p0 is not None:
            measured += f"; without import {s0:.3f} vs {p0:.3f} s"
        checks.append((f"{ADAPTERS[adapter]} start-up: <= {name}", measured, verdict(s <= p)))
    if any(s.startswith("futures/") for s in medians):
        notes.append("futures vs Ray: not measured, Ray has no concurrent.futures executor")
    return checks, notes


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


def select_systems(spec: str) -> tuple[list[str], dict]:
    wanted = [x.strip() for x in spec.split(",") if x.strip()]
    for w in wanted:
        if w not in IMPLS and w not in SYSTEMS:
            raise SystemExit(f"--systems: unknown {w!r}; choose from {', '.join(IMPLS)} "
                             f"or {', '.join(SYSTEMS)}")
    systems, skipped = [], {}
    for s in SYSTEMS:
        if s not in wanted and s.split("/")[1] not in wanted:
            continue
        missing = [p for p in SYSTEMS[s] if importlib.util.find_spec(p) is None]
        if missing:
            skipped[s] = f"package {missing[0]!r} is not installed"
            print(f"note: skipping {s}: package {missing[0]!r} is not installed", file=sys.stderr)
            continue
        systems.append(s)
    return systems, skipped


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="skate's drop-in adapters (futures, multiprocessing, joblib) beside the "
                    "standard library, loky and Ray's adapters (medians over repeats).")
    parser.add_argument("--repeats", type=int, default=None,
                        help="fresh processes per system (default 5, or 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="one warm-up call, shorter measurement, 2 repeats (Ray's "
                             "systems 1), imap chunksize=1 over fewer items (under 2 minutes)")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help="run only the workloads whose names contain one of these "
                             "(e.g. 'futures', 'start-up', 'pool imap')")
    parser.add_argument("--systems", default=",".join(IMPLS),
                        help=f"comma-separated, from {','.join(IMPLS)} or systems such as "
                             f"pool/ray (default: all)")
    parser.add_argument("--json", metavar="PATH", help="write the raw results here")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table as Markdown (for docs/benchmarks.md)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--child-budget", help=argparse.SUPPRESS)
    parser.add_argument("--child-workloads", help=argparse.SUPPRESS)
    parser.add_argument("--child-params", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, json.loads(args.child_workloads),
                          Budget(**json.loads(args.child_budget)),
                          json.loads(args.child_params), args.child_out)

    mode = "quick" if args.quick else "full"
    budget = QUICK if args.quick else FULL
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    # Ray takes seconds to start and stop: --quick runs its systems in the first repeat only.
    ray_repeats = 1 if args.quick else repeats
    params = {"imap1_items": IMAP1_ITEMS[mode]}
    workloads = select_workloads(args.only)
    systems, skipped = select_systems(args.systems)
    per_system = {s: [w for w in workloads if adapter_of(w) == s.split("/")[0]] for s in systems}
    systems = [s for s in systems if per_system[s]]
    if not systems:
        raise SystemExit("no system to run")

    samples = {s: {} for s in systems}
    failed = {s: set() for s in systems}
    runs = {s: [] for s in systems}
    t_start = time.perf_counter()
    for r in range(repeats):
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        for s in order:
            if s.endswith("/ray") and r >= ray_repeats:
                continue
            run = run_child(__file__, ["--child", s, "--child-budget", json.dumps(asdict(budget)),
                                       "--child-workloads", json.dumps(per_system[s]),
                                       "--child-params", json.dumps(params)],
                            budget.child_timeout_s, s, tail_chars=12_000)
            got = set()
            for item in run["results"]:
                if item["error"]:
                    failed[s].update(m.key for m in WORKLOADS[item["workload"]])
                for name, value in item["metrics"].items():
                    samples[s].setdefault(name, []).append(value)
                got.add(item["workload"])
            for w in per_system[s]:  # the child died before it
                if w not in got:
                    failed[s].update(m.key for m in WORKLOADS[w])
            errors = [f"{i['workload']}: {i['error']}" for i in run["results"] if i["error"]]
            if run["error"]:
                missing = [w for w in per_system[s] if w not in got]
                errors.append((f"during {missing[0]!r}: " if missing else "") + run["error"])
            notes = {k: v for i in run["results"] for k, v in (i.get("notes") or {}).items()}
            runs[s].append({"repeat": r + 1, "seconds": round(run["seconds"], 2),
                            "workload seconds": {i["workload"]: i["seconds"]
                                                 for i in run["results"] if i["seconds"]},
                            "notes": notes, "errors": errors,
                            "leftover processes": run["leftover processes"]})
            note = f", {len(errors)} error(s)" if errors else ""
            if run["leftover processes"]:
                note += f", {len(run['leftover processes'])} leftover process(es)"
            print(f"[repeat {r + 1}/{repeats}] {s}: {run['seconds']:.1f} s{note}",
                  file=sys.stderr, flush=True)
            for e in errors:
                print("    " + e.replace("\n", "\n    "), file=sys.stderr)
    elapsed = time.perf_counter() - t_start

    medians = {s: {m: median(v) for m, v in samples[s].items()} for s in systems}
    versions = {p: package_version(p) for p in ("skate", "loky", "joblib", "ray", "numpy")}
    print()
    ray_note = (f" (Ray's: {ray_repeats})" if ray_repeats != repeats
                and any(s.endswith("/ray") for s in systems) else "")
    print(f"skate adapters benchmark: medians over {repeats} repeats{ray_note}, {WORKERS} workers "
          f"each, {os.cpu_count()} CPUs, {mode} budget, {elapsed:.0f} s in all")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
          + f", python {platform.python_version()}"
          + (f"; skipped: {skipped}" if skipped else ""))
    if "pool imap" in workloads and any(s.startswith("pool/") for s in systems):
        items = params["imap1_items"]
        print(f"imap with chunksize=1 runs over {items['stdlib']:,} items"
              + (f" (Ray: the first {items['ray']:,})" if "pool/ray" in systems else ""))
    print()
    counts = {s: {m: (len(samples[s].get(m, [])), len(runs[s])) for m in METRICS}
              for s in systems}
    print(table(medians, failed, counts, systems, workloads, markdown=args.markdown))
    short = sorted({f"{s}: {METRICS[m].label} ({got} of {n})" for s in systems
                    for m, (got, n) in counts[s].items() if 0 < got < n})
    if short:
        print("\n* the median of fewer repeats than ran; the others failed (errors above, "
              "and in --json): " + "; ".join(short))
    checks, notes = target_checks(medians)
    if checks:
        print()
        print(render_checks("targets (issue 4)", checks))
    for n in notes:
        print(f"  note: {n}")

    if args.json:
        record = {
            "command": [os.path.basename(sys.executable)] + sys.argv,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "versions": versions, "budget": asdict(budget), "params": params,
            "repeats": repeats, "ray repeats": ray_repeats, "workloads": workloads,
            "systems": systems, "skipped": skipped, "seconds": round(elapsed, 1),
            "metrics": {m.key: {"label": m.label, "unit": m.unit, "better": m.better}
                        for m in METRICS.values()},
            "samples": samples, "medians": medians, "runs": runs,
            "targets": [{"target": t, "measured": m, "verdict": v} for t, m, v in checks],
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"\nraw results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
