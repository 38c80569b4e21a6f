"""Runtime bugs the property tests found, each kept as the smallest program that shows it.

Every test here states the behaviour skate owes. While a bug is open its test is marked
``xfail(strict=True)`` with the diagnosis: the day the runtime is fixed the test passes,
strict xfail fails the run, and the fixer removes the mark here and the bug's entry in
``known_bugs.py`` (which lets the property tests tell its outcomes apart from new ones).
Fixed bugs keep their test, unmarked, so they stay found. Programs and kill schedules are
the ones the search found, shrunk; transport plans keep the seed that found them.

Found and fixed (commit 095cc83): orphaned-sealed-result, function-blob-lost,
error-get-pins-borrowed-refs, returned-ref-never-released, cut-link-leaks-lease; then
cut-link-hangs-actor-calls, unflushed-reply-deadlock, reply-overtakes-seal,
cancel-lands-after-return, actor-exit-overtakes-last-reply. Open: none.
"""

from __future__ import annotations

import os
import time

import pytest

import skate
from skate._private.testing import faults
from skate.exceptions import ActorDiedError, WorkerCrashedError

from invariants import baseline, check_drained
from task_programs import ActorSpec, Input, Kill, Node, Program, run_program

pytestmark = pytest.mark.timeout(120)

GET_TIMEOUT = 10


def _bug(bug_id: str, diagnosis: str):
    """An open bug: the test fails until the runtime is fixed."""
    return pytest.mark.xfail(strict=True, reason=f"[{bug_id}] {diagnosis}")


def _fixed(bug_id: str, diagnosis: str):
    """A fixed bug: its test stays, a regression test, with the diagnosis that was made."""
    def keep(test):
        test.__doc__ = f"[{bug_id}, fixed] {diagnosis}"
        return test
    return keep


def _kill_cluster(clusters):
    clusters.ensure(faults.FaultPlan(seed=0, injector=clusters.injector.path), num_cpus=2)


def _assert_clean_run(clusters, program):
    verdict, reproducer = run_program(program, clusters.injector)
    if not verdict.clean:
        clusters.restart()
    assert verdict.clean, f"{verdict.describe()}\n{reproducer}"


# --- orphaned-sealed-result ----------------------------------------------------------------------

ORPHANED = ("A result sealed in shared memory by a worker that dies before its TASK_DONE reaches the "
            "caller stays in the store owned by nobody (the node frees only what the dead worker owned: "
            "object ids start with the caller's id). The retry's STORE_RESERVE of the same id is a no-op "
            "on the sealed entry (ObjectStore.reserve), so shm.create_and_write's O_EXCL create raises "
            "FileExistsError in the retried task (CoreWorker.write_to_store); without a retry the bytes "
            "stay accounted for ever.")


@_fixed("orphaned-sealed-result", ORPHANED)
def test_a_task_killed_after_sealing_a_large_result_is_retried_and_gives_its_value(clusters):
    _kill_cluster(clusters)
    _assert_clean_run(clusters, Program(nodes=(Node(kind="task", const=5, pad=300_000, max_retries=3),),
                                        kills=(Kill(0, "reply"),)))


@_fixed("orphaned-sealed-result", ORPHANED)
def test_an_actor_killed_after_sealing_a_large_result_leaves_nothing_in_the_store(clusters):
    _kill_cluster(clusters)
    _assert_clean_run(clusters, Program(nodes=(Node(kind="actor", const=4, pad=307_200),),
                                        actors=(ActorSpec(),), kills=(Kill(0, "reply"),)))


@_fixed("orphaned-sealed-result", ORPHANED)
def test_workers_killed_as_they_report_large_results_under_seed_1_lose_nothing(clusters):
    # The first seed that showed it: each worker dies at 30% of its TASK_DONEs.
    clusters.ensure(faults.FaultPlan(seed=1, kinds={"TASK_DONE": {"kill": 0.3, "roles": ["worker"]}}), num_cpus=2)
    before = baseline()

    @skate.remote
    def big(i):
        return bytes([i]) * 200_000
    refs = [big.remote(i) for i in range(10)]
    for i, ref in enumerate(refs):
        try:
            assert skate.get(ref, timeout=GET_TIMEOUT) == bytes([i]) * 200_000
        except WorkerCrashedError:
            pass    # a task whose four attempts all died: allowed
    del refs, ref
    problems = check_drained(before)
    clusters.restart()
    assert problems == []


