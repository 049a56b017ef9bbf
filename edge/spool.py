"""Durable outbox for alerts: SQLite in WAL mode with synchronous=FULL.

Every alert is written here before it is published and deleted only after the broker's PUBACK, so a
broker outage, kill -9 or power loss loses nothing; rows are replayed in insertion order. Bounded:
beyond `max_rows` rows or `max_bytes` of payload the OLDEST rows are dropped, and the drop count is
kept in the database (reported in the status payload as spool_dropped).

A delivery whose deletion cannot be written (disk full) is kept in memory and retried: this process never hands
that row out again, and only if it stops before the write succeeds is the alert sent once more at the next start
(consumers deduplicate on event_id).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: there the spool is not locked
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# The WAL is checkpointed every 64 pages (256 KiB at 4 KiB pages) instead of SQLite's 1000, and truncated to this
# after each checkpoint: without the limit the file keeps its high-water mark (~4 MiB) on the device's disk for good.
SPOOL_WAL_CHECKPOINT_PAGES = 64
SPOOL_WAL_LIMIT_BYTES = 512 * 1024
ACK_RETRY_S = 1.0  # a delivery that could not be recorded is retried at most this often (and with every put)

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

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder  # the holder's pid as its lock file says, or 'unknown'


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
        holder = holder or "unknown"
        raise SpoolInUse(
            f"the alert spool {path} is in use by another DrywallQA edge runtime (pid {holder}). Two "
            f"runtimes on one spool would publish each other's alerts and, with one mqtt.device_id, knock each "
            f"other off the broker. Stop the other one (e.g. `sudo systemctl stop drywallqa-edge`), or give this "
            f"one its own spool.path and mqtt.device_id", holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def wait_for_spool(path: Path, stop: threading.Event, on_busy: Callable[[SpoolInUse], None],
                   poll_s: float = 1.0) -> bool:
    """Wait until no other process holds the spool's lock (True) or `stop` is set (False); `on_busy` is called at
    each look that finds it held. The lock is not kept: the caller opens the spool next, and should another
    runtime take it in between, that opening raises SpoolInUse as usual. A lock file that cannot be opened (no
    folder yet, not writable) counts as free: opening the spool then says what is wrong."""
    while not stop.is_set():
        try:
            os.close(lock_spool(path))
            return True
        except SpoolInUse as exc:
            on_busy(exc)
        except OSError:
            return True
        stop.wait(poll_s)
    return False


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
        self.ack_error = ""  # set while deliveries cannot be recorded (disk full): for operators
        self._acked: set[int] = set()  # seqs of delivered rows still in the table: their deletion failed
        self._ack_failed_at: float | None = None  # monotonic time of the latest failed attempt to record them
        self._ack_cause = ""  # why the latest attempt failed
        self._lock = threading.Lock()
        self._lock_fd = lock_spool(self.path) if lock_fd is None else lock_fd  # before anything reads the file
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute(f"PRAGMA wal_autocheckpoint={SPOOL_WAL_CHECKPOINT_PAGES}")
                self._db.execute(f"PRAGMA journal_size_limit={SPOOL_WAL_LIMIT_BYTES}")
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
            if self._acked:
                self._record_acks()
            if self._acked:
                log.error("alert spool %s: %d delivered alert(s) could not be recorded as delivered (%s); they "
                          "will be sent again at the next start (consumers deduplicate on event_id)", self.path,
                          len(self._acked), self._ack_cause)
            self._db.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def put(self, event_id: str, topic: str, payload: bytes) -> int:
        """Append durably (committed and fsynced before returning); returns rows dropped to stay in bounds."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                recorded = self._delete_acked()  # first: delivered rows must not count against the bounds
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
            self._acks_recorded(recorded)
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
        """Undelivered rows in order, oldest first, with seq > after_seq."""
        with self._lock:
            if self._acked and self._ack_retry_due():
                self._record_acks()
            rows = self._db.execute(
                "SELECT seq, event_id, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit + len(self._acked)),
            ).fetchall()
            items = [SpoolItem(r[0], r[1], r[2], bytes(r[3])) for r in rows if r[0] not in self._acked]
        return items[:limit]

    def ack(self, seq: int) -> None:
        """Delete a delivered row (call only after the broker acknowledged it). Never raises for a failed write
        (disk full, read-only): the delivery is then kept in memory, retried, and reported (`ack_error`, log)."""
        with self._lock:
            self._acked.add(seq)
            if self._ack_retry_due():
                self._record_acks()
            if seq in self._acked and not self._row_exists(seq):  # dropped by the bounds while in flight
                self._acked.discard(seq)

    def _row_exists(self, seq: int) -> bool:
        return self._db.execute("SELECT 1 FROM outbox WHERE seq = ?", (seq,)).fetchone() is not None

    def _ack_retry_due(self) -> bool:
        return self._ack_failed_at is None or time.monotonic() - self._ack_failed_at >= ACK_RETRY_S

    def _delete_acked(self) -> int:
        """Delete the delivered rows not yet deleted, inside the caller's transaction; returns how many."""
        self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in self._acked])
        return len(self._acked)

    def _record_acks(self) -> None:
        """Delete the delivered rows in one transaction; on failure keep them for the next try and report it."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            recorded = self._delete_acked()
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):  # a failed COMMIT (disk full) has rolled back already
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            self._ack_failed(exc)
            return
        self._acks_recorded(recorded)

    def _ack_failed(self, exc: sqlite3.Error) -> None:
        self._ack_failed_at = time.monotonic()
        self._ack_cause = str(exc)
        if not self.ack_error:
            log.error("alert spool %s cannot record deliveries (%s): the delivered alerts are kept as such in "
                      "memory and recorded once it can be written; should the runtime stop first, they are sent "
                      "again at the next start (consumers deduplicate on event_id). Free disk space", self.path,
                      exc)
        self.ack_error = (f"alert spool cannot record deliveries ({exc}); {len(self._acked)} delivered alert(s) "
                          f"would be sent again after a restart")

    def _acks_recorded(self, recorded: int) -> None:
        if self.ack_error:
            log.warning("alert spool %s records deliveries again (%d recorded late)", self.path, recorded)
        self.ack_error = ""
        self._ack_failed_at = None
        self._acked.clear()

    def count(self) -> int:
        """Undelivered rows."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]) - len(self._acked)

    def dropped(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return int(row[0]) if row else 0
