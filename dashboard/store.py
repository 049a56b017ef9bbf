"""Alert history and acknowledgements in one small SQLite file, so both survive page reloads and restarts."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from drywallqa.edge.payloads import EARLIEST_PLAUSIBLE_TIME, AlertPayload

from .limits import bounded

# Alert ids remembered beyond the alerts kept, as a multiple of max_alerts: a device re-sends an alert from its spool
# until the broker acknowledges it, which may be long after the dashboard dropped it to stay within max_alerts.
SEEN_IDS_PER_ALERT = 10

# Alerts are listed by the device's timestamp only when it is plausible; otherwise by the time the dashboard received
# them. A device without a real-time clock or NTP boots in 1970 (its alerts would sink below the first page) and
# one whose clock runs ahead would pin its alerts on top; a replayed spool's old but true times keep their place.
EARLIEST_ALERT_TIME = EARLIEST_PLAUSIBLE_TIME  # 2020-01-01 UTC: no DrywallQA device sent an alert before
CLOCK_AHEAD_MARGIN_S = 300.0  # a device clock this far ahead of the dashboard's is still believed


class StoreError(RuntimeError):
    """The alert store file cannot be opened or is not a dashboard store."""


@dataclass(frozen=True)
class Ack:
    event_id: str
    acked_at: float
    by: str
    note: str


_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    event_id    TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL,
    timestamp   REAL NOT NULL,
    class_name  TEXT NOT NULL,
    payload     TEXT NOT NULL,          -- the AlertPayload JSON minus the snapshot
    snapshot    BLOB NOT NULL,          -- decoded JPEG bytes
    received_at REAL NOT NULL,
    sort_time   REAL NOT NULL           -- what the list is ordered by: see alert_sort_time
);
-- ids of alerts received lately, kept after their alert is trimmed so that a re-sent one is still a duplicate
CREATE TABLE IF NOT EXISTS seen_alerts (event_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS acks (
    event_id TEXT PRIMARY KEY,
    acked_at REAL NOT NULL,
    by       TEXT NOT NULL DEFAULT '',
    note     TEXT NOT NULL DEFAULT ''
);
"""


def alert_sort_time(timestamp: float, received_at: float) -> float:
    """The device's timestamp if its clock is plausible (not before EARLIEST_ALERT_TIME, not more than
    CLOCK_AHEAD_MARGIN_S after the alert was received), else the time the dashboard received it."""
    if EARLIEST_ALERT_TIME <= timestamp <= received_at + CLOCK_AHEAD_MARGIN_S:
        return timestamp
    return received_at


