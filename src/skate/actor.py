"""Actors: ``@skate.remote`` on a class, handles, methods, and ``exit_actor``.

``ActorClass.remote(*args)`` asks the local node manager to create the actor on a worker
of its own and returns an ``ActorHandle`` at once; ``handle.method.remote(*args)``
returns ObjectRefs, the call travelling straight from the caller to the actor's worker.
Calls from one caller run in the order they were made (with ``max_concurrency=1``).

Lifetimes, as in Ray: an unnamed, non-detached actor ends when every handle to it is
gone (after the calls already made); a named one lives as long as its owner (the process
that created it); a detached one (``lifetime="detached"``) until it is killed or its
cluster stops. Names live in the GCS (``get_actor``).

Options: ``name``, ``namespace``, ``lifetime``, ``get_if_exists``, ``max_restarts``
(default 0), ``max_task_retries`` (default 0), ``max_concurrency`` (default 1; 1000 for
async actors), ``num_cpus`` (held for the actor's lifetime; default 0), ``num_gpus``,
``resources``.
"""

from __future__ import annotations

import inspect
import numbers

from skate import exceptions
from skate._private import actor_table, runtime
from skate._private.object_store import serialization
from skate._private.worker.executor import TERMINATE, ActorExitRequest
from skate.remote_function import validate_options

ACTOR_OPTIONS = ("name", "namespace", "lifetime", "get_if_exists", "max_restarts", "max_task_retries",
                 "max_concurrency", "num_cpus", "num_gpus", "resources")
_TERMINATE_NAMES = (TERMINATE, "__ray_terminate__")


def method(*, num_returns: int = 1):
    """``@skate.method(num_returns=N)`` on an actor method: its calls return N refs."""
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) or num_returns < 0:
        raise ValueError(f"method(num_returns={num_returns!r}): expected a non-negative integer")

    def decorate(fn):
        fn.__skate_num_returns__ = num_returns
        return fn
    return decorate


def exit_actor() -> None:
    """Ends the current actor after this method returns; it is not restarted."""
    core = runtime.core()
    if core.executor is None or core.executor.actor is None:
        raise TypeError("exit_actor() can only be called inside an actor method")
    raise ActorExitRequest()


def _check_actor_options(opts: dict) -> dict:
    task_like = {k: v for k, v in opts.items() if k in ("num_cpus", "num_gpus", "resources")}
    for key in opts:
        if key not in ACTOR_OPTIONS:
            raise ValueError(f"unknown option {key!r} for an actor; valid options are: {', '.join(ACTOR_OPTIONS)}")
    validate_options(task_like)
    for key in ("max_restarts", "max_task_retries"):
        v = opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < -1):
            raise ValueError(f"option {key}={v!r} is invalid: expected an integer >= 0 (or -1 for no limit)")
    v = opts.get("max_concurrency")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"option max_concurrency={v!r} is invalid: expected an integer >= 1")
    v = opts.get("lifetime")
    if v not in (None, "detached", "non_detached"):
        raise ValueError(f"option lifetime={v!r} is invalid: expected None, 'detached' or 'non_detached'")
    for key in ("name", "namespace"):
        v = opts.get(key)
        if v is not None and (not isinstance(v, str) or (key == "name" and not v)):
            raise ValueError(f"option {key}={v!r} is invalid: expected a non-empty string")
    return opts


def _methods_of(cls) -> dict:
    methods = {}
    for name, member in inspect.getmembers(cls):
        if callable(member) and (not name.startswith("__") or name == "__call__"):
            methods[name] = getattr(member, "__skate_num_returns__", 1)
    return methods


