"""Helpers shared by the benchmark scripts (``microbenchmark.py``, ``adapters.py``).

What is here: the time budget of a workload and the loop that spends it
(``Budget``, ``timed_calls``); running one fresh child process with a time limit and
collecting its JSON lines and leftover processes (``run_child``); medians and number
formatting; the plain-text / Markdown table (``render_table``).

Only the standard library is imported at module level (``psutil`` inside functions), so
a benchmark child that imports this module has not yet imported any system it measures:
its import and start-up times stay its own.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """How long each workload warms up and is measured, in one child."""
    warmup_s: float
    measure_s: float
    min_calls: int
    child_timeout_s: float


def timed_calls(fn, budget: Budget) -> tuple[int, float]:
    """Warms ``fn`` up, then calls it until the budget is spent; returns (calls, seconds)."""
    start = time.perf_counter()
    while True:  # at least one warm-up call, however small the budget
        fn()
        if time.perf_counter() - start >= budget.warmup_s:
            break
    gc.collect()
    calls = 0
    start = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget.measure_s and calls >= budget.min_calls:
            return calls, elapsed


# --------------------------------------------------------------------------------------
# Parent side: one child process per (system, repeat).
# --------------------------------------------------------------------------------------

def session_processes(sid: int):
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return found


def run_child(script: str, args: list[str], timeout_s: float, label: str,
              tail_chars: int = 3000) -> dict:
    """Runs ``python script *args --child-out PATH`` in its own session, with a time limit.

    The child writes one JSON object per line to PATH. Returns its results, error (if
    any, with the last ``tail_chars`` of its output), seconds and the names of the
    processes it left behind in its session (which are then killed).
    """
    import psutil

    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in label)
    fd, out_path = tempfile.mkstemp(prefix=f"skate-bench-{safe}-", suffix=".jsonl")
    os.close(fd)
    log = tempfile.TemporaryFile(mode="w+")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.abspath(script), *args, "--child-out", out_path]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    error = None
    try:
        proc.wait(timeout=timeout_s)
        if proc.returncode != 0:
            error = f"child exited with status {proc.returncode}"
    except subprocess.TimeoutExpired:
        error = f"child timed out after {timeout_s:.0f} s"
        for p in [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()
    seconds = time.perf_counter() - started

    # What the child's runtime left running in the child's session: give it a moment
    # to finish its own clean-up, then count and end what remains.
    deadline = time.monotonic() + 5.0
    leftovers = session_processes(proc.pid)
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = session_processes(proc.pid)
    leftover_names = []
    for p in leftovers:
        try:
            leftover_names.append(p.name())
            p.kill()
        except psutil.NoSuchProcess:
            pass

    results = []
    with open(out_path) as f:
        for line in f:
            if line.strip():
                results.append(json.loads(line))
    os.unlink(out_path)
    if error:
        log.seek(0)
        tail = log.read()[-tail_chars:]
        error = f"{error}; output ends with:\n{tail}"
    log.close()
    return {"results": results, "error": error, "seconds": seconds,
            "leftover processes": leftover_names}


# --------------------------------------------------------------------------------------
# Figures and tables.
# --------------------------------------------------------------------------------------

def median(values):
    return statistics.median(values) if values else None


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def fmt_ratio(a, b) -> str:
    if a is None or b is None or b == 0 or isinstance(a, str) or isinstance(b, str):
        return "-"
    return f"{a / b:.2f}x"


def render_table(headers: list[str], rows: list[list[str]], markdown: bool = False,
                 left: int = 3) -> str:
    """Columns padded to width; the first ``left`` columns left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in rows + [headers]) for i in range(len(headers))]

    def line(r):
        cells = [c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(r)]
        return "| " + " | ".join(cells) + " |" if markdown else "  ".join(cells)
    if markdown:
        rule = "|" + "|".join("-" * (w + 1) + ("-" if i < left else ":")
                              for i, w in enumerate(widths)) + "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def render_checks(title: str, checks: list[tuple[str, str, str]]) -> str:
    """(target, measured, verdict) triples as an indented block under ``title``."""
    w0 = max(len(c[0]) for c in checks)
    w1 = max(len(c[1]) for c in checks)
    return "\n".join([title] + [f"  {t.ljust(w0)}  {m.ljust(w1)}  {v}" for t, m, v in checks])


def package_version(name):
    if name is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
