"""The embedded cluster: starting, joining, describing and leaving it, and what it leaves behind.

What these tests promise:

- ``init`` starts a cluster of one node with the resources it is given; ``is_initialized``
  says whether this process is connected; ``init`` twice is a ``RuntimeError`` unless
  ``ignore_reinit_error=True``; calls that need a cluster fail clearly before ``init``.
- ``get_runtime_context()`` names the job, task, node and worker, and the GCS address;
  ``cluster_resources()``, ``available_resources()`` and ``nodes()`` describe the cluster.
- A second driver process joins with ``init(address=<gcs_address>)`` or
  ``init(address="auto")``, runs tasks, and leaves the cluster up for its first driver.
- What a task prints appears in the driver's output as it runs, each line prefixed with
  ``(<function name> pid=<worker pid>)``.
- After ``shutdown()``, after a driver exits without calling it, and after a driver is
  killed with SIGKILL, no skate process, no shared-memory segment and no session directory
  remain.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import skate
from skate.exceptions import InfeasibleTaskError, RuntimeNotInitializedError
from skate._private import runtime
from skate_harness import (describe, run_driver, segment_path, skate_processes, wait_for,
                           write_script)

pytestmark = pytest.mark.timeout(120)

GET_TIMEOUT = 60
HEX = re.compile(r"^[0-9a-f]+$")


@skate.remote
def double(x):
    return 2 * x


@skate.remote
def wait_for_file(path, result=None):
    while not os.path.exists(path):
        time.sleep(0.01)
    return result


def touch(path):
    with open(path, "w"):
        pass


# --- init / shutdown ------------------------------------------------------------------------

def test_is_initialized_follows_init_and_shutdown(no_cluster, leak_tracker):
    assert skate.is_initialized() is False
    info = skate.init(num_cpus=1)
    leak_tracker.note_session(runtime.info().get("session"))
    assert skate.is_initialized() is True
    assert skate.get(double.remote(1), timeout=GET_TIMEOUT) == 2
    assert info["node_id"] == skate.get_runtime_context().get_node_id()
    skate.shutdown()
    assert skate.is_initialized() is False
    skate.shutdown()                  # a second shutdown is harmless
    assert skate.is_initialized() is False


def test_calls_that_need_a_cluster_fail_clearly_before_init(no_cluster):
    ref = skate.ObjectRef(b"\x00" * 20, (b"\x00" * 8, "/nonexistent.sock"))
    for call in (lambda: skate.get(ref), lambda: skate.wait([ref]), lambda: skate.cancel(ref),
                 skate.get_runtime_context, skate.cluster_resources):
        with pytest.raises(RuntimeNotInitializedError) as info:
            call()
        assert isinstance(info.value, RuntimeError)
        assert "skate.init()" in str(info.value)


def test_remote_starts_the_embedded_cluster_when_none_is_up(no_cluster, leak_tracker):
    ref = double.remote(5)               # as in Ray: the first task starts the default cluster
    leak_tracker.note_session(runtime.info().get("session"))
    assert skate.is_initialized()
    assert skate.get(ref, timeout=GET_TIMEOUT) == 10


def test_init_twice_is_a_runtime_error_unless_ignore_reinit_error(skate_cluster):
    with pytest.raises(RuntimeError) as info:
        skate.init(num_cpus=2)
    assert "ignore_reinit_error" in str(info.value)
    skate.init(num_cpus=2, ignore_reinit_error=True)
    # Still the same cluster, still working.
    assert runtime.info()["session"] == skate_cluster.session
    assert skate.get(double.remote(2), timeout=GET_TIMEOUT) == 4


@pytest.mark.parametrize("kwargs", [
    {"num_cpus": -1},
    {"num_gpus": -1},
    {"object_store_memory": -5},
    {"resources": {"CPU": 4}},
    {"resources": {"widget": -1}},
    {"resources": ["widget"]},
], ids=lambda k: "-".join(f"{a}={b!r}" for a, b in k.items()))
def test_init_with_invalid_resources_is_a_value_error_and_starts_nothing(no_cluster, kwargs):
    with pytest.raises(ValueError):
        skate.init(**kwargs)
    assert not skate.is_initialized()


def test_init_with_an_address_refuses_resources(no_cluster):
    with pytest.raises(ValueError):
        skate.init(address="127.0.0.1:1", num_cpus=2)
    assert not skate.is_initialized()


def test_init_auto_without_a_running_cluster_is_a_connection_error(no_cluster):
    with pytest.raises(ConnectionError):
        skate.init(address="auto")
    assert not skate.is_initialized()


def test_init_records_the_namespace(start_cluster):
    start_cluster(num_cpus=1, namespace="team-a")
    assert skate.get_runtime_context().namespace == "team-a"


# --- describing the cluster ------------------------------------------------------------------

def test_runtime_context_in_the_driver(skate_cluster):
    ctx = skate.get_runtime_context()
    assert isinstance(ctx.get_job_id(), str) and HEX.match(ctx.get_job_id())
    assert HEX.match(ctx.get_node_id())
    assert HEX.match(ctx.get_worker_id())
    assert (ctx.job_id, ctx.node_id, ctx.worker_id) == (ctx.get_job_id(), ctx.get_node_id(), ctx.get_worker_id())
    host, port = ctx.gcs_address.rsplit(":", 1)
    assert host and int(port) > 0


@skate.remote
def context_in_task():
    ctx = skate.get_runtime_context()
    return {"job": ctx.get_job_id(), "task": ctx.get_task_id(), "node": ctx.get_node_id(),
            "worker": ctx.get_worker_id(), "gcs": ctx.gcs_address, "pid": os.getpid()}


def test_runtime_context_in_a_task_names_the_task_its_worker_and_the_drivers_node(skate_cluster):
    driver = skate.get_runtime_context()
    first, second = skate.get([context_in_task.remote(), context_in_task.remote()], timeout=GET_TIMEOUT)
    for seen in (first, second):
        assert seen["node"] == driver.get_node_id()
        assert seen["worker"] != driver.get_worker_id()
        assert HEX.match(seen["worker"])
        assert seen["task"] and HEX.match(seen["task"])
        assert seen["gcs"] == driver.gcs_address
    assert first["task"] != second["task"]
    if first["pid"] != second["pid"]:
        assert first["worker"] != second["worker"]


def test_runtime_context_in_a_task_names_the_drivers_job(skate_cluster):
    driver_job = skate.get_runtime_context().get_job_id()
    assert skate.get(context_in_task.remote(), timeout=GET_TIMEOUT)["job"] == driver_job


def test_cluster_and_available_resources_and_nodes(skate_cluster, tmp_path):
    assert skate.cluster_resources() == {"CPU": 2.0}
    assert wait_for(lambda: skate.available_resources() == {"CPU": 2.0}, timeout=10)
    release = str(tmp_path / "release")
    running = wait_for_file.remote(release, "done")
    assert wait_for(lambda: skate.available_resources().get("CPU") == 1.0, timeout=GET_TIMEOUT)
    assert skate.cluster_resources() == {"CPU": 2.0}     # the total does not change
    touch(release)
    assert skate.get(running, timeout=GET_TIMEOUT) == "done"
    assert wait_for(lambda: skate.available_resources() == {"CPU": 2.0}, timeout=10)

    (node,) = skate.nodes()
    assert node["NodeID"] == skate.get_runtime_context().get_node_id()
    assert node["Alive"] is True
    assert node["Resources"] == {"CPU": 2.0}
    assert node["ObjectStoreCapacity"] > 0
    assert node["SessionDir"] == skate_cluster.session_dir


def test_a_cluster_with_gpus_and_custom_resources_runs_tasks_that_ask_for_them(start_cluster, tmp_path):
    start_cluster(num_cpus=2, num_gpus=1, resources={"widget": 2})
    assert skate.cluster_resources() == {"CPU": 2.0, "GPU": 1.0, "widget": 2.0}
    assert skate.get(double.options(resources={"widget": 1}).remote(3), timeout=GET_TIMEOUT) == 6
    assert skate.get(double.options(num_gpus=1).remote(4), timeout=GET_TIMEOUT) == 8

    release = str(tmp_path / "release")
    holder = wait_for_file.options(resources={"widget": 2}).remote(release, "held")
    assert wait_for(lambda: "widget" not in skate.available_resources(), timeout=GET_TIMEOUT)
    touch(release)
    assert skate.get(holder, timeout=GET_TIMEOUT) == "held"

    with pytest.raises(InfeasibleTaskError):
        skate.get(double.options(resources={"widget": 3}).remote(1), timeout=GET_TIMEOUT)
    assert skate.get(double.remote(5), timeout=GET_TIMEOUT) == 10


@skate.remote
def nested_chain(depth):
    if depth == 0:
        return "bottom"
    return skate.get(nested_chain.remote(depth - 1))


def test_nested_tasks_do_not_deadlock_a_one_cpu_cluster(start_cluster):
    start_cluster(num_cpus=1)
    assert skate.cluster_resources() == {"CPU": 1.0}
    assert skate.get(nested_chain.remote(10), timeout=GET_TIMEOUT) == "bottom"
    assert skate.get([double.remote(i) for i in range(100)], timeout=GET_TIMEOUT) == [2 * i for i in range(100)]


# --- more than one driver ---------------------------------------------------------------------

JOIN_SCRIPT = """
import os, skate

