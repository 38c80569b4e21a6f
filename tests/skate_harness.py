"""What the runtime tests share: finding skate's processes and segments, and drivers in subprocesses.

A skate process is either one whose command line contains ``skate._private`` (a node
process started as ``python -m skate._private.node.main '<json options>'``, and the zygote
and workers it forks, which keep that command line: the JSON options name the session, its
directory and the driver's pid), or one named ``skate:node``, ``skate:zygote`` or
``skate:worker`` (a node forked from its driver keeps the driver's command line): its
session is the session lock it holds open (``<lock dir>/<session>``), its session
directory the one its log files are in, its driver the first ancestor not named
``skate:``. That is how a process is attributed to the cluster that made it.

A shared-memory segment is ``/dev/shm/skate-{session}-{object id hex}``.

Other suites may run skate clusters on this machine at the same time, so the leak checks
here look at what *these* tests made (the private temp dir, the sessions and driver pids
noted), never at everything named ``skate-``.

This module is imported by the tests only, never by code that runs inside a task.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field

import psutil

SHM_DIR = "/dev/shm"
SEG_PREFIX = "skate-"


@dataclass
class SkateProcess:
    pid: int
    session: str | None
    session_dir: str | None
    driver_pid: int | None
    cmdline: str

    def __str__(self) -> str:
        return f"pid {self.pid} (session {self.session}, driver {self.driver_pid}): {self.cmdline[:160]}"


def _forked_skate_process(p: psutil.Process, cmdline: str) -> SkateProcess:
    from skate._private.object_store.shm import LOCK_DIR
    session = session_dir = driver = None
    for f in p.open_files():
        if os.path.dirname(f.path) == LOCK_DIR:
            session = os.path.basename(f.path)
    if session is not None:
        for f in p.open_files():
            marker = f"/session_{session}/"
            if marker in f.path:
                session_dir = f.path[:f.path.index(marker) + len(marker) - 1]
    try:
        for parent in p.parents():
            if not parent.name().startswith("skate:"):
                driver = parent.pid
                break
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return SkateProcess(p.pid, session, session_dir, driver, f"[{p.info['name']}] {cmdline}")


def skate_processes() -> list[SkateProcess]:
    """Every live (not zombie) process on the machine running skate's runtime, but this one."""
    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status", "name"]):
        try:
            info = p.info
            if info["pid"] == me or info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = info["cmdline"] or []
            if (info["name"] or "").startswith("skate:"):
                found.append(_forked_skate_process(p, " ".join(cmd)))
                continue
            if not any("skate._private" in c for c in cmd):
                continue
            opts = {}
            for c in cmd:
                if c.startswith("{"):
                    try:
                        opts = json.loads(c)
                    except ValueError:
                        pass
            found.append(SkateProcess(info["pid"], opts.get("session"), opts.get("session_dir"),
                                      opts.get("driver_pid"), " ".join(cmd)))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def shm_segments() -> list[str]:
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(SEG_PREFIX))
    except FileNotFoundError:
        return []


def segment_session(name: str) -> str:
    return name[len(SEG_PREFIX):].rsplit("-", 1)[0]


def segment_path(session: str, ref) -> str:
    """Where the shared-memory segment of ``ref`` lives if the object is in the store."""
    return os.path.join(SHM_DIR, f"{SEG_PREFIX}{session}-{ref.hex()}")


def session_segments(session: str) -> list[str]:
    return [n for n in shm_segments() if segment_session(n) == session]


def session_shm_bytes(session: str) -> int:
    total = 0
    for n in session_segments(session):
        try:
            total += os.stat(os.path.join(SHM_DIR, n)).st_size
        except FileNotFoundError:
            pass
    return total


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Polls ``predicate`` until it is true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


@dataclass
class LeakTracker:
    """Remembers which clusters these tests made, and checks that nothing of them remains."""

    temp_dir: str
    baseline_segments: set = field(default_factory=lambda: set(shm_segments()))
    sessions: set = field(default_factory=set)
    driver_pids: set = field(default_factory=lambda: {os.getpid()})

    def note_session(self, session: str | None) -> None:
        if session:
            self.sessions.add(session)

    def note_driver(self, pid: int) -> None:
        self.driver_pids.add(pid)

    def _ours(self, p: SkateProcess) -> bool:
        return ((p.session_dir or "").startswith(self.temp_dir) or p.session in self.sessions
                or p.driver_pid in self.driver_pids)

    def leaks(self, sessions=None) -> tuple[list[SkateProcess], list[str]]:
        procs = skate_processes()
        if sessions is not None:
            mine = [p for p in procs if p.session in sessions]
            segs = [s for s in shm_segments() if segment_session(s) in sessions]
            return mine, segs
        mine = [p for p in procs if self._ours(p)]
        live_foreign = {p.session for p in procs if not self._ours(p)}
        known = self.sessions | {p.session for p in mine}
        segs = []
        for s in shm_segments():
            sess = segment_session(s)
            if sess in known:
                segs.append(s)
            elif (s not in self.baseline_segments and sess not in live_foreign
                  and not sess.startswith("test")):  # test_object_store.py's own sessions
                segs.append(s)
        return mine, segs

    def assert_clean(self, what: str, sessions=None, timeout: float = 5.0) -> None:
        """Fails unless, within ``timeout``, no process and no segment of ours remains.

        What is found is removed before failing, so one leak does not fail later tests.
        """
        wait_for(lambda: not any(self.leaks(sessions)), timeout)
        procs, segs = self.leaks(sessions)
        if not procs and not segs:
            return
        for p in procs:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for s in segs:
            try:
                os.unlink(os.path.join(SHM_DIR, s))
            except FileNotFoundError:
                pass
        lines = [f"skate left things behind {what} (waited {timeout} s):"]
        lines += [f"  process {p}" for p in procs]
        lines += [f"  segment /dev/shm/{s}" for s in segs]
        raise AssertionError("\n".join(lines))


def write_script(directory, name: str, source: str) -> str:
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(source))
    return path


def run_driver(directory, source: str, timeout: float = 60.0, name: str = "driver.py") -> subprocess.CompletedProcess:
    """Runs ``source`` as a driver program in a fresh Python process and returns its outcome."""
    path = write_script(directory, name, source)
    return subprocess.run([sys.executable, path], cwd=str(directory), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


def mapping_of(address: int) -> str | None:
    """The file mapped at ``address`` in this process (from /proc/self/maps), or None.

    Shared-memory segments show as ``/dev/shm/<name>``, with `` (deleted)`` once unlinked.
    A value copied onto the heap shows as no file at all (or ``[heap]``).
    """
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= address < end:
                return parts[5].strip() if len(parts) > 5 else ""
    return None
