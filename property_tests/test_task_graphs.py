"""Task graphs: a random program gives what evaluating it serially gives.

What this property promises, for every program Hypothesis draws (``task_programs.py``):
fan-in and fan-out, refs passed at top level, inside lists and inside objects the driver
put and dropped, nested tasks, tasks and actor calls with one or two returns, results
inline or in shared memory, with ``get``, ``wait`` (random ``num_returns`` and timeouts),
``cancel`` and dropped refs between the submissions:

- every ref holds the value the serial oracle computes, or an error the program allows
  (the ValueError of a failing node and of the nodes that depend on it,
  TaskCancelledError where a node was cancelled, ActorDiedError after an actor was
  killed);
- ``wait`` returns a partition of its refs in their order, at most ``num_returns``
  ready, all of them when it had no timeout, and never later than its timeout;
- no ``get`` waits past its deadline;
- once the program drops its refs, the store's accounting and the driver's reference
  counts are back where they were.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings

from invariants import STATS, examples
from task_programs import Input, Node, Program, Step, programs, run_program

pytestmark = pytest.mark.timeout(600)


def check(clusters, program, injector=None) -> None:
    verdict, reproducer = run_program(program, injector)
    STATS.record(verdict, reproducer)
    if not verdict.clean:
        clusters.restart()
    assert verdict.ok, f"{verdict.describe()}\n{reproducer}"


@settings(max_examples=examples(60))
@given(program=programs(max_nodes=8, actors=False))
@example(program=Program(nodes=(
    Node(kind="put", const=1, pad=200_000),
    Node(kind="task", const=2, inputs=(Input(0, mode="arg"), Input(0, mode="nested"), Input(0, mode="boxed"))),
    Node(kind="task", const=3, inputs=(Input(1, mode="kwarg"),), num_returns=2, nested=True),
    Node(kind="task", inputs=(Input(2, ret=1), Input(2, ret=0, mode="boxed")), sleep_ms=200),
), steps=(Step(after=3, op="wait", nodes=(1, 2, 3), num_returns=2, timeout=None),
          Step(after=3, op="cancel", nodes=(3,)))))
def test_a_task_graph_gives_what_its_serial_evaluation_gives(clusters, program):
    clusters.ensure(num_cpus=2)
    check(clusters, program)


@settings(max_examples=examples(30))
@given(program=programs(max_nodes=6, actors=True))
def test_a_program_with_actors_gives_what_its_serial_evaluation_gives(clusters, program):
    clusters.ensure(num_cpus=2)
    check(clusters, program)
