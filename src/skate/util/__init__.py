"""Utilities built on the public API, as ``ray.util`` offers them.

``ActorPool`` (calls spread over a set of actors), ``queue`` (``queue.Queue``, a FIFO
shared by processes through an async actor) and ``state`` (actor listings from the GCS).
Import it explicitly: ``import skate.util`` or ``from skate.util import ActorPool``.

May call: the public API (``skate.api``, ``skate.actor``) and, for ``state``, the GCS
actor table.
"""

from skate.util import queue, state
from skate.util.actor_pool import ActorPool

__all__ = ["ActorPool", "queue", "state"]
