"""skate: a distributed runtime for Python in the design of Ray.

The public API, re-exported from ``skate.api``; ``import skate as ray`` runs Ray code
that uses these calls. Everything under ``skate._private`` is the runtime.
"""

from skate import actor, exceptions
from skate.api import (available_resources, cancel, cluster_resources, get, get_actor, get_runtime_context,
                       init, is_initialized, kill, method, nodes, put, remote, shutdown, wait)
from skate.object_ref import ObjectRef

__version__ = "0.1.0"

__all__ = ["init", "shutdown", "is_initialized", "remote", "get", "put", "wait", "cancel",
           "get_actor", "kill", "method", "actor",
           "get_runtime_context", "cluster_resources", "available_resources", "nodes",
           "ObjectRef", "exceptions", "__version__"]
