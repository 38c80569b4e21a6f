"""The process's connection to skate: start or join a cluster, and leave it.

Owns the one ``CoreWorker`` of this process. In a driver, ``init`` either starts the
embedded cluster (a node process hosting the GCS and a node manager, which forks the
zygote and the workers) or joins a running one; in a worker, ``attach_worker`` installs
the worker's core worker so the API works inside tasks.

::

    init()  --fork (or spawn python -m skate._private.node.main)--> node process
                                              (GCS + node manager + zygote)
            <--"ready" line on its stdout (spawned only: a forked node inherits
               its listening socket from the driver, which connects at once)--
            --connect node.sock, REGISTER--> driver core worker ready

Forking the node (``SKATE_NODE_START``, see config) skips a new interpreter and its
imports: the difference between a first result in ~0.2 s and in milliseconds, which is
what the standard library's fork pools take. It is used only when safe: on Linux, with
no other thread running in the driver (a lock held by one would stay held in the
child) and gRPC not loaded (its threads and state do not survive a fork).

The embedded cluster belongs to the driver that started it: it is gone after
``shutdown()``, after a normal exit (atexit) and after the driver is SIGKILLed (the node
manager sees its connection close and its pid vanish).

May call: worker.core_worker, config, ids, gcs.client (joining by address).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import select
import subprocess
import sys
import threading
import time

from skate import exceptions as exc_mod
from skate._private import ids as ids_mod
from skate._private.config import CONFIG
from skate._private.protocol import transport
from skate.object_ref import set_hooks

_lock = threading.RLock()
_core = None
_node_proc: subprocess.Popen | None = None
_info: dict = {}


def core():
    c = _core
    if c is None:
        raise exc_mod.RuntimeNotInitializedError("skate is not initialized: call skate.init() first")
    return c


def core_or_init():
    """The core worker, starting the embedded default first if needed (as Ray does)."""
    c = _core
    if c is None:
        init()
        c = _core
    return c


def is_initialized() -> bool:
    return _core is not None


def info() -> dict:
    return _info


def attach_worker(core_worker) -> None:
    global _core
    _core = core_worker
    set_hooks(core_worker)
    _info.update({"mode": "worker"})


@contextlib.contextmanager
def lending_cpu():
    """Inside a task: while the block waits on something other than ``skate.get`` or
    ``wait`` (a pool's results, a nested joblib call), the task's CPU is lent back to the
    node, as a get does, so nested work cannot starve its parents of CPUs. In a driver
    there is nothing to lend."""
    c = _core
    if c is None or c.is_driver:
        yield
        return
    c._set_blocked(True)
    try:
        yield
    finally:
        c._set_blocked(False)


def retire_worker_after_task() -> None:
    """Inside a task: this worker process exits once the task's result is sent, and a
    fresh one replaces it (how the adapters implement max_tasks_per_child)."""
    c = _core
    if c is None or c.executor is None or c.executor.actor is not None:
        raise RuntimeError("retire_worker_after_task() is for code running inside a task")
    c.executor.retire = True


def _latest_file() -> str:
    return os.path.join(CONFIG.temp_dir, "latest_cluster.json")


def _default_store_memory() -> int:
    try:
        st = os.statvfs("/dev/shm")
        shm_free = st.f_bavail * st.f_frsize
    except OSError:
        shm_free = 2 << 30
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = shm_free
    return int(max(64 << 20, min(total * CONFIG.object_store_fraction, shm_free * 0.9)))


def _check_resources(num_cpus, num_gpus, resources, object_store_memory) -> dict:
    for name, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus), ("object_store_memory", object_store_memory)):
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
            raise ValueError(f"init({name}={v!r}): expected a non-negative number")
    if resources is not None:
        if not isinstance(resources, dict):
            raise ValueError(f"init(resources={resources!r}): expected a dict of name -> amount")
        for k, v in resources.items():
            if k in ("CPU", "GPU"):
                raise ValueError(f"init(resources=...) got {k!r}: use num_cpus / num_gpus instead")
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"init(resources={{{k!r}: {v!r}}}): amounts must be non-negative numbers")
    res = {"CPU": float(os.cpu_count() or 1 if num_cpus is None else num_cpus),
           "GPU": float(num_gpus or 0)}
    res.update({k: float(v) for k, v in (resources or {}).items()})
    return res


def init(address=None, *, num_cpus=None, num_gpus=None, resources=None, object_store_memory=None,
         ignore_reinit_error=False, namespace=None, _keep_logs=None):
    global _core
    with _lock:
        if _core is not None:
            if ignore_reinit_error:
                return context_info()
            raise RuntimeError("skate.init() was called twice: call skate.shutdown() first, or "
                               "pass ignore_reinit_error=True")
        if address is None:
            address = os.environ.get("SKATE_ADDRESS") or None
        if address is None:
            res = _check_resources(num_cpus, num_gpus, resources, object_store_memory)
            _start_embedded(res, object_store_memory or _default_store_memory(),
                            CONFIG.keep_logs if _keep_logs is None else _keep_logs)
        else:
            if num_cpus is not None or num_gpus is not None or resources:
                raise ValueError("num_cpus/num_gpus/resources describe a new cluster: they cannot be "
                                 "given when connecting to an existing one (address=...)")
            _connect(address)
        _info["namespace"] = namespace or "default"
        atexit.register(shutdown)
        return context_info()


def context_info() -> dict:
    return {"address": _info.get("gcs_address"), "session_dir": _info.get("session_dir"),
            "node_id": _core.node_id.hex() if _core is not None and _core.node_id else None}


def _start_embedded(resources: dict, store_memory: int, keep_logs: bool) -> None:
    global _core, _node_proc
    from skate._private.worker.core_worker import CoreWorker, print_log_lines

    session = ids_mod.new_session_id()
    session_dir = os.path.join(CONFIG.temp_dir, f"session_{session}")
    os.makedirs(session_dir, mode=0o700, exist_ok=True)
    node_id = ids_mod.new_node_id()
    token = secrets.token_hex(16)
    opts = {"session": session, "session_dir": session_dir, "node_id": node_id.hex(),
            "resources": resources, "object_store_memory": int(store_memory), "head": True,
            "embedded": True, "driver_pid": os.getpid(), "token": token,
            "latest_file": _latest_file(), "keep_logs": keep_logs}
    if _fork_is_safe():
        # The node's socket is bound here and inherited: the driver connects while the
        # node starts (its REGISTER waits in the socket), instead of waiting for "ready".
        node_socket = os.path.join(session_dir, "node.sock")
        listener = transport.bind_unix(node_socket)
        try:
            proc = _fork_node(opts, listener)
        finally:
            listener.close()
    else:
        proc = subprocess.Popen([sys.executable, "-m", "skate._private.node.main", json.dumps(opts)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, close_fds=True)
        node_socket = _read_ready(proc)["node_socket"]
    _node_proc = proc
    job_id = secrets.token_hex(4)
    c = None
    try:
        c = CoreWorker(session=session, session_dir=session_dir, node_socket=node_socket,
                       is_driver=True, log_sink=print_log_lines, job_id=job_id, import_paths=_driver_paths())
        c.register({"embedded_owner": True}, timeout=CONFIG.node_start_timeout_s)
    except Exception as e:
        if c is not None:
            c.shutdown()
        _node_proc = None
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the skate node process did not start ({e}); its log is under "
                           f"{session_dir}/logs (kept with SKATE_KEEP_LOGS=1); SKATE_NODE_START=exec "
                           f"starts it as a fresh interpreter instead of a fork") from e
    _core = c
    set_hooks(c)
    _info.clear()
    _info.update({"mode": "driver", "session": session, "session_dir": session_dir, "token": token,
                  "node_pid": proc.pid, "embedded": True, "job_id": job_id})


def _fork_is_safe() -> bool:
    mode = CONFIG.node_start
    if mode not in ("auto", "fork", "exec"):
        raise ValueError(f"SKATE_NODE_START={mode!r} is not one of auto, fork, exec")
    if mode == "exec" or not hasattr(os, "fork"):
        return False
    if mode == "fork":
        return True
    return (sys.platform.startswith("linux") and threading.active_count() == 1
            and "grpc" not in sys.modules)


class _ForkedNode:
    """The node process forked from this driver, with the part of ``Popen``'s interface
    init and shutdown use."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:     # reaped by someone else (e.g. os.wait())
                self.returncode = 0
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"skate node {self.pid}", timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass


def _fork_node(opts: dict, listener) -> _ForkedNode:
    # Loaded here, once: a forked child pays for every page it touches first, so
    # importing in the driver (whose pages the node, zygote and workers then share) is
    # the cheaper place.
    from skate._private.node import log_monitor, node_manager, zygote  # noqa: F401
    from skate._private.object_store import store  # noqa: F401
    from skate._private.worker import main  # noqa: F401
    for stream in (sys.stdout, sys.stderr):   # or the child would write it out again
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or odd stream: nothing to repeat
            pass
    pid = os.fork()
    if pid == 0:
        from skate._private.node import main as node_main
        node_main.run_forked(opts, listener)     # never returns
        os._exit(1)
    return _ForkedNode(pid)


def forget_after_fork() -> None:
    """In a process forked from a driver: it is not that driver (no core worker, no node
    of its own), and the lock init held while forking is free."""
    global _lock, _core, _node_proc
    _lock = threading.RLock()
    _core = None
    _node_proc = None
    _info.clear()
    set_hooks(None)


def _driver_paths() -> list:
    """Where the driver's own modules come from: its script's directory and its working
    directory. Workers add them to sys.path, so tasks can import modules next to the
    script (what Ray's workers do too)."""
    paths = []
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if script:
        paths.append(os.path.dirname(os.path.abspath(script)))
    paths.append(os.getcwd())
    return [p for i, p in enumerate(paths) if p and p not in paths[:i]]


def _read_ready(proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + CONFIG.node_start_timeout_s
    buf = b""
    fd = proc.stdout.fileno()
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            raise RuntimeError(f"the skate node did not start within {CONFIG.node_start_timeout_s} s")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                code = proc.wait()
                raise RuntimeError(f"the skate node process exited at start-up (code {code}); "
                                   f"run it by hand to see why: {sys.executable} -m skate._private.node.main")
            buf += chunk
    proc.stdout.close()
    return json.loads(buf.split(b"\n", 1)[0])


def _connect(address: str) -> None:
    global _core
    from skate._private.gcs.client import GcsClient
    from skate._private.worker.core_worker import CoreWorker, print_log_lines

    token = os.environ.get("SKATE_TOKEN")
    latest = None
    try:
        with open(_latest_file()) as f:
            latest = json.load(f)
    except (OSError, ValueError):
        pass
    if address == "auto":
        if latest is None:
            raise ConnectionError("init(address='auto') found no running skate cluster on this machine; "
                                  "start one (skate.init() in another process, or `skate start --head`)")
        address = latest["gcs_address"]
    if token is None and latest is not None and latest.get("gcs_address") == address:
        token = latest.get("token")
    if token is None:
        try:
            with open(os.path.join(CONFIG.temp_dir, "clusters", address.replace(":", "_") + ".json")) as f:
                token = json.load(f).get("token")
        except (OSError, ValueError):
            pass
    if token is None:
        raise PermissionError(f"no token for the cluster at {address}: set SKATE_TOKEN to the token "
                              f"printed by `skate start --head`")
    gcs = GcsClient(address, token)
    nodes = [n for n in gcs.get_nodes() if n.get("state", "ALIVE") == "ALIVE"
             and os.path.exists(n.get("node_socket", ""))]
    if not nodes:
        raise ConnectionError(f"the cluster at {address} has no live node on this machine to connect through")
    node = nodes[0]
    job_id = secrets.token_hex(4)
    c = CoreWorker(session=node["session"], session_dir=node["session_dir"], node_socket=node["node_socket"],
                   is_driver=True, log_sink=print_log_lines, job_id=job_id, import_paths=_driver_paths())
    c.register()
    _core = c
    set_hooks(c)
    _info.clear()
    _info.update({"mode": "driver", "session": node["session"], "session_dir": node["session_dir"],
                  "gcs_address": address, "token": token, "embedded": False, "job_id": job_id})
    gcs.close()


def shutdown() -> None:
    global _core, _node_proc
    with _lock:
        c = _core
        if c is None or _info.get("mode") == "worker":
            return
        _core = None
        set_hooks(None)
        try:
            c.shutdown()
        finally:
            proc = _node_proc
            _node_proc = None
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            _info.clear()
