"""``@skate.remote`` functions: options, validation, and the call that submits a task.

A ``RemoteFunction`` wraps a Python function. ``f.remote(*args)`` checks the arguments
against the function's signature, then hands a task to this process's core worker and
returns ObjectRefs at once. The function itself is pickled (cloudpickle) once, on its
first call, and shipped to each worker once per connection.

Options (Ray's names): ``num_cpus`` (default 1), ``num_gpus``, ``resources``,
``num_returns``, ``max_retries`` (default 3), ``retry_exceptions`` (bool or a list of
exception types), ``name``. ``f.options(...)`` overrides them per call.
"""

from __future__ import annotations

import hashlib
import inspect
import numbers

from skate._private import runtime
from skate._private.object_store import serialization

TASK_OPTIONS = ("num_cpus", "num_gpus", "resources", "num_returns", "max_retries",
                "retry_exceptions", "name")

DEFAULTS = {"num_cpus": 1, "num_gpus": 0, "resources": None, "num_returns": 1, "max_retries": 3,
            "retry_exceptions": False, "name": None}


def _nonneg(key, value, integral=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
        raise ValueError(f"option {key}={value!r} is invalid: expected a non-negative number")
    if integral and int(value) != value:
        raise ValueError(f"option {key}={value!r} is invalid: expected a whole number")


def validate_options(opts: dict, allowed=TASK_OPTIONS, what="a remote function") -> dict:
    for key, value in opts.items():
        if key not in allowed:
            raise ValueError(f"unknown option {key!r} for {what}; valid options are: {', '.join(allowed)}")
        if key in ("num_cpus", "num_gpus"):
            _nonneg(key, value)
        elif key in ("num_returns", "max_retries"):
            if key == "max_retries" and value == -1:
                continue  # Ray's "retry forever"
            _nonneg(key, value, integral=True)
        elif key == "resources" and value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"option resources={value!r} is invalid: expected a dict of name -> amount")
            for rk, rv in value.items():
                if rk in ("CPU", "GPU"):
                    raise ValueError(f"option resources={{{rk!r}: ...}}: use num_cpus / num_gpus for {rk}")
                _nonneg(f"resources[{rk!r}]", rv)
        elif key == "retry_exceptions":
            if not isinstance(value, bool):
                if not isinstance(value, (list, tuple)) or not all(
                        isinstance(t, type) and issubclass(t, BaseException) for t in value):
                    raise ValueError(f"option retry_exceptions={value!r} is invalid: expected True/False "
                                     f"or a list of exception types")
        elif key == "name" and value is not None and not isinstance(value, str):
            raise ValueError(f"option name={value!r} is invalid: expected a string")
    return opts


def resources_of(opts: dict) -> dict:
    res = {"CPU": float(opts["num_cpus"])}
    if opts["num_gpus"]:
        res["GPU"] = float(opts["num_gpus"])
    if opts["resources"]:
        res.update({k: float(v) for k, v in opts["resources"].items()})
    return res


class _Prepared:
    """The per-option-set values computed once, not per call."""

    __slots__ = ("resources", "sched_key", "num_returns", "max_retries", "retry_exceptions", "name")

    def __init__(self, opts: dict, default_name: str):
        self.resources = resources_of(opts)
        self.sched_key = tuple(sorted(self.resources.items()))
        self.num_returns = int(opts["num_returns"])
        mr = opts["max_retries"]
        self.max_retries = 10 ** 9 if mr == -1 else int(mr)
        re_ = opts["retry_exceptions"]
        self.retry_exceptions = list(re_) if isinstance(re_, (list, tuple)) else bool(re_)
        self.name = opts["name"] or default_name


class RemoteFunction:
    def __init__(self, fn, options: dict):
        if not callable(fn):
            raise TypeError(f"@skate.remote expects a function or a class, got {type(fn).__name__}")
        self._function = fn
        self._options = dict(DEFAULTS)
        self._options.update(validate_options(dict(options)))
        self._prepared = _Prepared(self._options, getattr(fn, "__name__", "function"))
        self._blob = None
        self._fn_id = None
        self._signature = None
        self._fitting_shapes: set = set()   # (n positional, kwarg names) known to bind
        self.__name__ = getattr(fn, "__name__", "remote_function")
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__module__ = getattr(fn, "__module__", None)
        self.__wrapped__ = fn

    def __call__(self, *args, **kwargs):
        raise TypeError(f"remote function {self.__name__}() cannot be called directly: use "
                        f"{self.__name__}.remote(...) to run it as a task (it returns an ObjectRef; "
                        f"skate.get() gives its value)")

    def __repr__(self) -> str:
        return f"<skate remote function {self.__qualname__}>"

    def remote(self, *args, **kwargs):
        return self._submit(args, kwargs, self._prepared)

    def options(self, **options):
        opts = dict(self._options)
        opts.update(validate_options(options))
        return _WithOptions(self, _Prepared(opts, getattr(self._function, "__name__", "function")))

    def _pickled(self):
        if self._blob is None:
            blob = serialization.dumps(self._function)
            self._fn_id = hashlib.blake2b(blob, digest_size=16).digest()
            self._blob = blob
        return self._fn_id, self._blob

    def _check_args(self, args, kwargs) -> None:
        # Whether arguments bind depends only on their count and keyword names: check
        # each call shape once, not every call.
        shape = (len(args), tuple(kwargs)) if kwargs else len(args)
        if shape in self._fitting_shapes:
            return
        sig = self._signature
        if sig is None:
            try:
                sig = self._signature = inspect.signature(self._function)
            except (TypeError, ValueError):
                sig = self._signature = False
        if sig:
            try:
                sig.bind(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{self.__name__}.remote() got arguments that do not fit "
                                f"{self.__name__}{sig}: {e}") from None
        self._fitting_shapes.add(shape)

    def _submit(self, args, kwargs, p: _Prepared):
        self._check_args(args, kwargs)
        core = runtime.core_or_init()
        fn_id, blob = self._pickled()
        refs = core.submit_task(fn_id, blob, p.name, args, kwargs, p.num_returns, p.resources,
                                p.sched_key, p.max_retries, p.retry_exceptions)
        if p.num_returns == 1:
            return refs[0]
        if p.num_returns == 0:
            return None
        return refs

    def __reduce__(self):
        return (RemoteFunction, (self._function, {k: v for k, v in self._options.items()
                                                  if v != DEFAULTS.get(k)}))


class _WithOptions:
    __slots__ = ("_rf", "_prepared")

    def __init__(self, rf: RemoteFunction, prepared: _Prepared):
        self._rf = rf
        self._prepared = prepared

    def remote(self, *args, **kwargs):
        return self._rf._submit(args, kwargs, self._prepared)