skate.init(address={address!r})

@skate.remote
def where():
    return skate.get_runtime_context().get_node_id()

node = skate.get(where.remote(), timeout=60)
value = skate.get(skate.put("from the second driver"), timeout=60)
print("JOINED", node, skate.get_runtime_context().get_node_id(), value, flush=True)
skate.shutdown()
"""


@pytest.mark.parametrize("how", ["gcs_address", "auto"])
def test_a_second_driver_joins_the_running_cluster(skate_cluster, tmp_path, how):
    gcs_address = skate_cluster.gcs_address      # also: the GCS is up and announced
    address = gcs_address if how == "gcs_address" else "auto"
    node_id = skate.get_runtime_context().get_node_id()
    before = {p.pid for p in skate_processes() if p.session == skate_cluster.session}

    proc = run_driver(tmp_path, JOIN_SCRIPT.format(address=address))
    assert proc.returncode == 0, describe(proc)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("JOINED"))
    assert line.split(None, 3) == ["JOINED", node_id, node_id, "from the second driver"]

    # The cluster is still up for its first driver, with the same node process.
    assert skate.get(double.remote(6), timeout=GET_TIMEOUT) == 12
    after = {p.pid for p in skate_processes() if p.session == skate_cluster.session}
    assert skate_cluster.node_pid in before and skate_cluster.node_pid in after


SECOND_DRIVER_PUTS = """
import sys, numpy as np, skate
skate.init(address="auto")

