"""The Global Control Store: tables, liveness, pub/sub, persistence and authentication."""

from __future__ import annotations

import os
import pickle
import shlex
import threading
import time

import grpc
import pytest

from skate._private.gcs.client import GcsClient
from skate._private.gcs.server import GcsServer
from skate._private.gcs.storage import InMemoryStorage, SqliteStorage, make_storage

pytestmark = pytest.mark.timeout(60)

TOKEN = "test-cluster-token"


def wait_until(predicate, timeout=10.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def gcs_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("gcs-") and t.is_alive()]


@pytest.fixture
def gcs():
    """Starts servers and clients; stops all of them and checks no GCS thread survives."""

    class Harness:
        def __init__(self):
            self.servers = []
            self.clients = []

        def server(self, **kwargs) -> GcsServer:
            kwargs.setdefault("token", TOKEN)
            server = GcsServer(**kwargs)
            server.start()
            self.servers.append(server)
            return server

        def client(self, server_or_address, token=TOKEN, **kwargs) -> GcsClient:
            address = getattr(server_or_address, "address", server_or_address)
            client = GcsClient(address, token, **kwargs)
            self.clients.append(client)
            return client

    harness = Harness()
    yield harness
    for client in harness.clients:
        client.close()
    for server in harness.servers:
        server.stop()
    assert wait_until(lambda: not gcs_threads(), timeout=5), f"leaked threads: {gcs_threads()}"


@pytest.fixture
def server(gcs):
    return gcs.server()


@pytest.fixture
def client(gcs, server):
    return gcs.client(server)


# -- storage ----------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def storage(request, tmp_path):
    store = InMemoryStorage() if request.param == "memory" else SqliteStorage(tmp_path / "gcs.db")
    yield store
    store.close()


def test_storage_backends_agree_on_put_get_delete_scan(storage):
    storage.put("t", "a1", b"x")
    storage.put("t", b"a2", b"y")
    storage.put("t", b"b", b"z")
    storage.put("other", b"a1", b"elsewhere")
    storage.put("t", b"\xff\xff", b"high")
    storage.put("t", "a1", b"x2")  # replaces

    assert storage.get("t", b"a1") == b"x2"  # str and bytes keys are the same key
    assert storage.get("t", "missing") is None
    assert storage.scan("t", b"a") == [(b"a1", b"x2"), (b"a2", b"y")]
    assert storage.scan("t", b"\xff") == [(b"\xff\xff", b"high")]
    assert [k for k, _ in storage.scan("t")] == [b"a1", b"a2", b"b", b"\xff\xff"]
    assert storage.delete("t", b"a1") is True
    assert storage.delete("t", b"a1") is False
    assert storage.get("other", b"a1") == b"elsewhere"


def test_make_storage_picks_backend_from_spec(tmp_path):
    assert isinstance(make_storage(None), InMemoryStorage)
    assert isinstance(make_storage("memory"), InMemoryStorage)
    sqlite = make_storage(str(tmp_path / "x.db"))
    assert isinstance(sqlite, SqliteStorage)
    sqlite.close()


# -- key-value store --------------------------------------------------------------------


def test_kv_operations_are_isolated_per_namespace(client):
    assert client.kv_put("ns1", b"k", b"v1") is True  # new key
    assert client.kv_put("ns1", b"k", b"v2") is False  # overwritten, not added
    assert client.kv_get("ns1", b"k") == b"v2"
    assert client.kv_put("ns1", b"k", b"v3", overwrite=False) is False
    assert client.kv_get("ns1", b"k") == b"v2"

    assert client.kv_get("ns2", b"k") is None
    assert client.kv_exists("ns2", b"k") is False
    client.kv_put("ns2", "k", "text value")
    assert client.kv_get("ns2", b"k") == b"text value"  # str keys/values come back as bytes
    assert client.kv_get("ns1", "k") == b"v2"

    for key in (b"job:1", b"job:2", b"actor:1"):
        client.kv_put("ns1", key, b"")
    assert sorted(client.kv_keys("ns1", b"job:")) == [b"job:1", b"job:2"]
    assert sorted(client.kv_keys("ns1", b"")) == [b"actor:1", b"job:1", b"job:2", b"k"]
    assert client.kv_keys("ns2", b"job:") == []

    assert client.kv_exists("ns1", b"k") is True
    assert client.kv_del("ns1", b"k") is True
    assert client.kv_del("ns1", b"k") is False
    assert client.kv_get("ns1", b"k") is None
    assert client.kv_get("ns2", b"k") == b"text value"


# -- nodes ------------------------------------------------------------------------------


