"""The kill injector: SIGKILLs worker and actor processes at chosen moments of chosen tasks.

Tasks cooperate: code running in a worker calls
``skate._private.testing.faults.kill_point(label, phase)`` at the moments worth dying in
(the ``SKATE_FAULTS`` of the cluster names this injector's socket), and blocks until the
injector answers. The injector, a thread in the test process, counts how often each
``(label, phase)`` was reached and, when the schedule names that occurrence, SIGKILLs
the reporting process instead of answering — from outside, as a crash or the OOM killer
would. Phases (see ``task_programs.py`` and ``faults.py``):

=========  ==================================================================
``fetch``  while the task's arguments are fetched and deserialized
``run``    in the task's body
``return`` while a return value is serialized
``seal``   a result written into shared memory, not sealed yet
``reply``  the result stored, ``TASK_DONE`` not sent yet
=========  ==================================================================

The schedule is data (``{(label, phase): {occurrence, ...}}``), part of the program a
test draws, so a failing example prints it and re-running the example replays it. The
history (every report, and what was done) is what a failing check prints.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

PHASES = ("fetch", "run", "return", "seal", "reply")


class KillInjector:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self.schedule: dict[tuple, set] = {}
        self.seen: dict[tuple, int] = {}
        self.history: list[tuple] = []     # (t, label, phase, occurrence, pid, action)
        self.kills = 0                     # since the schedule was set
        self.total_kills = 0
        self._t0 = time.monotonic()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(64)
        self._closed = False
        threading.Thread(target=self._accept, name="kill-injector", daemon=True).start()

    # --- the test's side ----------------------------------------------------------------
    def set_schedule(self, schedule: dict) -> None:
        """Arms ``{(label, phase): {occurrence, ...}}`` (1-based) and forgets the past."""
        with self._lock:
            self.schedule = {k: set(v) for k, v in schedule.items()}
            self.seen = {}
            self.history = []
            self.kills = 0
            self._t0 = time.monotonic()

    def describe(self) -> str:
        with self._lock:
            lines = [f"kill schedule: {sorted((k[0], k[1], sorted(v)) for k, v in self.schedule.items())}",
                     f"kills done: {self.kills}"]
            lines += [f"  {t:7.3f}s {label} {phase}#{n} pid {pid}: {action}"
                      for t, label, phase, n, pid, action in self.history[-200:]]
        return "\n".join(lines)

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # --- the workers' side ------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="kill-injector-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    report = json.loads(line)
                    if self._decide(report["label"], report["phase"], report["pid"]):
                        return     # killed: its connection dies with it
                    try:
                        conn.sendall(b"go\n")
                    except OSError:
                        return

    def _decide(self, label: str, phase: str, pid: int) -> bool:
        with self._lock:
            key = (label, phase)
            n = self.seen.get(key, 0) + 1
            self.seen[key] = n
            kill = n in self.schedule.get(key, ())
            self.history.append((time.monotonic() - self._t0, label, phase, n, pid,
                                 "SIGKILL" if kill else "go"))
            if kill:
                self.kills += 1
                self.total_kills += 1
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return kill
