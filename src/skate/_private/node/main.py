"""The node process: hosts a node manager, and on the head node the GCS too.

Start-up order matters for the time to the first result:

1. fork the zygote before any thread exists (it then forks the first workers while
   this process goes on);
2. listen on the node socket and print one JSON line on stdout ("ready"), so the driver
   can connect and ask for leases at once;
3. only then import gRPC, start the GCS (head) and register with it, off the critical
   path.

Run as ``python -m skate._private.node.main '<json options>'``. Embedded (started by
``skate.init()``), it exits when its last driver disconnects or dies, removing its
processes, shared-memory segments and (unless asked to keep them) its session directory.

May call: node.node_manager, node.zygote, node.log_monitor, object_store.store, gcs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading


def _worker_env() -> None:
    # One thread per worker in the common numeric libraries, as Ray does: a worker is
    # leased one CPU, and N workers each spinning N BLAS threads oversubscribe the node.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def main(opts: dict, listener=None) -> int:
    """Runs the node until it shuts down. Started by a driver's fork, it gets the
    listening socket the driver bound (which is connecting already); spawned, it prints
    the "ready" line once it listens."""
    session = opts["session"]
    session_dir = opts["session_dir"]
    log_dir = os.path.join(session_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    # Ctrl-C in the driver's terminal reaches this process group too; the driver decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_env()
    node_socket = os.path.join(session_dir, "node.sock")

    from skate._private.node import zygote
    from skate._private.object_store import shm
    zygote.name_process("skate:node")
    session_lock = shm.hold_session_lock(session)  # noqa: F841 - held for life (and by children)
    zyg = zygote.start({
        "session": session,
        "session_dir": session_dir,
        "log_dir": log_dir,
        "node_socket": node_socket,
        "node_id": bytes.fromhex(opts["node_id"]),
    })
    # The first workers start now, while this process sets up: they connect when the
    # node listens (at once when the driver bound the socket).
    from skate._private.node.node_manager import pool_size
    first_workers = pool_size(opts["resources"])
    zyg.spawn(first_workers)

    from skate._private.ids import new_node_id  # noqa: F401 (import order: after fork)
    from skate._private.node.log_monitor import LogMonitor
    from skate._private.node.node_manager import NodeManager
    from skate._private.object_store.store import ObjectStore
    from skate._private.protocol.transport import EventLoop

    done = threading.Event()
    loop = EventLoop("skate-node-io")
    store = ObjectStore(session, int(opts["object_store_memory"]), os.path.join(session_dir, "spill"))
    nm = NodeManager(loop, node_id=bytes.fromhex(opts["node_id"]), session=session,
                     session_dir=session_dir, resources=opts["resources"], store=store,
                     zygote=zyg, embedded=opts.get("embedded", True), on_shutdown=done.set,
                     owner_pid=opts.get("driver_pid"))
    nm.token = opts["token"]
    nm.start(listener, starting=first_workers)
    loop.start()

    if listener is None:   # ready: the driver may connect now
        sys.stdout.write(json.dumps({"ready": True, "node_socket": node_socket, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
    _redirect_output(os.path.join(log_dir, "node.out"))

    try:  # segments of sessions whose processes were all SIGKILLed
        shm.reap_orphans()
    except Exception:
        pass
    monitor = LogMonitor(log_dir, lambda lines: loop.call_soon(nm.forward_logs, lines)).start()
    nm.log_monitor = monitor

    gcs_server = None
    if opts.get("head"):
        gcs_server = _start_gcs(opts, nm, loop)

    driver_pid = opts.get("driver_pid")
    while not done.wait(0.5):
        if driver_pid and not _alive(driver_pid):
            # The driver died before (or without) closing its connection.
            loop.call_soon(nm.shutdown)
    monitor.stop()
    loop.stop()
    if gcs_server is not None:
        gcs_server.stop(grace=0)
    if opts.get("head") and opts.get("latest_file"):
        _forget_cluster_files(opts["latest_file"], session)
    if not opts.get("keep_logs"):
        shutil.rmtree(session_dir, ignore_errors=True)
    try:
        os.unlink(session_lock.name)
    except OSError:
        pass
    return 0


def run_forked(opts: dict, listener) -> None:
    """The node process forked from a driver (``SKATE_NODE_START=fork``): leaves the
    driver's life behind (its exit handlers, signal handlers, log handlers, pending
    output), runs the node, and exits without returning to the driver's code."""
    import atexit
    import gc
    code = 1
    try:
        atexit._clear()
        threading._threading_atexits.clear()   # noqa: SLF001 - e.g. futures' exit hook
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        if "logging" in sys.modules:      # the driver's handlers (its files) are not ours
            import logging
            logging.root.handlers = []
        from skate._private import runtime
        runtime.forget_after_fork()
        from skate._private.testing import faults
        faults.take_role("node")
        # The driver's objects stay shared copy-on-write: a full collection here (and in
        # the zygote and workers, which inherit this) must not touch them.
        gc.freeze()
        code = main(opts, listener)
    except BaseException:  # noqa: BLE001
        import traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os._exit(code)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _redirect_output(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")
    sys.stderr = open(2, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")


def _start_gcs(opts, nm, loop):
    """Starts the GCS in this process and registers the node with it (off the hot path)."""
    from skate._private.gcs.client import GcsClient
    from skate._private.gcs.server import GcsServer

    server = GcsServer(host=opts.get("gcs_host", "127.0.0.1"), port=int(opts.get("gcs_port", 0)),
                       token=opts["token"], storage=opts.get("gcs_storage"))
    port = server.start()
    address = f"{opts.get('gcs_host', '127.0.0.1')}:{port}"
    client = GcsClient(address, opts["token"])
    info = {
        "node_id": bytes.fromhex(opts["node_id"]),
        "address": "127.0.0.1",
        "node_socket": nm.socket_path,
        "session": nm.session,
        "session_dir": nm.session_dir,
        "resources": dict(nm.total),
        "pid": os.getpid(),
        "is_head": True,
    }
    client.register_node(info)

    reporter = ActorReporter(client)

    def set_address():
        # On the I/O thread, so no actor is created between the catch-up and the switch.
        nm.actors.start_reporting(reporter.report)
        nm.gcs_address = address
    loop.call_soon(set_address)
    if opts.get("latest_file"):
        record = {"gcs_address": address, "session": nm.session, "session_dir": nm.session_dir,
                  "pid": os.getpid(), "token": opts["token"]}
        _write_latest(opts["latest_file"], record)
        # Per cluster too, so a driver joining by address finds the token even after
        # another cluster became the latest.
        _write_latest(_cluster_file(opts["latest_file"], address), record)

    def heartbeat():
        while True:
            try:
                if not client.heartbeat(info["node_id"], dict(nm.available), {"pending": len(nm.pending)}):
                    client.register_node(info)
            except Exception:
                pass
            if nm.shutting_down:
                return
            threading.Event().wait(1.0)
    threading.Thread(target=heartbeat, name="skate-heartbeat", daemon=True).start()
    return server


class ActorReporter:
    """Writes actor state changes to the GCS actor table, off the node's I/O thread."""

    def __init__(self, client):
        import queue
        self.client = client
        self.queue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="skate-actor-report", daemon=True).start()

    def report(self, record: dict) -> None:
        self.queue.put(record)

    def _run(self) -> None:
        from skate._private import actor_table
        while True:
            record = self.queue.get()
            try:
                actor_table.write(self.client, record)
            except Exception:
                pass


def _cluster_file(latest_file: str, address: str) -> str:
    d = os.path.join(os.path.dirname(latest_file), "clusters")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return os.path.join(d, address.replace(":", "_") + ".json")


def _write_latest(path: str, data: dict) -> None:
    tmp = path + f".{os.getpid()}"
    # The file holds the cluster token: readable by this user only.
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _forget_cluster_files(latest_file: str, session: str) -> None:
    """Removes this session's entries: the latest-cluster file and its per-address file."""
    _forget_latest(latest_file, session)
    clusters = os.path.join(os.path.dirname(latest_file), "clusters")
    try:
        names = os.listdir(clusters)
    except OSError:
        return
    for name in names:
        _forget_latest(os.path.join(clusters, name), session)


def _forget_latest(path: str, session: str) -> None:
    try:
        with open(path) as f:
            if json.load(f).get("session") == session:
                os.unlink(path)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
