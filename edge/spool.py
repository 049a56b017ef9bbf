"""Durable outbox for alerts: SQLite in WAL mode with synchronous=FULL.

Every alert is written here before it is published and deleted only after the broker's PUBACK, so a
broker outage, kill -9 or power loss loses nothing; rows are replayed in insertion order. Bounded:
beyond `max_rows` rows or `max_bytes` of payload the OLDEST rows are dropped, and the drop count is
kept in the database (reported in the status payload as spool_dropped).

A delivery whose deletion cannot be written (disk full) is kept in memory and retried: this process never hands
that row out again, and only if it stops before the write succeeds is the alert sent once more at the next start
(consumers deduplicate on event_id). A spool whose disk is full or read-only at start is opened later, when it can
be (`Spool.unopened`; a damaged file is then moved aside as at start); until then alerts are published from memory,
as when the disk fills mid-run.
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
SPOOL_REOPEN_S = 10.0  # a spool whose disk was full or read-only at start is tried again this often
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
        self.holder = holder  # the holder's pid as its lock file says (if that process is alive), or 'unknown'


def lock_spool(path: Path) -> int:
    """An exclusive flock on `<spool>.lock`, held until the returned descriptor is closed (by the kernel too, on
    kill -9). The file holds the holder's pid, for the error message. Another file than the database itself:
    SQLite's own POSIX locks on it must not be disturbed."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:  # a read-only disk: its lock file from earlier runs still takes a lock (not the pid)
        if exc.errno != errno.EROFS or fcntl is None:
            raise
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = _live_pid(holder)
        who = (f"in use by another DrywallQA edge runtime (pid {holder})" if holder != "unknown" else
               f"held by another process (its pid is not known: `fuser -v {lock_path}` names it), most likely "
               f"another DrywallQA edge runtime")
        raise SpoolInUse(
            f"the alert spool {path} is {who}. Two "
            f"runtimes on one spool would publish each other's alerts and, with one mqtt.device_id, knock each "
            f"other off the broker. Stop the other one (e.g. `sudo systemctl stop drywallqa-edge`), or give this "
            f"one its own spool.path and mqtt.device_id", holder) from None
    with contextlib.suppress(OSError):  # the pid is only for the message: a full disk must not fail the lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _live_pid(text: str) -> str:
    """The pid a lock file names if that process is alive, else 'unknown'. A holder on a read-only disk cannot
    write its pid: the file then still names an earlier holder, most often gone since."""
    try:
        pid = int(text)
        if pid <= 0:
            return "unknown"
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ValueError, ProcessLookupError, OverflowError):
        return "unknown"
    except PermissionError:  # alive, another user's
        pass
    return str(pid)


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


DISK_STATE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
DISK_NEARLY_FULL_BYTES = 64 * 1024


def is_disk_state(path: Path, exc: BaseException) -> bool:
    """Whether the spool could not be opened because of its disk's state (full, read-only, failing), which can
    change without anyone touching the config, rather than because of a wrong path or permissions."""
    if isinstance(exc, OSError) and exc.errno in DISK_STATE_ERRNOS:
        return True
    if isinstance(exc, sqlite3.Error) and not isinstance(exc, SpoolDamaged) \
            and getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_FULL", "SQLITE_IOERR")):
        return True
    if not hasattr(os, "statvfs"):
        return False
    try:  # exists() raises for a folder this user may not enter: that is a permission, not the disk
        folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
        st = os.statvfs(folder) if folder is not None else None
    except OSError:
        return False
    return st is not None and (bool(st.f_flag & os.ST_RDONLY) or st.f_bavail * st.f_frsize < DISK_NEARLY_FULL_BYTES)


SQLITE_HEADER = b"SQLite format 3\x00"