@skate.remote
def total(arr):
    return float(arr.sum())

ref = skate.put(np.ones(1_000_000))
print("OBJECT", ref.hex(), flush=True)
print("TOTAL", skate.get(total.remote(ref), timeout=60), flush=True)
if sys.argv[1:] == ["shutdown"]:
    skate.shutdown()
"""


def test_a_second_driver_passes_its_own_objects_to_tasks(skate_cluster, tmp_path):
    proc = run_driver(tmp_path, SECOND_DRIVER_PUTS)
    assert proc.returncode == 0, describe(proc)
    assert "TOTAL 1000000.0" in proc.stdout


@pytest.mark.parametrize("ending", ["exit", "shutdown"])
def test_the_objects_of_a_second_driver_are_freed_when_it_leaves(skate_cluster, tmp_path, ending):
    path = write_script(tmp_path, "driver.py", SECOND_DRIVER_PUTS)
    proc = subprocess.run([sys.executable, path, ending], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=GET_TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, describe(proc)
    oid = re.search(r"^OBJECT (\S+)$", proc.stdout, re.M).group(1)
    segment = f"/dev/shm/skate-{skate_cluster.session}-{oid}"
    assert wait_for(lambda: not os.path.exists(segment), timeout=5), f"{segment} outlived its owner"


# --- output -----------------------------------------------------------------------------------

PRINT_SCRIPT = """
import logging, os, sys, skate
skate.init(num_cpus=1)

@skate.remote
def say_hello(n):
    print(f"hello from task {n}")
    print(f"error line {n}", file=sys.stderr)
    logging.getLogger("app").warning("logged %d", n)
    return os.getpid()

pid = skate.get(say_hello.remote(1), timeout=60)
print("TASK_PID", pid, flush=True)
skate.shutdown()
"""


def test_what_a_task_prints_shows_in_the_drivers_output_with_its_name_and_pid(no_cluster, tmp_path):
    proc = run_driver(tmp_path, PRINT_SCRIPT)
    assert proc.returncode == 0, describe(proc)
    pid = int(re.search(r"^TASK_PID (\d+)$", proc.stdout, re.M).group(1))
    prefix = f"(say_hello pid={pid})"
    assert f"{prefix} hello from task 1" in proc.stdout.splitlines(), describe(proc)
    assert f"{prefix} error line 1" in proc.stderr.splitlines(), describe(proc)
    assert any(line.startswith(prefix) and "logged 1" in line for line in proc.stderr.splitlines()), describe(proc)


def test_output_of_a_task_shows_while_the_task_is_still_running(no_cluster, tmp_path):
    script = """
    import os, sys, time, skate
    skate.init(num_cpus=1)

    @skate.remote
    def talk_then_wait(release):
        print("before the wait", flush=True)
        while not os.path.exists(release):
            time.sleep(0.01)
        return "released"

    release = os.path.join(os.getcwd(), "release")
    ref = talk_then_wait.remote(release)
    for line in sys.stdin:           # the test answers once it has seen the line
        break
    open(release, "w").close()
    print("RESULT", skate.get(ref, timeout=60), flush=True)
    skate.shutdown()
    """
    path = write_script(tmp_path, "driver.py", script)
    proc = subprocess.Popen([sys.executable, path], cwd=str(tmp_path), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = read_line_matching(proc, "before the wait", timeout=GET_TIMEOUT)
        assert seen is not None and seen.startswith("(talk_then_wait pid="), seen
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=GET_TIMEOUT)
        assert "RESULT released" in out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def read_line_matching(proc: subprocess.Popen, text: str, timeout: float):
    """Reads ``proc``'s stdout line by line until one contains ``text``; None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if text in line:
            return line.rstrip("\n")
    return None


