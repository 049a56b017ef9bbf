"""A device whose clock is off the dashboard's (a board without a real-time clock or network time boots in 1970)
is named on its card, so that the operator can fix the cause: before, its alerts were quietly listed by the time
received and nothing said why. The offset is taken from the device's latest live message only: a retained status
(replayed by the broker at every subscribe, possibly old) and a snapshot that may have waited in the broker's queue
say nothing about its clock now. Real LiveState, real mosquitto and HTTP, the real app.js in Node."""

from __future__ import annotations

import re
import time
from pathlib import Path

from _dashboard_fixtures import (
    PREFIX,
    detection,
    get_json,
    make_jpeg,
    needs_node,
    run_app_js,
    running_dashboard,
    running_mosquitto,
    running_publisher,
    status,
)
from _mqtt_fixtures import wait_until

from drywallqa.dashboard.bridge import BrokerConfig
from drywallqa.dashboard.server import DashboardApp
from drywallqa.dashboard.state import LiveState
from drywallqa.dashboard.store import CLOCK_AHEAD_MARGIN_S, EARLIEST_ALERT_TIME
from drywallqa.edge.payloads import EARLIEST_PLAUSIBLE_TIME, TOPIC_DETECTIONS, TOPIC_STATUS, SnapshotPayload

BOOTED_IN_1970 = 180.0


def _card(state: LiveState, device_id: str) -> dict:
    return next(d for d in state.devices_json() if d["device_id"] == device_id)


def _clock(card: dict) -> tuple[bool, bool]:
    return card["clock_off"], card["clock_alerts_by_receipt"]


def test_one_floor_for_the_edge_and_the_dashboard() -> None:
    assert EARLIEST_ALERT_TIME == EARLIEST_PLAUSIBLE_TIME == 1577836800.0  # 2020-01-01 UTC


def test_a_live_status_from_1970_is_flagged_and_a_retained_one_is_not() -> None:
    state = LiveState()
    state.update_status(status("cam", timestamp=BOOTED_IN_1970), retained=True)  # replayed: maybe from long ago
    assert _card(state, "cam")["clock_offset_s"] is None and _clock(_card(state, "cam")) == (False, False)

    before = time.time()
    state.update_status(status("cam", timestamp=BOOTED_IN_1970))
    card = _card(state, "cam")
    assert BOOTED_IN_1970 - time.time() <= card["clock_offset_s"] <= BOOTED_IN_1970 - before
    assert _clock(card) == (True, True)

    state.update_status(status("cam", timestamp=time.time() - 7200), retained=True)  # a re-subscribe's replay
    assert _card(state, "cam")["clock_offset_s"] == card["clock_offset_s"]

    state.update_status(status("cam", state="offline", timestamp=BOOTED_IN_1970 + 60))  # no clock to read now
    assert _card(state, "cam")["clock_offset_s"] is None and _clock(_card(state, "cam")) == (False, False)


def test_a_clock_ahead_or_behind_by_more_than_the_margin_is_flagged_either_way() -> None:
    state = LiveState()
    det = detection("cam").model_copy(update={"timestamp": time.time() + 3600})  # an hour ahead
    state.update_detection(det, None)
    assert _clock(_card(state, "cam")) == (True, True)  # its alerts would pin on top: listed by the time received

    state.broker.since = time.time() - 3600  # the broker connection has been up an hour: nothing queued is this new
    state.update_status(status("cam", timestamp=time.time() - 2 * CLOCK_AHEAD_MARGIN_S))
    card = _card(state, "cam")
    assert card["clock_offset_s"] < -CLOCK_AHEAD_MARGIN_S
    assert _clock(card) == (True, False)  # behind but after 2020: its alerts keep the device's (too early) time

    state.update_status(status("cam", timestamp=time.time() - 60))  # a minute off: within the margin
    assert _clock(_card(state, "cam")) == (False, False)

    late = SnapshotPayload(device_id="cam", timestamp=BOOTED_IN_1970, frame_id=1, jpeg_b64="")
    state.update_snapshot(late, make_jpeg())  # not an answer to this dashboard: it may have waited in a queue
    assert _clock(_card(state, "cam")) == (False, False)
    state.update_snapshot(late, make_jpeg(), answers_request=True)  # asked for just now: its time is the clock's
    assert _clock(_card(state, "cam")) == (True, True)


def test_through_the_broker_a_retained_1970_status_is_not_counted_a_live_one_is(tmp_path: Path) -> None:
    with running_mosquitto(tmp_path) as broker, running_publisher(broker.port) as publisher:
        publisher.publish("robot", TOPIC_STATUS, status("robot", timestamp=BOOTED_IN_1970), retain=True)
        with running_dashboard(tmp_path, broker.port) as app:

            def robot(frames: int) -> dict | None:
                devices = get_json(app, "/api/state")["devices"]
                return next((d for d in devices if d["status"]["frames_processed"] == frames), None)

            card = wait_until(lambda: robot(120), 10, "the retained status")
            assert card["clock_offset_s"] is None and card["clock_off"] is False
            publisher.publish("robot", TOPIC_STATUS, status("robot", timestamp=BOOTED_IN_1970 + 10,
                                                            frames_processed=121), retain=True)
            card = wait_until(lambda: robot(121), 10, "the live status")
            assert card["clock_off"] is True and card["clock_alerts_by_receipt"] is True


