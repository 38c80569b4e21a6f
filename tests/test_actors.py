"""Actors: stateful workers with Ray's semantics (issue 3)."""

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import skate
from skate.exceptions import ActorDiedError, TaskError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if skate.is_initialized():
        skate.shutdown()
    skate.init(num_cpus=2)
    yield
    skate.shutdown()


@skate.remote
class Counter:
    def __init__(self, start=0):
        self.n = start
        self.log = []

    def add(self, k=1):
        self.n += k
        return self.n

    def record(self, who, i):
        self.log.append((who, i))

    def history(self):
        return self.log

    def pid(self):
        return os.getpid()

    def fail(self):
        raise KeyError("inside a method")

    @skate.method(num_returns=2)
    def pair(self):
        return self.n, -self.n

    def crash(self):
        os._exit(1)

    def leave(self):
        skate.actor.exit_actor()


def _wait_gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:   # gone (possibly between two checks)
            return True
        time.sleep(0.05)
    return False


def test_calls_from_one_caller_run_in_order_and_keep_state():
    c = Counter.remote(10)
    assert skate.get([c.add.remote() for _ in range(100)]) == list(range(11, 111))


def test_ten_thousand_ordered_calls_from_the_driver_and_from_two_tasks_at_once():
    c = Counter.remote()

    @skate.remote
    def caller(h, who, n):
        skate.get([h.record.remote(who, i) for i in range(n)])
        return who

    tasks = [caller.remote(c, "a", 10_000), caller.remote(c, "b", 10_000)]
    skate.get([c.record.remote("driver", i) for i in range(10_000)] + tasks)
    history = skate.get(c.history.remote())
    for who in ("a", "b", "driver"):
        seq = [i for w, i in history if w == who]
        assert seq == list(range(10_000)), who


def test_handle_passed_into_a_task_that_calls_it():
    c = Counter.remote(1)

    @skate.remote
    def bump(h):
        return skate.get(h.add.remote(5))

    assert skate.get(bump.remote(c)) == 6
    assert skate.get(c.add.remote(0)) == 6


def test_handle_passed_to_another_actor():
    c = Counter.remote(0)

    @skate.remote
    class Caller:
        def __init__(self, target):
            self.target = target

        def go(self):
            return skate.get(self.target.add.remote(3))

    assert skate.get(Caller.remote(c).go.remote()) == 3


def test_num_returns_by_decorator_and_by_options():
    c = Counter.remote(4)
    a, b = c.pair.remote()
    assert skate.get([a, b]) == [4, -4]
    x, y = c.pair.options(num_returns=2).remote()
    assert skate.get(x) == 4 and skate.get(y) == -4


def test_method_exception_is_a_task_error_and_the_actor_lives_on():
    c = Counter.remote(0)
    with pytest.raises(KeyError) as info:
        skate.get(c.fail.remote())
    assert isinstance(info.value, TaskError)
    assert "inside a method" in str(info.value)
    assert skate.get(c.add.remote()) == 1


def test_threaded_actor_runs_sleeping_calls_at_once():
    @skate.remote(max_concurrency=8)
    class Sleeper:
        def nap(self, s):
            start = time.monotonic()
            time.sleep(s)
            return start, time.monotonic()

    s = Sleeper.remote()
    spans = skate.get([s.nap.remote(0.5) for _ in range(8)])
    # Overlap, not speed: every call started before the first one ended.
    first_end = min(end for _, end in spans)
    assert all(start < first_end for start, _ in spans)


def test_async_actor_runs_a_hundred_awaiting_calls_concurrently():
    @skate.remote
    class Async:
        def __init__(self):
            self.running = 0
            self.peak = 0

        async def nap(self):
            self.running += 1
            self.peak = max(self.peak, self.running)
            await asyncio.sleep(0.3)
            self.running -= 1
            return 1

        async def peak_seen(self):
            return self.peak

    a = Async.remote()
    assert sum(skate.get([a.nap.remote() for _ in range(100)])) == 100
    assert skate.get(a.peak_seen.remote()) == 100


def test_await_on_refs_inside_an_async_actor():
    @skate.remote
    def square(x):
        return x * x

    @skate.remote
    class Awaiter:
        async def total(self, n):
            return sum([await square.remote(i) for i in range(n)])

    assert skate.get(Awaiter.remote().total.remote(5)) == 30


def test_named_actor_found_with_get_actor_and_get_if_exists():
    c = Counter.options(name="test-hits").remote(0)
    skate.get(c.add.remote())
    assert skate.get(skate.get_actor("test-hits").add.remote()) == 2
    same = Counter.options(name="test-hits", get_if_exists=True).remote(100)
    assert skate.get(same.add.remote()) == 3
    with pytest.raises(ValueError, match="test-hits"):
        Counter.options(name="test-hits").remote()
    with pytest.raises(ValueError, match="no-such-actor"):
        skate.get_actor("no-such-actor")
    skate.kill(c)


def test_namespaces_keep_names_apart():
    a = Counter.options(name="shared-name", namespace="ns1").remote(1)
    b = Counter.options(name="shared-name", namespace="ns2").remote(2)
    assert skate.get(skate.get_actor("shared-name", namespace="ns1").add.remote(0)) == 1
    assert skate.get(skate.get_actor("shared-name", namespace="ns2").add.remote(0)) == 2
    skate.kill(a)
    skate.kill(b)


