"""The log monitor: worker output, as it happens, to the drivers' terminals.

Workers write stdout and stderr to files under ``<session>/logs/`` (kept there for later
reading). Before a task's first output the worker writes a marker line naming the task,
so the monitor can prefix each line the way Ray does: ``(double pid=1234) hello``.

A daemon thread polls the files (cheap: a stat per file per poll) and hands batches of
new lines to ``sink(lines)`` with ``lines = [(is_err, prefix, text), ...]``.

May call: nothing of skate but config.
"""

from __future__ import annotations

import os
import re
import threading

from skate._private.config import CONFIG

TASK_MARKER = "\x00skate-task:"
_NAME = re.compile(r"worker-(\d+)\.(out|err)$")


class _Tail:
    __slots__ = ("path", "pid", "is_err", "offset", "partial", "task")

    def __init__(self, path, pid, is_err):
        self.path = path
        self.pid = pid
        self.is_err = is_err
        self.offset = 0
        self.partial = b""
        self.task = None


class LogMonitor:
    def __init__(self, log_dir: str, sink):
        self.log_dir = log_dir
        self.sink = sink
        self._tails: dict[str, _Tail] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()  # poll() runs on the monitor thread and on request
        self._thread = threading.Thread(target=self._run, name="skate-logs", daemon=True)

    def start(self) -> "LogMonitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.poll()  # the last lines of the last tasks

    def _run(self) -> None:
        while not self._stop.wait(CONFIG.log_poll_s):
            try:
                self.poll()
            except Exception:
                pass

    def poll(self) -> None:
        with self._lock:
            self._poll()

    def _poll(self) -> None:
        try:
            names = os.listdir(self.log_dir)
        except FileNotFoundError:
            return
        lines = []
        for name in names:
            tail = self._tails.get(name)
            if tail is None:
                m = _NAME.match(name)
                if not m:
                    continue
                tail = self._tails[name] = _Tail(os.path.join(self.log_dir, name), int(m.group(1)),
                                                 m.group(2) == "err")
            try:
                size = os.stat(tail.path).st_size
            except FileNotFoundError:
                continue
            if size <= tail.offset:
                continue
            with open(tail.path, "rb") as f:
                f.seek(tail.offset)
                data = f.read(size - tail.offset)
            tail.offset += len(data)
            data = tail.partial + data
            *complete, tail.partial = data.split(b"\n")
            for raw in complete:
                text = raw.decode("utf-8", "replace")
                if text.startswith(TASK_MARKER):
                    tail.task = text[len(TASK_MARKER):]
                    continue
                prefix = f"({tail.task} pid={tail.pid})" if tail.task else f"(pid={tail.pid})"
                lines.append((tail.is_err, prefix, text))
        if lines:
            self.sink(lines)
