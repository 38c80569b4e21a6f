r"""The same-node transport: framed, batched messages over Unix sockets.

Owns the I/O thread of every skate process (driver, worker, node manager) and the
connections it serves. Measured against gRPC over a Unix socket, a hand-made framed
protocol costs a fraction per message, so the same-node hot path uses it (see
docs/architecture.md).

::

    any thread                          I/O thread (EventLoop.run)
    ----------                          ----------------------------------------------
    conn.send(msg) --> conn._pending    select() wakes (wake pipe / readable / writable)
                  \-- loop.mark_dirty --> flush dirty conns: one frame per conn per tick
    conn.flush()   --> write now        readable: recv, split frames, unpickle batch,
                       (no thread hop)             handler(conn, msg) for each message
                                        callbacks from call_soon / timers

A frame is a 4-byte little-endian length and a pickled *list* of messages, so every
message queued during one tick of the loop travels in one frame and one syscall. A
message is a tuple whose first item is its kind (see ``messages.py``).

Writes never block the I/O thread: what the socket does not take is buffered and sent
when it becomes writable. Any thread may send; only the I/O thread reads.

This module imports nothing from the rest of skate.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import pickle
import selectors
import socket
import struct
import threading
import time
import traceback
from collections import deque

_LEN = struct.Struct("<I")
_RECV_SIZE = 1 << 18
_LAZY_MAX_S = 0.02
_IDLE_MAX_S = 0.2
_dumps = pickle.dumps
_loads = pickle.loads


class ConnectionClosed(ConnectionError):
    pass


# Test-only fault injection (see skate/_private/testing/faults.py): when set, every
# message sent goes through ``fault_hook(conn, msg)``, which returns None to send it as
# is, or the list of messages to send instead ([] drops it; it may also delay a message
# with ``conn.loop.call_later(d, conn.send_raw, msg)`` or close the connection). Off
# unless SKATE_FAULTS is set in the environment: one global lookup per send.
fault_hook = None


def bind_unix(path: str) -> socket.socket:
    """A Unix socket listening on ``path`` (replacing a stale file), for this user only."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(512)
    return sock


class Connection:
    """One framed, batched, bidirectional message stream."""

    __slots__ = ("loop", "sock", "handler", "on_close", "closed", "_pending", "_dirty",
                 "_lock", "_outbuf", "_inbuf", "_want_write", "peer", "fileno")

    def __init__(self, loop: "EventLoop", sock: socket.socket, handler, on_close=None):
        self.loop = loop
        self.sock = sock
        sock.setblocking(False)
        self.fileno = sock.fileno()
        self.handler = handler          # handler(conn, msg), called on the I/O thread
        self.on_close = on_close        # on_close(conn), called once on the I/O thread
        self.closed = False
        self.peer = None                # set by whoever owns the connection (e.g. worker id)
        self._pending: list = []
        self._dirty = False
        self._lock = threading.Lock()
        self._outbuf = bytearray()
        self._inbuf = bytearray()
        self._want_write = False

    # --- sending (any thread) -------------------------------------------------------
    def send(self, msg) -> None:
        """Queues ``msg``; it leaves with the other messages of this loop tick."""
        if fault_hook is not None and self._faulted(msg, self.send_raw):
            return
        self.send_raw(msg)

    def _faulted(self, msg, sender) -> bool:
        out = fault_hook(self, msg)
        if out is None:
            return False
        for m in out:
            sender(m)
        return True

    def send_raw(self, msg) -> None:
        with self._lock:
            self._pending.append(msg)
            if self._dirty:
                return
            self._dirty = True
        self.loop.mark_dirty(self)

    def send_deferred(self, msg) -> None:
        """Queues ``msg`` without waking the I/O thread; the caller flushes later."""
        if fault_hook is not None and self._faulted(msg, self._queue_raw):
            return
        self._queue_raw(msg)

    def _queue_raw(self, msg) -> None:
        with self._lock:
            self._pending.append(msg)

    def send_now(self, msg) -> None:
        """Queues ``msg`` and writes everything queued at once, from this thread."""
        if fault_hook is not None and self._faulted(msg, self._queue_raw):
            self.flush()
            return
        with self._lock:
            self._pending.append(msg)
            self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._dirty = False
        msgs = self._pending
        if not msgs or self.closed:
            return
        self._pending = []
        body = _dumps(msgs, 5)
        data = _LEN.pack(len(body)) + body
        if self._outbuf:
            self._outbuf += data
            return
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            # The peer is gone; the I/O thread sees the close and reports it.
            self._outbuf.clear()
            self.loop.call_soon(self.close)
            return
        if n < len(data):
            self._outbuf += data[n:] if n else data
            if not self._want_write:
                self._want_write = True
                self.loop.call_soon(self.loop._watch_write, self)

    # --- I/O thread -----------------------------------------------------------------
    def _on_writable(self) -> None:
        with self._lock:
            if self._outbuf:
                try:
                    n = self.sock.send(self._outbuf)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError:
                    self._outbuf.clear()
                    n = 0
                    self.loop.call_soon(self.close)
                del self._outbuf[:n]
            if not self._outbuf and self._want_write:
                self._want_write = False
                self.loop._unwatch_write(self)

    def _on_readable(self) -> None:
        # recv_into a buffer kept per loop: recv(N) would allocate (and, above glibc's
        # mmap threshold, map and unmap) N bytes on every call.
        view = self.loop._recv_view
        size = len(view)
        sock = self.sock
        buf = self._inbuf
        try:
            n = sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:
            self.close()
            return
        buf += view[:n]
        # Drain what is already queued in the kernel too: fewer wake-ups under load.
        while n == size:
            try:
                n = sock.recv_into(view)
            except (BlockingIOError, InterruptedError, OSError):
                break
            if not n:
                break
            buf += view[:n]
        pos = 0
        n = len(buf)
        frames = []
        while n - pos >= 4:
            (length,) = _LEN.unpack_from(buf, pos)
            if n - pos - 4 < length:
                break
            frames.append(bytes(buf[pos + 4:pos + 4 + length]))
            pos += 4 + length
        if pos:
            del buf[:pos]
        handler = self.handler
        for frame in frames:
            for msg in _loads(frame):
                if self.closed:
                    return
                try:
                    handler(self, msg)
                except Exception:
                    traceback.print_exc()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop._forget(self)
        try:
            self.sock.close()
        except OSError:
            pass
        if self.on_close is not None:
            try:
                self.on_close(self)
            except Exception:
                traceback.print_exc()


