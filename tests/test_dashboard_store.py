"""Alert store: deduplication, acknowledgements that survive a restart, bounded size, clear errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from _dashboard_fixtures import alert, make_jpeg

from drywallqa.dashboard.store import SEEN_IDS_PER_ALERT, AlertStore, StoreError


def test_alerts_are_deduplicated_on_event_id(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "s.sqlite")
    jpeg = make_jpeg()
    assert store.add_alert(alert("cam", "e1", jpeg), jpeg) is True
    assert store.add_alert(alert("cam", "e1", jpeg), jpeg) is False
    items = store.alerts()
    assert [a["event_id"] for a in items] == ["e1"]
    assert items[0]["snapshot_url"] == "/alerts/e1/snapshot.jpg"
    assert "snapshot_jpeg_b64" not in items[0]
    assert store.snapshot("e1") == jpeg


def test_acks_survive_reopening_the_store(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = AlertStore(path)
    jpeg = make_jpeg()
    store.add_alert(alert("cam", "e1", jpeg), jpeg)
    store.add_alert(alert("cam", "e2", jpeg, class_name="taping"), jpeg)
    store.acknowledge("e1", by="ana", note="patched")
    store.close()

    again = AlertStore(path)
    by_id = {a["event_id"]: a for a in again.alerts()}
    assert by_id["e1"]["acked"] and by_id["e1"]["ack"]["by"] == "ana"
    assert not by_id["e2"]["acked"]
    assert [a["event_id"] for a in again.alerts(include_acked=False)] == ["e2"]
    assert [a["event_id"] for a in again.alerts(class_name="crack")] == ["e1"]
    assert again.unacknowledge("e1") is True
    assert again.get("e1")["acked"] is False


def test_ack_of_unknown_alert_is_a_key_error(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "s.sqlite")
    with pytest.raises(KeyError):
        store.acknowledge("missing")


def test_store_keeps_only_the_newest_alerts(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "s.sqlite", max_alerts=3)
    jpeg = make_jpeg()
    for i in range(5):
        store.add_alert(alert("cam", f"e{i}", jpeg, timestamp=1000.0 + i), jpeg)
    store.acknowledge("e4")
    assert [a["event_id"] for a in store.alerts()] == ["e4", "e3", "e2"]
    assert store.snapshot("e0") is None


def test_a_file_that_is_not_a_store_gives_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open dashboard store"):
        AlertStore(bad)


def test_store_trims_by_arrival_not_by_the_devices_clock(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "s.sqlite", max_alerts=3)
    jpeg = make_jpeg()
    store.add_alert(alert("cam", "future", jpeg, timestamp=4e9), jpeg)  # a device clock years ahead
    store.add_alert(alert("cam", "now1", jpeg, timestamp=1000.0), jpeg)
    store.add_alert(alert("cam", "now2", jpeg, timestamp=1001.0), jpeg)
    assert store.add_alert(alert("cam", "late-spooled", jpeg, timestamp=10.0), jpeg)  # a replay from a spool
    kept = {a["event_id"] for a in store.alerts()}
    assert kept == {"now1", "now2", "late-spooled"}  # the oldest *received* went; the replay is kept


def test_paging_walks_the_whole_history_once_even_with_equal_times(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "s.sqlite")
    jpeg = make_jpeg()
    t0 = 1.7e9  # a plausible device clock, so the alerts are listed by it
    for i in range(25):  # pairs of alerts share a timestamp: the cursor must break the tie, not skip or repeat
        store.add_alert(alert("cam", f"e{i:02d}", jpeg, timestamp=t0 + i // 2), jpeg, received_at=t0 + 60)
    store.acknowledge("e03")
    seen: list[str] = []
    before = None
    while True:
        page = store.alerts(limit=4, before=before)
        if not page:
            break
        seen += [a["event_id"] for a in page]
        before = (page[-1]["sort_time"], page[-1]["event_id"])
    assert sorted(seen) == [f"e{i:02d}" for i in range(25)] and len(seen) == 25
    assert seen[0] == "e24" and seen[-1] == "e00"
    assert store.counts() == {"open": 24, "acknowledged": 1, "total": 25}
    open_only = store.alerts(include_acked=False, limit=100, before=(t0 + 2, "e04"))
    assert [a["event_id"] for a in open_only] == ["e02", "e01", "e00"]  # e03 acknowledged, e04 not older


def test_an_alert_re_sent_after_it_was_trimmed_is_still_a_duplicate(tmp_path: Path) -> None:
    """Before, deduplication looked only at the alerts kept: one dropped to stay within max_alerts and then re-sent
    from a device's spool (its broker ack was lost) came back as a new alert."""
    path = tmp_path / "s.sqlite"
    store = AlertStore(path, max_alerts=3)
    jpeg = make_jpeg()
    for i in range(5):
        assert store.add_alert(alert("cam", f"e{i}", jpeg), jpeg)
    assert "e0" not in {a["event_id"] for a in store.alerts()}  # trimmed
    assert store.add_alert(alert("cam", "e0", jpeg), jpeg) is False
    assert sorted(a["event_id"] for a in store.alerts()) == ["e2", "e3", "e4"]
    assert store.get("e0") is None
    store.close()

    again = AlertStore(path, max_alerts=3)  # remembered across a restart
    assert again.add_alert(alert("cam", "e1", jpeg), jpeg) is False
    for i in range(5, 100):  # and bounded: the ids of the latest SEEN_IDS_PER_ALERT * max_alerts alerts
        again.add_alert(alert("cam", f"e{i}", jpeg), jpeg)
    assert again.seen_count() == SEEN_IDS_PER_ALERT * 3
    assert again.add_alert(alert("cam", "e0", jpeg), jpeg) is True  # long forgotten: taken as new


def test_a_store_from_before_the_seen_ids_knows_its_alerts_as_seen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = AlertStore(path)
    jpeg = make_jpeg()
    store.add_alert(alert("cam", "old-1", jpeg), jpeg)
    store.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE seen_alerts")  # as a store written by an earlier dashboard
    db.commit()
    db.close()
    again = AlertStore(path)
    assert again.seen_count() == 1
    assert again.add_alert(alert("cam", "old-1", jpeg), jpeg) is False
