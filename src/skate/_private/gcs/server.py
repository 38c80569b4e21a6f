"""The Global Control Store server: the cluster's control state and its pub/sub.

Owns: the node, job, KV and function tables (kept in a ``storage`` backend so a GCS
restarted on the same SQLite file reloads them), node liveness (heartbeats and the
declaration of dead nodes), and the publish/subscribe fan-out. May call: ``storage``
and the wire constants of ``client`` in this package, ``config``, grpc. It never calls
node managers, workers or drivers: they call it, and learn of changes by subscription.

How a request flows::

    GcsClient                      GcsServer
    ---------                      ---------------------------------------------------
    /skate.Gcs/<Method>  --bytes-> [event-loop thread] check x-skate-token (hmac)
                                      | wrong or missing: abort UNAUTHENTICATED,
                                      |   the body is never unpickled
                                      v
                                   [rpc thread pool] unpickle (args, kwargs)
                                      -> GcsTables.<method> -> storage (may block: SQLite)
                                      -> PubSub.publish (node/job changes, Publish)
                 <-pickle(result)--   |
    /skate.Gcs/Subscribe --bytes-> [event-loop thread] check token, register subscriber,
                 <-- b"" --------  stream: one empty item (subscription live), then
                 <-- items ------  pickle((channel, payload)) per message

1. The server runs grpc's asyncio server on its own thread and event loop, so a
   subscriber is a suspended coroutine, not a parked thread: thousands of subscribers do
   not starve unary calls of threads.
2. Unary bodies run on a small thread pool so a slow SQLite commit never stalls the loop.
3. Publishers hand messages to the loop with ``call_soon_threadsafe``; the loop appends
   them to each subscriber's backlog. A subscriber whose stream ends (disconnect, cancel)
   is removed in the generator's ``finally``; one that falls ``_MAX_BACKLOG`` messages
   behind is dropped, and its client resubscribes.
4. A monitor thread declares a node DEAD when it has not heartbeated for
   ``node_death_timeout`` seconds and publishes the change on channel ``"node"``.

Tables in storage: ``nodes`` (node_id -> pickled record), ``jobs`` (8-byte big-endian
job id -> pickled record), ``meta`` (the job counter), ``kv`` (length-prefixed namespace
+ key -> value), ``functions`` (function_id -> pickled blob and descriptor). Heartbeat
data (availability, load, last seen) is kept in memory only: it is rewritten every
second and a restarted GCS waits for fresh heartbeats anyway.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import os
import pickle
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable, Optional, Union

import grpc

from skate._private.config import CONFIG
from skate._private.gcs.client import CHANNEL_OPTIONS, SERVICE, SUBSCRIBED, TOKEN_METADATA_KEY
from skate._private.gcs.storage import Storage, make_storage

log = logging.getLogger("skate.gcs")

ALIVE = "ALIVE"
DEAD = "DEAD"
JOB_RUNNING = "RUNNING"
JOB_FINISHED = "FINISHED"

NODE_CHANNEL = "node"
JOB_CHANNEL = "job"

# Threads running unary request bodies (storage access). The control plane is not on the
# task hot path, so a few suffice.
_RPC_THREADS = 8
# A subscriber this many messages behind is dropped (it resubscribes) rather than let
# the GCS's memory grow without bound.
_MAX_BACKLOG = 100_000

_SERVER_OPTIONS = [
    *[(k, v) for k, v in CHANNEL_OPTIONS if k.startswith("grpc.max_")],
    # grpc sets SO_REUSEPORT by default, which would let a second GCS silently share a
    # fixed port with a running one.
    ("grpc.so_reuseport", 0),
    # Accept the clients' keepalive pings (grpc's default would answer them with GOAWAY).
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class _BadRequest(Exception):
    """The request could not be decoded or its arguments are invalid."""


def _as_bytes(value, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes or str, not {type(value).__name__}")


def _kv_key(ns, key) -> bytes:
    # Length-prefixed namespace: no separator byte can collide with namespace contents,
    # and a prefix scan of one namespace stays a prefix scan.
    ns = _as_bytes(ns if ns is not None else b"", "KV namespace")
    return len(ns).to_bytes(4, "big") + ns + _as_bytes(key, "KV key")


def _job_key(job_id: int) -> bytes:
    return job_id.to_bytes(8, "big")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("skate")
    except Exception:
        return "0+unknown"


class GcsTables:
    """The control state and its rules; transport-free so it can be read on its own.

    Every public method is one RPC (``register_node`` serves ``RegisterNode``). Called
    from the server's rpc threads and its node monitor, hence one lock over the
    in-memory state; storage writes happen under it so storage matches memory.
    """

    def __init__(self, storage: Storage, publish: Callable[[str, Any], None], node_death_timeout: float):
        self._storage = storage
        self._publish = publish
        self.node_death_timeout = node_death_timeout
        self._lock = threading.Lock()
        self._start_time = time.time()
        self._nodes: dict[bytes, dict] = {}
        self._last_seen: dict[bytes, float] = {}  # node_id -> time.monotonic() of last heartbeat
        self._jobs: dict[int, dict] = {}
        self._last_job_id = 0
        self._load()

    def _load(self) -> None:
        """Rebuild memory from storage after a GCS restart."""
        now = time.monotonic()
        for node_id, blob in self._storage.scan("nodes"):
            record = pickle.loads(blob)
            self._nodes[node_id] = record
            # A node that was alive gets a full death timeout to find the new GCS.
            self._last_seen[node_id] = now
        for _, blob in self._storage.scan("jobs"):
            record = pickle.loads(blob)
            self._jobs[record["job_id"]] = record
        stored_counter = self._storage.get("meta", "last_job_id")
        self._last_job_id = max(
            int.from_bytes(stored_counter, "big") if stored_counter else 0,
            max(self._jobs, default=0),
        )

    # -- nodes --------------------------------------------------------------------------

    @staticmethod
    def _node_view(record: dict) -> dict:
        # Heartbeats replace the inner dicts rather than mutate them, so a shallow copy
        # taken under the lock is safe to pickle outside it.
        return dict(record)

    def _persist_node(self, record: dict) -> None:
        self._storage.put("nodes", record["node_id"], pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))

    def register_node(self, info: dict) -> None:
        if not isinstance(info, dict):
            raise TypeError(f"node info must be a dict, not {type(info).__name__}")
        missing = [k for k in ("node_id", "address", "resources") if k not in info]
        if missing:
            raise ValueError(f"node info lacks {', '.join(missing)}")
        node_id = _as_bytes(info["node_id"], "node_id")
        record = dict(info)
        record.update(
            node_id=node_id,
            resources=dict(info["resources"]),
            state=ALIVE,
            resources_available=dict(info.get("resources_available", info["resources"])),
            load=dict(info.get("load", {})),
            registered_at=time.time(),
            last_heartbeat=time.time(),
            death_reason=None,
        )
        with self._lock:
            self._nodes[node_id] = record
            self._last_seen[node_id] = time.monotonic()
            self._persist_node(record)
            view = self._node_view(record)
        log.info("node %s registered at %s", node_id.hex(), record["address"])
        self._publish(NODE_CHANNEL, view)

    def _mark_dead(self, record: dict, reason: str) -> dict:
        record["state"] = DEAD
        record["death_reason"] = reason
        record["died_at"] = time.time()
        self._last_seen.pop(record["node_id"], None)
        self._persist_node(record)
        return self._node_view(record)

    def unregister_node(self, node_id: bytes) -> bool:
        node_id = _as_bytes(node_id, "node_id")
        with self._lock:
            record = self._nodes.get(node_id)
            if record is None or record["state"] == DEAD:
                return False
            view = self._mark_dead(record, "unregistered")
        self._publish(NODE_CHANNEL, view)
        return True

    def heartbeat(self, node_id: bytes, resources_available: dict, load: dict) -> bool:
        node_id = _as_bytes(node_id, "node_id")
        with self._lock:
            record = self._nodes.get(node_id)
            if record is None or record["state"] != ALIVE:
                return False
            self._last_seen[node_id] = time.monotonic()
            record["last_heartbeat"] = time.time()
            record["resources_available"] = dict(resources_available)
            record["load"] = dict(load or {})
        return True

    def get_nodes(self) -> list[dict]:
        with self._lock:
            return [self._node_view(r) for r in self._nodes.values()]

    def declare_silent_nodes_dead(self) -> list[bytes]:
        """Mark DEAD every ALIVE node silent for longer than the death timeout."""
        now = time.monotonic()
        views = []
        with self._lock:
            for node_id, seen in list(self._last_seen.items()):
                record = self._nodes[node_id]
                if record["state"] == ALIVE and now - seen > self.node_death_timeout:
                    views.append(self._mark_dead(record, f"no heartbeat for {self.node_death_timeout:g}s"))
        for view in views:
            log.warning("node %s declared dead: %s", view["node_id"].hex(), view["death_reason"])
            self._publish(NODE_CHANNEL, view)
        return [v["node_id"] for v in views]

    # -- jobs ---------------------------------------------------------------------------

    def _persist_job(self, record: dict) -> None:
        self._storage.put("jobs", _job_key(record["job_id"]), pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))

    def register_job(self, info: dict) -> int:
        with self._lock:
            self._last_job_id += 1
            job_id = self._last_job_id
            # The counter is written first so a crash between the two writes never
            # hands out a job id twice.
            self._storage.put("meta", "last_job_id", job_id.to_bytes(8, "big"))
            record = dict(info or {})
            record.update(job_id=job_id, state=JOB_RUNNING, start_time=time.time(), end_time=None)
            self._jobs[job_id] = record
            self._persist_job(record)
            view = dict(record)
        self._publish(JOB_CHANNEL, view)
        return job_id

    def finish_job(self, job_id: int) -> bool:
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None or record["state"] == JOB_FINISHED:
                return False
            record["state"] = JOB_FINISHED
            record["end_time"] = time.time()
            self._persist_job(record)
            view = dict(record)
        self._publish(JOB_CHANNEL, view)
        return True

    def get_jobs(self) -> list[dict]:
        with self._lock:
            return [dict(self._jobs[j]) for j in sorted(self._jobs)]

    # -- key-value store ----------------------------------------------------------------

    def kv_put(self, ns, key, value, overwrite: bool = True) -> bool:
        full_key = _kv_key(ns, key)
        value = _as_bytes(value, "KV value")
        # The lock makes check-then-write atomic for overwrite=False (a distributed lock
        # or "first writer wins" registration relies on it).
        with self._lock:
            exists = self._storage.get("kv", full_key) is not None
            if exists and not overwrite:
                return False
            self._storage.put("kv", full_key, value)
        return not exists

    def kv_get(self, ns, key) -> Optional[bytes]:
        return self._storage.get("kv", _kv_key(ns, key))

    def kv_del(self, ns, key) -> bool:
        with self._lock:
            return self._storage.delete("kv", _kv_key(ns, key))

    def kv_keys(self, ns, prefix=b"") -> list[bytes]:
        ns_prefix = _kv_key(ns, b"")
        scan_prefix = ns_prefix + _as_bytes(prefix or b"", "KV prefix")
        return [k[len(ns_prefix):] for k, _ in self._storage.scan("kv", scan_prefix)]

    def kv_exists(self, ns, key) -> bool:
        return self.kv_get(ns, key) is not None

    # -- functions ----------------------------------------------------------------------

    def export_function(self, function_id: bytes, blob: bytes, descriptor: dict) -> None:
        record = {"blob": _as_bytes(blob, "function blob"), "descriptor": dict(descriptor or {})}
        self._storage.put(
            "functions", _as_bytes(function_id, "function_id"), pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        )

    def get_function(self, function_id: bytes) -> Optional[bytes]:
        stored = self._storage.get("functions", _as_bytes(function_id, "function_id"))
        return None if stored is None else pickle.loads(stored)["blob"]

    # -- pub/sub and liveness -----------------------------------------------------------

    def publish(self, channel: str, payload: bytes) -> None:
        """Forward an already-pickled message (see client.py) to the channel's subscribers."""
        if not isinstance(channel, str):
            raise TypeError(f"channel must be a str, not {type(channel).__name__}")
        self._publish(channel, _RawPayload(_as_bytes(payload, "message payload")))

    def ping(self) -> dict:
        return {"start_time": self._start_time, "version": _version(), "pid": os.getpid()}


