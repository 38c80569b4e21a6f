"""Actor state listings, as ``ray.util.state.list_actors`` / ``get_actor`` give them.

Reads the GCS actor table (``skate._private.actor_table``), where node managers write each
actor's record as its state changes (PENDING_CREATION -> ALIVE -> RESTARTING -> DEAD).
Those writes go through the node's reporter thread, so a state change shows here a
moment after it happened, not at once.

Each entry is a dict with the columns of Ray's ``ActorState``: by default the base ones
(``actor_id``, ``class_name``, ``state``, ``job_id``, ``name``, ``node_id``, ``pid``,
``ray_namespace``, and ``namespace``, the same value under skate's name); with
``detail=True`` also ``death_cause``, ``num_restarts``, ``is_detached``... Columns skate has
no value for are ``None``, as in Ray's output. ``death_cause`` is text: why the actor
died, with the constructor's traceback when the constructor raised.

May call: the runtime's core worker (for its GCS client), the actor table, serialization.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from skate._private import actor_table, runtime
from skate._private.object_store import serialization

DEFAULT_LIMIT = 100

# Ray's ActorState columns: (name, in base output, filterable).
_COLUMNS = (
    ("actor_id", True, True),
    ("class_name", True, True),
    ("state", True, True),
    ("job_id", True, True),
    ("name", True, True),
    ("node_id", True, True),
    ("pid", True, True),
    ("ray_namespace", True, True),
    ("namespace", True, True),          # skate's name for ray_namespace
    ("serialized_runtime_env", False, False),
    ("required_resources", False, False),
    ("death_cause", False, False),
    ("is_detached", False, False),
    ("placement_group_id", False, True),
    ("repr_name", False, True),
    ("num_restarts", False, False),
    ("num_restarts_due_to_lineage_reconstruction", False, False),
)
_BASE = [c for c, base, _ in _COLUMNS if base]
_DETAIL = [c for c, _, _ in _COLUMNS]
_FILTERABLE = {c for c, _, f in _COLUMNS if f}
_INT_COLUMNS = {"pid", "num_restarts", "num_restarts_due_to_lineage_reconstruction"}


def _death_cause(record: dict) -> Optional[str]:
    if record.get("state") != "DEAD":
        return None
    cause = record.get("cause")
    if isinstance(cause, (bytes, bytearray, memoryview)):
        # A constructor failure: the serialized TaskError with the remote traceback.
        try:
            err = serialization.deserialize(cause)
        except Exception as e:
            return f"the actor's constructor raised an exception that could not be read back ({e!r})"
        return "the actor's constructor raised:\n\n" + (getattr(err, "traceback_str", "") or str(err))
    return None if cause is None else str(cause)


def _entry(record: dict) -> dict:
    """A GCS actor record as a full (detail) row with Ray's column names."""
    node_id = record.get("node_id")
    namespace = record.get("namespace")
    return {
        "actor_id": record["actor_id"].hex(),
        "class_name": record.get("class_name"),
        "state": record.get("state"),
        "job_id": record["job_id"].hex() if isinstance(record.get("job_id"), bytes) else record.get("job_id"),
        "name": record.get("name") or "",
        "node_id": node_id.hex() if isinstance(node_id, bytes) else node_id,
        "pid": record.get("pid") or 0,     # 0 until a process holds the actor, as in Ray
        "ray_namespace": namespace,
        "namespace": namespace,
        "serialized_runtime_env": None,
        "required_resources": None,
        "death_cause": _death_cause(record),
        "is_detached": bool(record.get("detached", False)),
        "placement_group_id": None,
        "repr_name": "",
        "num_restarts": record.get("num_restarts") or 0,
        "num_restarts_due_to_lineage_reconstruction": 0,
    }


def _to_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise ValueError(f"filter value {value!r} is not a boolean: use true/false or 1/0")


def _check_filters(filters) -> list:
    filters = list(filters or [])
    out = []
    for f in filters:
        if not isinstance(f, (tuple, list)) or len(f) != 3:
            raise ValueError(f"filter {f!r} is invalid: expected a (key, predicate, value) tuple, "
                             f"e.g. ('state', '=', 'ALIVE')")
        key, predicate, value = f
        if predicate not in ("=", "!="):
            raise ValueError(f"Unsupported filter predicate {predicate} is given. Available predicates: =, !=.")
        key = str(key).lower()
        if key not in _FILTERABLE:
            raise ValueError(f"The given filter column {key} is not supported. "
                             f"Supported filter columns: {sorted(_FILTERABLE)}")
        if key in _INT_COLUMNS and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"Invalid filter `{key} {predicate} {value}` for an int column: "
                                 f"give an integer") from None
        out.append((key, predicate, value))
    return out


def _matches(row: dict, key: str, value) -> bool:
    have = row.get(key)
    if isinstance(value, str) and isinstance(have, str):
        return have.lower() == value.lower()    # string columns compare case-insensitively
    if isinstance(value, str) and isinstance(have, bool):
        return have == _to_bool(value)
    return have == value


def _rows(filters) -> List[dict]:
    core = runtime.core()
    rows = [_entry(r) for r in actor_table.list_all(core.gcs())]
    for key, predicate, value in filters:
        rows = [r for r in rows if _matches(r, key, value) == (predicate == "=")]
    return rows


def _columns(row: dict, detail: bool) -> dict:
    return {c: row[c] for c in (_DETAIL if detail else _BASE)}


def list_actors(filters: Optional[List[Tuple[str, str, object]]] = None, *, limit: int = DEFAULT_LIMIT,
                detail: bool = False) -> List[dict]:
    """The actors of this cluster, sorted by ``actor_id``, at most ``limit`` of them.

    ``filters`` is a list of ``(column, "=" or "!=", value)`` that must all hold, e.g.
    ``[("state", "=", "ALIVE"), ("class_name", "=", "Counter")]``; string values compare
    case-insensitively. ``detail=True`` adds the detail columns (``death_cause``,
    ``num_restarts``, ``is_detached``...).
    """
    checked = _check_filters(filters)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit={limit!r} is invalid: expected a non-negative integer")
    rows = sorted(_rows(checked), key=lambda r: r["actor_id"])
    return [_columns(r, detail) for r in rows[:limit]]


def get_actor_state(actor_id_hex: str) -> Optional[dict]:
    """The detailed entry of one actor (its id in hex), or None if the GCS has no record of it."""
    if not isinstance(actor_id_hex, str):
        raise TypeError(f"get_actor_state() expects an actor id in hex (a str), got a "
                        f"{type(actor_id_hex).__name__}; an actor handle's id is "
                        f"handle._actor_id.hex()")
    try:
        actor_id = bytes.fromhex(actor_id_hex)
    except ValueError:
        return None
    record = actor_table.read(runtime.core().gcs(), actor_id)
    return None if record is None else _columns(_entry(record), True)


# Ray's name for the same call (``ray.util.state.get_actor``).
get_actor = get_actor_state

__all__ = ["list_actors", "get_actor_state", "get_actor"]