# --- function-blob-lost ---------------------------------------------------------------------------

_DRIVER = os.getpid()


def _unpickle_in_driver_only():
    if os.getpid() != _DRIVER:
        raise RuntimeError("this function cannot be unpickled in a worker")
    return 1


class _FailsToUnpickle:
    def __reduce__(self):
        return (_unpickle_in_driver_only, ())


_BOMB = _FailsToUnpickle()


@_fixed("function-blob-lost",
      "TaskExecutor._function pops the function's blob before unpickling it "
      "(self.functions[fn_id] = deserialize(self.function_blobs.pop(fn_id))): when unpickling raises "
      "(an import error, or a cancel's SIGINT landing in it) the blob is gone and every later task of "
      "that function on that worker fails with KeyError(fn_id) instead of running or raising the "
      "real error. Found by a soak: a cancel landed while a worker unpickled run_node.")
def test_a_function_that_failed_to_unpickle_once_raises_its_own_error_every_time(clusters):
    clusters.ensure(num_cpus=1)

    @skate.remote
    def holds_a_bomb():
        return _BOMB

    errors = []
    for _ in range(3):
        with pytest.raises(RuntimeError) as info:   # not KeyError
            skate.get(holds_a_bomb.remote(), timeout=GET_TIMEOUT)
        errors.append(info.value)
    assert all("cannot be unpickled" in str(e) for e in errors)


# --- error-get-pins-borrowed-refs -----------------------------------------------------------------

@_fixed("error-get-pins-borrowed-refs",
      "CoreWorker.value_of ends with 'raise err' for errors that are not TaskErrors (ActorDiedError, "
      "WorkerCrashedError, TaskCancelledError, ObjectLostError): the exception is also a local of the "
      "frame it is raised from, a cycle (exception -> traceback -> frame -> exception) that keeps every "
      "frame on the way alive, with the ObjectRefs they hold, until the process's next cyclic GC. An "
      "idle worker runs none: it stays a borrower and the owner never frees the objects.")
def test_a_task_that_fails_on_a_dead_actors_result_lets_go_of_the_ref(clusters):
    _kill_cluster(clusters)
    _assert_clean_run(clusters, Program(
        nodes=(Node(kind="actor", const=0, fail=True),
               Node(kind="task", inputs=(Input(0, mode="nested"),), max_retries=0)),
        actors=(ActorSpec(),), kills=(Kill(0, "fetch"),)))


# --- returned-ref-never-released -------------------------------------------------------------------

@_fixed("returned-ref-never-released",
      "TaskExecutor._pack calls ref_counter.add_contents(return_id, refs in the value) for return "
      "objects the worker does not own; nothing ever frees them there, so each ref a task returns "
      "inside its result stays counted as contained in the worker, which never sends "
      "REMOVE_BORROWER: the owner keeps the object for ever. (architecture.md's known gap is the "
      "opposite race; this is a leak on every such return.)")
def test_a_ref_returned_inside_a_task_result_is_freed_once_dropped(clusters):
    clusters.ensure(num_cpus=2)
    before = baseline()

    @skate.remote
    def identity(x):
        return x
    inner = skate.put(b"x" * 300_000)
    returned = skate.get(identity.remote([inner]), timeout=GET_TIMEOUT)
    assert returned[0] == inner
    del inner, returned
    assert check_drained(before) == []


# --- cut links ------------------------------------------------------------------------------------

@_fixed("cut-link-leaks-lease",
      "TaskSubmitter.on_worker_lost retries the tasks of a worker whose connection closed but never "
      "returns its lease (return_lease(worker_id, kill=True)): when the worker is alive (a cut link, "
      "not a crash) the node keeps it LEASED with its CPU, and once every CPU is held so, later "
      "tasks wait for ever.")
