"""The alert list's order cannot be broken by a device's wrong clock: an alert is listed by the device's timestamp
when it is plausible, else by the time the dashboard received it (a device without network time boots in 1970;
one whose clock runs ahead would pin its alerts on top). Real SQLite, real mosquitto, real HTTP, the real app.js
in Node. Before, the list was ordered by the device's timestamp alone: a new alert from a 1970 clock sank below
the first page and was never seen."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _dashboard_fixtures import (
    alert,
    get_json,
    http_get,
    make_jpeg,
    needs_node,
    run_app_js,
    running_dashboard,
    running_mosquitto,
    running_publisher,
)
from _mqtt_fixtures import wait_until

from drywallqa.dashboard.server import DashboardApp
from drywallqa.dashboard.store import CLOCK_AHEAD_MARGIN_S, EARLIEST_ALERT_TIME, AlertStore
from drywallqa.edge.payloads import TOPIC_ALERTS

T = 1.75e9  # a plausible "now" (2025) for the store-level tests, which pass received_at themselves
YEARS_AHEAD = T + 6 * 365 * 86400.0  # a clock in 2031


def _ids(items: list[dict]) -> list[str]:
    return [a["event_id"] for a in items]


def _add(store: AlertStore, event_id: str, timestamp: float, received_at: float) -> None:
    jpeg = make_jpeg(16, 16)
    assert store.add_alert(alert("cam", event_id, jpeg, timestamp=timestamp), jpeg, received_at=received_at)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AlertStore]:
    s = AlertStore(tmp_path / "alerts.sqlite")
    yield s
    s.close()


def test_an_alert_from_a_clock_in_1970_is_listed_first_when_it_is_the_newest(store: AlertStore) -> None:
    _add(store, "a", T - 100, T - 99)
    _add(store, "b", T - 50, T - 49)
    _add(store, "boot-1970", 12.0, T)  # a device that booted without network time
    listed = store.alerts()
    assert _ids(listed) == ["boot-1970", "b", "a"]
    top = listed[0]
    assert top["device_clock_off"] is True and top["sort_time"] == T and top["timestamp"] == 12.0
    assert [(a["device_clock_off"], a["sort_time"]) for a in listed[1:]] == [(False, T - 50), (False, T - 100)]


def test_an_alert_dated_years_ahead_is_listed_by_its_receive_time(store: AlertStore) -> None:
    _add(store, "future", YEARS_AHEAD, T - 200)
    _add(store, "later", T - 10, T - 9)
    _add(store, "a-bit-ahead", T + CLOCK_AHEAD_MARGIN_S - 1, T)  # within the margin: the device is believed
    listed = store.alerts()
    assert _ids(listed) == ["a-bit-ahead", "later", "future"]
    assert listed[2]["device_clock_off"] is True and listed[2]["sort_time"] == T - 200
    assert listed[0]["device_clock_off"] is False and listed[0]["sort_time"] == T + CLOCK_AHEAD_MARGIN_S - 1


def test_a_replayed_old_alert_takes_its_place_in_time_not_the_top(store: AlertStore) -> None:
    _add(store, "hour-ago", T - 3600, T - 3600)
    _add(store, "minute-ago", T - 60, T - 60)
    _add(store, "replayed", T - 1800, T)  # from a spool after an outage: old, but the clock was right
    _add(store, "boot-1970", 5.0, T + 1)  # received just after it, from a device without network time
    listed = store.alerts()
    assert _ids(listed) == ["boot-1970", "minute-ago", "replayed", "hour-ago"]
    replayed = listed[2]
    assert replayed["device_clock_off"] is False and replayed["sort_time"] == T - 1800


def _expected_sort_time(timestamp: float, received_at: float) -> float:
    plausible = EARLIEST_ALERT_TIME <= timestamp <= received_at + CLOCK_AHEAD_MARGIN_S
    return timestamp if plausible else received_at


def test_paging_walks_a_mix_of_right_and_wrong_clocks_once_without_gaps(store: AlertStore) -> None:
    rng = random.Random(7)
    expected: dict[str, float] = {}
    for i in range(60):
        received = T + i // 3  # some alerts arrive in the same second
        timestamp = rng.choice([
            received - rng.randrange(0, 5000),  # right clock, maybe a replay
            float(rng.randrange(0, 1000)),  # 1970
            YEARS_AHEAD + rng.randrange(0, 10),  # years ahead
            T + rng.randrange(0, 20),  # right clock, equal to another alert's receive time: a tie
        ])
        _add(store, f"e{i:02d}", timestamp, received)
        expected[f"e{i:02d}"] = _expected_sort_time(timestamp, received)
    store.acknowledge("e05")
    walked: list[str] = []
    before = None
    while page := store.alerts(limit=7, before=before):
        walked += _ids(page)
        before = (page[-1]["sort_time"], page[-1]["event_id"])
    assert walked == sorted(expected, key=lambda e: (expected[e], e), reverse=True)  # each once, newest first
    open_only: list[str] = []
    before = None
    while page := store.alerts(include_acked=False, limit=5, before=before):
        open_only += _ids(page)
        before = (page[-1]["sort_time"], page[-1]["event_id"])
    assert open_only == [e for e in walked if e != "e05"]


_OLD_SCHEMA = """
CREATE TABLE alerts (
    event_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, timestamp REAL NOT NULL, class_name TEXT NOT NULL,
    payload TEXT NOT NULL, snapshot BLOB NOT NULL, received_at REAL NOT NULL
);
CREATE INDEX alerts_by_time ON alerts (timestamp);
CREATE TABLE seen_alerts (event_id TEXT PRIMARY KEY);
CREATE TABLE acks (
    event_id TEXT PRIMARY KEY, acked_at REAL NOT NULL, by TEXT NOT NULL DEFAULT '', note TEXT NOT NULL DEFAULT ''
);
"""


def _old_store(path: Path, rows: list[tuple[str, float, float]], jpeg: bytes) -> None:
    """A store file as the dashboard wrote it before sort_time existed."""
    db = sqlite3.connect(path)
    db.executescript(_OLD_SCHEMA)
    for event_id, timestamp, received_at in rows:
        meta = alert("cam", event_id, None, timestamp=timestamp).model_dump(exclude={"snapshot_jpeg_b64"})
        db.execute(
            "INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?, ?)",
            (event_id, "cam", timestamp, "crack", json.dumps(meta), jpeg, received_at),
        )
        db.execute("INSERT INTO seen_alerts VALUES (?)", (event_id,))
    db.execute("INSERT INTO acks VALUES ('old-right', ?, 'ana', 'patched')", (T,))
    db.commit()
    db.close()


def test_a_store_from_before_sort_time_is_migrated_on_open_without_losing_anything(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    jpeg = make_jpeg(16, 16)
    _old_store(path, [("old-right", T - 100, T - 99), ("old-1970", 12.0, T), ("old-ahead", YEARS_AHEAD, T - 50)], jpeg)
    store = AlertStore(path)
    listed = store.alerts()
    assert _ids(listed) == ["old-1970", "old-ahead", "old-right"]
    assert [(a["sort_time"], a["device_clock_off"]) for a in listed] == [(T, True), (T - 50, True), (T - 100, False)]
    assert listed[2]["ack"] == {"acked_at": T, "by": "ana", "note": "patched"}
    assert store.snapshot("old-1970") == jpeg and store.seen_count() == 3
    assert store.add_alert(alert("cam", "old-right", jpeg), jpeg) is False  # still known as seen
    _add(store, "new", T + 10, T + 11)
    store.close()
    again = AlertStore(path)  # opening a migrated store again changes nothing
    assert _ids(again.alerts()) == ["new", "old-1970", "old-ahead", "old-right"]
    indexes = {row[1] for row in again._db.execute("PRAGMA index_list(alerts)")}
    assert "alerts_by_sort_time" in indexes
    again.close()


def _publish(port: int, alerts: list[tuple[str, float]]) -> None:
    with running_publisher(port) as pub:
        for event_id, timestamp in alerts:
            pub.publish("cam-1", TOPIC_ALERTS, alert("cam-1", event_id, make_jpeg(16, 16), timestamp=timestamp))


def test_the_api_lists_and_pages_a_1970_alert_on_top_through_http(tmp_path: Path) -> None:
    now = time.time()
    with running_mosquitto(tmp_path) as broker, running_dashboard(tmp_path, broker.port) as app:
        wait_until(lambda: app.state.broker.connected, 10, "dashboard to connect to the broker")
        _publish(broker.port, [("hour-ago", now - 3600), ("minute-ago", now - 60), ("replayed", now - 1800),
                               ("boot-1970", 12.0), ("years-ahead", now + 6 * 365 * 86400.0)])
        wait_until(lambda: app.store.get("years-ahead") is not None, 10, "the last alert stored")
        listed = get_json(app, "/api/alerts")
        assert _ids(listed) == ["years-ahead", "boot-1970", "minute-ago", "replayed", "hour-ago"]
        assert [a["device_clock_off"] for a in listed] == [True, True, False, False, False]
        walked = _walk(app)
        assert walked == _ids(listed)
        code, _, body = http_get(app, "/api/alerts?before=soon")
        assert code == 400 and b"sort_time" in body


def _walk(app: DashboardApp) -> list[str]:
    """Page through /api/alerts one alert at a time, as the page's "show older" does."""
    walked: list[str] = []
    query = "/api/alerts?limit=1"
    while page := get_json(app, query):
        walked += _ids(page)
        query = f"/api/alerts?limit=1&before={page[-1]['sort_time']}&before_id={page[-1]['event_id']}"
    return walked


