"""``Queue``: a first-in, first-out queue shared by processes, as ``ray.util.queue.Queue``.

::

    producer (any process)                 queue actor (async)             consumer (any process)
    q.put(x, timeout=t) --put.remote(x, t)--> asyncio.Queue.put   <--get.remote(t)-- q.get(timeout=t)
                        <-- None / Full ----  (waits up to t)     ---- x / Empty -->

The items live in one async actor holding an ``asyncio.Queue``; a blocking ``put`` or
``get`` is a call that waits on the actor's event loop, so many can wait at once without
holding a thread. The ``Queue`` object is only the actor's handle and ``maxsize``: it
pickles as such, so passing it to tasks and actors gives them the same queue. The actor
lives while some ``Queue`` object for it exists (or until ``shutdown``).

Errors: ``Empty`` / ``Full`` (subclasses of the standard ``queue.Empty`` / ``queue.Full``)
when nothing is there / no room is left, immediately (``block=False``) or after
``timeout``. They are raised as themselves, not wrapped in a task error.

May call: the public API (``skate.remote``, ``skate.get``, ``skate.wait``, ``skate.kill``).
"""

from __future__ import annotations

import asyncio
import queue as _std_queue
from collections.abc import Iterable
from typing import Any, Dict, List, Optional

from skate import actor as _actor
from skate import api


class Empty(_std_queue.Empty):
    """The queue had no item: at once (``block=False``) or within the timeout."""


class Full(_std_queue.Full):
    """The queue had no room for the item: at once (``block=False``) or within the timeout."""


class _QueueActor:
    """Holds the items. Sync methods run on the actor's event loop too, between awaits."""

    def __init__(self, maxsize):
        self.maxsize = maxsize
        self.queue = asyncio.Queue(self.maxsize)

    def qsize(self):
        return self.queue.qsize()

    def empty(self):
        return self.queue.empty()

    def full(self):
        return self.queue.full()

    async def put(self, item, timeout=None):
        try:
            await asyncio.wait_for(self.queue.put(item), timeout)
        except asyncio.TimeoutError:
            raise Full(f"the queue stayed full (maxsize={self.maxsize}) for the whole "
                       f"timeout of {timeout}s") from None

    async def get(self, timeout=None):
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            raise Empty(f"the queue stayed empty for the whole timeout of {timeout}s") from None

    def put_nowait(self, item):
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            raise Full(f"the queue is full (maxsize={self.maxsize})") from None

    def put_nowait_batch(self, items):
        # All or nothing: a batch that does not fit leaves the queue as it was.
        if self.maxsize > 0 and len(items) + self.qsize() > self.maxsize:
            raise Full(f"Cannot add {len(items)} items to queue of size "
                       f"{self.qsize()} and maxsize {self.maxsize}.")
        for item in items:
            self.queue.put_nowait(item)

    def get_nowait(self):
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            raise Empty("the queue is empty") from None

    def get_nowait_batch(self, num_items):
        if num_items > self.qsize():
            raise Empty(f"Cannot get {num_items} items from queue of size {self.qsize()}.")
        return [self.queue.get_nowait() for _ in range(num_items)]


_QueueActorClass = api.remote(_QueueActor)


def _plain(err: BaseException) -> BaseException:
    """``Empty``/``Full`` raised in the actor come back as a task error that is also an
    instance of them; users get the plain exception, with its message."""
    if isinstance(err, Full):
        return Full(*err.args)
    if isinstance(err, Empty):
        return Empty(*err.args)
    return err


def _check_timeout(timeout) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")