def test_node_registration_heartbeat_and_listing(client):
    client.register_node({"node_id": b"node-1", "address": "10.0.0.1:7000", "resources": {"CPU": 4.0}, "hostname": "h1"})
    (node,) = client.get_nodes()
    assert node["node_id"] == b"node-1"
    assert node["state"] == "ALIVE"
    assert node["resources"] == {"CPU": 4.0}
    assert node["resources_available"] == {"CPU": 4.0}
    assert node["hostname"] == "h1"  # free-form fields are kept
    first_beat = node["last_heartbeat"]

    time.sleep(0.01)
    assert client.heartbeat(b"node-1", {"CPU": 1.0}, {"queued": 3}) is True
    (node,) = client.get_nodes()
    assert node["resources_available"] == {"CPU": 1.0}
    assert node["load"] == {"queued": 3}
    assert node["last_heartbeat"] > first_beat

    assert client.heartbeat(b"unknown-node", {}, {}) is False

    assert client.unregister_node(b"node-1") is True
    (node,) = client.get_nodes()
    assert node["state"] == "DEAD"
    assert client.heartbeat(b"node-1", {"CPU": 4.0}, {}) is False  # must re-register


def test_silent_node_is_declared_dead_and_subscribers_hear_it(gcs):
    server = gcs.server(node_death_timeout=0.5)
    client = gcs.client(server)
    events = []
    client.subscribe(["node"], lambda channel, msg: events.append((msg["node_id"], msg["state"])))

    client.register_node({"node_id": b"n", "address": "a:1", "resources": {"CPU": 1}})
    # Heartbeating for longer than the timeout keeps the node alive.
    for _ in range(8):
        assert client.heartbeat(b"n", {"CPU": 1}, {}) is True
        time.sleep(0.1)
    assert client.get_nodes()[0]["state"] == "ALIVE"

    # Silence: the node is declared dead and the "node" channel says so.
    assert wait_until(lambda: (b"n", "DEAD") in events, timeout=5)
    assert events[0] == (b"n", "ALIVE")
    assert client.get_nodes()[0]["state"] == "DEAD"
    assert client.heartbeat(b"n", {"CPU": 1}, {}) is False

    # A node told it is dead can come back by registering again.
    client.register_node({"node_id": b"n", "address": "a:1", "resources": {"CPU": 1}})
    assert client.get_nodes()[0]["state"] == "ALIVE"
    assert wait_until(lambda: events[-1] == (b"n", "ALIVE"))


# -- pub/sub ----------------------------------------------------------------------------


def test_pubsub_delivers_to_every_subscriber_of_a_channel(gcs, server):
    publisher = gcs.client(server)
    got_a, got_b = [], []
    sub_a = gcs.client(server).subscribe(["logs"], lambda ch, m: got_a.append((ch, m)))
    sub_b = gcs.client(server).subscribe(["logs", "errors"], lambda ch, m: got_b.append((ch, m)))
    assert server.subscriber_count() == 2

    for i in range(20):
        publisher.publish("logs", {"line": i})
    publisher.publish("errors", ValueError("boom"))
    publisher.publish("unwatched", "nobody hears this")

    assert wait_until(lambda: len(got_a) == 20 and len(got_b) == 21)
    assert got_a == [("logs", {"line": i}) for i in range(20)]  # in publish order
    assert got_b[:20] == got_a
    assert got_b[20][0] == "errors" and str(got_b[20][1]) == "boom"

    # A closed subscription is removed on the server and hears nothing more.
    sub_a.close()
    assert wait_until(lambda: server.subscriber_count() == 1)
    publisher.publish("logs", "after close")
    assert wait_until(lambda: len(got_b) == 22)
    time.sleep(0.1)
    assert len(got_a) == 20
    sub_b.close()
    assert wait_until(lambda: server.subscriber_count() == 0)


def test_subscriber_that_disconnects_is_dropped(server):
    channel = grpc.insecure_channel(server.address)
    subscribe = channel.unary_stream("/skate.Gcs/Subscribe", request_serializer=None, response_deserializer=None)
    call = subscribe(pickle.dumps(((["node"],), {})), metadata=(("x-skate-token", TOKEN),))
    assert next(iter(call)) == b""  # the subscription is live
    assert server.subscriber_count() == 1
    channel.close()  # the peer goes away without unsubscribing
    assert wait_until(lambda: server.subscriber_count() == 0)


# -- jobs and functions -----------------------------------------------------------------


def test_job_ids_increase_from_one(client):
    ids = [client.register_job({"driver": f"d{i}"}) for i in range(3)]
    assert ids == [1, 2, 3]
    assert client.finish_job(2) is True
    assert client.finish_job(2) is False
    assert client.finish_job(99) is False
    jobs = client.get_jobs()
    assert [(j["job_id"], j["driver"], j["state"]) for j in jobs] == [
        (1, "d0", "RUNNING"),
        (2, "d1", "FINISHED"),
        (3, "d2", "RUNNING"),
    ]


