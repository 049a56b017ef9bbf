"""The alert history as a CSV file for an inspector's report (`GET /api/alerts.csv`).

Every cell of text is written so that a spreadsheet shows it as text: device ids come from anyone who can publish
to the broker and notes from anyone signed in, and a cell such as `=HYPERLINK(...)` would otherwise run as a
formula when the report is opened (OWASP, "CSV Injection")."""

from __future__ import annotations

import csv
import io
import math
from datetime import datetime, timezone

from .store import AlertStore

COLUMNS = (
    "event_id", "device_id", "time", "received", "device_clock_off", "class", "prompt", "rule", "area_percent",
    "region_count", "crack_length_px", "mean_confidence", "persisted_frames", "frame_id", "acknowledged",
    "acknowledged_at", "acknowledged_by", "note", "snapshot_url",
)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n")  # what a spreadsheet may read as the start of a formula
EXPORT_PAGE = 500  # alerts fetched from the store per call while walking the whole history


def all_alerts(store: AlertStore, class_name: str | None = None, include_acked: bool = True) -> list[dict]:
    """Every alert the store holds that matches, newest first, fetched a page at a time with the store's
    `before` cursor (an alert arriving meanwhile is above the cursor and left out, never listed twice)."""
    alerts: list[dict] = []
    before: tuple[float, str] | None = None
    while True:
        page = store.alerts(class_name=class_name, include_acked=include_acked, limit=EXPORT_PAGE, before=before)
        alerts += page
        if len(page) < EXPORT_PAGE:
            return alerts
        before = (page[-1]["sort_time"], page[-1]["event_id"])


def alerts_csv(alerts: list[dict]) -> str:
    """One header row (COLUMNS), then one row per alert in the order given. Text is quoted and neutralised
    (see `safe_text`); numbers are written unquoted, so a spreadsheet keeps them numbers."""
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    writer.writerows(_row(a) for a in alerts)
    return out.getvalue()


def _row(alert: dict) -> list[object]:
    ack = alert.get("ack") or {}
    clock_off = alert.get("device_clock_off")
    cells = {
        "event_id": alert.get("event_id"),
        "device_id": alert.get("device_id"),
        "time": iso_utc(alert.get("timestamp")),
        "received": iso_utc(alert.get("received_at")),
        "device_clock_off": "" if clock_off is None else _bool(clock_off),
        "class": alert.get("class_name"),
        "prompt": alert.get("prompt"),
        "rule": alert.get("rule"),
        "area_percent": _number(alert.get("area_fraction"), scale=100.0, digits=4),
        "region_count": _number(alert.get("region_count")),
        "crack_length_px": _number(alert.get("skeleton_length_px"), digits=2),
        "mean_confidence": _number(alert.get("mean_confidence"), digits=4),
        "persisted_frames": _number(alert.get("persisted_frames")),
        "frame_id": _number(alert.get("frame_id")),
        "acknowledged": _bool(alert.get("acked")),
        "acknowledged_at": iso_utc(ack.get("acked_at")),
        "acknowledged_by": ack.get("by"),
        "note": ack.get("note"),
        "snapshot_url": alert.get("snapshot_url"),
    }
    return [_cell(cells[name]) for name in COLUMNS]


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return safe_text(str(value))


def safe_text(text: str) -> str:
    """`text` with a leading `'` when a spreadsheet could take it for a formula: it starts with one of
    FORMULA_STARTS, also after spaces (Excel and Sheets skip leading blanks, so ` =cmd` runs too). The quote makes
    the cell text and shows that it was added."""
    return "'" + text if text.lstrip().startswith(FORMULA_STARTS) or text.startswith(FORMULA_STARTS) else text


def _bool(value: object) -> str:
    return "true" if value else "false"


def _number(value: object, scale: float = 1.0, digits: int | None = None) -> int | float | None:
    """A number as a number (rounded to `digits` for the reader), or an empty cell when the alert has none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value if digits is None else round(value * scale, digits)


def iso_utc(seconds: object) -> str | float:
    """Unix time as ISO 8601 UTC with milliseconds (`2024-05-01T12:00:00.250Z`); empty for none. A time no
    calendar date holds (a device clock gone wild) is written as the number it is."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return ""
    try:
        when = datetime.fromtimestamp(seconds, timezone.utc)
    except (OverflowError, OSError, ValueError):
        return float(seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def export_filename(now: float) -> str:
    """`drywallqa-alerts-<UTC date-time>.csv`, without characters a file system may refuse (no colons)."""
    return f"drywallqa-alerts-{datetime.fromtimestamp(now, timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.csv"