def test_a_cut_link_to_a_leased_worker_gives_its_cpu_back(clusters):
    clusters.ensure(faults.FaultPlan(seed=1, kinds={"PUSH_TASK": {"drop": 1.0, "roles": ["driver"]}}),
                    num_cpus=2)

    @skate.remote
    def one():
        return 1
    try:
        with pytest.raises(WorkerCrashedError):   # every push cuts the link: retries run out
            skate.get(one.remote(), timeout=GET_TIMEOUT)
        deadline = time.monotonic() + 5
        while skate.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert skate.available_resources().get("CPU", 0) == 2
    finally:
        clusters.stop()


@_fixed("cut-link-hangs-actor-calls",
      "ActorSubmitter.on_disconnected parks the calls in flight on an actor whose connection closed "
      "and waits for the node's verdict (DEAD or RESTARTING); when the actor's process is alive (a cut "
      "link) no verdict ever comes and the calls, and every later one, wait for ever.")
def test_a_call_whose_link_to_a_live_actor_is_cut_fails_or_completes(clusters):
    clusters.ensure(faults.FaultPlan(seed=1, kinds={"TASK_DONE": {"drop": 1.0, "roles": ["worker"]}}),
                    num_cpus=2)

    @skate.remote
    class Echo:
        def echo(self, x):
            return x
    try:
        actor = Echo.remote()
        try:
            assert skate.get(actor.echo.remote(1), timeout=3) == 1
        except ActorDiedError:
            pass
    finally:
        clusters.stop()



# --- unflushed-reply-deadlock -------------------------------------------------------------------

@_fixed("unflushed-reply-deadlock",
      "TaskExecutor.run_forever queues each TASK_DONE with send_deferred and flushes only when its "
      "queue runs dry or 1 ms passed since the last flush. When the next call pushed to the same "
      "actor (or task pipelined to the same worker) gets the previous one's result, it blocks in "
      "get while that result's TASK_DONE waits unflushed in the same process: the caller never "
      "learns the result is ready, and the get hangs until it times out. Found by a soak (plain "
      "programs, no faults): Program(nodes=(Node('actor', pad=102700), Node('actor', pad=102700), "
      "Node('actor', inputs=(Input(1, mode='boxed'),), num_returns=2)), ...).")
def test_a_call_that_gets_the_result_of_the_call_before_it_on_the_same_actor_completes(clusters):
    clusters.ensure(num_cpus=2)

    @skate.remote
    class Relay:
        def echo(self, x):
            return x

        def get_boxed(self, box):
            return skate.get(box[0], timeout=3)

    relay = Relay.remote()
    skate.get(relay.echo.remote(0), timeout=GET_TIMEOUT)
    for i in range(10):
        relay.echo.remote(i)
        previous = relay.echo.remote(i + 1)
        assert skate.get(relay.get_boxed.remote([previous]), timeout=GET_TIMEOUT) == i + 1


# --- reply-overtakes-seal ---------------------------------------------------------------------------

OVERTAKES = ("CoreWorker.write_to_store queues STORE_SEAL on the node connection with send() (the I/O "
             "thread flushes it at its next tick), then the executor writes TASK_DONE to the caller from "
             "the main thread: the reply can reach the caller before the seal reaches the node. A caller "
             "that drops the result at once sends STORE_FREE, which ObjectStore.free applies to the still "
             "pending entry; the late STORE_SEAL then re-creates an entry (seal() accepts unknown ids) that "
             "nobody frees. A worker that dies between the two has its pending reservation aborted and the "
             "segment unlinked, though the caller was told the result is stored: get raises "
             "ObjectLostError. Found by soaks: a plain program leaking 307285 bytes, an actor result lost.")
SLOW_SEAL = {"STORE_SEAL": {"delay": 1.0, "delay_ms": [300, 300], "roles": ["worker"]}}