def test_exported_function_can_be_fetched(client):
    assert client.get_function(b"fn-1") is None
    client.export_function(b"fn-1", b"cloudpickled bytes", {"module": "m", "name": "f"})
    assert client.get_function(b"fn-1") == b"cloudpickled bytes"


# -- persistence ------------------------------------------------------------------------


def test_sqlite_state_survives_a_gcs_restart(gcs, tmp_path):
    db = str(tmp_path / "gcs.sqlite")
    first = gcs.server(storage=db)
    client = gcs.client(first)
    client.kv_put("ns", b"key", b"value")
    assert [client.register_job({}) for _ in range(2)] == [1, 2]
    client.finish_job(1)
    client.export_function(b"fn", b"blob", {"name": "f"})
    client.register_node({"node_id": b"node", "address": "h:1", "resources": {"CPU": 2}})
    client.register_node({"node_id": b"gone", "address": "h:2", "resources": {"CPU": 1}})
    client.unregister_node(b"gone")
    first.stop()

    second = gcs.server(storage=db, node_death_timeout=0.5)
    client = gcs.client(second)
    assert client.kv_get("ns", b"key") == b"value"
    assert client.get_function(b"fn") == b"blob"
    assert [(j["job_id"], j["state"]) for j in client.get_jobs()] == [(1, "FINISHED"), (2, "RUNNING")]
    assert client.register_job({}) == 3  # the counter continues
    nodes = {n["node_id"]: n for n in client.get_nodes()}
    assert nodes[b"node"]["state"] == "ALIVE" and nodes[b"node"]["resources"] == {"CPU": 2}
    assert nodes[b"gone"]["state"] == "DEAD"
    # A reloaded node must heartbeat the new GCS, or it is declared dead.
    assert client.heartbeat(b"node", {"CPU": 2}, {}) is True
    assert wait_until(lambda: {n["node_id"]: n["state"] for n in client.get_nodes()}[b"node"] == "DEAD", timeout=5)


# -- authentication ---------------------------------------------------------------------


class _TouchOnUnpickle:
    """Unpickling this runs a shell command that creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.path)}",))


def test_wrong_token_is_rejected_with_permission_error(gcs, server):
    bad = gcs.client(server, token="not-the-token", timeout=2)
    with pytest.raises(PermissionError, match="rejected the cluster token"):
        bad.kv_get("ns", b"k")
    with pytest.raises(PermissionError, match="token"):
        bad.subscribe(["node"], lambda ch, m: None)
    assert gcs.client(server).ping()["version"]  # the right token still works


@pytest.mark.parametrize("metadata", [None, (("x-skate-token", "wrong"),), (("x-skate-token", ""),)])
@pytest.mark.parametrize("method", ["/skate.Gcs/KvPut", "/skate.Gcs/Subscribe"])
def test_unauthenticated_payload_is_never_unpickled(server, tmp_path, metadata, method):
    # Control: this payload really runs code when unpickled.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(control)))
    assert control.exists()

    marker = tmp_path / "pwned"
    payload = pickle.dumps(((_TouchOnUnpickle(marker), b"k", b"v"), {}))
    channel = grpc.insecure_channel(server.address)
    try:
        if method.endswith("Subscribe"):
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as info:
                list(call(payload, metadata=metadata, timeout=5))
        else:
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as info:
                call(payload, metadata=metadata, timeout=5)
    finally:
        channel.close()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    time.sleep(0.2)  # os.system would have run synchronously; leave margin anyway
    assert not marker.exists()


# -- outages ----------------------------------------------------------------------------


def test_client_and_subscription_ride_through_a_gcs_restart(gcs, tmp_path):
    db = str(tmp_path / "gcs.sqlite")
    first = gcs.server(storage=db)
    port = first.port
    client = gcs.client(first)
    client.kv_put("ns", b"k", b"before restart")
    heard, reconnected = [], threading.Event()
    client.subscribe(["events"], lambda ch, m: heard.append(m), on_reconnect=reconnected.set)
    first.stop()

    def restart_later():
        time.sleep(0.7)
        gcs.server(port=port, storage=db)

    restarter = threading.Thread(target=restart_later)
    restarter.start()
    # Issued while the GCS is down: retried until the new server answers.
    started = time.monotonic()
    assert client.kv_get("ns", b"k") == b"before restart"
    assert time.monotonic() - started >= 0.5
    restarter.join()

    # The subscription is re-established on the new server and hears new messages.
    assert reconnected.wait(10)
    client.publish("events", "after restart")
    assert wait_until(lambda: heard == ["after restart"])


def test_unreachable_gcs_raises_connection_error_naming_the_address(gcs):
    server = gcs.server()
    address = server.address
    server.stop()
    client = gcs.client(address, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=address):
        client.ping()
    assert time.monotonic() - started < 5
