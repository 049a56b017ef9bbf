"""Durable outbox for alerts: SQLite in WAL mode with synchronous=FULL.

Every alert is written here before it is published and deleted only after the broker's PUBACK, so a
broker outage, kill -9 or power loss loses nothing; rows are replayed in insertion order. Bounded:
beyond `max_rows` rows or `max_bytes` of payload the OLDEST rows are dropped, and the drop count is
kept in the database (reported in the status payload as spool_dropped).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: there the spool is not locked
    fcntl = None  # type: ignore[assignment]

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class SpoolDamaged(sqlite3.DatabaseError):
    """The spool is an SQLite file whose pages are corrupt (PRAGMA quick_check at open)."""


class SpoolInUse(RuntimeError):
    """Another process holds the spool. Two runtimes on one spool would publish each other's alerts and, sharing
    a device id, knock each other off the broker (one MQTT client id), so the second one does not start."""


def lock_spool(path: Path) -> int:
    """An exclusive flock on `<spool>.lock`, held until the returned descriptor is closed (by the kernel too, on
    kill -9). The file holds the holder's pid, for the error message. Another file than the database itself:
    SQLite's own POSIX locks on it must not be disturbed."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise SpoolInUse(
            f"the alert spool {path} is in use by another DrywallQA edge runtime (pid {holder or 'unknown'}). Two "
            f"runtimes on one spool would publish each other's alerts and, with one mqtt.device_id, knock each "
            f"other off the broker. Stop the other one (e.g. `sudo systemctl stop drywallqa-edge`), or give this "
            f"one its own spool.path and mqtt.device_id") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass(frozen=True)
class SpoolItem:
    seq: int
    event_id: str
    topic: str
    payload: bytes


class Spool:
    def __init__(self, path: str | Path, max_rows: int = 10_000, max_bytes: int = 200 * 2**20, *,
                 lock_fd: int | None = None) -> None:
        """`lock_fd`: the spool's lock (lock_spool), taken by the caller: the spool closes it on close(); if this
        raises, the caller still holds it (open_spool keeps it while it moves a damaged spool aside)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.moved_aside: Path | None = None  # a damaged spool found at start and kept there (see open_spool)
        self._lock = threading.Lock()
        self._lock_fd = lock_spool(self.path) if lock_fd is None else lock_fd  # before anything reads the file
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(SCHEMA)
                problems = [r[0] for r in self._db.execute("PRAGMA quick_check(3)").fetchall()]
            except BaseException:
                self._db.close()
                raise
            if problems != ["ok"]:  # else every read and write would fail later, mid-run
                self._db.close()
                raise SpoolDamaged(f"database disk image is malformed: {'; '.join(problems)}")
        except BaseException:
            if lock_fd is None:
                os.close(self._lock_fd)
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def put(self, event_id: str, topic: str, payload: bytes) -> int:
        """Append durably (committed and fsynced before returning); returns rows dropped to stay in bounds."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO outbox (event_id, topic, payload, created) VALUES (?, ?, ?, ?)",
                    (event_id, topic, payload, time.time()),
                )
                dropped = self._enforce_bounds()
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT (disk full) has rolled back already
                    self._db.execute("ROLLBACK")
                raise
            return dropped

    def _enforce_bounds(self) -> int:
        rows, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        dropped = 0
        while rows > 1 and (rows > self.max_rows or size > self.max_bytes):
            seq, length = self._db.execute("SELECT seq, LENGTH(payload) FROM outbox ORDER BY seq LIMIT 1").fetchone()
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            rows -= 1
            size -= length
            dropped += 1
        if dropped:
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES ('dropped', ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (dropped,),
            )
        return dropped

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[SpoolItem]:
        """Rows in order, oldest first, with seq > after_seq."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, event_id, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [SpoolItem(r[0], r[1], r[2], bytes(r[3])) for r in rows]

    def ack(self, seq: int) -> None:
        """Delete a delivered row (call only after the broker acknowledged it)."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def dropped(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return int(row[0]) if row else 0
