"""The errors users catch.

Every error skate raises to user code lives here. Ray's names are kept as aliases
(``RayTaskError``, ``GetTimeoutError``...) so code written for Ray catches the same
conditions after ``import skate as ray``.

This module imports nothing from the runtime: the runtime imports it.
"""

from __future__ import annotations


class SkateError(Exception):
    """Base class of every error raised by skate itself."""


class TaskError(SkateError):
    """A task raised an exception.

    What ``get`` raises is an instance of both ``TaskError`` and the original
    exception's type (see :meth:`as_instanceof_cause`), so ``except ValueError``
    still catches a ``ValueError`` raised remotely. The message carries the
    remote traceback.
    """

    def __init__(self, function_name: str = "", traceback_str: str = "", cause=None,
                 pid: int | None = None):
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        self.pid = pid
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"task {self.function_name}()"
        if self.pid is not None:
            where += f" (pid={self.pid})"
        return f"{where} raised:\n\n{self.traceback_str}".rstrip()

    def __str__(self) -> str:  # the same text whichever class the instance became
        return self._message()

    def as_instanceof_cause(self):
        """An exception that is an instance of TaskError and of the cause's type."""
        cause = self.cause
        if cause is None or not isinstance(cause, BaseException):
            return self
        cause_cls = type(cause)
        if issubclass(cause_cls, TaskError):
            # A task re-raised the error of a task it called: keep the innermost cause's
            # type, and this task's traceback (whose message holds the inner one's).
            return TaskError(self.function_name, self.traceback_str, cause.cause,
                             self.pid).as_instanceof_cause()
        cls = _dual_class(cause_cls)
        if cls is None:
            return self
        try:
            err = cls.__new__(cls)
        except Exception:
            return self
        err.__dict__.update(getattr(cause, "__dict__", {}))
        err.args = cause.args
        err.function_name = self.function_name
        err.traceback_str = self.traceback_str
        err.cause = cause
        err.pid = self.pid
        err.__cause__ = None
        return err

    def __reduce__(self):
        return (TaskError, (self.function_name, self.traceback_str, self.cause, self.pid))


_dual_classes: dict[type, type | None] = {}


def _dual_class(cause_cls: type) -> type | None:
    """A class deriving from both TaskError and ``cause_cls`` (cached per class)."""
    if cause_cls in _dual_classes:
        return _dual_classes[cause_cls]
    try:
        cls = type(
            f"TaskError({cause_cls.__name__})",
            (TaskError, cause_cls),
            {
                "__init__": lambda self, *a, **k: None,
                "__str__": TaskError.__str__,
                "__reduce__": TaskError.__reduce__,
                "__module__": __name__,
            },
        )
    except TypeError:  # e.g. a layout conflict between built-in bases
        cls = None
    _dual_classes[cause_cls] = cls
    return cls


class GetTimeoutError(SkateError, TimeoutError):
    """``get`` did not see every object ready within its timeout."""


class WorkerCrashedError(SkateError):
    """The worker process running a task died and the task's retries are spent."""


class TaskCancelledError(SkateError):
    """The task was cancelled with ``skate.cancel``."""


class ObjectLostError(SkateError):
    """Every copy of an object is gone and it cannot be reconstructed."""


class OwnerDiedError(ObjectLostError):
    """The process that owned the object (the one that created the ref) died."""


class ObjectStoreFullError(SkateError, MemoryError):
    """The shared-memory store cannot hold the object even after spilling to disk."""


class ActorDiedError(SkateError):
    """The actor's process died, was killed, or its constructor failed."""


class RuntimeNotInitializedError(SkateError, RuntimeError):
    """An API call that needs a running skate was made before ``skate.init()``."""


class InfeasibleTaskError(SkateError, ValueError):
    """No node of the cluster has the resources the task asks for."""


# Ray's names, so `except ray.exceptions.X` keeps working after `import skate as ray`.
RayError = SkateError
RayTaskError = TaskError
RayActorError = ActorDiedError
ActorError = ActorDiedError
TaskCancelledException = TaskCancelledError
ObjectFetchTimedOutError = GetTimeoutError
OwnerDiedException = OwnerDiedError

__all__ = [
    "SkateError", "TaskError", "GetTimeoutError", "WorkerCrashedError",
    "TaskCancelledError", "ObjectLostError", "OwnerDiedError", "ObjectStoreFullError",
    "ActorDiedError", "RuntimeNotInitializedError", "InfeasibleTaskError",
    "RayError", "RayTaskError", "RayActorError", "ActorError",
    "TaskCancelledException", "ObjectFetchTimedOutError", "OwnerDiedException",
]