def test_worker_logs_are_kept_on_request(no_cluster, tmp_path, leak_tracker):
    script = """
    import skate
    from skate._private import runtime
    skate.init(num_cpus=1, _keep_logs=True)

    @skate.remote
    def noisy():
        print("kept in the log file")

    skate.get(noisy.remote(), timeout=60)
    print("SESSION_DIR", runtime.info()["session_dir"], flush=True)
    skate.shutdown()
    """
    proc = run_driver(tmp_path, script)
    assert proc.returncode == 0, describe(proc)
    session_dir = re.search(r"^SESSION_DIR (\S+)$", proc.stdout, re.M).group(1)
    try:
        logs = os.path.join(session_dir, "logs")
        texts = []
        for name in os.listdir(logs):
            with open(os.path.join(logs, name), errors="replace") as f:
                texts.append(f.read())
        assert any("kept in the log file" in t for t in texts)
    finally:
        import shutil
        shutil.rmtree(session_dir, ignore_errors=True)


# --- nothing left behind ------------------------------------------------------------------------

def test_shutdown_leaves_no_process_segment_or_session_directory(start_cluster, leak_tracker):
    cluster = start_cluster(num_cpus=2)
    ref = skate.put(np.ones(1_000_000))
    assert os.path.exists(segment_path(cluster.session, ref))
    assert skate.get([double.remote(i) for i in range(10)], timeout=GET_TIMEOUT) == [2 * i for i in range(10)]
    assert any(p.session == cluster.session for p in skate_processes())
    skate.shutdown()
    leak_tracker.assert_clean("after shutdown()", sessions={cluster.session})
    assert wait_for(lambda: not os.path.exists(cluster.session_dir), timeout=5)
    del ref     # a ref outliving its cluster is harmless


EXIT_SCRIPT = """
import json, os, time, numpy as np, skate
from skate._private import runtime

skate.init(num_cpus=2)

@skate.remote
def forever(started):
    open(started, "w").close()
    time.sleep(300)

ref = skate.put(np.ones(1_000_000))
started = os.path.join(os.getcwd(), "started")
running = forever.remote(started)
while not os.path.exists(started):
    time.sleep(0.01)
info = runtime.info()
print(json.dumps({{"session": info["session"], "session_dir": info["session_dir"],
                  "node_pid": info["node_pid"], "object": ref.hex()}}), flush=True)
{ending}
"""


def check_driver_left_nothing(leak_tracker, report: dict, timeout: float = 10.0) -> None:
    leak_tracker.note_session(report["session"])
    leak_tracker.assert_clean("after its driver went away", sessions={report["session"]}, timeout=timeout)
    assert wait_for(lambda: not os.path.exists(report["session_dir"]), timeout=5), report["session_dir"]


NODE_START = pytest.mark.parametrize("node_start", ["fork", "exec"])


@NODE_START
def test_a_driver_that_exits_without_shutdown_leaves_nothing_behind(no_cluster, tmp_path, leak_tracker,
                                                                     monkeypatch, node_start):
    monkeypatch.setenv("SKATE_NODE_START", node_start)
    proc = run_driver(tmp_path, EXIT_SCRIPT.format(ending="# exits here, with a task still running"))
    assert proc.returncode == 0, describe(proc)
    report = json.loads(proc.stdout.splitlines()[0])
    check_driver_left_nothing(leak_tracker, report)


