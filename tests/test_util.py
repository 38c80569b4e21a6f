"""skate.util: ActorPool, queue.Queue and state.list_actors, with Ray's behaviour (issue 3,
items 7 and 8)."""

import asyncio
import os
import pickle
import queue as std_queue
import time

import cloudpickle
import pytest

import skate
import skate.util
from skate.exceptions import ActorDiedError
from skate.util import ActorPool, state
from skate.util.queue import Empty, Full, Queue
from skate_harness import describe, run_driver

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if skate.is_initialized():
        skate.shutdown()
    skate.init(num_cpus=2)
    # The node starts the GCS after init() returns and only reports actor states to it from
    # then on (see test_actor_created_right_after_init_is_listed): wait for it, so the
    # listings below see the actors these tests create.
    assert skate.get_runtime_context().gcs_address
    yield
    skate.shutdown()


def poll(fn, timeout=10.0, interval=0.05):
    """fn()'s first truthy value within timeout, else its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@skate.remote
class Worker:
    def __init__(self, tag=""):
        self.tag = tag

    def work(self, value, delay=0.0):
        time.sleep(delay)
        return (self.tag, value * 10)

    def pid(self):
        return os.getpid()

    def crash(self, _value):
        os._exit(1)


def work(actor, value):
    # value 0 is slow, every other value fast: completion order differs from submission order
    return actor.work.remote(value, 1.5 if value == 0 else 0.0)


def values_of(results):
    return [v for _, v in results]


# --- ActorPool ----------------------------------------------------------------------------

def test_pool_map_yields_in_submission_order_even_when_later_values_finish_first():
    pool = ActorPool([Worker.remote("a"), Worker.remote("b")])
    gen = pool.map(work, [0, 1, 2, 3])
    assert not isinstance(gen, list)
    results = list(gen)
    assert values_of(results) == [0, 10, 20, 30]
    # both actors did work: the calls were spread over the pool
    assert {tag for tag, _ in results} == {"a", "b"}
    assert not pool.has_next()


def test_pool_map_unordered_yields_each_result_as_it_finishes():
    pool = ActorPool([Worker.remote(), Worker.remote()])
    results = values_of(pool.map_unordered(work, [0, 1, 2, 3]))
    # 1, 2 and 3 run on the second actor while the first sleeps on 0
    assert results[-1] == 0
    assert sorted(results) == [0, 10, 20, 30]


def test_pool_submit_queues_beyond_free_actors_and_get_next_keeps_submission_order():
    pool = ActorPool([Worker.remote()])
    assert pool.has_free() and not pool.has_next()
    for v in (3, 1, 2):
        pool.submit(lambda a, v: a.work.remote(v, 0.05), v)
    assert pool.has_next()
    assert not pool.has_free()          # one actor, busy, with submits waiting
    assert pool.pop_idle() is None
    assert [pool.get_next()[1] for _ in range(3)] == [30, 10, 20]
    assert not pool.has_next()
    assert pool.has_free()
    with pytest.raises(StopIteration, match="No more results to get"):
        pool.get_next()
    with pytest.raises(StopIteration, match="No more results to get"):
        pool.get_next_unordered()


def test_pool_get_next_timeout_leaves_the_call_pending():
    pool = ActorPool([Worker.remote()])
    pool.submit(lambda a, v: a.work.remote(v, 1.0), 7)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="Timed out waiting for result"):
        pool.get_next(timeout=0.1)
    assert time.monotonic() - start < 0.9
    assert pool.has_next()
    assert pool.get_next(timeout=30)[1] == 70


def test_pool_get_next_ignore_if_timedout_skips_the_call_and_frees_the_actor():
    pool = ActorPool([Worker.remote()])
    pool.submit(lambda a, v: a.work.remote(v, 1.0), 1)
    pool.submit(lambda a, v: a.work.remote(v), 2)
    with pytest.raises(TimeoutError, match="has been ignored"):
        pool.get_next(timeout=0.1, ignore_if_timedout=True)
    # the skipped call's actor took the waiting submit; its result comes next
    assert pool.has_next()
    assert pool.get_next()[1] == 20
    assert not pool.has_next()


def test_pool_get_next_unordered_timeout():
    pool = ActorPool([Worker.remote()])
    pool.submit(lambda a, v: a.work.remote(v, 1.0), 5)
    with pytest.raises(TimeoutError, match="Timed out waiting for result"):
        pool.get_next_unordered(timeout=0.1)
    assert pool.has_next()
    assert pool.get_next_unordered(timeout=30)[1] == 50
    pool.submit(lambda a, v: a.work.remote(v, 1.0), 6)
    with pytest.raises(TimeoutError, match="has been ignored"):
        pool.get_next_unordered(timeout=0.1, ignore_if_timedout=True)
    assert not pool.has_next()


def test_pool_get_next_after_get_next_unordered_took_a_later_result_is_refused():
    pool = ActorPool([Worker.remote(), Worker.remote()])
    pool.submit(work, 0)       # slow
    pool.submit(work, 1)       # fast
    assert pool.get_next_unordered()[1] == 10
    with pytest.raises(ValueError, match="not allowed to call get_next\\(\\) after get_next_unordered"):
        pool.get_next()
    assert pool.get_next_unordered()[1] == 0


def test_pool_results_of_several_refs_per_call():
    @skate.remote
    class Pair:
        @skate.method(num_returns=2)
        def both(self, v):
            return v, -v

    pool = ActorPool([Pair.remote(), Pair.remote()])
    assert list(pool.map(lambda a, v: a.both.remote(v), [1, 2, 3])) == [[1, -1], [2, -2], [3, -3]]
    assert sorted(pool.map_unordered(lambda a, v: a.both.remote(v), [1, 2])) == [[1, -1], [2, -2]]


def test_pool_pop_idle_and_push():
    a1, a2 = Worker.remote("a1"), Worker.remote("a2")
    pool = ActorPool([a1])
    pool.submit(lambda a, v: a.work.remote(v), 1)
    assert pool.pop_idle() is None
    with pytest.raises(ValueError, match="Actor already belongs to current ActorPool"):
        pool.push(a1)                        # busy in the pool
    assert pool.get_next() == ("a1", 10)
    assert pool.pop_idle() == a1
    assert pool.pop_idle() is None and not pool.has_free()
    pool.submit(lambda a, v: a.work.remote(v), 2)    # no actor: waits
    assert not pool.has_next()
    pool.push(a2)                            # takes the waiting submit at once
    assert pool.has_next()
    assert pool.get_next() == ("a2", 20)
    with pytest.raises(ValueError, match="Actor already belongs to current ActorPool"):
        pool.push(a2)                        # idle in the pool


def test_pool_drops_an_actor_that_died():
    pool = ActorPool([Worker.remote()])
    pool.submit(lambda a, v: a.crash.remote(v), 1)
    with pytest.raises(ActorDiedError):
        pool.get_next(timeout=30)
    assert not pool.has_free()               # the dead actor was not handed back
    assert pool.pop_idle() is None


# --- queue.Queue --------------------------------------------------------------------------

def test_queue_errors_are_the_standard_ones():
    assert issubclass(Empty, std_queue.Empty)
    assert issubclass(Full, std_queue.Full)
    assert skate.util.queue.Queue is Queue


def test_queue_put_get_fifo_and_sizes():
    q = Queue()
    assert q.empty() and q.qsize() == 0 and not q.full()
    for i in range(5):
        q.put(i)
    assert q.qsize() == q.size() == len(q) == 5
    assert not q.empty() and not q.full()    # unbounded: never full
    assert [q.get() for _ in range(5)] == [0, 1, 2, 3, 4]
    assert q.empty()
    q.shutdown()


def test_queue_get_on_empty_raises_empty_at_once_or_after_timeout():
    q = Queue()
    start = time.monotonic()
    with pytest.raises(Empty):
        q.get(block=False)
    with pytest.raises(Empty):
        q.get_nowait()
    assert time.monotonic() - start < 2.0
    start = time.monotonic()
    with pytest.raises(Empty) as info:
        q.get(timeout=0.3)
    assert time.monotonic() - start >= 0.3
    assert type(info.value) is Empty         # the plain error, not a task error
    with pytest.raises(ValueError, match="non-negative"):
        q.get(timeout=-1)
    q.shutdown()


def test_queue_put_on_full_raises_full_at_once_or_after_timeout():
    q = Queue(maxsize=2)
    q.put("a")
    q.put_nowait("b")
    assert q.full() and q.qsize() == 2
    with pytest.raises(Full):
        q.put("c", block=False)
    with pytest.raises(Full):
        q.put_nowait("c")
    start = time.monotonic()
    with pytest.raises(Full) as info:
        q.put("c", timeout=0.3)
    assert time.monotonic() - start >= 0.3
    assert type(info.value) is Full
    with pytest.raises(ValueError, match="non-negative"):
        q.put("c", timeout=-0.5)
    assert [q.get(), q.get()] == ["a", "b"]  # nothing was added by the failed puts
    q.shutdown()


@skate.remote
def put_later(q, item, delay):
    time.sleep(delay)
    q.put(item)
    return os.getpid()


@skate.remote
def get_later(q, delay):
    time.sleep(delay)
    return q.get(timeout=30)


def test_queue_blocking_get_waits_for_a_put_and_blocking_put_for_a_get():
    q = Queue(maxsize=1)
    ref = put_later.remote(q, "late", 0.5)
    start = time.monotonic()
    assert q.get(timeout=30) == "late"
    assert time.monotonic() - start >= 0.4
    skate.get(ref)
    q.put("first")
    taker = get_later.remote(q, 0.5)
    start = time.monotonic()
    q.put("second", timeout=30)             # blocks until the task took "first"
    assert time.monotonic() - start >= 0.4
    assert skate.get(taker) == "first"
    assert q.get_nowait() == "second"
    q.shutdown()


def test_queue_nowait_batches_are_all_or_nothing():
    q = Queue(maxsize=4)
    q.put_nowait_batch([1, 2, 3])
    with pytest.raises(Full, match="Cannot add 2 items to queue of size 3 and maxsize 4"):
        q.put_nowait_batch([4, 5])
    assert q.qsize() == 3
    q.put_nowait_batch(x for x in [4])       # any iterable
    assert q.get_nowait_batch(2) == [1, 2]
    with pytest.raises(Empty, match="Cannot get 5 items from queue of size 2"):
        q.get_nowait_batch(5)
    assert q.qsize() == 2
    assert q.get_nowait_batch(0) == []
    with pytest.raises(TypeError):
        q.put_nowait_batch(7)
    with pytest.raises(TypeError):
        q.get_nowait_batch("2")
    with pytest.raises(ValueError):
        q.get_nowait_batch(-1)
    assert q.get_nowait_batch(2) == [3, 4]
    q.shutdown()


@skate.remote
class AsyncUser:
    async def roundtrip(self, q, items):
        for item in items:
            await q.put_async(item)
        return [await q.get_async() for _ in items]

    async def wait_for_items(self, q, n):
        return [await q.get_async(timeout=30) for _ in range(n)]

    async def errors(self, empty_q, full_q):
        out = []
        for call in (lambda: empty_q.get_async(timeout=0.1), lambda: empty_q.get_async(block=False),
                     lambda: full_q.put_async("x", timeout=0.1), lambda: full_q.put_async("x", block=False)):
            try:
                await call()
                out.append(None)
            except (Empty, Full) as e:
                out.append(type(e).__name__)
        return out

    async def ping(self):
        return "pong"


def test_queue_async_variants_from_an_async_actor():
    user = AsyncUser.remote()
    q = Queue()
    assert skate.get(user.roundtrip.remote(q, [1, 2, 3])) == [1, 2, 3]
    # an awaiting get_async holds no thread: the actor keeps answering meanwhile
    waiting = user.wait_for_items.remote(q, 2)
    assert skate.get(user.ping.remote(), timeout=10) == "pong"
    ready, _ = skate.wait([waiting], timeout=0.3)
    assert not ready
    q.put("x")
    q.put("y")
    assert skate.get(waiting, timeout=30) == ["x", "y"]
    full = Queue(maxsize=1)
    full.put("only")
    empty = Queue()
    assert skate.get(user.errors.remote(empty, full)) == ["Empty", "Empty", "Full", "Full"]
    assert full.get_nowait() == "only" and full.empty()
    empty.shutdown()
    q.shutdown()
    full.shutdown()


@skate.remote
def produce(q, n):
    for i in range(n):
        q.put(i, timeout=30)
    return os.getpid()


@skate.remote
def consume(q, n):
    return os.getpid(), [q.get(timeout=30) for _ in range(n)]


def test_queue_shared_by_a_producer_task_and_a_consumer_task():
    q = Queue(maxsize=5)                    # smaller than the stream: the producer must wait
    consumer = consume.remote(q, 50)
    producer = produce.remote(q, 50)
    producer_pid = skate.get(producer, timeout=60)
    consumer_pid, items = skate.get(consumer, timeout=60)
    assert items == list(range(50))
    assert len({producer_pid, consumer_pid, os.getpid()}) == 3
    assert q.empty()
    q.shutdown()


def test_queue_pickles_as_its_actor_handle():
    q = Queue(maxsize=3)
    copy = pickle.loads(cloudpickle.dumps(q))
    assert copy.actor == q.actor and copy.maxsize == 3
    copy.put("via the copy")
    assert q.get_nowait() == "via the copy"
    q.shutdown()


def test_queue_shutdown_ends_its_actor():
    for force in (False, True):
        q = Queue(actor_options={"name": f"util-queue-{force}"})
        q.put(1)
        handle = q.actor
        q.shutdown(force=force, grace_period_s=5)
        assert q.actor is None
        with pytest.raises(RuntimeError, match="shut down"):
            q.put(2)
        with pytest.raises(ActorDiedError):
            skate.get(handle.qsize.remote(), timeout=30)
        assert poll(lambda: not actor_named(f"util-queue-{force}"))


def actor_named(name):
    try:
        return skate.get_actor(name)
    except ValueError:
        return None


# --- state.list_actors --------------------------------------------------------------------

def entry_of(actor, detail=False):
    rows = state.list_actors(filters=[("actor_id", "=", actor._actor_id.hex())], detail=detail)
    assert len(rows) <= 1
    return rows[0] if rows else None


def test_list_actors_shows_alive_then_dead_with_cause_after_kill():
    actor = Worker.options(name="util-state-worker", namespace="util-ns").remote()
    pid = skate.get(actor.pid.remote())
    alive = poll(lambda: (e := entry_of(actor)) and e["state"] == "ALIVE" and e)
    assert alive, entry_of(actor)
    assert alive["actor_id"] == actor._actor_id.hex()
    assert alive["class_name"] == "Worker"
    assert alive["name"] == "util-state-worker"
    assert alive["ray_namespace"] == alive["namespace"] == "util-ns"
    assert alive["pid"] == pid
    assert alive["node_id"] == skate.get_runtime_context().get_node_id()
    assert "death_cause" not in alive          # a detail column, as in Ray
    detail = entry_of(actor, detail=True)
    assert detail["death_cause"] is None and detail["num_restarts"] == 0
    assert detail["is_detached"] is False

    skate.kill(actor)
    dead = poll(lambda: (e := entry_of(actor, detail=True)) and e["state"] == "DEAD" and e)
    assert dead, entry_of(actor, detail=True)
    assert "killed" in dead["death_cause"]
    assert state.get_actor_state(actor._actor_id.hex()) == dead


def test_list_actors_death_cause_of_a_failed_constructor_carries_its_traceback():
    @skate.remote
    class Broken:
        def __init__(self):
            raise ValueError("util-state: constructor refused")

        def m(self):
            return 1

    actor = Broken.remote()
    with pytest.raises(ActorDiedError):
        skate.get(actor.m.remote(), timeout=30)
    dead = poll(lambda: (e := state.get_actor_state(actor._actor_id.hex())) and e["state"] == "DEAD" and e)
    assert dead, state.get_actor_state(actor._actor_id.hex())
    assert dead["class_name"] == "Broken"
    assert "Traceback (most recent call last)" in dead["death_cause"]
    assert "ValueError: util-state: constructor refused" in dead["death_cause"]


def test_list_actors_counts_restarts():
    actor = Worker.options(max_restarts=1).remote()
    skate.get(actor.pid.remote())
    skate.kill(actor, no_restart=False)
    restarted = poll(lambda: (e := entry_of(actor, detail=True)) and e["num_restarts"] == 1
                     and e["state"] == "ALIVE" and e, timeout=30)
    assert restarted, entry_of(actor, detail=True)
    assert skate.get(actor.pid.remote()) == restarted["pid"]
    skate.kill(actor)


def test_list_actors_filters():
    keep = Worker.options(name="util-filter-keep").remote()
    skate.get(keep.pid.remote())
    assert poll(lambda: entry_of(keep) and entry_of(keep)["state"] == "ALIVE")
    hexid = keep._actor_id.hex()

    def ids(filters):
        return {e["actor_id"] for e in state.list_actors(filters=filters, limit=10_000)}

    assert hexid in ids([("state", "=", "alive")])           # strings: case-insensitive
    assert hexid not in ids([("state", "!=", "ALIVE")])
    assert ids([("name", "=", "util-filter-keep")]) == {hexid}
    assert ids([("class_name", "=", "Worker"), ("name", "=", "util-filter-keep")]) == {hexid}
    assert hexid not in ids([("class_name", "!=", "Worker")])
    assert ids([("pid", "=", str(entry_of(keep)["pid"]))]) == {hexid}   # converted to int
    everyone = state.list_actors(limit=10_000)
    assert [e["actor_id"] for e in everyone] == sorted(e["actor_id"] for e in everyone)
    assert len(state.list_actors(limit=1)) == 1
    with pytest.raises(ValueError, match="Unsupported filter predicate"):
        state.list_actors(filters=[("state", ">", "ALIVE")])
    with pytest.raises(ValueError, match="filter column death_cause is not supported"):
        state.list_actors(filters=[("death_cause", "=", "x")])
    assert state.get_actor_state("00" * 16) is None
    assert state.get_actor is state.get_actor_state
    skate.kill(keep)


def test_actor_created_right_after_init_is_listed(tmp_path):
    """An actor made right after init(), before the GCS is up, still reaches the actor
    table: the node reports what it has as soon as the GCS is there."""
    proc = run_driver(tmp_path, """
        import time, skate
        from skate.util import state

        @skate.remote
        class A:
            def ping(self):
                return 1

        skate.init(num_cpus=1)
        a = A.remote()
        skate.get(a.ping.remote())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            rows = state.list_actors(filters=[("actor_id", "=", a._actor_id.hex())])
            if rows and rows[0]["state"] == "ALIVE":
                print("LISTED")
                break
            time.sleep(0.1)
        else:
            print("MISSING", state.list_actors())
        skate.shutdown()
    """)
    assert proc.returncode == 0, describe(proc)
    assert "LISTED" in proc.stdout, describe(proc)
