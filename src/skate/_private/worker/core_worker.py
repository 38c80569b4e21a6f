"""The core worker: what every skate process embeds, driver and worker alike.

It ties together small parts with one duty each:

- ``MemoryStore``: status and small values of objects (owned or borrowed);
- ``ReferenceCounter``: when an object may be freed;
- ``TaskSubmitter``: leases and pushes of the tasks this process submits;
- the owner service (here): answers other processes asking for objects this process
  owns (``GET_OBJECT``) and counts them as borrowers;
- ``TaskExecutor`` (workers only, ``executor.py``): runs tasks pushed to this process.

Connections: one to the node manager (leases, store accounting, logs), one listener on
``<session>/w-<id>.sock`` where callers push tasks and borrowers ask for objects, and
outgoing connections to the owners and leased workers it talks to. All I/O happens on
one I/O thread (``protocol.transport.EventLoop``).

May call: protocol, object_store, worker.* parts, config, ids. Never the public API.
"""

from __future__ import annotations

import copy
import os
import queue as queue_mod
import sys
import threading
import time

from skate import exceptions as exc_mod
from skate._private import ids as ids_mod
from skate._private.config import CONFIG
from skate._private.object_store import serialization, shm
from skate._private.protocol import messages as M
from skate._private.protocol.transport import Connection, EventLoop, Replies
from skate._private.worker.actor_submitter import ActorSubmitter
from skate._private.worker.memory_store import ERROR, IN_STORE, INLINE, PENDING, MemoryStore
from skate._private.worker.reference_counter import ReferenceCounter
from skate._private.worker.submitter import TaskSpec, TaskSubmitter
from skate.object_ref import ObjectRef


ACTOR_KEY_LEN = 17  # b"A" + actor id: actor handles counted like refs


class TopRef:
    """Stands for a top-level ObjectRef argument: resolved to its value before the call."""

    __slots__ = ("oid", "owner")

    def __init__(self, oid, owner):
        self.oid = oid
        self.owner = owner

    def __reduce__(self):
        return (TopRef, (self.oid, self.owner))


