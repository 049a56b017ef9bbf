"""The per-browser event queue of the dashboard: latest-value events coalesce, alerts keep their order, and a
client that falls behind on distinct events is flagged for a full resync rather than blocking the MQTT thread."""

from __future__ import annotations

import queue
import threading

import pytest

from drywallqa.dashboard.state import Subscription


def drain(sub: Subscription) -> list[tuple[str, dict]]:
    out = []
    while True:
        try:
            out.append(sub.get(timeout=0))
        except queue.Empty:
            return out


def test_a_burst_of_frames_costs_one_slot_per_device_and_delivers_the_newest() -> None:
    sub = Subscription(maxsize=10)
    for i in range(2000):
        sub.put(("device", {"device_id": f"cam{i % 3}", "seq": i}))
    assert not sub.needs_resync
    got = drain(sub)
    assert [(name, d["device_id"], d["seq"]) for name, d in got] == [
        ("device", "cam2", 1997),
        ("device", "cam0", 1998),
        ("device", "cam1", 1999),
    ]


def test_alerts_with_their_totals_fill_one_slot_each_not_two() -> None:
    sub = Subscription(maxsize=500)
    for i in range(450):  # the old queue (two events an alert) resynced after 250
        sub.put(("alert", {"event_id": f"e{i}", "acked": False}))
        sub.put(("alert_counts", {"total": i + 1}))
    assert not sub.needs_resync
    got = drain(sub)
    assert [d["event_id"] for name, d in got if name == "alert"] == [f"e{i}" for i in range(450)]
    assert got[-1] == ("alert_counts", {"total": 450})
    assert sum(name == "alert_counts" for name, _ in got) == 1


def test_what_is_delivered_is_the_original_order_minus_superseded_values() -> None:
    sub = Subscription(maxsize=50)
    sent = [
        ("alert", {"event_id": "a", "acked": False}),
        ("device", {"device_id": "cam0", "seq": 1}),
        ("alert", {"event_id": "b", "acked": False}),
        ("alert", {"event_id": "a", "acked": True}),  # the ack supersedes a's first state and moves after b
        ("broker", {"connected": False}),
        ("device_removed", {"device_id": "cam0"}),  # supersedes cam0's card
        ("_close", {}),
        ("_close", {}),  # events without a key are never merged
    ]
    for event in sent:
        sub.put(event)
    assert drain(sub) == [
        ("alert", {"event_id": "b", "acked": False}),
        ("alert", {"event_id": "a", "acked": True}),
        ("broker", {"connected": False}),
        ("device_removed", {"device_id": "cam0"}),
        ("_close", {}),
        ("_close", {}),
    ]


def test_a_client_that_falls_behind_on_distinct_alerts_is_resynced_with_only_newer_events() -> None:
    sub = Subscription(maxsize=100)
    for i in range(150):
        sub.put(("alert", {"event_id": f"e{i}"}))
    assert sub.needs_resync
    got = drain(sub)
    assert [d["event_id"] for _, d in got] == [f"e{i}" for i in range(100, 150)]  # the backlog before was dropped


def test_get_waits_for_an_event_from_another_thread_and_times_out_without_one() -> None:
    sub = Subscription()
    with pytest.raises(queue.Empty):
        sub.get(timeout=0.05)
    timer = threading.Timer(0.1, sub.put, args=(("broker", {"connected": True}),))
    timer.start()
    assert sub.get(timeout=5) == ("broker", {"connected": True})
    timer.join()