@NODE_START
def test_a_sigkilled_driver_leaves_nothing_behind(no_cluster, tmp_path, leak_tracker, monkeypatch, node_start):
    monkeypatch.setenv("SKATE_NODE_START", node_start)
    path = write_script(tmp_path, "driver.py", EXIT_SCRIPT.format(ending="time.sleep(300)"))
    proc = subprocess.Popen([sys.executable, path], cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    leak_tracker.note_driver(proc.pid)
    try:
        line = read_line_matching(proc, '"session"', timeout=GET_TIMEOUT)
        assert line is not None, "the driver never reported its session"
        report = json.loads(line)
        leak_tracker.note_session(report["session"])
        # Before the kill, there is something to clean up: processes, a segment, a directory.
        assert any(p.pid == report["node_pid"] for p in skate_processes())
        assert os.path.exists(f"/dev/shm/skate-{report['session']}-{report['object']}")
        assert os.path.isdir(report["session_dir"])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    check_driver_left_nothing(leak_tracker, report)


# --- how the node process starts: forked from the driver, or a fresh interpreter -----------------

START_SCRIPT = """
import atexit, json, os, sys, threading, time
import psutil
import skate
from skate._private import runtime

atexit.register(lambda: open("exit-handler-ran", "a").write(f"{{os.getpid()}}\\n"))
sys.stdout.write("unflushed-before-init;")     # buffered: stdout is a pipe
{before}
skate.init(num_cpus=2)

@skate.remote
def where():
    with open("/proc/self/comm") as f:
        return os.getpid(), f.read().strip()

pid, comm = skate.get(where.remote(), timeout=60)
node = psutil.Process(runtime.info()["node_pid"])
print(json.dumps({{"worker_comm": comm, "node_name": node.name(), "node_cmdline": node.cmdline(),
                  "worker_pid": pid, "driver_pid": os.getpid()}}))
"""


@pytest.mark.parametrize("mode", ["auto", "fork", "exec"])
def test_the_node_is_forked_or_spawned_as_asked_and_its_processes_are_named(no_cluster, tmp_path,
                                                                             monkeypatch, mode):
    monkeypatch.setenv("SKATE_NODE_START", mode)
    proc = run_driver(tmp_path, START_SCRIPT.format(before=""))
    assert proc.returncode == 0, describe(proc)
    report = json.loads(proc.stdout.rsplit(";", 1)[1])
    assert report["worker_comm"] == "skate:worker"
    assert report["node_name"] == "skate:node"
    spawned = any("skate._private.node.main" in c for c in report["node_cmdline"])
    assert spawned == (mode == "exec")      # auto forks a driver with one thread
    # The driver's exit handler ran once, in the driver: not in the node, zygote or workers.
    with open(tmp_path / "exit-handler-ran") as f:
        assert f.read().split() == [str(report["driver_pid"])]
    # What the driver had written but not flushed before init is printed once, not twice.
    assert proc.stdout.count("unflushed-before-init") == 1, describe(proc)


def test_a_driver_with_a_thread_running_gets_a_spawned_node(no_cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("SKATE_NODE_START", raising=False)
    before = "stop = threading.Event(); threading.Thread(target=stop.wait, daemon=True).start()"
    proc = run_driver(tmp_path, START_SCRIPT.format(before=before))
    assert proc.returncode == 0, describe(proc)
    report = json.loads(proc.stdout.rsplit(";", 1)[1])
    assert any("skate._private.node.main" in c for c in report["node_cmdline"])
    assert report["worker_comm"] == "skate:worker"


def test_an_unknown_node_start_mode_is_a_clear_error_and_starts_nothing(no_cluster, monkeypatch, leak_tracker):
    monkeypatch.setattr(runtime.CONFIG, "node_start", "spawn")
    before = {p.pid for p in skate_processes()}
    with pytest.raises(ValueError, match="SKATE_NODE_START='spawn'.*auto, fork, exec"):
        skate.init(num_cpus=1)
    assert not skate.is_initialized()
    assert {p.pid for p in skate_processes()} <= before


# --- Ray compatibility of the driver's code ------------------------------------------------------

def test_a_task_can_use_a_module_next_to_the_drivers_script(no_cluster, tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "skate_helpers_for_test.py").write_text("def triple(x):\n    return 3 * x\n")
    write_script(app, "main.py", """
    import skate, skate_helpers_for_test
    skate.init(num_cpus=1)
    triple = skate.remote(skate_helpers_for_test.triple)
    print("RESULT", skate.get(triple.remote(5), timeout=60), flush=True)
    skate.shutdown()
    """)
    proc = subprocess.run([sys.executable, str(app / "main.py")], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=GET_TIMEOUT, stdin=subprocess.DEVNULL)
    assert "RESULT 15" in proc.stdout, describe(proc)
