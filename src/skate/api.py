"""The native API: what ``import skate`` offers, with Ray's names and signatures.

Thin: each call validates its input (bad input fails here, with a message naming the
problem, before it reaches the runtime) and delegates to this process's core worker.
"""

from __future__ import annotations

import numbers

from skate import exceptions
from skate._private import runtime
from skate.actor import ActorClass, ActorHandle, get_actor, kill, method
from skate.object_ref import ObjectRef
from skate.remote_function import RemoteFunction

init = runtime.init
shutdown = runtime.shutdown
is_initialized = runtime.is_initialized


def remote(*args, **options):
    """``@skate.remote`` or ``@skate.remote(num_cpus=..., ...)`` on a function (a task) or a
    class (an actor)."""
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args:
        raise TypeError("@skate.remote takes keyword options only, e.g. @skate.remote(num_cpus=2)")

    def decorator(obj):
        return _make_remote(obj, options)
    return decorator


def _make_remote(obj, options):
    if isinstance(obj, type):
        return ActorClass(obj, options)
    return RemoteFunction(obj, options)


def _check_timeout(timeout) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                or timeout < 0):
        raise ValueError(f"timeout={timeout!r} is invalid: expected None or a non-negative number of seconds")


def get(object_refs, *, timeout=None):
    """The value of a ref, or the values of a list of refs (in order).

    Raises the task's error (an instance of ``TaskError`` and of the original exception
    type), ``GetTimeoutError`` when ``timeout`` passes first.
    """
    _check_timeout(timeout)
    core = runtime.core()
    if isinstance(object_refs, ObjectRef):
        return core.get_values([object_refs], timeout)[0]
    if isinstance(object_refs, (list, tuple)):
        for i, r in enumerate(object_refs):
            if not isinstance(r, ObjectRef):
                raise TypeError(f"get() expects an ObjectRef or a list of ObjectRefs; item {i} is "
                                f"a {type(r).__name__}")
        return core.get_values(list(object_refs), timeout)
    raise TypeError(f"get() expects an ObjectRef or a list of ObjectRefs, got a {type(object_refs).__name__}")


def put(value) -> ObjectRef:
    """Stores ``value`` in the object store and returns a ref to it."""
    return runtime.core_or_init().put(value)


def wait(object_refs, *, num_returns=1, timeout=None, fetch_local=True):
    """Returns ``(ready, not_ready)`` once ``num_returns`` refs are ready or ``timeout`` passes.

    Both lists keep the order of ``object_refs``.
    """
    if isinstance(object_refs, ObjectRef) or not isinstance(object_refs, (list, tuple)):
        raise TypeError(f"wait() expects a list of ObjectRefs, got a {type(object_refs).__name__}")
    for i, r in enumerate(object_refs):
        if not isinstance(r, ObjectRef):
            raise TypeError(f"wait() expects a list of ObjectRefs; item {i} is a {type(r).__name__}")
    if len({r.id for r in object_refs}) != len(object_refs):
        raise ValueError("wait() got the same ObjectRef more than once in object_refs")
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) or num_returns < 0:
        raise ValueError(f"num_returns={num_returns!r} is invalid: expected a non-negative integer")
    if num_returns > len(object_refs):
        raise ValueError(f"num_returns={num_returns} is more than the {len(object_refs)} refs given")
    _check_timeout(timeout)
    core = runtime.core()
    refs = list(object_refs)
    if refs and num_returns:
        core.wait_ready(refs, num_returns, timeout)
    store = core.memory_store
    ready, not_ready = [], []
    for r in refs:
        (ready if len(ready) < num_returns and store.is_ready(r.id) else not_ready).append(r)
    return ready, not_ready


def cancel(object_ref, *, force=False, recursive=True):
    """Cancels the task that makes ``object_ref``: ``get`` then raises TaskCancelledError.

    A queued task is dropped; a running one gets TaskCancelledError raised inside it, or
    with ``force=True`` its worker is killed. Tasks it submitted are cancelled too.
    """
    if not isinstance(object_ref, ObjectRef):
        raise TypeError(f"cancel() expects an ObjectRef, got a {type(object_ref).__name__}")
    runtime.core().cancel(object_ref, force, recursive)


class RuntimeContext:
    """Where the calling code runs: job, task, node, worker, and the cluster's GCS."""

    def __init__(self, core):
        self._core = core

    def get_job_id(self) -> str:
        return self._core.job_id or runtime.info().get("job_id") or ""

    def get_task_id(self):
        ex = self._core.executor
        return ex.current.hex() if ex is not None and ex.current else None

    def get_node_id(self) -> str:
        return self._core.node_id.hex()

    def get_worker_id(self) -> str:
        return self._core.worker_id.hex()

    job_id = property(get_job_id)
    task_id = property(get_task_id)
    node_id = property(get_node_id)
    worker_id = property(get_worker_id)

    @property
    def gcs_address(self):
        addr = runtime.info().get("gcs_address")
        if addr:
            return addr
        from skate._private.protocol import messages as M
        for _ in range(200):  # the GCS starts off the critical path of init()
            addr = self._core.node_request(M.NODE_INFO, timeout=5).get("gcs_address")
            if addr:
                runtime.info()["gcs_address"] = addr
                return addr
            import time
            time.sleep(0.025)
        return None

    @property
    def namespace(self):
        return runtime.info().get("namespace")


def get_runtime_context() -> RuntimeContext:
    return RuntimeContext(runtime.core())


def _node_info(reclaim: bool = False) -> dict:
    from skate._private.protocol import messages as M
    return runtime.core().node_request(M.NODE_INFO, reclaim, timeout=10)


def cluster_resources() -> dict:
    """Total resources of the cluster, e.g. ``{"CPU": 2.0, ...}``."""
    return {k: v for k, v in _node_info()["resources"].items() if v}


def available_resources() -> dict:
    """Resources free right now.

    Worker leases that callers keep idle (a speed-up, not work) are taken back first, so
    what is reported free is what new tasks could use.
    """
    return {k: v for k, v in _node_info(reclaim=True)["available"].items() if v > 0}


def nodes() -> list:
    """One dict per node, with Ray's keys."""
    info = _node_info()
    return [{
        "NodeID": info["node_id"].hex(),
        "Alive": True,
        "Resources": {k: v for k, v in info["resources"].items() if v},
        "NodeManagerAddress": "127.0.0.1",
        "ObjectStoreCapacity": info["store_capacity"],
        "SessionDir": info["session_dir"],
    }]


__all__ = ["init", "shutdown", "is_initialized", "remote", "get", "put", "wait", "cancel",
           "get_actor", "kill", "method", "ActorClass", "ActorHandle", "get_runtime_context", "cluster_resources", "available_resources", "nodes",
           "ObjectRef", "RemoteFunction", "exceptions"]