@_fixed("reply-overtakes-seal", OVERTAKES)
def test_a_large_result_dropped_as_soon_as_it_is_ready_leaves_nothing_in_the_store(clusters):
    clusters.ensure(faults.FaultPlan(seed=1, kinds=SLOW_SEAL), num_cpus=2)
    before = baseline()

    @skate.remote
    def big():
        return b"x" * 300_000
    ref = big.remote()
    skate.wait([ref], timeout=GET_TIMEOUT)
    del ref
    time.sleep(0.5)      # the seal arrives after the free
    problems = check_drained(before, timeout=2)
    clusters.stop()
    assert problems == []


@_fixed("reply-overtakes-seal", OVERTAKES)
def test_a_result_an_actor_reported_survives_the_actor(clusters):
    clusters.ensure(faults.FaultPlan(seed=1, kinds=SLOW_SEAL), num_cpus=2)

    @skate.remote
    class Maker:
        def big(self):
            return b"x" * 300_000
    maker = Maker.remote()
    ref = maker.big.remote()
    try:
        skate.wait([ref], timeout=GET_TIMEOUT)
        skate.kill(maker)
        time.sleep(0.5)
        assert skate.get(ref, timeout=GET_TIMEOUT) == b"x" * 300_000
    finally:
        del ref
        clusters.stop()


# --- cancel-lands-after-return ------------------------------------------------------------------------

@_fixed("cancel-lands-after-return",
      "TaskExecutor.cancel sends SIGINT whenever the task is current, and _on_sigint raises "
      "TaskCancelledError wherever the main thread is, including after the function returned: in "
      "_pack while CoreWorker.write_to_store waits for STORE_RESERVE's reply (outside the try that "
      "sends STORE_ABORT) the reservation stays pending for the worker's life (the store never "
      "drains); a second cancel landing in _pack's error handler (_task_error) escapes execute() and "
      "kills the worker. Found by a soak (the worker logs showed the double traceback).")
def test_a_cancel_that_lands_while_the_result_is_stored_leaves_nothing_pending(clusters, tmp_path):
    slow_node_replies = {"REPLY": {"delay": 1.0, "delay_ms": [400, 400], "roles": ["node"]}}
    clusters.ensure(faults.FaultPlan(seed=1, kinds=slow_node_replies), num_cpus=2)
    before = baseline()
    returning = str(tmp_path / "returning")

    @skate.remote
    def big(marker):
        open(marker, "w").close()
        return b"x" * 300_000
    ref = big.remote(returning)
    deadline = time.monotonic() + GET_TIMEOUT
    while not os.path.exists(returning) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)      # the worker now waits for its STORE_RESERVE's (slow) reply
    skate.cancel(ref)
    try:
        assert skate.get(ref, timeout=GET_TIMEOUT) == b"x" * 300_000
    except skate.exceptions.TaskCancelledError:
        pass
    del ref
    problems = check_drained(before, timeout=2)
    clusters.stop()
    assert problems == []


# --- actor-exit-overtakes-last-reply ----------------------------------------------------------------

@_fixed("actor-exit-overtakes-last-reply",
      "An actor whose last handle is dropped runs the calls already made, then exits: its last "
      "TASK_DONE goes on the caller's connection, ACTOR_EXITING on its node connection, and the node's "
      "DEAD verdict reaches the caller on the caller's node connection, racing the reply. When the "
      "verdict is read first, ActorSubmitter.on_state(DEAD) fails the calls still in flight with "
      "ActorDiedError('stopped gracefully') although they ran (their replies are dropped on arrival). "
      "About 2% of such calls; with the verdict delayed 200 ms none. Found by the API state machine "
      "in a soak.")
def test_calls_made_before_the_last_handle_is_dropped_give_their_values(clusters):
    clusters.ensure(num_cpus=2)

    @skate.remote
    class Echo:
        def echo(self, x, sleep_ms=0):
            time.sleep(sleep_ms / 1000.0)
            return x

    for i in range(500):      # the race is lost about once in 50 tries
        actor = Echo.remote()
        skate.kill(Echo.remote())   # more traffic on the node connection: the race is lost more often
        first = actor.echo.remote(0, 30)
        del first
        last = actor.echo.remote(i)
        del actor
        assert skate.get(last, timeout=GET_TIMEOUT) == i