def spool_path_mistake(path: Path, exc: BaseException) -> str:
    """Why `path` cannot be a spool whatever its disk's state (a folder, under a file, not this user's, a file that is
    not an SQLite database), or "" if it could be. Asked before is_disk_state: on a full or read-only disk these
    mistakes look like the disk's state, and would be tried again for ever instead of stopping the start."""
    not_a_spool = "it is not an SQLite database, so not an alert spool"
    if isinstance(exc, PermissionError):  # a read-only disk says EROFS, not this
        return str(exc)
    if getattr(exc, "sqlite_errorname", "") == "SQLITE_NOTADB":
        return not_a_spool
    try:
        if path.is_dir():
            return "it is a folder, not a file"
        above = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if above is not None:
            return f"{above} is a file, not a folder"
        if path.is_file() and path.stat().st_size:
            with path.open("rb") as f:
                if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                    return not_a_spool
    except OSError:  # cannot be looked at (a failing disk, a closed folder): the error says what is wrong
        return ""
    return ""


def is_damaged(exc: BaseException) -> bool:
    """Whether the spool file is an SQLite database whose pages are corrupt: moved aside (move_aside), not retried."""
    return isinstance(exc, SpoolDamaged) or getattr(exc, "sqlite_errorname", "") == "SQLITE_CORRUPT"