def test_a_status_that_waited_in_the_broker_for_the_dashboard_is_not_taken_for_a_clock_behind(tmp_path: Path) -> None:
    """The dashboard's session is persistent: statuses sent while it was away (a restart) wait in the broker and
    come, not retained, once it is back; the last of them may be an hour old (the broker's queue was full, the
    status interval is long). Its age is not the device's clock: no "clock behind" on a device that is fine. A
    clock truly behind still shows, by a live detection (QoS 0: never queued)."""
    with running_mosquitto(tmp_path) as broker, running_publisher(broker.port) as publisher:
        broker_config = BrokerConfig(host="127.0.0.1", port=broker.port, prefix=PREFIX,
                                     client_id="dash-clock-session", keepalive=5, reconnect_max_s=1)

        def cam(app: DashboardApp, frames: int) -> dict | None:
            devices = get_json(app, "/api/state")["devices"]
            return next((d for d in devices if d["status"] and d["status"]["frames_processed"] == frames), None)

        with running_dashboard(tmp_path, broker.port, broker=broker_config) as app:  # its session: subscribed
            live = status("cam", frames_processed=1)  # sent until it arrives: then the session's subscription is up
            wait_until(lambda: publisher.publish("cam", TOPIC_STATUS, live) or cam(app, 1), 10, "the live status")
        hour_ago = time.time() - 3600  # sent while the dashboard was away, by a clock that is right
        publisher.publish("cam", TOPIC_STATUS, status("cam", timestamp=hour_ago, frames_processed=2))
        with running_dashboard(tmp_path, broker.port, broker=broker_config) as app:
            card = wait_until(lambda: cam(app, 2), 10, "the status the broker kept for the dashboard")
            assert card["clock_off"] is False and card["clock_offset_s"] is None, card
            publisher.publish("cam", TOPIC_DETECTIONS, detection("cam").model_copy(update={"timestamp": hour_ago}))
            card = wait_until(lambda: (c := cam(app, 2)) and c["clock_off"] and c, 10, "the live detection")
            assert card["clock_offset_s"] < -CLOCK_AHEAD_MARGIN_S and card["clock_alerts_by_receipt"] is False


_CARDS = """
const render = app("renderDevice");
const base = { device_id: "robot", status: null, detection: null, frame: null, last_seen: 0,
  clock_offset_s: null, clock_off: false, clock_alerts_by_receipt: false };
console.log(JSON.stringify([
  text(render({ ...base, clock_offset_s: -1.77e9, clock_off: true, clock_alerts_by_receipt: true })),
  text(render({ ...base, clock_offset_s: 5400, clock_off: true, clock_alerts_by_receipt: true })),
  text(render({ ...base, clock_offset_s: -900, clock_off: true })),
  text(render({ ...base, clock_offset_s: 30 })),
  text(render(base))]));
"""


@needs_node
def test_the_card_says_how_far_the_device_clock_is_off_and_what_to_do() -> None:
    years, ahead, behind, close, unknown = run_app_js(_CARDS)
    assert ("device clock 56 years behind the dashboard's: alerts are listed by the time received; set up network "
            "time on the device") in years
    assert "device clock 1.5 h ahead of the dashboard's: alerts are listed by the time received" in ahead
    assert "device clock 15 min behind the dashboard's: its alerts are listed by its own, too early, times" in behind
    assert "device clock" not in close and "device clock" not in unknown


_AGES = """
const now = Date.now() / 1000;
const base = { device_id: "robot", detection: null, frame: null, last_seen: now };
const status = { state: "online", timestamp: 180, source: "demo", source_state: "open", model: "m", fps: 9,
  frames_processed: 5, prompts: [] };
const detection = { frame_id: 7, width: 96, height: 64, inference_ms: 12.5, timestamp: 180, results: [] };
const card = (d) => text(app("renderDevice")({ ...base, ...d }));
console.log(JSON.stringify([
  card({ status, detection, clock_offset_s: 180 - now, clock_off: true, clock_alerts_by_receipt: true }),
  card({ status: { ...status, timestamp: now - 3 * 86400 }, clock_offset_s: null, clock_off: false }),
]));
"""


@needs_node
def test_a_card_tells_ages_on_the_dashboards_clock_even_from_a_clock_in_1970() -> None:
    """A status and a detection just received from a device whose clock reads 1970 are told as seconds old, not as
    "498866.0 h ago"; an age beyond two days reads in days."""
    booted_1970, days_old = run_app_js(_AGES)
    assert re.search(r"status \d+ s ago", booted_1970), booted_1970
    assert re.search(r"12\.5 ms inference, \d+ s ago", booted_1970), booted_1970
    assert "status 3 days ago" in days_old, days_old
