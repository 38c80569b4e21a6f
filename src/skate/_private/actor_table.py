"""The actor table and the actor name registry, kept in the GCS.

Built on the GCS's KV store: namespace ``actors`` maps an actor id to its latest record
(state, class, node, worker, restarts, cause of death); namespace ``actor_names`` maps
``<namespace>\\0<name>`` to an actor id. Claiming a name is one atomic put-if-absent, so
two drivers creating the same named actor cannot both win. A dead actor's name is freed.

Node managers write records as states change (see ``node/main.py``'s reporter); the
API reads them for ``get_actor`` and state listings.

May call: a ``GcsClient`` it is given.
"""

from __future__ import annotations

import pickle

ACTORS = "actors"
NAMES = "actor_names"


def name_key(namespace: str, name: str) -> bytes:
    return f"{namespace}\0{name}".encode()


def write(client, record: dict) -> None:
    client.kv_put(ACTORS, record["actor_id"], pickle.dumps(record), True)
    if record.get("state") == "DEAD" and record.get("name"):
        key = name_key(record.get("namespace") or "", record["name"])
        if client.kv_get(NAMES, key) == record["actor_id"]:
            client.kv_del(NAMES, key)


def read(client, actor_id: bytes) -> dict | None:
    raw = client.kv_get(ACTORS, actor_id)
    return None if raw is None else pickle.loads(raw)


def claim_name(client, namespace: str, name: str, actor_id: bytes) -> bytes | None:
    """Claims ``name`` for ``actor_id``; returns the id of the live actor holding it if taken."""
    key = name_key(namespace, name)
    for _ in range(3):
        if client.kv_put(NAMES, key, actor_id, False):
            return None
        holder = client.kv_get(NAMES, key)
        if holder is None:
            continue
        record = read(client, holder)
        if record is not None and record.get("state") == "DEAD":
            client.kv_del(NAMES, key)   # a dead actor's name is free again
            continue
        return holder
    return client.kv_get(NAMES, key)


def lookup(client, namespace: str, name: str) -> dict | None:
    actor_id = client.kv_get(NAMES, name_key(namespace, name))
    if actor_id is None:
        return None
    record = read(client, actor_id)
    if record is None or record.get("state") == "DEAD":
        return None
    return record


def list_all(client) -> list[dict]:
    out = []
    for key in client.kv_keys(ACTORS, b""):
        record = read(client, key)
        if record is not None:
            out.append(record)
    return out