class AlertStore:
    """Thread-safe store of alerts (deduplicated on event_id) and their acknowledgements.

    `max_alerts` bounds the file: the oldest alerts beyond it are dropped (with their acks) on insert. The ids of
    the latest SEEN_IDS_PER_ALERT * max_alerts alerts are kept apart from them, so a dropped alert delivered again
    is still known as a duplicate.
    """

    def __init__(self, path: str | Path, max_alerts: int = 2000) -> None:
        self.path = Path(path)
        self.max_alerts = max_alerts
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            self._add_sort_time()
            # a store from before seen_alerts existed: its alerts are the ones seen so far
            self._db.execute("INSERT OR IGNORE INTO seen_alerts (event_id) SELECT event_id FROM alerts ORDER BY rowid")
        except (sqlite3.DatabaseError, OSError) as exc:
            raise StoreError(
                f"cannot open dashboard store {self.path}: {exc}. Move the file away or pass another --store path."
            ) from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _add_sort_time(self) -> None:
        """A store from before sort_time existed gets the column, filled by the rule new alerts follow."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(alerts)")}
        if "sort_time" not in columns:
            self._db.create_function("alert_sort_time", 2, alert_sort_time, deterministic=True)
            try:
                with self._transaction():
                    self._db.execute("ALTER TABLE alerts ADD COLUMN sort_time REAL NOT NULL DEFAULT 0")
                    self._db.execute("UPDATE alerts SET sort_time = alert_sort_time(timestamp, received_at)")
                    self._db.execute("DROP INDEX IF EXISTS alerts_by_time")  # the old listing order's index
                    self._db.execute("CREATE INDEX alerts_by_sort_time ON alerts (sort_time, event_id)")
            except sqlite3.Error as exc:
                raise StoreError(self._upgrade_failed(exc)) from exc
        self._db.execute("CREATE INDEX IF NOT EXISTS alerts_by_sort_time ON alerts (sort_time, event_id)")

    def _upgrade_failed(self, exc: sqlite3.Error) -> str:
        """Why an older store was not upgraded, and what to do. The upgrade rewrites every alert (their pictures
        included), so a disk with room for the old store's writes may not have room for it; the generic advice to
        move the file away would throw the alert history and its acknowledgements away."""
        size_mib = self.path.stat().st_size / 2**20 if self.path.exists() else 0.0
        self._db.close()  # rolled back: closing removes what the attempt wrote to the -wal file
        return (
            f"cannot upgrade the dashboard store {self.path} to this version ({exc}): its alerts get the time they "
            f"are listed by, which rewrites each of them and needs about {size_mib:.1f} MiB free on that disk. The "
            "file is left as it was, with its alerts and acknowledgements: free disk space there (or make the file "
            "writable) and start the dashboard again."
        )

    @property
    def max_seen_ids(self) -> int:
        return SEEN_IDS_PER_ALERT * self.max_alerts

    def add_alert(self, alert: AlertPayload, snapshot_jpeg: bytes, received_at: float | None = None) -> bool:
        """Insert an alert (its text clipped); returns False when its event_id was seen before (a duplicate delivery,
        or a device re-sending it from its spool), even if that alert was dropped since."""
        meta = bounded(alert.model_dump(exclude={"snapshot_jpeg_b64"}))
        with self._lock, self._writing(f"alert {alert.event_id}"), self._transaction():
            cur = self._db.execute("INSERT OR IGNORE INTO seen_alerts (event_id) VALUES (?)", (alert.event_id,))
            if cur.rowcount != 1:
                return False
            received = received_at if received_at is not None else time.time()
            self._db.execute(
                "INSERT OR IGNORE INTO alerts (event_id, device_id, timestamp, class_name, payload, snapshot, "
                "received_at, sort_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    alert.event_id,
                    alert.device_id,
                    alert.timestamp,
                    meta["class_name"],
                    json.dumps(meta),
                    sqlite3.Binary(snapshot_jpeg),
                    received,
                    alert_sort_time(alert.timestamp, received),
                ),
            )
            self._trim()
        return True

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction (the connection autocommits otherwise): an id is never marked seen without its alert."""
        self._db.execute("BEGIN")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite ends the transaction itself on some errors (a full disk)
                self._db.execute("ROLLBACK")
            raise

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A write that fails (disk full, file made read-only) as a StoreError saying what was not saved and why."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(
                f"{what} was not saved: cannot write the dashboard store {self.path} ({exc}). Free disk space "
                "there or make the file writable; the dashboard goes on once it can write again."
            ) from exc

    def seen_count(self) -> int:
        """How many alert ids are remembered for deduplication."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM seen_alerts").fetchone()[0]

    def _trim(self) -> None:
        (count,) = self._db.execute("SELECT COUNT(*) FROM alerts").fetchone()
        excess = count - self.max_alerts
        if excess > 0:
            # Oldest received first, not oldest device time: a replayed (spooled) alert or a device with a wrong
            # clock must neither be dropped on arrival nor stay forever.
            old = "SELECT event_id FROM alerts ORDER BY rowid ASC LIMIT ?"
            self._db.execute(f"DELETE FROM acks WHERE event_id IN ({old})", (excess,))
            self._db.execute(f"DELETE FROM alerts WHERE event_id IN ({old})", (excess,))
        self._db.execute(
            "DELETE FROM seen_alerts WHERE rowid <= (SELECT MAX(rowid) FROM seen_alerts) - ?", (self.max_seen_ids,)
        )

    def get(self, event_id: str) -> dict | None:
        found = self.alerts(event_id=event_id, limit=1)
        return found[0] if found else None

    def alerts(
        self,
        class_name: str | None = None,
        include_acked: bool = True,
        limit: int = 500,
        event_id: str | None = None,
        before: tuple[float, str] | None = None,
    ) -> list[dict]:
        """Newest first by sort_time, as JSON-ready dicts (no snapshot bytes; each has `acked`/`ack` fields, its
        `sort_time`, and `device_clock_off` when it is listed by the time received, not the device's clock).

        `before=(sort_time, event_id)` pages: only alerts listed below that one (ties broken on event_id), so a
        client can walk the whole history a page at a time even while new alerts arrive."""
        sql = (
            "SELECT a.payload, a.received_at, a.sort_time, a.sort_time != a.timestamp, length(a.snapshot), "
            "k.acked_at, k.by, k.note FROM alerts a LEFT JOIN acks k ON k.event_id = a.event_id WHERE 1=1"
        )
        args: list[object] = []
        if event_id is not None:
            sql += " AND a.event_id = ?"
            args.append(event_id)
        if class_name:
            sql += " AND a.class_name = ?"
            args.append(class_name)
        if not include_acked:
            sql += " AND k.event_id IS NULL"
        if before is not None:
            sql += " AND (a.sort_time < ? OR (a.sort_time = ? AND a.event_id < ?))"
            args.extend([before[0], before[0], before[1]])
        sql += " ORDER BY a.sort_time DESC, a.event_id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        out = []
        for payload, received_at, sort_time, clock_off, snapshot_size, acked_at, by, note in rows:
            item = json.loads(payload)
            item["received_at"] = received_at
            item["sort_time"] = sort_time
            item["device_clock_off"] = bool(clock_off)
            url = f"/alerts/{quote(item['event_id'], safe='')}/snapshot.jpg"
            item["snapshot_url"] = url if snapshot_size else None
            item["acked"] = acked_at is not None
            item["ack"] = {"acked_at": acked_at, "by": by, "note": note} if acked_at is not None else None
            out.append(item)
        return out

    def counts(self) -> dict[str, int]:
        """How many alerts the store holds, open and acknowledged."""
        with self._lock:
            total, acked = self._db.execute(
                "SELECT COUNT(*), COUNT(k.event_id) FROM alerts a LEFT JOIN acks k ON k.event_id = a.event_id"
            ).fetchone()
        return {"open": total - acked, "acknowledged": acked, "total": total}

    def snapshot(self, event_id: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT snapshot FROM alerts WHERE event_id = ?", (event_id,)).fetchone()
        return bytes(row[0]) if row else None

    def acknowledge(self, event_id: str, by: str = "", note: str = "") -> Ack:
        """Mark an alert acknowledged (idempotent: the first ack is kept). KeyError if the alert is unknown."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM alerts WHERE event_id = ?", (event_id,)).fetchone() is None:
                raise KeyError(event_id)
            with self._writing(f"the acknowledgement of alert {event_id}"):
                self._db.execute(
                    "INSERT OR IGNORE INTO acks VALUES (?, ?, ?, ?)",
                    (event_id, time.time(), by[:200], note[:1000]),
                )
            row = self._db.execute(
                "SELECT acked_at, by, note FROM acks WHERE event_id = ?", (event_id,)
            ).fetchone()
        return Ack(event_id, row[0], row[1], row[2])

    def unacknowledge(self, event_id: str) -> bool:
        with self._lock, self._writing(f"the undo of alert {event_id}'s acknowledgement"):
            cur = self._db.execute("DELETE FROM acks WHERE event_id = ?", (event_id,))
        return cur.rowcount == 1
