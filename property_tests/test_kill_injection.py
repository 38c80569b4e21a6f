"""Killed workers and actors: a program whose processes are SIGKILLed at chosen moments
still gives what its serial evaluation gives, or a documented error.

The kill injector (``kill_injector.py``) SIGKILLs the worker or actor process running a
chosen node of the program, at the n-th time that node's code reaches a phase: while its
arguments are fetched (``fetch``), in its body (``run``), while a return value is
serialized (``return``), between writing a result into shared memory and sealing it
(``seal``), or after storing it and before ``TASK_DONE`` leaves (``reply``).

What this property promises, on top of ``test_task_graphs.py``'s:

- a task whose retries outnumber the processes the run killed gives its value: a crash
  that retries can absorb is invisible; past its retries a task raises
  WorkerCrashedError, passed on to the nodes that depend on it;
- an actor whose process was killed fails its calls with ActorDiedError (or, restarted
  and with retries left, completes them);
- no get waits past its deadline, and once the program drops its refs the store and the
  driver's reference counts are back where they were;
- after the cluster shuts down, no process and no shared-memory segment of it remains
  (checked when the module's cluster stops).

A failing example prints the program (with its kill schedule) and the injector's
history; ``@example(program=...)`` with that program replays the same schedule.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings

from skate._private.testing import faults

from invariants import STATS, examples
from task_programs import ActorSpec, Input, Kill, Node, Program, programs, run_program

pytestmark = pytest.mark.timeout(600)


def kill_cluster(clusters) -> None:
    clusters.ensure(faults.FaultPlan(seed=0, injector=clusters.injector.path), num_cpus=2)


def check(clusters, program) -> None:
    verdict, reproducer = run_program(program, clusters.injector)
    STATS.record(verdict, reproducer)
    if not verdict.clean:
        clusters.restart()
    assert verdict.ok, f"{verdict.describe()}\n{reproducer}"


@settings(max_examples=examples(80))
@given(program=programs(max_nodes=6, kills=True, actors=True))
@example(program=Program(   # three kills in three phases of one task: its three retries absorb them
    nodes=(Node(kind="put", const=1), Node(kind="task", const=2, inputs=(Input(0),), max_retries=3)),
    kills=(Kill(1, "fetch"), Kill(1, "run", 2), Kill(1, "return", 3))))
@example(program=Program(   # a large result: killed before it is sealed, then before reply
    nodes=(Node(kind="task", const=5, pad=300_000, max_retries=3),),
    kills=(Kill(0, "seal"),)))
@example(program=Program(   # an actor killed in a call, restarted, the call retried
    nodes=(Node(kind="actor", const=1), Node(kind="actor", const=2)),
    actors=(ActorSpec(max_restarts=1, max_task_retries=1),),
    kills=(Kill(0, "run"),)))
def test_a_program_whose_workers_are_killed_gives_its_values_or_documented_errors(clusters, program):
    kill_cluster(clusters)
    check(clusters, program)
