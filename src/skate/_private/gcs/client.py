"""The client every component uses to talk to the Global Control Store.

Owns: the GCS wire protocol as seen from the caller (method names, the token metadata,
pickled request/response bodies, channel options), retries through short GCS outages,
and subscriptions that survive a GCS restart. May call: grpc only. It is imported by
drivers, workers and node managers, so it stays light (no sqlite, no asyncio).

Wire protocol (shared with ``server.py``, which imports the constants from here so the
two cannot drift):

- service ``skate.Gcs``; every call carries the cluster token in metadata key
  ``x-skate-token``; the server checks it before it unpickles anything;
- unary request body: ``pickle((args, kwargs))``; response body: ``pickle(result)``;
- ``Publish`` sends ``(channel, payload)`` where ``payload = pickle(message)`` is made
  here, so the GCS forwards messages without ever importing the classes inside them;
- ``Subscribe`` streams one empty item (the subscription is live) and then
  ``pickle((channel, payload))`` per message.

Failure handling:

- ``UNAVAILABLE`` (GCS down or restarting) is retried with exponential backoff until
  ``timeout`` seconds have passed, then ``ConnectionError`` names the address. Calls that
  are not idempotent (``register_job``) may in rare cases be applied twice when the
  connection drops after the server received the request.
- ``UNAUTHENTICATED`` becomes ``PermissionError``: it is a configuration error, never
  retried.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from typing import Any, Callable, Iterable, Optional

import grpc

SERVICE = "skate.Gcs"
TOKEN_METADATA_KEY = "x-skate-token"
# Stream item that tells a subscriber its subscription is registered on the server.
SUBSCRIBED = b""
MAX_MESSAGE_BYTES = 512 * 1024 * 1024

# Options shared by client channels and the server. Reconnect backoff is capped low so a
# restarted GCS is found within about a second (grpc's default cap is two minutes).
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Keepalive pings notice a GCS host that vanished without closing the connection,
    # which matters for subscriptions that may be quiet for a long time.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]

_UNARY_METHODS = (
    "RegisterNode", "UnregisterNode", "Heartbeat", "GetNodes",
    "RegisterJob", "FinishJob", "GetJobs",
    "KvPut", "KvGet", "KvDel", "KvKeys", "KvExists",
    "ExportFunction", "GetFunction",
    "Publish", "Ping",
)

_INITIAL_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0

log = logging.getLogger("skate.gcs")


def token_rejected_error(address: str) -> PermissionError:
    return PermissionError(
        f"the GCS at {address} rejected the cluster token. Every process of a cluster must "
        "use the token the cluster was started with. A driver on the head's machine finds it "
        "in /tmp/skate/latest_cluster.json (readable by the cluster's user only); elsewhere "
        "set SKATE_TOKEN to the token the head printed when it started."
    )


class GcsClient:
    """A connection to the GCS at ``address`` ("host:port"), authenticated with ``token``.

    Thread-safe: one client may be shared by all threads of a process.
    """

    def __init__(self, address: str, token: str, timeout: float = 10.0):
        if not token:
            raise ValueError("GcsClient needs the cluster token (got an empty token)")
        self.address = address
        self.timeout = timeout
        self._metadata = ((TOKEN_METADATA_KEY, token),)
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        # Raw bytes in and out: (de)serialization happens here so the server can check the
        # token before it touches the body.
        self._methods = {
            name: self._channel.unary_unary(f"/{SERVICE}/{name}", request_serializer=None, response_deserializer=None)
            for name in _UNARY_METHODS
        }
        self._subscribe_method = self._channel.unary_stream(
            f"/{SERVICE}/Subscribe", request_serializer=None, response_deserializer=None
        )
        self._subscriptions: set[Subscription] = set()
        self._lock = threading.Lock()
        self._closed = False

    # -- transport ----------------------------------------------------------------------

    def _call(self, method: str, *args, **kwargs):
        if self._closed:
            raise RuntimeError(f"GcsClient for {self.address} is closed")
        request = pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        stub = self._methods[method]
        deadline = time.monotonic() + self.timeout
        backoff = _INITIAL_BACKOFF_S
        while True:
            remaining = deadline - time.monotonic()
            try:
                reply = stub(request, timeout=max(remaining, 0.01), metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    # The GCS is down or restarting: wait and try again until the deadline.
                    if time.monotonic() + backoff >= deadline:
                        raise ConnectionError(
                            f"the GCS at {self.address} is unreachable (retried {method} for "
                            f"{self.timeout:g}s): {exc.details()}"
                        ) from None
                    time.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF_S)
                    continue
                raise self._translate(method, exc) from None
            return pickle.loads(reply)

    def _translate(self, method: str, exc: grpc.RpcError) -> Exception:
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return token_rejected_error(self.address)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return TimeoutError(f"the GCS at {self.address} did not answer {method} within {self.timeout:g}s")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ValueError(f"the GCS at {self.address} rejected {method}: {exc.details()}")
        return RuntimeError(f"the GCS at {self.address} failed {method} ({code.name}): {exc.details()}")

    # -- nodes --------------------------------------------------------------------------

    def register_node(self, info: dict) -> None:
        """Register (or re-register) a node: ``info`` has node_id, address, resources."""
        return self._call("RegisterNode", info)

    def unregister_node(self, node_id: bytes) -> bool:
        return self._call("UnregisterNode", node_id)

    def heartbeat(self, node_id: bytes, resources_available: dict, load: Optional[dict] = None) -> bool:
        """Report liveness; False means the GCS does not know the node as alive: re-register."""
        return self._call("Heartbeat", node_id, resources_available, load or {})

    def get_nodes(self) -> list[dict]:
        return self._call("GetNodes")

    # -- jobs ---------------------------------------------------------------------------

    def register_job(self, info: Optional[dict] = None) -> int:
        return self._call("RegisterJob", info or {})

    def finish_job(self, job_id: int) -> bool:
        return self._call("FinishJob", job_id)

    def get_jobs(self) -> list[dict]:
        return self._call("GetJobs")

    # -- key-value store ----------------------------------------------------------------

    def kv_put(self, ns, key, value, overwrite: bool = True) -> bool:
        """Store ``value`` under ``key`` in namespace ``ns``; True when the key is new."""
        return self._call("KvPut", ns, key, value, overwrite)

    def kv_get(self, ns, key) -> Optional[bytes]:
        return self._call("KvGet", ns, key)

    def kv_del(self, ns, key) -> bool:
        return self._call("KvDel", ns, key)

    def kv_keys(self, ns, prefix=b"") -> list[bytes]:
        return self._call("KvKeys", ns, prefix)

    def kv_exists(self, ns, key) -> bool:
        return self._call("KvExists", ns, key)

    # -- functions ----------------------------------------------------------------------

    def export_function(self, function_id: bytes, blob: bytes, descriptor: Optional[dict] = None) -> None:
        return self._call("ExportFunction", function_id, blob, descriptor or {})

    def get_function(self, function_id: bytes) -> Optional[bytes]:
        return self._call("GetFunction", function_id)

    # -- pub/sub and liveness -----------------------------------------------------------

    def publish(self, channel: str, message: Any) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        return self._call("Publish", channel, payload)

    def subscribe(
        self,
        channels: Iterable[str],
        callback: Callable[[str, Any], None],
        on_reconnect: Optional[Callable[[], None]] = None,
    ) -> "Subscription":
        """Call ``callback(channel, message)`` for every message published from now on.

        Returns once the server has registered the subscription, so nothing published
        after this call returns is missed. Runs on a daemon thread; resubscribes after a
        GCS restart and then calls ``on_reconnect()`` (messages published while the GCS
        was away are lost, so the subscriber may want to re-read state).
        """
        sub = Subscription(self, list(channels), callback, on_reconnect)
        with self._lock:
            self._subscriptions.add(sub)
        sub._start(self.timeout)
        return sub

    def ping(self) -> dict:
        return self._call("Ping")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subs = list(self._subscriptions)
            self._subscriptions.clear()
        for sub in subs:
            sub.close()
        self._channel.close()

    def __enter__(self) -> "GcsClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GcsClient({self.address!r})"


class Subscription:
    """A live subscription to GCS channels; ``close()`` ends it. Made by ``GcsClient.subscribe``."""

    def __init__(self, client: GcsClient, channels: list[str], callback, on_reconnect):
        self.channels = channels
        self._client = client
        self._callback = callback
        self._on_reconnect = on_reconnect
        self._request = pickle.dumps(((channels,), {}), protocol=pickle.HIGHEST_PROTOCOL)
        self._lock = threading.Lock()
        self._closed = False
        self._stopped = threading.Event()  # set by close(); wakes the retry pause early
        self._call = None  # the current stream, cancelled by close()
        self._live = threading.Event()  # set once the first subscription is registered
        self._error: Optional[Exception] = None
        self._thread = threading.Thread(target=self._run, name="gcs-subscription", daemon=True)

    def _start(self, timeout: float) -> None:
        self._thread.start()
        if not self._live.wait(timeout):
            self.close()
            raise ConnectionError(f"could not subscribe to {self.channels} at the GCS at {self._client.address} within {timeout:g}s")
        if self._error is not None:
            self.close()
            raise self._error

    def _run(self) -> None:
        backoff = _INITIAL_BACKOFF_S
        subscribed_before = False
        while True:
            with self._lock:
                if self._closed:
                    return
                call = self._client._subscribe_method(self._request, metadata=self._client._metadata)
                self._call = call
            try:
                for item in call:
                    if item == SUBSCRIBED:
                        backoff = _INITIAL_BACKOFF_S
                        if subscribed_before:
                            self._notify_reconnect()
                        subscribed_before = True
                        self._live.set()
                        continue
                    self._deliver(item)
            except grpc.RpcError as exc:
                if self._closed:
                    return
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self._error = token_rejected_error(self._client.address)
                    self._live.set()
                    return
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    log.debug("GCS subscription to %s ended: %s", self.channels, exc)
            # The stream ended (GCS stopped or restarting): subscribe again after a pause.
            if self._closed:
                return
            self._stopped.wait(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _deliver(self, item: bytes) -> None:
        channel = None
        try:
            channel, payload = pickle.loads(item)
            self._callback(channel, pickle.loads(payload))
        except Exception:
            # A message that cannot be decoded here (say, its class is not importable in
            # this process) or a failing callback must not end the subscription.
            log.exception("GCS subscription to %s: delivering a message on channel %r failed", self.channels, channel)

    def _notify_reconnect(self) -> None:
        if self._on_reconnect is None:
            return
        try:
            self._on_reconnect()
        except Exception:
            log.exception("GCS subscription on_reconnect callback failed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            call = self._call
        self._stopped.set()
        if call is not None:
            call.cancel()
        with self._client._lock:
            self._client._subscriptions.discard(self)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def __repr__(self) -> str:
        return f"Subscription({self.channels!r}, closed={self._closed})"
