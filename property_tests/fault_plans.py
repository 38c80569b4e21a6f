"""Hypothesis strategies for ``SKATE_FAULTS`` plans: disturbed messages in the transport.

A plan (see ``skate/_private/testing/faults.py``) delays messages on every connection (a
slow link keeps its order), duplicates the kinds whose receivers must be idempotent,
SIGKILLs workers as they are about to seal a result (``STORE_SEAL``: written, not sealed)
or to answer (``TASK_DONE``: stored, not reported), and cuts links between core workers
(``drop``) at a push, a reply or a fetch. ``drops=False`` leaves links alone: for
programs with actors while ``cut-link-hangs-actor-calls`` is open (``known_bugs.py``),
as a call on a cut link to a live actor can only hang.

Rules are limited to the processes whose fault the suite can judge: the driver's own
connection to its node is never cut and the node process is never killed (that is the
end of an embedded cluster, not a fault skate recovers from yet).
"""

from __future__ import annotations

import hypothesis.strategies as st

from skate._private.testing import faults

import known_bugs


@st.composite
def fault_plans(draw, log: str | None = None, drops: bool = True) -> faults.FaultPlan:
    kinds: dict = {"*": {"delay": draw(st.sampled_from((0.0, 0.02, 0.1))),
                         "delay_ms": [0, draw(st.sampled_from((2, 10, 40)))],
                         "duplicate": draw(st.sampled_from((0.0, 0.05, 0.2)))}}
    kill = draw(st.sampled_from((0.0, 0.0, 0.02, 0.05)))
    if kill:
        for kind in draw(st.lists(st.sampled_from(("STORE_SEAL", "TASK_DONE")), min_size=1, unique=True)):
            kinds[kind] = {"kill": kill, "roles": ["worker"]}
    if drops:
        drop = draw(st.sampled_from((0.0, 0.01, 0.03)))
        if drop:
            kinds.setdefault("PUSH_TASK", {}).update({"drop": drop, "roles": ["driver"]})
            kinds.setdefault("GET_OBJECT", {}).update({"drop": drop, "roles": ["worker"]})
            kinds.setdefault("TASK_DONE", {}).update({"drop": drop, "roles": ["worker"]})
    return faults.FaultPlan(seed=draw(st.integers(0, 2 ** 32 - 1)), kinds=kinds, log=log)


def drops_allowed(program) -> bool:
    return not program.actors or not known_bugs.avoid("cut-link-hangs-actor-calls")