class Queue:
    """A FIFO queue on an async actor; usable from any task or actor it is passed to.

    ``maxsize=0`` means unbounded. ``actor_options`` go to the queue actor's
    ``.options(...)`` (e.g. ``{"num_cpus": 1}``, ``{"name": "jobs"}``).

    >>> q = Queue(maxsize=2)
    >>> q.put(1); q.put(2)
    >>> q.put(3, timeout=0.1)          # raises Full
    >>> q.get(), q.get()
    (1, 2)
    """

    def __init__(self, maxsize: int = 0, actor_options: Optional[Dict] = None) -> None:
        actor_options = actor_options or {}
        self.maxsize = maxsize
        self.actor = _QueueActorClass.options(**actor_options).remote(self.maxsize)

    def __reduce__(self):
        # Only the handle travels: every copy talks to the same actor.
        return (_rebuild, (self.maxsize, self.actor))

    def _handle(self):
        if self.actor is None:
            raise RuntimeError("this Queue was shut down (Queue.shutdown()); create a new Queue")
        return self.actor

    def _get(self, ref):
        try:
            return api.get(ref)
        except (Empty, Full) as e:
            raise _plain(e) from None

    async def _await(self, ref):
        try:
            return await ref
        except (Empty, Full) as e:
            raise _plain(e) from None

    # --- size -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        """The number of items in the queue now."""
        return api.get(self._handle().qsize.remote())

    def qsize(self) -> int:
        """The number of items in the queue now."""
        return self.size()

    def empty(self) -> bool:
        """Whether the queue holds no item now."""
        return api.get(self._handle().empty.remote())

    def full(self) -> bool:
        """Whether the queue holds ``maxsize`` items now (never, when unbounded)."""
        return api.get(self._handle().full.remote())

    # --- put ------------------------------------------------------------------------------
    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Adds ``item``; if the queue is full, waits for room (up to ``timeout`` seconds)
        when ``block``, else raises ``Full`` at once. Raises ``Full`` on timeout."""
        if not block:
            self._get(self._handle().put_nowait.remote(item))
            return
        _check_timeout(timeout)
        self._get(self._handle().put.remote(item, timeout))

    async def put_async(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """``put`` for async code: awaits room instead of blocking the thread."""
        if not block:
            await self._await(self._handle().put_nowait.remote(item))
            return
        _check_timeout(timeout)
        await self._await(self._handle().put.remote(item, timeout))

    def put_nowait(self, item: Any) -> None:
        """``put(item, block=False)``."""
        return self.put(item, block=False)

    def put_nowait_batch(self, items: Iterable) -> None:
        """Adds ``items`` in order, all or none: raises ``Full`` if they do not all fit."""
        if not isinstance(items, Iterable):
            raise TypeError("Argument 'items' must be an Iterable")
        self._get(self._handle().put_nowait_batch.remote(list(items)))

    # --- get ------------------------------------------------------------------------------
    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """Removes and returns the oldest item; if the queue is empty, waits for one (up to
        ``timeout`` seconds) when ``block``, else raises ``Empty`` at once. Raises
        ``Empty`` on timeout."""
        if not block:
            return self._get(self._handle().get_nowait.remote())
        _check_timeout(timeout)
        return self._get(self._handle().get.remote(timeout))

    async def get_async(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """``get`` for async code: awaits an item instead of blocking the thread."""
        if not block:
            return await self._await(self._handle().get_nowait.remote())
        _check_timeout(timeout)
        return await self._await(self._handle().get.remote(timeout))

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self.get(block=False)

    def get_nowait_batch(self, num_items: int) -> List[Any]:
        """Removes and returns the ``num_items`` oldest items, or raises ``Empty`` (taking
        none) if there are fewer."""
        if not isinstance(num_items, int):
            raise TypeError("Argument 'num_items' must be an int")
        if num_items < 0:
            raise ValueError("'num_items' must be nonnegative")
        return self._get(self._handle().get_nowait_batch.remote(num_items))

    # --- end ------------------------------------------------------------------------------
    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        """Ends the queue actor (its items are lost) and frees what it reserved.

        ``force=True`` kills it at once; otherwise it is asked to stop and killed if it has
        not within ``grace_period_s`` seconds.
        """
        if self.actor:
            if force:
                _actor.kill(self.actor, no_restart=True)
            else:
                done_ref = self.actor.__ray_terminate__.remote()
                _, not_done = api.wait([done_ref], timeout=grace_period_s)
                if not_done:
                    _actor.kill(self.actor, no_restart=True)
        self.actor = None


def _rebuild(maxsize, handle) -> Queue:
    q = Queue.__new__(Queue)
    q.maxsize = maxsize
    q.actor = handle
    return q


__all__ = ["Queue", "Empty", "Full"]
