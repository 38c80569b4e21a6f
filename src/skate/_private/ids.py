"""Identifiers: workers, tasks, objects, jobs, nodes.

IDs are plain ``bytes`` on the hot path (cheap to hash, compare and pickle):

- worker id: 8 random bytes, one per process that embeds a core worker;
- task id: worker id of the submitter + an 8-byte counter (16 bytes);
- object id: the id of the task that makes it + a 4-byte return index (20 bytes).
  ``put`` objects use a task id whose counter has its top bit set, so object ids never
  collide and the task that produced an object can be read back from its id (lineage).
"""

from __future__ import annotations

import itertools
import os

WORKER_ID_LEN = 8
TASK_ID_LEN = 16
OBJECT_ID_LEN = 20
_PUT_BIT = 1 << 63


def new_worker_id() -> bytes:
    return os.urandom(WORKER_ID_LEN)


def new_node_id() -> bytes:
    return os.urandom(8)


def new_session_id() -> str:
    return os.urandom(4).hex()


class IdSource:
    """Mints task and put-object ids for one core worker."""

    __slots__ = ("worker_id", "_tasks", "_puts")

    def __init__(self, worker_id: bytes):
        self.worker_id = worker_id
        self._tasks = itertools.count(1)
        self._puts = itertools.count(1)

    def task_id(self) -> bytes:
        return self.worker_id + next(self._tasks).to_bytes(8, "big")

    def put_object_id(self) -> bytes:
        return self.worker_id + (next(self._puts) | _PUT_BIT).to_bytes(8, "big") + b"\0\0\0\0"


def return_object_id(task_id: bytes, index: int) -> bytes:
    return task_id + index.to_bytes(4, "big")


def task_of(object_id: bytes) -> bytes:
    return object_id[:TASK_ID_LEN]


def owner_worker_of_task(task_id: bytes) -> bytes:
    return task_id[:WORKER_ID_LEN]


def is_put_object(object_id: bytes) -> bool:
    return bool(object_id[WORKER_ID_LEN] & 0x80)