def move_aside(path: Path) -> Path:
    """Rename a damaged spool to `<name>.corrupt-<time>`, its WAL and shared memory with it (they belong to it);
    returns the new path. Call with the spool's lock held."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        part = path.with_name(path.name + suffix)
        if part.exists():
            part.rename(aside.with_name(aside.name + suffix))
    return aside


def damaged_notice(path: Path, exc: BaseException, aside: Path) -> str:
    """The log line for a damaged spool moved aside (at start or when it opened late)."""
    return (f"alert spool {path} is damaged ({exc}): moved aside to {aside} (its undelivered alerts may be "
            f"recovered with `sqlite3 {aside} .recover`); starting a fresh spool")


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
        self._init_state(max_rows, max_bytes)
        own_lock = lock_fd is None
        held = lock_spool(self.path) if lock_fd is None else lock_fd  # before anything reads the file
        self._db = self._connect(held, own_lock=own_lock)
        self._lock_fd = held

    def _init_state(self, max_rows: int, max_bytes: int) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.moved_aside: Path | None = None  # a damaged spool found (at start or late open) and kept there
        self.ack_error = ""  # set while deliveries cannot be recorded (disk full): for operators
        self._acked: set[int] = set()  # seqs of delivered rows still in the table: their deletion failed
        self._ack_failed_at: float | None = None  # monotonic time of the latest failed attempt to record them
        self._ack_cause = ""  # why the latest attempt failed
        self.open_error = ""  # set while the file could not be opened yet (see unopened)
        self._open_cause = ""
        self._open_tried_at = 0.0
        self._lock = threading.Lock()
        self._lock_fd = -1

    def _connect(self, lock_fd: int, *, own_lock: bool) -> sqlite3.Connection:
        """The spool file, opened and checked; `lock_fd` is closed on failure if `own_lock`."""
        try:
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute(f"PRAGMA wal_autocheckpoint={SPOOL_WAL_CHECKPOINT_PAGES}")
                db.execute(f"PRAGMA journal_size_limit={SPOOL_WAL_LIMIT_BYTES}")
                db.executescript(SCHEMA)
                problems = [r[0] for r in db.execute("PRAGMA quick_check(3)").fetchall()]
            except BaseException:
                db.close()
                raise
            if problems != ["ok"]:  # else every read and write would fail later, mid-run
                db.close()
                raise SpoolDamaged(f"database disk image is malformed: {'; '.join(problems)}")
        except BaseException:
            if own_lock:
                os.close(lock_fd)
            raise
        return db

    @classmethod
    def unopened(cls, path: str | Path, max_rows: int, max_bytes: int, cause: str, lock_fd: int = -1) -> Spool:
        """A spool whose file cannot be opened now because its disk is full, read-only or failing: a state of the
        device, not of its config, so the runtime starts anyway rather than stay down until someone restarts it.
        Nothing is durable meanwhile: `put` raises, and the link then publishes the alert from memory, as when the
        disk fills mid-run. `put` and `pending` try the file again every SPOOL_REOPEN_S; once it opens, the rows it
        held are replayed and alerts are durable again (a damaged file is moved aside then, `moved_aside`).
        `open_error` says why while it lasts. `lock_fd`: the spool's lock when it could be taken (its lock file usually
        survives a full or read-only disk); it is kept meanwhile, and taken at each try until it is, so that a second
        runtime on this spool is refused as usual."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self._init_state(max_rows, max_bytes)
        self._lock_fd = lock_fd
        self._db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)  # empty until opened
        self._db.executescript(SCHEMA)
        self._open_failed(cause)
        log.error("%s", self.open_error)
        return self

    def _open_failed(self, cause: str) -> None:
        self._open_tried_at = time.monotonic()
        self._open_cause = cause
        self.open_error = (f"alert spool {self.path} cannot be opened ({cause}): alerts are kept in memory only "
                           f"until it can (tried again every {SPOOL_REOPEN_S:.0f} s); free disk space")

    def _open_if_due(self) -> None:
        """For an unopened spool (lock held): try its file again if SPOOL_REOPEN_S have passed."""
        if not self.open_error or time.monotonic() - self._open_tried_at < SPOOL_REOPEN_S:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._lock_fd < 0:  # kept once taken, even if the file cannot be opened yet
                self._lock_fd = lock_spool(self.path)
            db = self._connect_or_replace()
        except (OSError, sqlite3.Error, SpoolInUse) as exc:
            self._open_failed(str(exc))
            return
        self._db.close()
        self._db = db
        self.open_error = ""
        log.warning("alert spool %s opened: alerts are durable again (%d undelivered from before)", self.path,
                    self.count_locked())

    def _connect_or_replace(self) -> sqlite3.Connection:
        """The file (lock held), or, when it is damaged, a fresh one with the damaged one moved aside, as at start
        (open_spool): a damaged file never opens, so trying it again would keep the spool unopened for good."""
        try:
            return self._connect(self._lock_fd, own_lock=False)
        except sqlite3.DatabaseError as exc:
            if not is_damaged(exc):
                raise
            self.moved_aside = move_aside(self.path)
            log.error("%s", damaged_notice(self.path, exc, self.moved_aside))
        return self._connect(self._lock_fd, own_lock=False)

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
        return self.put_many([(event_id, topic, payload)])[1]

    def put_many(self, rows: list[tuple[str, str, bytes]]) -> tuple[list[int], int]:
        """Append (event_id, topic, payload) rows in one durable transaction; returns their seqs, in order, and the
        rows dropped to stay in bounds."""
        with self._lock:
            self._open_for_write()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                recorded = self._delete_acked()  # first: delivered rows must not count against the bounds
                seqs = [self._insert(*row) for row in rows]
                dropped = self._enforce_bounds()
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT (disk full) has rolled back already
                    self._db.execute("ROLLBACK")
                raise
            self._acks_recorded(recorded)
            return seqs, dropped

    def _open_for_write(self) -> None:
        self._open_if_due()
        if self.open_error:
            raise sqlite3.OperationalError(f"cannot be opened: {self._open_cause}")

    def _insert(self, event_id: str, topic: str, payload: bytes) -> int:
        self._db.execute("INSERT OR IGNORE INTO outbox (event_id, topic, payload, created) VALUES (?, ?, ?, ?)",
                         (event_id, topic, payload, time.time()))
        return int(self._db.execute("SELECT seq FROM outbox WHERE event_id = ?", (event_id,)).fetchone()[0])

    def probe(self, size: int) -> None:
        """Write `size` bytes durably and delete them again, in a table of their own (never an alert): raises as
        put of an alert that size would while the spool cannot take it (disk still full, read-only)."""
        with self._lock:
            self._open_for_write()
            for sql, args in (("CREATE TABLE IF NOT EXISTS probe (data BLOB NOT NULL)", ()),
                              ("INSERT INTO probe (data) VALUES (zeroblob(?))", (size,)), ("DELETE FROM probe", ())):
                self._db.execute(sql, args)  # autocommit: each its own durable transaction

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
            self._open_if_due()
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
            return self.count_locked()

    def count_locked(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]) - len(self._acked)

    def dropped(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return int(row[0]) if row else 0