class CoreWorker:
    def __init__(self, *, session: str, session_dir: str, node_socket: str, is_driver: bool,
                 job_id=None, log_sink=None, import_paths=None):
        self.worker_id = ids_mod.new_worker_id()
        self.session = session
        self.session_dir = session_dir
        self.is_driver = is_driver
        self.job_id = job_id
        # Directories callers' code imports from, passed on to the workers it calls.
        self.import_paths: list = list(import_paths or ())
        self.ids = ids_mod.IdSource(self.worker_id)
        self.socket_path = os.path.join(session_dir, f"w-{self.worker_id.hex()}.sock")
        self.address = (self.worker_id, self.socket_path)
        self.loop = EventLoop("skate-io")
        self.memory_store = MemoryStore()
        # Frees may wait for the I/O thread's next tick: no wake-up syscall per dropped ref.
        self.ref_counter = ReferenceCounter(self.worker_id, self._free_owned, self._release_borrowed,
                                            self.loop.call_lazily)
        self.submitter = TaskSubmitter(self)
        self.actor_submitter = ActorSubmitter(self)
        self._gcs = None
        self._ready_callbacks = queue_mod.SimpleQueue()
        self._callback_thread = None
        self.executor = None            # set by workers
        self.before_block = None        # workers: flushes replies held back (executor)
        self.node_replies = Replies()
        self.peer_replies = Replies()
        self._peers: dict[bytes, Connection] = {}
        self._peer_lock = threading.Lock()
        self._fetching: set = set()
        self._log_sink = log_sink
        self._blocked_depth = 0
        self._blocked_lock = threading.Lock()
        self.node_id = None
        self.node_info: dict = {}
        self.shut_down = False

        self.loop.listen_unix(self.socket_path, self._on_accept)
        self.loop.start()
        self.node_conn = self.loop.connect_unix(node_socket, self._on_node_msg, self._on_node_closed,
                                                timeout=CONFIG.node_start_timeout_s)

    def register(self, extra: dict | None = None, timeout: float | None = None) -> dict:
        info = {"worker_id": self.worker_id, "pid": os.getpid(), "is_driver": self.is_driver,
                "socket_path": self.socket_path, "job_id": self.job_id}
        if extra:
            info.update(extra)
        self.node_info = self.node_request(M.REGISTER, info, timeout=timeout)
        self.node_id = self.node_info["node_id"]
        return self.node_info

    # --- node manager ------------------------------------------------------------------
    def node_request(self, kind, *args, timeout: float | None = None):
        rid, slot = self.node_replies.new()
        self.node_conn.send_now((kind, rid, *args))
        return slot.wait(timeout)

    def request_lease(self, resources, callback) -> None:
        rid, _slot = self.node_replies.new(callback)
        self.node_conn.send((M.REQUEST_LEASE, rid, resources))

    def return_lease(self, worker_id, kill: bool = False) -> None:
        self.node_conn.send((M.RETURN_LEASE, worker_id, kill))

    def kill_worker(self, worker_id) -> None:
        self.node_conn.send((M.KILL_WORKER, worker_id))

    def free_in_store(self, oids) -> None:
        self.node_conn.send((M.STORE_FREE, list(oids)))

    def _on_node_msg(self, conn, msg) -> None:
        kind = msg[0]
        if kind == M.REPLY:
            self.node_replies.resolve(msg[1], msg[2], msg[3])
        elif kind == M.LEASE_WANTED:
            self.submitter.on_lease_wanted()
        elif kind == M.ACTOR_STATE:
            self.actor_submitter.on_state(msg[1])
        elif kind == M.BECOME_ACTOR:
            self.executor.become_actor(msg[1])
        elif kind == M.LOG_LINES:
            if self._log_sink is not None:
                self._log_sink(msg[1])

    def _on_node_closed(self, conn) -> None:
        self.node_replies.fail_all(ConnectionError("the node manager is gone"))
        if not self.is_driver:
            os._exit(0)  # a worker without its node has nothing left to do

    # --- peers (callers, owners, leased workers) -----------------------------------------
    def _on_accept(self, sock) -> None:
        conn = Connection(self.loop, sock, self._on_peer_msg, self._on_peer_closed)
        self.loop.add_connection(conn)

    def _connect(self, socket_path: str, timeout: float = 5.0) -> Connection:
        conn = self.loop.connect_unix(socket_path, self._on_peer_msg, self._on_peer_closed, timeout=timeout)
        conn.send((M.HELLO, self.worker_id, self.job_id, self.import_paths))
        return conn

    def connect_peer_for_lease(self, socket_path: str, timeout: float = 5.0) -> Connection:
        """A worker the node reported: it listens already, so a refusal (timeout 0:
        one attempt) means it died."""
        return self._connect(socket_path, timeout)

    def owner_conn(self, owner) -> Connection:
        worker_id, socket_path = owner
        conn = self._peers.get(worker_id)
        if conn is not None and not conn.closed:
            return conn
        with self._peer_lock:
            conn = self._peers.get(worker_id)
            if conn is None or conn.closed:
                conn = self._connect(socket_path)
                conn.peer = ("owner", worker_id)
                self._peers[worker_id] = conn
        return conn

    def _on_peer_msg(self, conn, msg) -> None:
        kind = msg[0]
        if kind == M.TASK_DONE:
            peer = conn.peer
            if type(peer) is tuple and peer[0] == "actor":
                self.actor_submitter.on_task_done(peer[1], msg[1], msg[2])
            else:
                self.submitter.on_task_done(conn, msg[1], msg[2], msg[3])
        elif kind == M.PUSH_TASK:
            self.executor.enqueue(conn, msg[1])
        elif kind == M.FUNCTION:
            self.executor.add_function(msg[1], msg[2])
        elif kind == M.REPLY:
            self.peer_replies.resolve(msg[1], msg[2], msg[3])
        elif kind == M.GET_OBJECT:
            self._serve_get(conn, msg[1], msg[2])
        elif kind == M.ADD_BORROWER:
            for oid in msg[1]:
                self.ref_counter.add_borrower(oid, conn.peer)
        elif kind == M.REMOVE_BORROWER:
            for oid in msg[1]:
                self.ref_counter.remove_borrower(oid, conn.peer)
        elif kind == M.HELLO:
            conn.peer = msg[1]
            self._adopt_caller_context(msg[2], msg[3])
        elif kind == M.RETIRING:
            self.submitter.on_worker_retiring(conn)
        elif kind == M.STEAL:
            if self.executor is not None:
                self.executor.give_back(conn, msg[1])
        elif kind == M.STOLEN:
            self.submitter.on_stolen(conn, msg[1])
        elif kind == M.CANCEL_TASK:
            if self.executor is not None:
                self.executor.cancel(conn, msg[1], msg[2], msg[3])

    def _adopt_caller_context(self, job_id, paths) -> None:
        """A caller's job and import paths: a worker runs its tasks as part of that job,
        and can import the modules next to the driver's script (as Ray's workers can)."""
        if job_id is not None and self.executor is not None:
            self.job_id = job_id
        for path in reversed(paths or ()):
            if path not in sys.path:
                sys.path.insert(0, path)
                if path not in self.import_paths:
                    self.import_paths.append(path)

    def _on_peer_closed(self, conn) -> None:
        peer = conn.peer
        if type(peer) is tuple and peer[0] == "actor":
            self.actor_submitter.on_disconnected(peer[1])
        elif type(peer) is tuple and len(peer) == 2 and peer[0] == "owner":
            self._peers.pop(peer[1], None)
            self._owner_died(peer[1])
        elif type(peer) is tuple:
            self.submitter.on_worker_lost(conn)
        elif type(peer) is bytes:
            # A process that borrowed from us (or pushed tasks to us) is gone.
            self.ref_counter.remove_borrower_everywhere(peer)
            if self.executor is not None:
                self.executor.caller_gone(conn)

    def _owner_died(self, owner_id: bytes) -> None:
        self.peer_replies.fail_all(exc_mod.OwnerDiedError("the owner of an object died"))
        store = self.memory_store
        for oid in list(self._fetching):
            if oid[:8] == owner_id:
                self._fetching.discard(oid)
                store.set(oid, ERROR, exc_mod.OwnerDiedError(
                    f"object {oid.hex()} is lost: the process that owned it (worker "
                    f"{owner_id.hex()}) died; objects live as long as their owner"))

    # --- owner service -----------------------------------------------------------------
    def _serve_get(self, conn, rid, oid) -> None:
        store = self.memory_store
        if store.get(oid) is None:
            conn.send((M.REPLY, rid, True, (ERROR, exc_mod.ObjectLostError(
                f"object {oid.hex()} was freed by its owner (no reference to it remained)"))))
            return

        def reply(entry):
            if conn.closed:
                return
            data = entry.data
            if entry.state == ERROR and not isinstance(data, bytes):
                data = _error_blob(data)
            conn.send((M.REPLY, rid, True, (entry.state, data)))
        store.on_ready(oid, reply)

    # --- reference counting callbacks (I/O thread) ---------------------------------------
    def _free_owned(self, oid: bytes) -> None:
        if len(oid) == ACTOR_KEY_LEN and oid[:1] == b"A":
            self._actor_out_of_scope(oid[1:])
            return
        e = self.memory_store.delete(oid)
        if e is not None and e.state == IN_STORE:
            self.free_in_store([oid])

    def _release_borrowed(self, oid: bytes, owner) -> None:
        self.memory_store.delete(oid)
        if owner[0] in self._peers or not self.shut_down:
            try:
                self.owner_conn(owner).send((M.REMOVE_BORROWER, [oid]))
            except ConnectionError:
                pass

    # --- hooks for ObjectRef --------------------------------------------------------------
    def add_local(self, oid, owner) -> None:
        self.ref_counter.add_local(oid, None if owner[0] == self.worker_id else owner)

    def remove_local(self, oid) -> None:
        self.ref_counter.remove_local(oid)

    def on_deserialized(self, oid, owner) -> None:
        if owner[0] != self.worker_id:
            try:
                self.owner_conn(owner).send((M.ADD_BORROWER, [oid]))
            except ConnectionError:
                pass

    def on_ref_ready(self, ref, fn) -> None:
        """Calls ``fn(ref)`` once the object is ready (value or error), on this process's
        callback thread: never on the I/O thread (a get there could deadlock), and one
        thread for all callbacks rather than one per ref."""
        self._ensure_fetch([ref])
        self.memory_store.on_ready(ref.id, lambda _e: self._ready_callbacks.put((fn, ref)))
        if self._callback_thread is None:
            with self._peer_lock:
                if self._callback_thread is None:
                    t = threading.Thread(target=self._run_callbacks, name="skate-callbacks", daemon=True)
                    t.start()
                    self._callback_thread = t

    def _run_callbacks(self) -> None:
        get = self._ready_callbacks.get
        while True:
            fn, ref = get()
            if fn is None:
                return
            try:
                fn(ref)
            except Exception:  # noqa: BLE001 - a callback's error must not stop the others
                import traceback
                traceback.print_exc()
            fn = ref = None   # nothing of the last callback stays alive while we wait

    def as_future(self, ref):
        import concurrent.futures
        fut = concurrent.futures.Future()

        def done(r):
            try:
                fut.set_result(self.get_values([r], None)[0])
            except BaseException as e:  # noqa: BLE001 - the future carries it
                fut.set_exception(e)
        self.on_ref_ready(ref, done)
        return fut

    # --- put -----------------------------------------------------------------------------
    def put(self, value) -> ObjectRef:
        if isinstance(value, ObjectRef):
            raise TypeError("put() of an ObjectRef is not allowed: pass the ref itself where "
                            "it is needed (or put a container holding it)")
        oid = self.ids.put_object_id()
        sobj = serialization.serialize(value)
        ref = ObjectRef(oid, self.address)
        self.ref_counter.add_contents(oid, sobj.contained_refs)
        self.store_value(oid, sobj)
        return ref

    def store_value(self, oid: bytes, sobj) -> tuple:
        """Records a value this process owns: inline if small, else sealed in shared memory.
        Returns the (kind, payload) a TASK_DONE carries for it."""
        size = sobj.total_size()
        if size < CONFIG.inline_threshold:
            data = sobj.to_bytes()
            self.memory_store.set(oid, INLINE, data, overwrite=True)
            return (M.RESULT_INLINE, data)
        self.write_to_store(oid, sobj)
        self.memory_store.set(oid, IN_STORE, size, self.node_id, overwrite=True)
        return (M.RESULT_IN_STORE, size)

    def write_to_store(self, oid: bytes, sobj) -> int:
        size = sobj.total_size()
        if self.ref_counter.has_pending_releases():
            # Objects dropped just before may free the segment this one can reuse.
            self._apply_releases_now()
        try:
            # A cancel can land while the reply is awaited: the abort follows the
            # reservation on the same connection, so it never leaves one pending.
            recycled = self.node_request(M.STORE_RESERVE, oid, size)
            if recycled:
                shm.write_existing(self.session, oid, sobj)
            else:
                shm.create_and_write(self.session, oid, sobj)
        except BaseException:
            self.node_conn.send((M.STORE_ABORT, oid))
            raise
        # Acknowledged before anyone hears of the object (TASK_DONE, a ref): the node
        # has it sealed, so a process dying after that cannot lose it, and the owner's
        # free, which may come on another connection, cannot overtake the seal.
        self.node_request(M.STORE_SEAL, oid, size)
        return size

    def _apply_releases_now(self) -> None:
        if self.loop.in_loop_thread():
            self.ref_counter.apply_released()
            return
        done = threading.Event()

        def apply():
            self.ref_counter.apply_released()
            self.node_conn.flush()   # STORE_FREE leaves before the next request
            done.set()
        self.loop.call_soon(apply)
        done.wait(5)

    # --- get / wait ----------------------------------------------------------------------
    def _ensure_fetch(self, refs) -> None:
        """Asks owners for borrowed objects not known here yet."""
        store = self.memory_store
        me = self.worker_id
        for ref in refs:
            oid = ref.id
            if ref.owner[0] == me or oid in self._fetching:
                continue
            e = store.get(oid)
            if e is not None and e.state != PENDING:
                continue
            self._fetching.add(oid)
            store.add_pending(oid)

            def got(ok, value, oid=oid):
                self._fetching.discard(oid)
                if ok:
                    state, data = value
                    store.set(oid, state, data)
                else:
                    store.set(oid, ERROR, value if isinstance(value, BaseException)
                              else exc_mod.OwnerDiedError(str(value)))
            try:
                conn = self.owner_conn(ref.owner)
            except ConnectionError:
                got(False, exc_mod.OwnerDiedError(
                    f"object {oid.hex()} is lost: its owner (worker {ref.owner[0].hex()}) is gone"))
                continue
            rid, _slot = self.peer_replies.new(got)
            conn.send((M.GET_OBJECT, rid, oid))

    def wait_ready(self, refs, num: int, timeout: float | None) -> int:
        oids = [r.id for r in refs]
        store = self.memory_store
        ready = sum(1 for oid in oids if store.is_ready(oid))
        if ready >= num:
            return ready
        self._ensure_fetch(refs)
        if timeout is not None and timeout <= 0:
            return sum(1 for oid in oids if store.is_ready(oid))
        if self.before_block is not None:
            self.before_block()
        self._set_blocked(True)
        try:
            return store.wait(oids, num, timeout)
        finally:
            self._set_blocked(False)

    def _set_blocked(self, blocked: bool) -> None:
        """A worker waiting in get/wait lends its CPU back, so nested tasks can run."""
        if self.is_driver:
            return
        with self._blocked_lock:
            if blocked:
                self._blocked_depth += 1
                if self._blocked_depth == 1:
                    self.node_conn.send_now((M.BLOCKED,))
            else:
                self._blocked_depth -= 1
                if self._blocked_depth == 0:
                    self.node_conn.send_now((M.UNBLOCKED,))

    def get_values(self, refs, timeout: float | None):
        n = len(refs)
        if self.wait_ready(refs, n, timeout) < n:
            raise exc_mod.GetTimeoutError(
                f"get timed out after {timeout} s: {n - self._count_ready(refs)} of {n} objects "
                f"were not ready; raise the timeout or check that the tasks making them can run")
        return [self.value_of(ref.id) for ref in refs]

    def _count_ready(self, refs) -> int:
        return sum(1 for r in refs if self.memory_store.is_ready(r.id))

    def value_of(self, oid: bytes):
        e = self.memory_store.get(oid)
        if e is None:
            raise exc_mod.ObjectLostError(f"object {oid.hex()} is not known here (it was freed)")
        state = e.state
        if state == INLINE:
            return serialization.deserialize(e.data)
        if state == IN_STORE:
            return serialization.deserialize(self.read_store(oid))
        if state == ERROR:
            err = self.decode_error(e.data)
            err = err.as_instanceof_cause() if isinstance(err, exc_mod.TaskError) else copy.copy(err)
            # A fresh exception per get (the stored one would gather tracebacks), and no
            # local left pointing at it: exception -> traceback -> this frame -> exception
            # is a cycle that would pin the caller's frames (and their refs) until a GC.
            try:
                raise err
            finally:
                err = None
        raise exc_mod.ObjectLostError(f"object {oid.hex()} is not ready")

    def read_store(self, oid: bytes) -> memoryview:
        for _ in range(20):
            mv = shm.open_readonly(self.session, oid)
            if mv is not None:
                return mv
            # Spilled to disk (or being restored): ask the node manager to bring it back.
            if not self.node_request(M.STORE_ENSURE, oid):
                break
        raise exc_mod.ObjectLostError(
            f"object {oid.hex()} is lost: it is neither in shared memory nor spilled on this node")

    def decode_error(self, blob):
        if isinstance(blob, BaseException):
            return blob
        try:
            err = serialization.deserialize(blob)
        except Exception as e:  # noqa: BLE001
            return exc_mod.TaskError("?", f"the task's exception could not be deserialized: {e!r}")
        return err

    # --- tasks ---------------------------------------------------------------------------
    def build_spec(self, fn_id, fn_blob, name, args, kwargs, num_returns, max_retries) -> tuple:
        """A task spec (for a function or an actor method) and the refs to its returns."""
        spec = TaskSpec()
        spec.task_id = task_id = self.ids.task_id()
        spec.fn_id = fn_id
        spec.fn_blob = fn_blob
        spec.name = name
        top_refs = []
        if any(type(a) is ObjectRef for a in args) or any(type(v) is ObjectRef for v in kwargs.values()):
            args = tuple(self._top(a, top_refs) for a in args)
            kwargs = {k: self._top(v, top_refs) for k, v in kwargs.items()}
        me = self.worker_id
        if not args and not kwargs:
            spec.args_blob = _NO_ARGS   # common (getters, no-op tasks): nothing to pickle
            spec.arg_refs = []
        else:
            sobj = _serialize_args(name, args, kwargs)
            spec.args_blob = sobj.to_bytes()
            spec.arg_refs = [(oid, None if owner[0] == me else owner) for oid, owner in top_refs] + \
                [(r.id, None if r.owner[0] == me else r.owner) for r in sobj.contained_refs]
        spec.top_refs = top_refs
        spec.num_returns = num_returns
        spec.return_ids = [ids_mod.return_object_id(task_id, i) for i in range(max(num_returns, 1))]
        spec.retries_left = max_retries
        spec.retry_exceptions = False
        store = self.memory_store
        refs = []
        for oid in spec.return_ids:
            store.add_pending(oid)
            refs.append(ObjectRef(oid, self.address))
        if spec.arg_refs:
            self.ref_counter.add_submitted(spec.arg_refs)
        return spec, refs

    def submit_task(self, fn_id, fn_blob, name, args, kwargs, num_returns, resources, sched_key,
                    max_retries, retry_exceptions) -> list:
        spec, refs = self.build_spec(fn_id, fn_blob, name, args, kwargs, num_returns, max_retries)
        spec.resources = resources
        spec.sched_key = sched_key
        spec.retry_exceptions = retry_exceptions
        self.loop.call_soon(self.submitter.submit, spec)
        return refs

    # --- actors --------------------------------------------------------------------------
    def create_actor(self, spec: dict) -> None:
        """Asks the node manager to create an actor; raises if no node can host it."""
        try:
            self.node_request(M.CREATE_ACTOR, spec)
        except Exception as e:  # noqa: BLE001
            raise exc_mod.InfeasibleTaskError(str(e)) from None
        self.loop.call_soon(self.actor_submitter.watch, spec["actor_id"])

    def submit_actor_task(self, actor_id, method, args, kwargs, num_returns, max_task_retries) -> list:
        spec, refs = self.build_spec(None, None, method, args, kwargs, num_returns, max_task_retries)
        self.loop.call_soon(self.actor_submitter.submit, actor_id, spec)
        return refs

    def _actor_out_of_scope(self, actor_id: bytes) -> None:
        """Every handle to an actor this process owns is gone: stop it once its calls ran."""
        from skate._private.worker.executor import TERMINATE
        spec, _refs = self.build_spec(None, None, TERMINATE, (), {}, 1, 0)
        self.actor_submitter.submit(actor_id, spec)

    def kill_actor(self, actor_id: bytes, no_restart: bool) -> None:
        self.loop.call_soon(self.actor_submitter.kill, actor_id, no_restart)

    def gcs(self):
        """A GCS client (created on first use: gRPC stays out of processes that do not need it)."""
        if self._gcs is None:
            from skate._private.gcs.client import GcsClient
            address, token = self.gcs_address_and_token()
            self._gcs = GcsClient(address, token)
        return self._gcs

    def gcs_address_and_token(self):
        from skate._private import runtime
        info = runtime.info()
        address, token = info.get("gcs_address"), info.get("token")
        deadline = time.monotonic() + CONFIG.node_start_timeout_s
        while not address or not token:
            node = self.node_request(M.NODE_INFO, False, timeout=10)
            address = address or node.get("gcs_address")
            token = token or node.get("token")
            if address and token:
                break
            if time.monotonic() > deadline:
                raise ConnectionError("the GCS of this cluster did not come up")
            time.sleep(0.01)
        info["gcs_address"], info["token"] = address, token
        return address, token

    @staticmethod
    def _top(value, top_refs):
        if type(value) is ObjectRef:
            top_refs.append((value.id, value.owner))
            return TopRef(value.id, value.owner)
        return value

    def cancel(self, ref: ObjectRef, force: bool, recursive: bool = True) -> None:
        if ref.owner[0] != self.worker_id:
            raise ValueError("cancel() works on refs returned by tasks this process submitted")
        self.loop.call_soon(self.submitter.cancel, ref.id[:16], force, recursive)

    # --- shutdown --------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self.shut_down:
            return
        self.shut_down = True
        if self.is_driver:
            try:  # the last lines tasks printed reach the terminal before we go
                self.node_request(M.FLUSH_LOGS, timeout=1.0)
            except Exception:
                pass
        self.loop.call_soon(self.submitter.return_all_leases)
        flushed = threading.Event()
        self.loop.call_soon(flushed.set)
        flushed.wait(1.0)
        self.loop.stop()
        if self._callback_thread is not None:
            self._ready_callbacks.put((None, None))
        if self._gcs is not None:
            self._gcs.close()
        try:
            os.unlink(self.socket_path)
        except OSError:
            pass