class _RawPayload(bytes):
    """A message already pickled by the publishing client: forwarded without re-pickling."""


class _Subscriber:
    __slots__ = ("channels", "backlog", "wakeup", "closed")

    def __init__(self, channels: frozenset):
        self.channels = channels
        self.backlog: deque[bytes] = deque()
        self.wakeup = asyncio.Event()
        self.closed = False

    def push(self, item: bytes) -> None:
        if self.closed:
            return
        if len(self.backlog) >= _MAX_BACKLOG:
            log.warning("dropping a GCS subscriber to %s that is %d messages behind", sorted(self.channels), _MAX_BACKLOG)
            self.backlog.clear()
            self.close()
            return
        self.backlog.append(item)
        self.wakeup.set()

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()


class PubSub:
    """Channel -> subscribers, touched only on the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._by_channel: dict[str, set[_Subscriber]] = {}

    def publish_threadsafe(self, channel: str, message: Any) -> None:
        payload = message if isinstance(message, _RawPayload) else pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        # Pickled once here, shared by every subscriber of the channel.
        item = pickle.dumps((channel, bytes(payload)), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._loop.call_soon_threadsafe(self._fan_out, channel, item)
        except RuntimeError:
            pass  # the loop is closed: the server stopped, nobody is subscribed

    def _fan_out(self, channel: str, item: bytes) -> None:
        for sub in list(self._by_channel.get(channel, ())):
            sub.push(item)

    def add(self, channels: frozenset) -> _Subscriber:
        sub = _Subscriber(channels)
        for channel in channels:
            self._by_channel.setdefault(channel, set()).add(sub)
        return sub

    def remove(self, sub: _Subscriber) -> None:
        for channel in sub.channels:
            subs = self._by_channel.get(channel)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_channel[channel]

    def close_all(self) -> None:
        for subs in list(self._by_channel.values()):
            for sub in subs:
                sub.close()

    def subscriber_count(self) -> int:
        return len({s for subs in self._by_channel.values() for s in subs})


class GcsServer:
    """Serves the GCS on ``host:port`` (port 0 picks a free one) for clients with ``token``.

    ``storage`` is a storage object, or a spec for ``make_storage`` (None/"memory" or a
    SQLite file path); a storage the server made itself is closed by ``stop()``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str,
        storage: Union[Storage, str, os.PathLike, None] = None,
        node_death_timeout: Optional[float] = None,
    ):
        if not token:
            raise ValueError("GcsServer needs a non-empty cluster token")
        self.host = host
        self.port = port
        self._token = token.encode("utf-8")
        if storage is None or isinstance(storage, (str, os.PathLike)):
            self._storage = make_storage(storage)
            self._owns_storage = True
        else:
            self._storage = storage
            self._owns_storage = False
        self.node_death_timeout = CONFIG.node_death_timeout_s if node_death_timeout is None else node_death_timeout
        self.tables: Optional[GcsTables] = None
        self._pubsub: Optional[PubSub] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[threading.Thread] = None
        self._stop_requested: Optional[asyncio.Event] = None
        self._stop_grace: Optional[float] = None
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._monitor_thread: Optional[threading.Thread] = None
        self._monitor_stop = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> int:
        """Bind, load the tables from storage, start serving; returns the bound port."""
        if self._loop_thread is not None:
            raise RuntimeError(f"GCS server at {self.address} is already started")
        self._executor = concurrent.futures.ThreadPoolExecutor(_RPC_THREADS, thread_name_prefix="gcs-rpc")
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._loop_thread = threading.Thread(target=self._serve, args=(ready,), name="gcs-server", daemon=True)
        self._loop_thread.start()
        try:
            self.port = ready.result()
        except BaseException:
            self._loop_thread.join()
            self._loop_thread = None
            self._executor.shutdown(wait=True)
            raise
        self._monitor_stop.clear()
        self._monitor_thread = threading.Thread(target=self._monitor_nodes, name="gcs-node-monitor", daemon=True)
        self._monitor_thread.start()
        log.info("GCS serving on %s with %r", self.address, self._storage)
        return self.port

    def stop(self, grace: Optional[float] = None) -> None:
        """Stop serving: subscribers' streams end, in-flight calls get ``grace`` seconds."""
        if self._loop_thread is None:
            return
        self._monitor_stop.set()
        self._monitor_thread.join()
        self._stop_grace = grace
        self._loop.call_soon_threadsafe(self._stop_requested.set)
        self._loop_thread.join()
        self._loop_thread = None
        # Request bodies still running finish before their storage goes away.
        self._executor.shutdown(wait=True)
        if self._owns_storage:
            self._storage.close()

    def __enter__(self) -> "GcsServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self, ready: concurrent.futures.Future) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._run(ready))
        finally:
            loop.close()

    async def _run(self, ready: concurrent.futures.Future) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._stop_requested = asyncio.Event()
            self._pubsub = PubSub(self._loop)
            self.tables = GcsTables(self._storage, self._pubsub.publish_threadsafe, self.node_death_timeout)
            server = grpc.aio.server(options=_SERVER_OPTIONS)
            server.add_generic_rpc_handlers((self._handler(),))
            port = server.add_insecure_port(f"{self.host}:{self.port}")
            if not port:
                raise OSError(f"GCS could not bind {self.host}:{self.port}")
            await server.start()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(port)
        await self._stop_requested.wait()
        self._pubsub.close_all()
        await server.stop(self._stop_grace)

    def _monitor_nodes(self) -> None:
        # Check several times per timeout so a death is declared at most ~20% late.
        interval = max(0.02, min(1.0, self.node_death_timeout / 5))
        while not self._monitor_stop.wait(interval):
            try:
                self.tables.declare_silent_nodes_dead()
            except Exception:
                log.exception("GCS node monitor failed")

    # -- transport ----------------------------------------------------------------------

    def _handler(self) -> grpc.GenericRpcHandler:
        tables = self.tables
        bodies = {
            "RegisterNode": tables.register_node,
            "UnregisterNode": tables.unregister_node,
            "Heartbeat": tables.heartbeat,
            "GetNodes": tables.get_nodes,
            "RegisterJob": tables.register_job,
            "FinishJob": tables.finish_job,
            "GetJobs": tables.get_jobs,
            "KvPut": tables.kv_put,
            "KvGet": tables.kv_get,
            "KvDel": tables.kv_del,
            "KvKeys": tables.kv_keys,
            "KvExists": tables.kv_exists,
            "ExportFunction": tables.export_function,
            "GetFunction": tables.get_function,
            "Publish": tables.publish,
            "Ping": tables.ping,
        }
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._unary(name, body)) for name, body in bodies.items()}
        handlers["Subscribe"] = grpc.unary_stream_rpc_method_handler(self._subscribe)
        # No request_deserializer: handlers get raw bytes, so nothing is unpickled before
        # the token check.
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _authorized(self, context) -> bool:
        for key, value in context.invocation_metadata() or ():
            if key == TOKEN_METADATA_KEY:
                if isinstance(value, str):
                    value = value.encode("utf-8")
                # Constant time: the comparison must not reveal how much of a guess matched.
                return hmac.compare_digest(value, self._token)
        return False

    async def _reject(self, context) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")

    def _unary(self, name: str, body: Callable):
        def run(request: bytes) -> bytes:
            # Runs on the rpc thread pool, only after the token was checked.
            try:
                args, kwargs = pickle.loads(request)
            except Exception as exc:
                raise _BadRequest(f"undecodable {name} request: {exc!r}") from None
            try:
                result = body(*args, **kwargs)
            except (TypeError, ValueError) as exc:
                raise _BadRequest(f"{type(exc).__name__}: {exc}") from None
            return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)

        async def handle(request: bytes, context) -> bytes:
            if not self._authorized(context):
                await self._reject(context)
            try:
                return await self._loop.run_in_executor(self._executor, run, request)
            except _BadRequest as exc:
                status, details = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            except Exception:
                log.exception("GCS %s failed", name)
                status, details = grpc.StatusCode.INTERNAL, traceback.format_exc()
            # abort() raises; it is kept outside the try so it is not caught above.
            await context.abort(status, details)

        return handle

    async def _subscribe(self, request: bytes, context):
        if not self._authorized(context):
            await self._reject(context)
        try:
            (channels,), _ = pickle.loads(request)
            channels = frozenset(channels)
            if not all(isinstance(c, str) for c in channels):
                raise TypeError("channel names must be str")
        except Exception as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad Subscribe request: {exc!r}")
        sub = self._pubsub.add(channels)
        try:
            yield SUBSCRIBED
            while True:
                while sub.backlog:
                    yield sub.backlog.popleft()
                if sub.closed:
                    return
                sub.wakeup.clear()
                await sub.wakeup.wait()
        finally:
            # Runs on normal end, client disconnect and cancellation alike: no leak.
            self._pubsub.remove(sub)

    def subscriber_count(self) -> int:
        """How many subscriptions are live (for tests and the dashboard)."""
        if self._loop is None or self._loop_thread is None:
            return 0
        return asyncio.run_coroutine_threadsafe(self._count(), self._loop).result(5)

    async def _count(self) -> int:
        return self._pubsub.subscriber_count()

    def __repr__(self) -> str:
        return f"GcsServer({self.address!r}, storage={self._storage!r})"
