"""``ActorPool``: spread calls over a fixed set of actors, as ``ray.util.ActorPool`` does.

::

    submit(fn, v) --an idle actor?--yes--> fn(actor, v) -> ref    (actor busy, ref numbered)
                                  \\--no---> pending_submits        (waits for an actor)
    get_next()            the ref numbered next, in submission order    --\\
    get_next_unordered()  whichever ref is ready first                  ---> skate.get(ref);
                                                                             the actor is idle
                                                                             again and takes the
                                                                             oldest pending submit

``fn(actor, value)`` must return the ObjectRef (or a list of ObjectRefs) of one call on
that actor; the actor counts as busy until its result has been taken by ``get_next*``.
An actor whose call fails with ``ActorDiedError`` leaves the pool (as in Ray), so the
pool does not keep handing work to a dead actor.

Not thread-safe, like Ray's. May call: the public API (``skate.get``, ``skate.wait``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, List, Optional, TypeVar

from skate import api, exceptions

V = TypeVar("V")

_TIMEOUT_MSG = "Timed out waiting for result"


def _key(future):
    """Results of ``fn`` are dict keys; a list of refs (``num_returns > 1``) becomes a tuple."""
    return tuple(future) if isinstance(future, list) else future


def _refs(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def _first_ready(keys: list, timeout: Optional[float]):
    """The first of ``keys`` (in their order) whose refs are all ready, or None at timeout.

    A key of several refs is ready only when all of them are, so the wait asks for one
    more ready ref each round until some key is complete.
    """
    flat = [r for k in keys for r in _refs(k)]
    if not flat:
        return keys[0] if keys else None
    deadline = None if timeout is None else time.monotonic() + timeout
    need = 1
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _ = api.wait(flat, num_returns=min(need, len(flat)), timeout=left)
        done = set(ready)
        for k in keys:
            if all(r in done for r in _refs(k)):
                return k
        if len(ready) < need or need >= len(flat):
            return None
        need = len(ready) + 1


class ActorPool:
    """Runs ``fn(actor, value)`` on whichever actor of ``actors`` is idle.

    >>> pool = ActorPool([Doubler.remote(), Doubler.remote()])
    >>> list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3, 4]))
    [2, 4, 6, 8]
    """

    def __init__(self, actors: list):
        self._idle_actors = list(actors)
        self._future_to_actor: dict = {}        # key -> (task index, actor)
        self._index_to_future: dict = {}        # task index -> future as fn returned it
        self._next_task_index = 0
        self._next_return_index = 0
        self._pending_submits: list = []        # (fn, value) waiting for an idle actor

    # --- batch ----------------------------------------------------------------------------
    def map(self, fn: Callable[[Any, V], Any], values: List[V]):
        """A generator of ``fn``'s results over ``values``, in the order of ``values``.

        Results of earlier submissions not yet taken are dropped first (finished ones now;
        unfinished ones are ignored, their actors handed back).
        """
        while self.has_next():
            try:
                self.get_next(timeout=0, ignore_if_timedout=True)
            except TimeoutError:
                pass
        for v in values:
            self.submit(fn, v)

        def results():
            while self.has_next():
                yield self.get_next()
        return results()

    def map_unordered(self, fn: Callable[[Any, V], Any], values: List[V]):
        """Like ``map``, but yields each result as soon as it is ready."""
        while self.has_next():
            try:
                self.get_next_unordered(timeout=0)
            except TimeoutError:
                pass
        for v in values:
            self.submit(fn, v)

        def results():
            while self.has_next():
                yield self.get_next_unordered()
        return results()

    # --- one at a time --------------------------------------------------------------------
    def submit(self, fn: Callable[[Any, V], Any], value: V) -> None:
        """Runs ``fn(actor, value)`` on an idle actor now, or once one is free."""
        if self._idle_actors:
            actor = self._idle_actors.pop()
            future = fn(actor, value)
            self._future_to_actor[_key(future)] = (self._next_task_index, actor)
            self._index_to_future[self._next_task_index] = future
            self._next_task_index += 1
        else:
            self._pending_submits.append((fn, value))

    def has_next(self) -> bool:
        """Whether a submitted call's result has not been taken yet."""
        return bool(self._future_to_actor)

    def get_next(self, timeout: Optional[float] = None, ignore_if_timedout: bool = False):
        """The next result in submission order.

        Raises ``TimeoutError`` if it is not ready within ``timeout`` seconds; with
        ``ignore_if_timedout=True`` that call is also skipped for good (its actor goes back
        to the pool). Raises ``StopIteration`` when nothing is pending.
        """
        if not self.has_next():
            raise StopIteration("No more results to get")
        if self._next_return_index >= self._next_task_index:
            raise ValueError("It is not allowed to call get_next() after get_next_unordered().")
        future = self._index_to_future[self._next_return_index]
        key = _key(future)
        timed_out = False
        if timeout is not None and _first_ready([key], timeout) is None:
            if not ignore_if_timedout:
                raise TimeoutError(_TIMEOUT_MSG)
            timed_out = True
        del self._index_to_future[self._next_return_index]
        self._next_return_index += 1
        _, actor = self._future_to_actor.pop(key)
        if timed_out:
            self._return_actor(actor)
            raise TimeoutError(f"{_TIMEOUT_MSG}. The task {future} has been ignored.")
        return self._get_result(future, actor)

    def get_next_unordered(self, timeout: Optional[float] = None, ignore_if_timedout: bool = False):
        """Any ready result (the earliest submitted among those ready).

        Raises ``TimeoutError`` if none is ready within ``timeout`` seconds; with
        ``ignore_if_timedout=True`` the oldest pending call is skipped for good.
        """
        if not self.has_next():
            raise StopIteration("No more results to get")
        key = _first_ready(list(self._future_to_actor), timeout)
        timed_out = False
        if key is None:
            if not ignore_if_timedout:
                raise TimeoutError(_TIMEOUT_MSG)
            timed_out = True
            key = next(iter(self._future_to_actor))
        index, actor = self._future_to_actor.pop(key)
        future = self._index_to_future.pop(index)
        self._next_return_index = max(self._next_return_index, index + 1)
        if timed_out:
            self._return_actor(actor)
            raise TimeoutError(f"{_TIMEOUT_MSG}. The task {future} has been ignored.")
        return self._get_result(future, actor)

    # --- the actors -----------------------------------------------------------------------
    def has_free(self) -> bool:
        """Whether an actor is idle and no submit is waiting for one."""
        return len(self._idle_actors) > 0 and len(self._pending_submits) == 0

    def pop_idle(self):
        """Takes an idle actor out of the pool; None if none is free."""
        if self.has_free():
            return self._idle_actors.pop()
        return None

    def push(self, actor) -> None:
        """Adds ``actor`` to the pool (it may take a waiting submit at once)."""
        busy = [a for _, a in self._future_to_actor.values()]
        if actor in self._idle_actors or actor in busy:
            raise ValueError("Actor already belongs to current ActorPool")
        self._return_actor(actor)

    def _get_result(self, future, actor):
        alive = True
        try:
            return api.get(future)
        except exceptions.ActorDiedError:
            alive = False
            raise
        finally:
            self._return_actor(actor, alive)

    def _return_actor(self, actor, alive: bool = True) -> None:
        if alive:
            self._idle_actors.append(actor)
        if self._pending_submits and self._idle_actors:
            self.submit(*self._pending_submits.pop(0))


__all__ = ["ActorPool"]
