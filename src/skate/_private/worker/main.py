"""A worker process's entry point (runs in a child forked by the zygote).

Sends its output to ``<session>/logs/worker-<pid>.{out,err}`` (the node's log monitor
forwards it to the driver), starts a core worker in worker mode, registers with the node
manager as an idle worker, then runs the task executor on its main thread forever. It
exits when its node manager goes away.

May call: worker.core_worker, worker.executor, runtime (to make the API usable inside
tasks).
"""

from __future__ import annotations

import os
import sys

from skate._private import runtime
from skate._private.worker.core_worker import CoreWorker
from skate._private.worker.executor import TaskExecutor


def _redirect(log_dir: str) -> None:
    pid = os.getpid()
    for fd, ext in ((1, "out"), (2, "err")):
        f = os.open(os.path.join(log_dir, f"worker-{pid}.{ext}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")
    sys.stderr = open(2, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")


def run(args: dict) -> None:
    _redirect(args["log_dir"])
    core = CoreWorker(session=args["session"], session_dir=args["session_dir"],
                      node_socket=args["node_socket"], is_driver=False)
    executor = TaskExecutor(core)
    core.executor = executor
    runtime.attach_worker(core)
    core.register({"is_worker": True})
    executor.run_forever()
