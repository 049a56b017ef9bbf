"""What devices (or any client of the broker) send, against a real mosquitto and real HTTP: wills from while the
dashboard was away, device clocks set back, oversized text, floods of device ids, and requests to offline devices."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from _dashboard_fixtures import (
    POST_HEADERS,
    PREFIX,
    Publisher,
    alert,
    b64,
    detection,
    get_json,
    http_get,
    http_post,
    make_jpeg,
    running_dashboard,
    running_mosquitto,
    running_publisher,
    status,
)
from _mqtt_fixtures import Mosquitto, wait_until

from drywallqa.dashboard.bridge import BrokerConfig
from drywallqa.dashboard.limits import ELLIPSIS, MESSAGE_CHARS, NAME_CHARS
from drywallqa.dashboard.server import DashboardApp
from drywallqa.edge.payloads import (
    TOPIC_ALERTS,
    TOPIC_CMD,
    TOPIC_DETECTIONS,
    TOPIC_SNAPSHOT,
    TOPIC_STATUS,
    ClassResult,
    CommandPayload,
    SnapshotPayload,
    topic,
)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    with running_mosquitto(tmp_path) as broker:
        yield broker


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Iterator[Publisher]:
    with running_publisher(mosquitto.port) as pub:
        yield pub


def _connected(app: DashboardApp) -> DashboardApp:
    wait_until(lambda: app.state.broker.connected, 10, "dashboard to connect to the broker")
    return app


def _device(app: DashboardApp, device_id: str) -> dict | None:
    return next((d for d in get_json(app, "/api/state")["devices"] if d["device_id"] == device_id), None)


def _frame(app: DashboardApp, device_id: str) -> bytes:
    return http_get(app, f"/devices/{device_id}/frame.jpg")[2]


def test_a_will_queued_while_the_dashboard_was_away_is_not_dated_at_its_start(
    tmp_path: Path, mosquitto: Mosquitto, publisher: Publisher
) -> None:
    """The dashboard's MQTT session is persistent: a will published while it was down is queued for it and delivered
    when it connects, as a live (not retained) message. Before, that will was dated at its arrival: the page said
    the device went offline the moment the dashboard started."""
    broker = BrokerConfig(host="127.0.0.1", port=mosquitto.port, prefix=PREFIX, client_id=f"dash-{uuid.uuid4().hex}",
                          keepalive=5, reconnect_max_s=1)
    with running_dashboard(tmp_path / "first", mosquitto.port, broker=broker) as app:
        _connected(app)  # subscribes; the broker keeps the session (and queues for it) after it stops

    last_status = time.time() - 600  # the device's last status, ten minutes ago, then it died
    publisher.publish("cam-died", TOPIC_STATUS, status("cam-died", timestamp=last_status), retain=True)
    will = status("cam-died", state="offline", timestamp=last_status - 300, frames_processed=50, last_will=True)
    publisher.publish("cam-died", TOPIC_STATUS, will, retain=True)

    started = time.time()
    with running_dashboard(tmp_path / "second", mosquitto.port, broker=broker) as app:
        dev = wait_until(lambda: (d := _device(app, "cam-died")) and d["status"]["state"] == "offline" and d, 10,
                         "the queued will")
        assert dev["status"]["last_will"] is True
        assert dev["status"]["timestamp"] == pytest.approx(last_status, abs=1)  # not the dashboard's start
        assert started <= dev["status"]["offline_since_before"] <= time.time()
        assert dev["status"]["frames_processed"] == 120  # the figures of its latest status, not the will's

        # A snapshot request to it is refused, saying why and that nothing was sent.
        code, _, body = http_post(app, "/api/devices/cam-died/snapshot", b"", POST_HEADERS)
        answer = json.loads(body)
        assert code == 409 and answer["sent"] is False, (code, body)
        assert "device cam-died is offline since before " in answer["error"]
        assert "the snapshot request was not sent" in answer["error"]


def test_a_will_seen_live_is_dated_at_its_arrival(tmp_path: Path, mosquitto: Mosquitto, publisher: Publisher) -> None:
    """The will's own time is when the device's connection opened; one that arrives while the dashboard hears the
    device is the moment it went offline."""
    with running_dashboard(tmp_path, mosquitto.port) as app:
        _connected(app)
        publisher.publish("cam-live", TOPIC_STATUS, status("cam-live"), retain=True)
        wait_until(lambda: _device(app, "cam-live"), 5, "the online status")
        sent = time.time()
        will = status("cam-live", state="offline", timestamp=sent - 3600, last_will=True)
        publisher.publish("cam-live", TOPIC_STATUS, will, retain=True)
        dev = wait_until(lambda: (d := _device(app, "cam-live")) and d["status"]["state"] == "offline" and d, 5,
                         "the will")
        assert dev["status"]["timestamp"] >= sent and "offline_since_before" not in dev["status"]

        code, _, body = http_post(app, "/api/devices/cam-live/snapshot", b"", POST_HEADERS)
        assert code == 409 and "device cam-live is offline since 2" in json.loads(body)["error"]


def test_a_device_whose_clock_went_back_gets_its_new_frames_shown(
    tmp_path: Path, mosquitto: Mosquitto, publisher: Publisher
) -> None:
    """Frames were ordered by the device's clock: after an NTP step back (or a restart without a real-time clock)
    the page kept the old frame until the clock caught up. A live preview and the answer to the page's own request
    are newer by their arrival; a snapshot the broker delivers late still cannot replace a newer frame."""
    now = time.time()
    before, after = make_jpeg(color=(0, 0, 255)), make_jpeg(color=(0, 255, 0))
    with running_dashboard(tmp_path, mosquitto.port) as app:
        _connected(app)
        publisher.publish("cam-1", TOPIC_DETECTIONS, detection("cam-1", preview=before))
        wait_until(lambda: _frame(app, "cam-1") == before, 5, "the first frame")
        stepped_back = detection("cam-1", frame_id=8, preview=after).model_copy(update={"timestamp": now - 3600})
        publisher.publish("cam-1", TOPIC_DETECTIONS, stepped_back)
        wait_until(lambda: _frame(app, "cam-1") == after, 5, "the frame sent after the clock went back")

        # A snapshot answering some other request, older than the shown frame: not shown.
        stale = SnapshotPayload(device_id="cam-1", timestamp=now - 7200, frame_id=2, request_id="not-ours",
                                jpeg_b64=b64(make_jpeg(color=(255, 0, 0))))
        publisher.publish("cam-1", TOPIC_SNAPSHOT, stale)
        publisher.publish("cam-1", TOPIC_STATUS, status("cam-1", frames_processed=777))  # handled after it
        wait_until(lambda: (_device(app, "cam-1") or {}).get("status"), 5, "the status after the stale snapshot")
        assert _frame(app, "cam-1") == after

        # The answer to the page's own request, on the device's (still earlier) clock: shown.
        code, _, body = http_post(app, "/api/devices/cam-1/snapshot", b"", POST_HEADERS)
        assert code == 202, body
        answer_jpeg = make_jpeg(color=(255, 255, 0))
        answer = SnapshotPayload(device_id="cam-1", timestamp=now - 7000, frame_id=9,
                                 request_id=json.loads(body)["request_id"], jpeg_b64=b64(answer_jpeg))
        publisher.publish("cam-1", TOPIC_SNAPSHOT, answer)
        wait_until(lambda: _frame(app, "cam-1") == answer_jpeg, 5, "the requested snapshot")


def test_long_device_text_is_clipped_and_overlong_ids_are_refused(
    tmp_path: Path, mosquitto: Mosquitto, publisher: Publisher
) -> None:
    """Before, a 1 MB last_error went to every browser with every change of the device, and into the page."""
    huge_error = "E" * 1_000_000
    with running_dashboard(tmp_path, mosquitto.port) as app:
        _connected(app)
        publisher.publish("cam-t", TOPIC_STATUS, status("cam-t", last_error=huge_error, model="m" * 5000,
                                                        prompts=["p" * 1000] * 500))
        wide = ClassResult(class_name="c" * 3000, prompt="q" * 3000, area_fraction=0.1, region_count=1,
                           mean_confidence=0.5)
        publisher.publish("cam-t", TOPIC_DETECTIONS, detection("cam-t").model_copy(update={"results": [wide]}))
        publisher.publish("cam-t", TOPIC_ALERTS, alert("cam-t", "evt-long", make_jpeg(), class_name="c" * 3000,
                                                       prompt="q" * 100_000, rule="r" * 5000))
        publisher.publish("d" * 200, TOPIC_STATUS, status("d" * 200))
        publisher.publish("cam-t", TOPIC_ALERTS, alert("cam-t", "e" * 200, make_jpeg()))
        wait_until(lambda: get_json(app, "/api/state")["broker"]["invalid_messages"] == 2, 10, "the refusals")
        wait_until(lambda: (_device(app, "cam-t") or {}).get("detection"), 5, "the detection")
        code, _, body = http_get(app, "/api/state")

    assert code == 200 and len(body) < 100_000, len(body)
    state = json.loads(body)
    (dev,) = state["devices"]
    st = dev["status"]
    assert st["last_error"] == "E" * (MESSAGE_CHARS - 1) + ELLIPSIS
    assert st["model"] == "m" * (NAME_CHARS - 1) + ELLIPSIS
    assert len(st["prompts"]) == 64 and all(len(p) == NAME_CHARS for p in st["prompts"])
    (result,) = dev["detection"]["results"]
    assert len(result["class_name"]) == NAME_CHARS and result["class_name"].endswith(ELLIPSIS)
    (kept,) = state["alerts"]
    assert kept["event_id"] == "evt-long"
    assert len(kept["prompt"]) == NAME_CHARS and len(kept["rule"]) == NAME_CHARS and len(kept["class_name"]) == NAME_CHARS
    assert "event_id is 200 characters long" in state["broker"]["last_invalid"]


def test_the_device_list_is_bounded_and_drops_the_longest_silent_offline_device_first(
    tmp_path: Path, mosquitto: Mosquitto, publisher: Publisher, caplog
) -> None:
    """Before, every device id any client of the broker published under was kept, and sent to every browser."""
    caplog.set_level(logging.WARNING, logger="drywallqa.dashboard")
    with running_dashboard(tmp_path, mosquitto.port, max_devices=3) as app:
        _connected(app)

        def report(device_id: str, **kw) -> None:
            publisher.publish(device_id, TOPIC_STATUS, status(device_id, **kw))
            wait_until(lambda: (d := _device(app, device_id)) and d["status"]["state"] == kw.get("state", "online"),
                       5, f"{device_id}'s status")

        report("cam-b")  # silent longest, but online
        report("cam-a")
        report("cam-a", state="offline")  # stopped cleanly: offline
        report("cam-c")
        report("cam-d")  # one too many: the offline one goes, not the longest silent
        assert [d["device_id"] for d in get_json(app, "/api/state")["devices"]] == ["cam-b", "cam-c", "cam-d"]
        report("cam-e")  # no offline one left: the longest silent goes
        state = get_json(app, "/api/state")
    assert [d["device_id"] for d in state["devices"]] == ["cam-c", "cam-d", "cam-e"]
    assert state["broker"]["devices_dropped"] == 2 and state["broker"]["max_devices"] == 3
    warnings = [r.getMessage() for r in caplog.records if "--max-devices" in r.getMessage()]
    assert len(warnings) == 1 and "'cam-a'" in warnings[0], warnings  # said once


def test_a_snapshot_request_to_an_offline_device_is_refused_and_not_sent(
    tmp_path: Path, mosquitto: Mosquitto, publisher: Publisher
) -> None:
    """Before, it got 202 and no further word: the device is gone and nobody would answer."""
    commands: list[tuple[str, CommandPayload]] = []
    subscribed = threading.Event()
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"devices-{uuid.uuid4().hex[:8]}")
    device.on_message = lambda c, u, msg: commands.append((msg.topic, CommandPayload.model_validate_json(msg.payload)))
    device.on_subscribe = lambda *args: subscribed.set()
    device.connect("127.0.0.1", mosquitto.port)
    device.loop_start()
    try:
        device.subscribe(topic(PREFIX, "+", TOPIC_CMD), qos=1)
        assert subscribed.wait(5), "the devices' subscription to their commands"
        with running_dashboard(tmp_path, mosquitto.port) as app:
            _connected(app)
            stopped = time.time() - 5
            for device_id, state in (("cam-off", "offline"), ("cam-on", "online")):
                publisher.publish(device_id, TOPIC_STATUS, status(device_id, state=state, timestamp=stopped), retain=True)
                wait_until(lambda: _device(app, device_id), 5, f"{device_id}'s status")  # noqa: B023

            code, _, body = http_post(app, "/api/devices/cam-off/snapshot", b"", POST_HEADERS)
            answer = json.loads(body)
            assert code == 409 and answer["sent"] is False and "request_id" not in answer
            assert answer["error"].startswith("device cam-off is offline since ")
            assert time.strftime("%Y-%m-%d", time.localtime(stopped)) in answer["error"]
            # The online device's request goes out after the refused one would have: only it arrives.
            code, _, body = http_post(app, "/api/devices/cam-on/snapshot", b"", POST_HEADERS)
            assert code == 202, body
            wait_until(lambda: commands, 5, "cam-on's snapshot command")
        assert [t for t, _ in commands] == [topic(PREFIX, "cam-on", TOPIC_CMD)]
    finally:
        device.disconnect()
        device.loop_stop()