_ALERTS = """
const render = app("renderAlert");
const base = { event_id: "e", device_id: "cam", class_name: "crack", rule: "r", timestamp: 12, frame_id: 1,
  prompt: "p", area_fraction: 0.1, skeleton_length_px: 0, region_count: 1, mean_confidence: 0.5,
  persisted_frames: 3, acked: false, snapshot_url: null, sort_time: 1.75e9 };
console.log(JSON.stringify([text(render({ ...base, device_clock_off: true })),
  text(render({ ...base, timestamp: 1.75e9, device_clock_off: false }))]));
"""


@needs_node
def test_the_page_says_when_an_alert_is_listed_by_the_time_received() -> None:
    clock_off, clock_right = run_app_js(_ALERTS)
    assert "device clock wrong: listed by the time received" in clock_off
    assert "device clock wrong" not in clock_right


_OPEN_WITH_FILE_LIMIT = """
import resource, signal, sys
from drywallqa.dashboard.store import AlertStore, StoreError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like one on a full disk
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    AlertStore(sys.argv[1]).close()
except StoreError as exc:
    print(exc)
    sys.exit(3)
"""


def test_an_older_store_without_room_for_its_upgrade_says_to_free_space_and_is_left_intact(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    picture = b"\xff\xd8" + random.Random(3).randbytes(20_000)
    rows = [("old-right" if i == 0 else f"old-{i:02d}", T - 100 * i, T - 100 * i + 1) for i in range(40)]
    _old_store(path, rows, picture)
    # files may grow to 150 kB only, in a subprocess (the limit and its signal stay out of the test process): the
    # old dashboard opened this store (its open writes nothing), the upgrade rewrites ~0.8 MB of alerts
    out = subprocess.run([sys.executable, "-c", _OPEN_WITH_FILE_LIMIT, str(path), "150000"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    said = out.stdout
    assert f"cannot upgrade the dashboard store {path} to this version" in said
    assert "free disk space there (or make the file writable) and start the dashboard again" in said
    assert "MiB free on that disk" in said and "Move the file away" not in said  # moving it loses the history
    store = AlertStore(path)  # with room, the same file upgrades with everything in it
    listed = store.alerts()
    assert _ids(listed) == [r[0] for r in rows] and store.snapshot("old-39") == picture
    assert store.alerts(event_id="old-right")[0]["ack"] == {"acked_at": T, "by": "ana", "note": "patched"}
    store.close()
