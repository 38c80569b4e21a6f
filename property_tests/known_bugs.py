"""Runtime bugs this suite found that are reported and not fixed yet.

Each has a regression test in ``test_found_bugs.py`` marked ``xfail(strict=True)``: when
the runtime is fixed the test passes, strict xfail turns that into a failure, and whoever
fixed it deletes the entry here and the mark there (the test stays, as a regression
test).

While an entry is here, the property tests tell its outcomes apart from new wrong
results (``match``, ``explain_leak``), and stay out of the fault space that can only hang
on it (``avoid``). ``SKATE_PROPERTY_KNOWN_BUGS=include`` explores that space anyway (e.g.
in a soak, to measure how often a known bug is met).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownBug:
    id: str
    summary: str
    error_name: str = ""     # the exception type name a get raises when it is met
    message: str = ""        # a fragment of that error's message
    leak: str = ""           # "borrowed": refs held by borrowers only; "store": store bytes only


BUGS: tuple = ()   # none open: every bug found so far is fixed (see test_found_bugs.py)

INCLUDE = os.environ.get("SKATE_PROPERTY_KNOWN_BUGS", "") == "include"

SYSTEM_ERRORS = ("ActorDiedError", "WorkerCrashedError", "TaskCancelledError", "ObjectLostError",
                 "OwnerDiedError")


def match(error_type: type, message: str) -> KnownBug | None:
    """The known bug an error outcome is the signature of, if any."""
    names = {c.__name__ for c in error_type.__mro__}
    for bug in BUGS:
        if bug.error_name and bug.error_name in names and bug.message in message:
            return bug
    return None


def explain_leak(leaked: list, store: dict, error_names: set, processes_died: bool,
                 cancelled: bool) -> KnownBug | None:
    """The known bug a leak after a program is the signature of, if any.

    ``leaked``: the driver's reference counts ``(oid, [local, submitted, contained,
    borrowers])`` still held; ``store``: the node's store stats after the program;
    ``error_names``: the exception types the program's gets raised; ``processes_died``:
    whether the run killed a worker or an actor; ``cancelled``: whether it cancelled.
    """
    store_leaked = bool(store.get("used") or store.get("num_objects"))
    for bug in BUGS:
        if (bug.leak == "borrowed" and leaked and error_names & set(SYSTEM_ERRORS)
                and all(not any(counts[:3]) and counts[3] for _oid, counts in leaked)):
            return bug
        if bug.leak == "store-sealed" and not leaked and store_leaked and not store.get("num_pending"):
            return bug
        if bug.leak == "store-pending" and not leaked and store.get("num_pending") and cancelled:
            return bug
    return None


def avoid(bug_id: str) -> bool:
    """Whether the property tests stay out of this bug's fault space."""
    return not INCLUDE and any(b.id == bug_id for b in BUGS)
