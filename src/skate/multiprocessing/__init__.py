"""``skate.multiprocessing``: the standard library's process pool, on skate.

Change one import::

    from multiprocessing import Pool, cpu_count          # before
    from skate.multiprocessing import Pool, cpu_count    # after

and the pool's work runs as skate tasks: on the embedded default cluster, or on the
cluster named by ``SKATE_ADDRESS`` (or ``Pool(address=...)``). ``cpu_count()`` is then
the cluster's CPU count. The names users import next to ``Pool`` come along:
``TimeoutError`` (what ``AsyncResult.get(timeout)`` raises), ``AsyncResult``,
``current_process`` and ``freeze_support`` (the standard library's own).

See ``pool.py`` for how a pool works and where it does better than the standard library.
"""

from multiprocessing import TimeoutError, current_process, freeze_support
from multiprocessing.pool import AsyncResult

from skate.multiprocessing.pool import Pool, cpu_count

__all__ = ["Pool", "AsyncResult", "TimeoutError", "cpu_count", "current_process", "freeze_support"]
