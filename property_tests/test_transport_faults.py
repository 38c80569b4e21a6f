"""Disturbed messages: what ``SKATE_FAULTS`` does to the transport, and what skate keeps
promising under it.

The switch itself (``skate/_private/testing/faults.py``):

- a plan is checked when it is read: unknown kinds, actions and fields, probabilities
  outside [0, 1], and duplicates of kinds whose receivers are not idempotent are refused
  with a message naming them;
- a delayed message holds back the ones after it on its connection (order is kept);
- a duplicated message arrives twice; a dropped one cuts the connection (both ends see it
  close, nothing after it arrives);
- decisions are a function of the seed, the process's role and start order, and the
  message's rank: the same seed replays the same decisions.

The property: a random program (``task_programs.py``) run on a cluster whose every
process follows a random plan (``fault_plans.py``) gives what its serial evaluation
gives. Delays and duplicates must be invisible; workers killed as they seal or report a
result are retried (WorkerCrashedError only past a task's retries); a cut link costs a
retry, or fails a fetch with OwnerDiedError.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skate._private.protocol import messages as M
from skate._private.protocol import transport
from skate._private.testing import faults

from fault_plans import drops_allowed, fault_plans
from invariants import STATS, examples
from task_programs import programs, run_program

pytestmark = pytest.mark.timeout(600)


# --- the switch ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, complaint", [
    ('{"kinds": {"NO_SUCH_KIND": {"delay": 0.1}}}', "unknown message kind 'NO_SUCH_KIND'"),
    ('{"kinds": {"PUSH_TASK": {"explode": 0.1}}}', "unknown field(s) ['explode']"),
    ('{"kinds": {"PUSH_TASK": {"delay": 1.5}}}', "PUSH_TASK.delay=1.5 is not a probability"),
    ('{"kinds": {"PUSH_TASK": {"duplicate": 0.1}}}', "PUSH_TASK cannot be duplicated"),
    ('{"kinds": {"REPLY": {"delay": 0.1, "delay_ms": [5, 1]}}}', "is not a [low, high] range"),
    ('{"kinds": {"REPLY": {"drop": 0.1, "roles": ["gcs"]}}}', "REPLY.roles=['gcs']"),
    ('{"seed": "seven"}', "seed='seven' is not an integer"),
    ('{"sede": 7}', "unknown key(s) ['sede']"),
    ('[1, 2]', "must be a JSON object"),
    ('{not json', "is not valid JSON"),
])
def test_a_plan_that_cannot_be_followed_is_refused_naming_the_problem(text, complaint):
    with pytest.raises(ValueError) as info:
        faults.FaultPlan.from_json(text)
    assert complaint in str(info.value)


def test_a_wildcard_duplicates_only_the_kinds_that_may_be_duplicated():
    plan = faults.FaultPlan.from_json('{"kinds": {"*": {"duplicate": 0.5}, "TASK_DONE": {"delay": 0.1}}}')
    duplicated = {faults.KIND_NAMES[k] for k, rule in plan.rules.items() if rule["duplicate"]}
    assert duplicated == set(faults.DUPLICABLE)
    assert plan.rules[M.TASK_DONE]["delay"] == 0.1 and plan.rules[M.TASK_DONE]["duplicate"] == 0.5


def test_install_from_env_arms_the_hook_and_an_empty_variable_disarms_it(monkeypatch, clusters):
    clusters.stop()
    try:
        monkeypatch.setenv(faults.ENV_VAR, '{"seed": 3, "kinds": {"REPLY": {"delay": 0.5}}}')
        faults.install_from_env()
        assert transport.fault_hook is faults._hook
        assert faults._state.plan.seed == 3 and faults._state.role == "driver"
        monkeypatch.setenv(faults.ENV_VAR, "")
        faults.install_from_env()
        assert transport.fault_hook is None
    finally:
        faults.install(None)


def test_workers_forked_by_the_zygote_draw_from_streams_of_their_own():
    faults.install(faults.FaultPlan(seed=1), role="zygote")
    try:
        state = faults._state
        state.forks = 2              # two workers forked before this one
        faults._after_fork_in_child()
        assert (state.role, state.ordinal) == ("worker", 3)
    finally:
        faults.install(None)


class _Loop:
    """Stands for the EventLoop in decision tests: timers and callbacks are recorded."""

    def __init__(self):
        self.later = []

    def call_later(self, delay, fn, *args):
        self.later.append(round(delay, 6))

    def call_soon(self, fn, *args):
        pass


class _Conn:
    def __init__(self):
        self.loop = _Loop()
        self.closed = False
        self.sent = []

    def send_raw(self, msg):
        self.sent.append(msg)


def _decisions(seed: int, n: int = 200) -> list:
    faults.install(faults.FaultPlan(seed=seed, kinds={"*": {"delay": 0.3, "duplicate": 0.3}}), role="worker")
    try:
        out, conns = [], []
        for i in range(n):
            conn = _Conn()   # a fresh connection each time: no message waits behind another
            conns.append(conn)
            kind = (M.REPLY, M.TASK_DONE, M.PUSH_TASK)[i % 3]
            result = faults._hook(conn, (kind, i))
            out.append((None if result is None else len(result), tuple(conn.loop.later)))
        return out
    finally:
        faults.install(None)


def test_the_same_seed_replays_the_same_decisions_and_another_seed_does_not():
    assert _decisions(11) == _decisions(11)
    assert _decisions(11) != _decisions(12)


def _pair(plan: faults.FaultPlan):
    """Two connections of one socketpair on a loop, the sender armed with ``plan``."""
    loop = transport.EventLoop("faults-test").start()
    a, b = socket.socketpair()
    got, closed = [], threading.Event()
    sender = loop.add_connection(transport.Connection(loop, a, lambda c, m: None, lambda c: closed.set()))
    receiver = loop.add_connection(transport.Connection(loop, b, lambda c, m: got.append((time.monotonic(), m)),
                                                        lambda c: closed.set()))
    faults.install(plan, role="worker")
    return loop, sender, receiver, got, closed


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


def test_a_delayed_message_holds_back_the_ones_after_it_on_its_connection():
    loop, sender, _, got, _ = _pair(faults.FaultPlan(kinds={"HELLO": {"delay": 1.0, "delay_ms": [50, 50]}}))
    try:
        start = time.monotonic()
        sender.send((M.HELLO, 1))
        sender.send((M.FUNCTION, 2))      # no rule for it: it still waits behind HELLO
        sender.send((M.HELLO, 3))
        assert _wait_for(lambda: len(got) == 3)
        assert [m[1] for _, m in got] == [1, 2, 3]
        assert got[0][0] - start >= 0.045
    finally:
        faults.install(None)
        loop.stop()


def test_a_duplicated_message_arrives_twice():
    loop, sender, _, got, _ = _pair(faults.FaultPlan(kinds={"REPLY": {"duplicate": 1.0}}))
    try:
        sender.send((M.REPLY, 7, True, None))
        sender.send((M.HELLO, 8))
        assert _wait_for(lambda: len(got) == 3)
        assert [m[:2] for _, m in got] == [(M.REPLY, 7), (M.REPLY, 7), (M.HELLO, 8)]
    finally:
        faults.install(None)
        loop.stop()


def test_a_dropped_message_cuts_the_connection_and_nothing_after_it_arrives():
    loop, sender, receiver, got, closed = _pair(faults.FaultPlan(kinds={"TASK_DONE": {"drop": 1.0}}))
    try:
        sender.send((M.HELLO, 1))
        assert _wait_for(lambda: len(got) == 1)
        sender.send((M.TASK_DONE, b"t", [], 0.0))
        sender.send((M.HELLO, 2))
        assert _wait_for(lambda: sender.closed and receiver.closed)
        assert [m[1] for _, m in got] == [1]
    finally:
        faults.install(None)
        loop.stop()


# --- the property --------------------------------------------------------------------------------

@settings(max_examples=examples(25))
@given(program=programs(max_nodes=6, actors=True), data=st.data())
def test_a_program_under_disturbed_messages_gives_its_values_or_documented_errors(clusters, program, data):
    log = os.path.join(clusters.temp_dir, f"faults-{os.getpid()}.log")
    plan = data.draw(fault_plans(log=log, drops=drops_allowed(program)), label="plan")
    clusters.ensure(plan, num_cpus=2)
    verdict, reproducer = run_program(program, fault_log=log)
    reproducer = f"plan = {plan.to_json()}\n{reproducer}"
    STATS.record(verdict, reproducer)
    if not verdict.clean:
        clusters.restart()
    assert verdict.ok, f"{verdict.describe()}\n{reproducer}"