class ActorClass:
    def __init__(self, cls, options: dict):
        self._cls = cls
        self._options = _check_actor_options(dict(options))
        self._blob = None
        self._meta = None
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__
        self.__module__ = cls.__module__

    def __call__(self, *args, **kwargs):
        raise TypeError(f"actor class {self.__name__} cannot be instantiated directly: use "
                        f"{self.__name__}.remote(...) to create an actor")

    def __repr__(self) -> str:
        return f"<skate actor class {self.__qualname__}>"

    def remote(self, *args, **kwargs):
        return self._create(args, kwargs, self._options)

    def options(self, **options):
        opts = dict(self._options)
        opts.update(_check_actor_options(options))
        return _ActorClassWithOptions(self, opts)

    def _meta_and_blob(self):
        if self._meta is None:
            cls = self._cls
            is_async = any(inspect.iscoroutinefunction(m) for _, m in inspect.getmembers(cls, callable))
            self._meta = {"class_name": cls.__name__, "methods": _methods_of(cls), "is_async": is_async}
            self._blob = serialization.dumps(cls)
        return self._meta, self._blob

    def _create(self, args, kwargs, opts):
        init = getattr(self._cls, "__init__", None)
        if init is not None and init is not object.__init__:
            try:
                inspect.signature(init).bind(None, *args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{self.__name__}.remote() got arguments that do not fit "
                                f"{self.__name__}.__init__: {e}") from None
            except ValueError:
                pass
        core = runtime.core_or_init()
        meta, blob = self._meta_and_blob()
        meta = dict(meta, max_task_retries=opts.get("max_task_retries") or 0)
        name = opts.get("name")
        namespace = opts.get("namespace") or runtime.info().get("namespace") or "default"
        detached = opts.get("lifetime") == "detached"
        actor_id = core.ids.task_id()
        if name:
            gcs = core.gcs()
            holder = actor_table.claim_name(gcs, namespace, name, actor_id)
            if holder is not None:
                if opts.get("get_if_exists"):
                    record = actor_table.read(gcs, holder)
                    if record is not None:
                        return ActorHandle(holder, record["meta"], record.get("owner_address"), counted=False)
                raise ValueError(f"an actor named {name!r} already exists in namespace {namespace!r}; "
                                 f"use skate.get_actor({name!r}) to reach it, get_if_exists=True to reuse "
                                 f"it, or another name")
        top_refs: list = []
        args = tuple(core._top(a, top_refs) for a in args)
        kwargs = {k: core._top(v, top_refs) for k, v in kwargs.items()}
        from skate._private.worker.core_worker import _serialize_args
        sobj = _serialize_args(f"{self.__name__}.__init__", args, kwargs)
        me = core.worker_id
        held = [(oid, None if owner[0] == me else owner) for oid, owner in top_refs] + \
            [(r.id, None if r.owner[0] == me else r.owner) for r in sobj.contained_refs]
        if held:
            # Constructor arguments stay alive with the actor (it may be constructed again).
            core.ref_counter.add_submitted(held)
        resources = {}
        if opts.get("num_cpus"):
            resources["CPU"] = float(opts["num_cpus"])
        if opts.get("num_gpus"):
            resources["GPU"] = float(opts["num_gpus"])
        for k, v in (opts.get("resources") or {}).items():
            resources[k] = float(v)
        concurrency = opts.get("max_concurrency") or (1000 if meta["is_async"] else 1)
        spec = {
            "actor_id": actor_id, "class_blob": blob, "args_blob": sobj.to_bytes(),
            "class_name": self.__name__, "max_concurrency": concurrency, "is_async": meta["is_async"],
            "meta": meta, "resources": resources, "name": name, "namespace": namespace,
            "detached": detached, "max_restarts": opts.get("max_restarts") or 0,
            "owner": core.worker_id,
        }
        if name:
            actor_table.write(core.gcs(), {
                "actor_id": actor_id, "state": "PENDING_CREATION", "class_name": self.__name__,
                "name": name, "namespace": namespace, "detached": detached, "meta": meta,
                "owner": core.worker_id, "owner_address": core.address, "num_restarts": 0})
        core.create_actor(spec)
        return ActorHandle(actor_id, meta, core.address, counted=not (detached or name))


class _ActorClassWithOptions:
    __slots__ = ("_cls", "_opts")

    def __init__(self, cls: ActorClass, opts: dict):
        self._cls = cls
        self._opts = opts

    def remote(self, *args, **kwargs):
        return self._cls._create(args, kwargs, self._opts)


