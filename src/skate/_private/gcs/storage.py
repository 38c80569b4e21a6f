"""Table storage behind the Global Control Store.

Owns: where the GCS's tables live (process memory, or one SQLite file that survives a
GCS restart). Every table is a flat map ``key (bytes) -> value (bytes)``; the GCS
server decides what the bytes mean. This module calls nothing else in skate.

Both backends share one API and are safe to call from many threads:

    put(table, key, value)         write (insert or replace)
    get(table, key) -> bytes|None
    delete(table, key) -> bool     True when the key existed
    scan(table, prefix=None)       [(key, value), ...] in key order
    close()

Keys may be given as ``str`` (encoded as UTF-8) or ``bytes``; they are always stored and
returned as ``bytes`` so both backends agree on ordering, prefixes and round trips.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Optional, Union

Key = Union[bytes, str]


def _key_bytes(key: Key) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"storage keys are bytes or str, not {type(key).__name__}")


def _value_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"storage values are bytes, not {type(value).__name__}")


class InMemoryStorage:
    """Tables in a dict of dicts: the default, gone when the GCS process exits."""

    def __init__(self):
        self._tables: dict[str, dict[bytes, bytes]] = {}
        self._lock = threading.Lock()

    def put(self, table: str, key: Key, value: bytes) -> None:
        key, value = _key_bytes(key), _value_bytes(value)
        with self._lock:
            self._tables.setdefault(table, {})[key] = value

    def get(self, table: str, key: Key) -> Optional[bytes]:
        key = _key_bytes(key)
        with self._lock:
            return self._tables.get(table, {}).get(key)

    def delete(self, table: str, key: Key) -> bool:
        key = _key_bytes(key)
        with self._lock:
            return self._tables.get(table, {}).pop(key, None) is not None

    def scan(self, table: str, prefix: Optional[Key] = None) -> list[tuple[bytes, bytes]]:
        prefix = _key_bytes(prefix) if prefix is not None else b""
        with self._lock:
            rows = [(k, v) for k, v in self._tables.get(table, {}).items() if k.startswith(prefix)]
        rows.sort()
        return rows

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return "InMemoryStorage()"


def _prefix_upper_bound(prefix: bytes) -> Optional[bytes]:
    """The smallest byte string greater than every string starting with ``prefix``.

    None when no such bound exists (prefix is all 0xff): the scan is then open-ended.
    A range ``prefix <= key < bound`` lets SQLite use the primary-key index, which
    ``LIKE``/``substr`` on a BLOB would not.
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class SqliteStorage:
    """Tables in one SQLite file, so a GCS restarted on the same file reloads its state.

    One SQL table ``gcs(tbl, key, value)`` with primary key ``(tbl, key)``. Each write is
    its own transaction (autocommit), in WAL mode with ``synchronous=NORMAL``: a write
    that returned survives a crash of the GCS process, and writes do not wait for an
    fsync each (the control plane writes on every registration, not on heartbeats).
    One connection is shared behind a lock: SQLite serialises writers anyway.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit, i.e. one committed transaction per statement.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS gcs ("
            " tbl TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,"
            " PRIMARY KEY (tbl, key)) WITHOUT ROWID"
        )

    def put(self, table: str, key: Key, value: bytes) -> None:
        key, value = _key_bytes(key), _value_bytes(value)
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO gcs (tbl, key, value) VALUES (?, ?, ?)", (table, key, value)
            )

    def get(self, table: str, key: Key) -> Optional[bytes]:
        key = _key_bytes(key)
        with self._lock:
            row = self._conn.execute("SELECT value FROM gcs WHERE tbl = ? AND key = ?", (table, key)).fetchone()
        return None if row is None else bytes(row[0])

    def delete(self, table: str, key: Key) -> bool:
        key = _key_bytes(key)
        with self._lock:
            cur = self._conn.execute("DELETE FROM gcs WHERE tbl = ? AND key = ?", (table, key))
            return cur.rowcount > 0

    def scan(self, table: str, prefix: Optional[Key] = None) -> list[tuple[bytes, bytes]]:
        prefix = _key_bytes(prefix) if prefix is not None else b""
        upper = _prefix_upper_bound(prefix)
        if upper is None:
            sql, args = "SELECT key, value FROM gcs WHERE tbl = ? AND key >= ? ORDER BY key", (table, prefix)
        else:
            sql = "SELECT key, value FROM gcs WHERE tbl = ? AND key >= ? AND key < ? ORDER BY key"
            args = (table, prefix, upper)
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [(bytes(k), bytes(v)) for k, v in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"SqliteStorage({self.path!r})"


Storage = Union[InMemoryStorage, SqliteStorage]


def make_storage(spec: Union[None, str, os.PathLike]) -> Storage:
    """``None`` or ``"memory"``: in-memory tables; anything else: a SQLite file path."""
    if spec is None or spec == "memory":
        return InMemoryStorage()
    return SqliteStorage(spec)
