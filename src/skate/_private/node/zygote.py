"""The zygote: a preloaded process that forks workers in milliseconds.

The node process forks the zygote first thing, before it starts any thread (forking a
process with threads is unsafe). The zygote imports the worker's modules once, then waits
on a socketpair for commands; each ``spawn`` forks a worker that starts with everything
already imported, so a new worker costs a fork, not an interpreter start.

::

    node manager --"spawn"--> zygote --fork()--> worker (worker.main.run)
                 <--"exit pid status"--  (the zygote reaps its children)

The zygote may call only ``worker.main`` (in the forked child). It exits when the node
process closes the socketpair, killing the workers it started.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

_CMD = struct.Struct("<I")


def name_process(name: str) -> None:
    """Sets this process's name as ``ps``, ``top`` and ``psutil`` show it (Linux, 15
    characters): ``skate:node``, ``skate:zygote``, ``skate:worker``. A node forked from
    its driver keeps the driver's command line; the name tells them apart."""
    try:
        with open("/proc/self/comm", "w") as f:    # prctl(PR_SET_NAME), without ctypes
            f.write(name[:15])
    except OSError:  # cosmetic: not on this platform
        pass


class ZygoteHandle:
    """The node manager's side: ask for workers, learn of their exits."""

    def __init__(self, sock: socket.socket, pid: int):
        self.sock = sock
        self.pid = pid

    def spawn(self, count: int = 1) -> None:
        self.sock.sendall(_CMD.pack(count))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def start(worker_args: dict) -> ZygoteHandle:
    """Forks the zygote. Call before the calling process starts any thread."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the zygote
        parent_sock.close()
        try:
            _serve(child_sock, worker_args)
        finally:
            os._exit(0)
    child_sock.close()
    return ZygoteHandle(parent_sock, pid)


def _serve(sock: socket.socket, worker_args: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the driver's terminal
    name_process("skate:zygote")
    # Preload what every worker needs, so that forked workers start warm.
    from skate._private.worker import main as worker_main  # noqa: F401
    children: set[int] = set()

    def reap(*_):
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)

    signal.signal(signal.SIGCHLD, reap)
    preloaded_extra = False
    buf = b""
    while True:
        try:
            data = sock.recv(4096)
        except InterruptedError:
            continue
        if not data:
            break
        buf += data
        while len(buf) >= 4:
            (count,) = _CMD.unpack_from(buf)
            buf = buf[4:]
            for _ in range(count):
                pid = os.fork()
                if pid == 0:
                    sock.close()
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    name_process("skate:worker")
                    code = 0
                    try:
                        worker_main.run(worker_args)
                    except BaseException:
                        import traceback
                        traceback.print_exc()
                        code = 1
                    finally:
                        try:
                            sys.stdout.flush()
                            sys.stderr.flush()
                        except Exception:
                            pass
                        os._exit(code)
                children.add(pid)
        if not preloaded_extra:
            # After the first workers are out, warm up modules tasks commonly use, so
            # that later workers do not each pay for them.
            preloaded_extra = True
            for name in ("numpy",):
                try:
                    __import__(name)
                except Exception:
                    pass
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    reap()
