"""Every tunable of the runtime, in one place.

Each knob has an environment variable, a default and a meaning. Components read
``CONFIG.<name>``; nothing else reads ``SKATE_*`` variables for tuning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _env(name: str, default, cast):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if cast is bool:
        cast = _bool
    try:
        return cast(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {getattr(cast, '__name__', cast)}") from exc


@dataclass
class Config:
    # SKATE_INLINE_THRESHOLD: objects whose serialized size is below this many bytes
    # live in the owner's memory and travel inline in messages; larger ones go to the
    # node's shared-memory store.
    inline_threshold: int = 100 * 1024
    # SKATE_OBJECT_STORE_FRACTION: default store capacity as a fraction of the memory
    # available in /dev/shm (used when init() gets no object_store_memory).
    object_store_fraction: float = 0.3
    # SKATE_MAX_INFLIGHT_PER_WORKER: how many tasks a caller pushes to one leased worker
    # before waiting for replies (pipelining depth on the hot path).
    max_inflight_per_worker: int = 32
    # SKATE_LEASE_IDLE_S: how long a caller keeps an idle worker lease before returning it,
    # so a submit/get loop does not pay a lease round trip per task. The node manager asks
    # for idle leases back at once when another caller needs the resources.
    lease_idle_s: float = 1.0
    # SKATE_WORKER_START_TIMEOUT_S: a worker that has not registered with its node
    # manager within this time is considered failed.
    worker_start_timeout_s: float = 30.0
    # SKATE_NODE_START: how init() starts the embedded node process. "fork" forks it from
    # the driver (no new interpreter, no imports: the first result comes in milliseconds;
    # workers then inherit the driver's imported modules, as multiprocessing's fork
    # start method does); "exec" runs a fresh interpreter (workers start clean, as Ray's);
    # "auto" forks when that is safe (Linux, no other thread running in the driver, gRPC
    # not loaded) and execs otherwise.
    node_start: str = "auto"
    # SKATE_NODE_START_TIMEOUT_S: how long init() waits for the embedded node to come up.
    node_start_timeout_s: float = 30.0
    # SKATE_LOG_POLL_S: how often the node's log monitor looks for new worker output.
    log_poll_s: float = 0.05
    # SKATE_TEMP_DIR: where sessions keep sockets, logs and spilled objects.
    temp_dir: str = "/tmp/skate"
    # SKATE_KEEP_LOGS: 1 keeps the session directory (worker logs under logs/) after the
    # embedded cluster shuts down; by default it is removed.
    keep_logs: bool = False
    # SKATE_HEARTBEAT_S: how often node managers report to the GCS.
    heartbeat_s: float = 1.0
    # SKATE_NODE_DEATH_TIMEOUT_S: a node silent this long is declared dead by the GCS.
    node_death_timeout_s: float = 10.0


_ENV_NAMES = {f.name: "SKATE_" + f.name.upper() for f in fields(Config)}


def load() -> Config:
    cfg = Config()
    for f in fields(Config):
        setattr(cfg, f.name, _env(_ENV_NAMES[f.name], getattr(cfg, f.name), type(getattr(cfg, f.name))))
    return cfg


CONFIG = load()