class EventLoop:
    """A selector loop on its own daemon thread: sockets, callbacks, timers."""

    def __init__(self, name: str = "skate-io"):
        self.name = name
        self._sel = selectors.DefaultSelector()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._sel.register(self._rfd, selectors.EVENT_READ, None)
        self._callbacks: deque = deque()
        self._dirty: deque = deque()
        self._timers: list = []
        self._timer_seq = itertools.count()
        self._woken = False
        self._running = False
        self.thread: threading.Thread | None = None
        self._listeners: dict = {}
        self._recv_view = memoryview(bytearray(_RECV_SIZE))
        self._lazy: deque = deque()

    # --- any thread -------------------------------------------------------------------
    def start(self) -> "EventLoop":
        self._running = True
        self.thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self.thread.start()
        return self

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def wake(self) -> None:
        if not self._woken:
            self._woken = True
            try:
                os.write(self._wfd, b"x")
            except (BlockingIOError, OSError):
                pass

    def call_soon(self, fn, *args) -> None:
        self._callbacks.append((fn, args))
        if not self.in_loop_thread():
            self.wake()

    def call_lazily(self, fn, *args) -> None:
        """Runs ``fn(*args)`` on the I/O thread at its next tick, without waking it: for
        work that may wait (at most ``_IDLE_MAX_S``) but must not cost a syscall."""
        self._lazy.append((fn, args))

    def call_later(self, delay: float, fn, *args):
        """Runs ``fn(*args)`` on the I/O thread after ``delay`` seconds; returns a handle
        whose ``[2]`` item can be set to None to cancel."""
        entry = [time.monotonic() + delay, next(self._timer_seq), fn, args]
        self.call_soon(heapq.heappush, self._timers, entry)
        return entry

    def mark_dirty(self, conn: Connection) -> None:
        self._dirty.append(conn)
        if not self.in_loop_thread():
            self.wake()

    def add_connection(self, conn: Connection) -> Connection:
        def register():
            if not conn.closed:
                self._sel.register(conn.fileno, selectors.EVENT_READ, conn)
        if self.in_loop_thread():
            register()
        else:
            self.call_soon(register)
        return conn

    def connect_unix(self, path: str, handler, on_close=None, timeout: float = 5.0) -> Connection:
        """Connects to a Unix socket (retrying while it is not there yet)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise ConnectionError(f"cannot connect to {path}: nothing listens there")
                time.sleep(0.002)
        return self.add_connection(Connection(self, sock, handler, on_close))

    def listen_unix(self, path: str, on_accept, sock: socket.socket | None = None) -> socket.socket:
        """Listens on ``path`` (or on ``sock``, bound there already, e.g. by the process
        that forked this one); ``on_accept(sock)`` runs on the I/O thread per peer."""
        if sock is None:
            sock = bind_unix(path)
        sock.setblocking(False)
        self._listeners[sock.fileno()] = sock

        def register():
            self._sel.register(sock.fileno(), selectors.EVENT_READ, ("listen", sock, on_accept))
        if self.in_loop_thread() or self.thread is None:
            register()
        else:
            self.call_soon(register)
        return sock

    def stop(self, join: bool = True) -> None:
        self._running = False
        self.wake()
        if join and self.thread is not None and not self.in_loop_thread():
            self.thread.join(timeout=5)

    # --- I/O thread -------------------------------------------------------------------
    def _watch_write(self, conn: Connection) -> None:
        if not conn.closed:
            try:
                self._sel.modify(conn.fileno, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
            except (KeyError, ValueError):
                pass

    def _unwatch_write(self, conn: Connection) -> None:
        if not conn.closed:
            try:
                self._sel.modify(conn.fileno, selectors.EVENT_READ, conn)
            except (KeyError, ValueError):
                pass

    def _forget(self, conn: Connection) -> None:
        try:
            self._sel.unregister(conn.fileno)
        except (KeyError, ValueError):
            pass

    def run(self) -> None:
        sel = self._sel
        callbacks = self._callbacks
        dirty = self._dirty
        timers = self._timers
        rfd = self._rfd
        while self._running:
            # Never block for ever: lazy work (reference releases) queued while the loop
            # sleeps must still run soon, without costing its producer a wake-up syscall.
            timeout = _IDLE_MAX_S
            if callbacks or dirty:
                timeout = 0
            elif timers:
                timeout = min(_IDLE_MAX_S, max(0.0, timers[0][0] - time.monotonic()))
            if self._lazy and timeout > _LAZY_MAX_S:
                timeout = _LAZY_MAX_S
            try:
                events = sel.select(timeout)
            except InterruptedError:
                continue
            self._woken = False
            for key, mask in events:
                data = key.data
                if data is None:
                    try:
                        while os.read(rfd, 4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                elif type(data) is tuple:
                    self._accept(data)
                else:
                    if mask & selectors.EVENT_READ and not data.closed:
                        data._on_readable()
                    if mask & selectors.EVENT_WRITE and not data.closed:
                        data._on_writable()
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    entry = heapq.heappop(timers)
                    if entry[2] is not None:
                        callbacks.append((entry[2], entry[3]))
            lazy = self._lazy
            while lazy:
                callbacks.append(lazy.popleft())
            while callbacks:
                fn, args = callbacks.popleft()
                try:
                    fn(*args)
                except Exception:
                    traceback.print_exc()
            while dirty:
                conn = dirty.popleft()
                conn.flush()
        self._close_all()

    def _accept(self, data) -> None:
        _, lsock, on_accept = data
        while True:
            try:
                sock, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    return
                return
            try:
                on_accept(sock)
            except Exception:
                traceback.print_exc()
                sock.close()

    def _close_all(self) -> None:
        for key in list(self._sel.get_map().values()):
            data = key.data
            if isinstance(data, Connection):
                data.close()
        for sock in self._listeners.values():
            try:
                sock.close()
            except OSError:
                pass
        try:
            self._sel.close()
        except Exception:
            pass
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass


class Replies:
    """Request/reply over a Connection: ``request`` returns a waitable slot."""

    def __init__(self):
        self._ids = itertools.count(1)
        self._waiting: dict = {}

    def new(self, callback=None):
        rid = next(self._ids)
        slot = _Slot(callback)
        self._waiting[rid] = slot
        return rid, slot

    def resolve(self, rid, ok: bool, value) -> None:
        slot = self._waiting.pop(rid, None)
        if slot is not None:
            slot.set(ok, value)

    def fail_all(self, exc: BaseException) -> None:
        waiting, self._waiting = self._waiting, {}
        for slot in waiting.values():
            slot.set(False, exc)


class _Slot:
    __slots__ = ("_event", "ok", "value", "callback")

    def __init__(self, callback=None):
        self._event = threading.Event()
        self.ok = None
        self.value = None
        self.callback = callback

    def set(self, ok: bool, value) -> None:
        self.ok = ok
        self.value = value
        self._event.set()
        if self.callback is not None:
            try:
                self.callback(ok, value)
            except Exception:
                traceback.print_exc()

    def wait(self, timeout: float | None = None):
        if not self._event.wait(timeout):
            raise TimeoutError("no reply in time")
        if self.ok:
            return self.value
        if isinstance(self.value, BaseException):
            raise self.value
        raise RuntimeError(str(self.value))


if os.environ.get("SKATE_FAULTS"):
    from skate._private.testing import faults as _faults  # noqa: E402 - test-only
    _faults.install_from_env()