class ActorHandle:
    """A reference to an actor; pass it to tasks and other actors, who may call it too."""

    __slots__ = ("_actor_id", "_meta", "owner", "_counted", "id", "__weakref__")

    def __init__(self, actor_id: bytes, meta: dict, owner, counted: bool):
        self._actor_id = actor_id
        self._meta = meta
        self.owner = owner
        self.id = b"A" + actor_id     # how the reference counter knows handles
        self._counted = counted and owner is not None
        if self._counted:
            from skate import object_ref
            object_ref._hooks.add_local(self.id, owner)

    def __del__(self):
        if self._counted:
            try:
                from skate import object_ref
                object_ref._hooks.remove_local(self.id)
            except Exception:
                pass

    def __getattr__(self, name):
        if name.startswith("_") and name not in _TERMINATE_NAMES and name != "__call__":
            raise AttributeError(name)
        methods = self._meta["methods"]
        if name in _TERMINATE_NAMES:
            return ActorMethod(self, TERMINATE, 1)
        if name not in methods:
            raise AttributeError(f"actor {self._meta['class_name']} has no method {name!r}")
        return ActorMethod(self, name, methods[name])

    def __reduce__(self):
        if self._counted:
            serialization.note_ref(self)  # held for the task or object it travels in
        return (_rebuild_handle, (self._actor_id, self._meta, self.owner, self._counted))

    def __repr__(self) -> str:
        return f"Actor({self._meta['class_name']}, {self._actor_id.hex()})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self) -> int:
        return hash(self._actor_id)


def _rebuild_handle(actor_id, meta, owner, counted):
    handle = ActorHandle(actor_id, meta, owner, counted)
    if handle._counted:
        from skate import object_ref
        object_ref._hooks.on_deserialized(handle.id, owner)
    return handle


class ActorMethod:
    __slots__ = ("_handle", "_name", "_num_returns")

    def __init__(self, handle: ActorHandle, name: str, num_returns: int):
        self._handle = handle
        self._name = name
        self._num_returns = num_returns

    def __call__(self, *args, **kwargs):
        raise TypeError(f"actor method {self._name}() cannot be called directly: use "
                        f"handle.{self._name}.remote(...)")

    def remote(self, *args, **kwargs):
        return self._submit(args, kwargs, self._num_returns)

    def options(self, *, num_returns=None, **other):
        if other:
            raise ValueError(f"unknown option(s) for an actor method: {', '.join(other)}; valid: num_returns")
        if num_returns is None:
            num_returns = self._num_returns
        if isinstance(num_returns, bool) or not isinstance(num_returns, numbers.Integral) or num_returns < 0:
            raise ValueError(f"option num_returns={num_returns!r} is invalid: expected a non-negative integer")
        return _MethodWithOptions(self, int(num_returns))

    def _submit(self, args, kwargs, num_returns):
        h = self._handle
        core = runtime.core_or_init()
        retries = h._meta.get("max_task_retries") or 0
        refs = core.submit_actor_task(h._actor_id, self._name, args, kwargs, num_returns,
                                      10 ** 9 if retries == -1 else retries)
        if num_returns == 1:
            return refs[0]
        if num_returns == 0:
            return None
        return refs


class _MethodWithOptions:
    __slots__ = ("_method", "_num_returns")

    def __init__(self, m: ActorMethod, num_returns: int):
        self._method = m
        self._num_returns = num_returns

    def remote(self, *args, **kwargs):
        return self._method._submit(args, kwargs, self._num_returns)


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """The handle of the live actor named ``name``; ValueError if there is none."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"get_actor() expects a non-empty actor name, got {name!r}")
    core = runtime.core_or_init()
    ns = namespace or runtime.info().get("namespace") or "default"
    record = actor_table.lookup(core.gcs(), ns, name)
    if record is None:
        raise ValueError(f"no live actor named {name!r} in namespace {ns!r}")
    return ActorHandle(record["actor_id"], record["meta"], record.get("owner_address"), counted=False)


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    """Kills the actor's process at once: its pending calls fail with ActorDiedError.

    With ``no_restart=False`` it is restarted if its ``max_restarts`` allows.
    """
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"kill() expects an actor handle, got a {type(actor).__name__}")
    runtime.core().kill_actor(actor._actor_id, bool(no_restart))


__all__ = ["ActorClass", "ActorHandle", "ActorMethod", "method", "exit_actor", "get_actor", "kill",
           "exceptions"]
