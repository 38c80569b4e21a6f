"""The soak: random fault programs for as long as ``SKATE_SOAK_SECONDS`` says.

    SKATE_SOAK_SECONDS=600 .venv/bin/python -m pytest property_tests/test_soak.py

Runs in turns of about a minute each: programs whose workers and actors the kill
injector SIGKILLs (``test_kill_injection.py``'s property), programs under disturbed
messages (``test_transport_faults.py``'s), undisturbed programs with actors, and the API
state machine (``test_api_state_machine.py``), each turn drawing from a fresh random
Hypothesis seed (printed). Unlike the ci tests it keeps going
after a failure — the cluster is restarted and the failing program recorded — and ends
with the summary line (programs run, faults injected, wrong results, hangs, leaks) and
every failing program with what reproduces it; it fails if any program failed.

Skipped unless ``SKATE_SOAK_SECONDS`` is set.
"""

from __future__ import annotations

import os
import random
import time

import pytest
from hypothesis import Phase, given, seed, settings
from hypothesis import strategies as st

from skate._private.testing import faults

from fault_plans import drops_allowed, fault_plans
from invariants import STATS, soak_seconds
from task_programs import programs, run_program

SECONDS = soak_seconds()
TURN_S = 60.0

pytestmark = [pytest.mark.skipif(SECONDS <= 0, reason="a soak runs only when SKATE_SOAK_SECONDS is set"),
              pytest.mark.timeout(int(SECONDS) + 900)]


_seconds_per_program = [1.0]


def _turn(clusters, family: str, hypothesis_seed: int, until: float) -> None:
    log = os.path.join(clusters.temp_dir, f"faults-{os.getpid()}.log")
    # Enough examples to fill the turn; those drawn after its end return at once.
    budget = int((until - time.monotonic()) / _seconds_per_program[0]) + 5

    def judge(verdict, reproducer):
        reproducer = f"soak turn {family}, hypothesis seed {hypothesis_seed}\n{reproducer}"
        STATS.record(verdict, reproducer)
        if not verdict.clean:
            clusters.restart()

    @seed(hypothesis_seed)
    @settings(max_examples=budget, phases=[Phase.generate], deadline=None, database=None)
    @given(program=programs(max_nodes=8, kills=family == "kills", actors=True), data=st.data())
    def one(program, data):
        # Drawn first, every time: Hypothesis needs each example to draw the same way.
        plan = data.draw(fault_plans(log=log, drops=drops_allowed(program)), label="plan")
        start = time.monotonic()
        if start >= until:
            return
        if family == "kills":
            clusters.ensure(faults.FaultPlan(seed=0, injector=clusters.injector.path), num_cpus=2)
            judge(*run_program(program, clusters.injector))
        elif family == "transport":
            clusters.ensure(plan, num_cpus=2)
            verdict, reproducer = run_program(program, fault_log=log)
            judge(verdict, f"plan = {plan.to_json()}\n{reproducer}")
        else:
            clusters.ensure(num_cpus=2)
            judge(*run_program(program))
        _seconds_per_program[0] = 0.8 * _seconds_per_program[0] + 0.2 * (time.monotonic() - start)

    one()


def _api_turn(clusters, hypothesis_seed: int, until: float) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    from invariants import Verdict
    from test_api_state_machine import SkateAPI

    clusters.ensure(num_cpus=2)
    while time.monotonic() < until:
        done = SkateAPI.completed
        try:
            run_state_machine_as_test(SkateAPI, settings=settings(
                max_examples=10, stateful_step_count=30, deadline=None, database=None,
                phases=[Phase.generate], derandomize=False))
            verdict = Verdict()
        except Exception as exc:  # noqa: BLE001 - recorded, and the soak goes on
            steps = "\n".join(getattr(exc, "__notes__", []))   # Hypothesis's reproducing steps
            verdict = Verdict(wrong=[f"state machine: {type(exc).__name__}: {exc}"[:3000] + "\n" + steps])
        with STATS.lock:
            STATS.programs += max(0, SkateAPI.completed - done - 1)
        STATS.record(verdict, f"soak turn api (turn seed {hypothesis_seed}; the steps above reproduce it)")
        if not verdict.ok:
            clusters.restart()


def test_soak(clusters):
    end = time.monotonic() + SECONDS
    rng = random.Random()
    families = ["kills", "transport", "plain", "api"]
    rng.shuffle(families)
    turn = 0
    while time.monotonic() < end:
        family = families[turn % len(families)]
        turn += 1
        hypothesis_seed = rng.getrandbits(32)
        print(f"soak turn {turn}: {family}, hypothesis seed {hypothesis_seed}", flush=True)
        until = min(end, time.monotonic() + TURN_S)
        if family == "api":
            _api_turn(clusters, hypothesis_seed, until)
        else:
            _turn(clusters, family, hypothesis_seed, until)
    print(STATS.summary(), flush=True)
    assert not STATS.failures, f"{len(STATS.failures)} failing programs (listed in the summary)"