def test_named_detached_actor_found_from_a_second_driver_process():
    c = Counter.options(name="detached-counter", lifetime="detached").remote(41)
    skate.get(c.add.remote(0))
    address = skate.get_runtime_context().gcs_address
    code = textwrap.dedent(f"""
        import skate
        skate.init(address={address!r})
        print("VALUE", skate.get(skate.get_actor("detached-counter").add.remote(1)))
        skate.shutdown()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "VALUE 42" in out.stdout, out.stderr
    assert skate.get(c.add.remote(0)) == 42
    skate.kill(c)


def test_kill_without_restart_fails_pending_and_later_calls():
    c = Counter.remote(0)
    pid = skate.get(c.pid.remote())
    skate.kill(c)
    with pytest.raises(ActorDiedError, match="kill"):
        skate.get(c.add.remote(), timeout=30)
    assert _wait_gone(pid)


def test_kill_with_restart_allowed_restarts_with_fresh_state():
    c = Counter.options(max_restarts=1).remote(5)
    skate.get(c.add.remote(10))
    pid = skate.get(c.pid.remote())
    skate.kill(c, no_restart=False)
    assert _wait_gone(pid)
    assert skate.get(c.add.remote(1), timeout=30) == 6   # constructor ran again: state is fresh
    assert skate.get(c.pid.remote()) != pid


def test_crash_with_max_restarts_one_restarts_and_the_next_call_works():
    c = Counter.options(max_restarts=1).remote(0)
    with pytest.raises(ActorDiedError):
        skate.get(c.crash.remote(), timeout=30)   # max_task_retries=0: the call itself fails
    assert skate.get(c.add.remote(), timeout=30) == 1


def test_crash_with_max_task_retries_retries_the_pending_calls_on_the_restarted_actor():
    @skate.remote(max_restarts=2, max_task_retries=2)
    class Flaky:
        def __init__(self, marker):
            self.marker = marker

        def work(self):
            if not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(1)
            return "done"

    marker = f"/tmp/skate-test-flaky-{os.getpid()}-{time.time_ns()}"
    try:
        assert skate.get(Flaky.remote(marker).work.remote(), timeout=30) == "done"
    finally:
        if os.path.exists(marker):
            os.unlink(marker)


def test_crash_with_max_restarts_zero_gives_actor_died_error():
    c = Counter.remote(0)
    skate.get(c.add.remote())
    c.crash.remote()
    with pytest.raises(ActorDiedError, match="died"):
        skate.get(c.add.remote(), timeout=30)


def test_a_raising_constructor_makes_every_call_raise_with_its_traceback():
    @skate.remote
    class Broken:
        def __init__(self):
            raise ValueError("constructor exploded")

        def f(self):
            return 1

    b = Broken.remote()
    for _ in range(2):
        with pytest.raises(ActorDiedError) as info:
            skate.get(b.f.remote(), timeout=30)
        assert "constructor exploded" in str(info.value)
        assert "Traceback" in str(info.value)


def test_exit_actor_ends_it_and_it_is_not_restarted():
    c = Counter.options(max_restarts=3).remote(0)
    pid = skate.get(c.pid.remote())
    with pytest.raises(ActorDiedError):
        skate.get(c.leave.remote(), timeout=30)
    with pytest.raises(ActorDiedError, match="exit_actor"):
        skate.get(c.add.remote(), timeout=30)
    assert _wait_gone(pid)


def test_graceful_terminate_runs_pending_calls_first():
    c = Counter.remote(0)
    pid = skate.get(c.pid.remote())
    refs = [c.add.remote() for _ in range(50)]
    done = c.__skate_terminate__.remote()
    assert skate.get(refs)[-1] == 50
    assert skate.get(done) is None
    assert _wait_gone(pid)


def test_an_actor_dropped_by_every_handle_is_gone():
    c = Counter.remote(0)
    pid = skate.get(c.pid.remote())

    @skate.remote
    def touch(h):
        return skate.get(h.add.remote())

    assert skate.get(touch.remote(c)) == 1
    del c
    gc.collect()
    assert _wait_gone(pid)


def test_actor_options_are_validated():
    with pytest.raises(ValueError, match="max_concurrency"):
        Counter.options(max_concurrency=0)
    with pytest.raises(ValueError, match="unknown option"):
        Counter.options(colour="red")
    with pytest.raises(ValueError, match="lifetime"):
        Counter.options(lifetime="forever")
    with pytest.raises(TypeError, match="remote"):
        Counter()
    with pytest.raises(TypeError, match="fit"):
        Counter.remote(1, 2, 3)
    c = Counter.remote(0)
    with pytest.raises(AttributeError, match="no method"):
        c.missing
    with pytest.raises(TypeError, match="remote"):
        c.add()
    assert skate.get(c.add.remote()) == 1   # nothing above broke the runtime


def test_actor_holding_a_cpu_waits_for_it_and_infeasible_actor_is_reported():
    @skate.remote(num_cpus=1)
    class Heavy:
        def ok(self):
            return True

    h = Heavy.remote()
    assert skate.get(h.ok.remote(), timeout=30)
    with pytest.raises(skate.exceptions.InfeasibleTaskError):
        Heavy.options(num_cpus=64).remote()
    skate.kill(h)