_NO_ARGS = serialization.dumps(((), {}))


def _error_blob(err) -> bytes:
    try:
        return serialization.dumps(err)
    except TypeError:
        return serialization.dumps(exc_mod.SkateError(repr(err)))


def _serialize_args(name, args, kwargs):
    try:
        return serialization.serialize((args, kwargs))
    except TypeError:
        pass
    # Name the argument that cannot be serialized.
    for i, a in enumerate(args):
        try:
            serialization.serialize(a)
        except TypeError as e:
            raise TypeError(f"argument {i} of {name}() (type {type(a).__qualname__}) cannot be "
                            f"serialized to send it to a worker: {e.__cause__ or e}") from None
    for k, v in kwargs.items():
        try:
            serialization.serialize(v)
        except TypeError as e:
            raise TypeError(f"keyword argument {k!r} of {name}() (type {type(v).__qualname__}) cannot "
                            f"be serialized to send it to a worker: {e.__cause__ or e}") from None
    return serialization.serialize((args, kwargs))


def print_log_lines(lines) -> None:
    """The driver's sink for worker output: prefixed lines on its own terminal."""
    out, err = sys.stdout, sys.stderr
    for is_err, prefix, text in lines:
        (err if is_err else out).write(f"{prefix} {text}\n")
    try:
        out.flush()
        err.flush()
    except Exception:
        pass
