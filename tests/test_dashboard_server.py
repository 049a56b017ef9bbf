"""Dashboard server against a real mosquitto: SSE fan-out, payload validation, alerts, acks, auth, review."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from _dashboard_fixtures import (
    PREFIX,
    Publisher,
    alert,
    b64,
    detection,
    get_json,
    http_get,
    http_post,
    make_app,
    make_jpeg,
    running_dashboard,
    running_mosquitto,
    running_publisher,
    status,
)
from _mqtt_fixtures import Mosquitto, wait_until

from drywallqa.dashboard.auth import AuthConfigError
from drywallqa.dashboard.cli import main as dashboard_main
from drywallqa.dashboard.server import DashboardApp
from drywallqa.edge.payloads import (
    TOPIC_ALERTS,
    TOPIC_CMD,
    TOPIC_DETECTIONS,
    TOPIC_SNAPSHOT,
    TOPIC_STATUS,
    CommandPayload,
    SnapshotPayload,
    topic,
)
from drywallqa.masks import mask_filename


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    with running_mosquitto(tmp_path) as broker:
        yield broker


@pytest.fixture
def dashboard(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[DashboardApp]:
    with running_dashboard(tmp_path, mosquitto.port) as app:
        wait_until(lambda: app.state.broker.connected, 10, "dashboard to connect to the broker")
        yield app


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Iterator[Publisher]:
    with running_publisher(mosquitto.port) as pub:
        yield pub


ACK_HEADERS = {"X-DrywallQA": "1", "Content-Type": "application/json"}


class SSE:
    """Minimal Server-Sent Events reader over http.client."""

    def __init__(self, app, headers: dict[str, str] | None = None) -> None:
        host, port = app.address
        self.conn = http.client.HTTPConnection(host, port, timeout=10)
        self.conn.request("GET", "/events", headers=headers or {})
        self.res = self.conn.getresponse()

    def next_event(self) -> tuple[str, dict]:
        name, data = "", []
        while True:
            line = self.res.fp.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and name:
                return name, json.loads("\n".join(data))

    def wait_for(self, name: str, predicate=lambda d: True, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev, data = self.next_event()
            if ev == name and predicate(data):
                return data
        raise AssertionError(f"no {name} event matching within {timeout} s")

    def close(self) -> None:
        self.conn.close()


def test_live_events_flow_from_mqtt_to_the_browser_stream(dashboard, publisher) -> None:
    sse = SSE(dashboard)
    try:
        state = sse.wait_for("state")
        assert state["broker"]["connected"] is True and state["devices"] == []
        preview = make_jpeg(color=(0, 0, 255))
        publisher.publish("cam 1?", TOPIC_STATUS, status("cam 1?"), retain=True)  # needs URL quoting
        publisher.publish("cam 1?", TOPIC_DETECTIONS, detection("cam 1?", preview=preview))
        dev = sse.wait_for("device", lambda d: d["detection"] is not None)
        assert dev["status"]["state"] == "online"
        assert dev["detection"]["results"][0]["skeleton_length_px"] == pytest.approx(123.4)
        assert "preview_jpeg_b64" not in dev["detection"]
        code, headers, body = http_get(dashboard, dev["frame"]["url"])
        assert code == 200 and headers["Content-Type"] == "image/jpeg" and body == preview

        snap = make_jpeg(color=(255, 0, 0))
        publisher.publish("cam-1", TOPIC_ALERTS, alert("cam-1", "evt-1", snap))
        publisher.publish("cam-1", TOPIC_ALERTS, alert("cam-1", "evt-1", snap))  # redelivery: deduplicated
        item = sse.wait_for("alert")
        assert item["event_id"] == "evt-1" and item["acked"] is False
        assert http_get(dashboard, item["snapshot_url"])[2] == snap
        wait_until(lambda: len(get_json(dashboard, "/api/alerts")) == 1, 5, "alert stored")
        time.sleep(0.3)  # give a duplicate the chance to (wrongly) appear
        assert len(get_json(dashboard, "/api/alerts")) == 1
    finally:
        sse.close()


def test_invalid_payloads_are_reported_and_do_not_break_the_bridge(dashboard, publisher) -> None:
    publisher.publish("cam-x", TOPIC_STATUS, b"{not json")
    publisher.publish("cam-x", TOPIC_DETECTIONS, json.dumps({"device_id": "cam-x"}))
    # An alert with a broken snapshot is still kept (losing the alert would be worse), without a picture.
    publisher.publish("cam-x", TOPIC_ALERTS, alert("cam-x", "evt-bad-snap", None))
    publisher.publish("cam-x", TOPIC_STATUS, status("cam-x", state="paused"))
    wait_until(lambda: get_json(dashboard, "/api/state")["devices"], 5, "valid status after invalid ones")
    state = get_json(dashboard, "/api/state")
    assert state["devices"][0]["status"]["state"] == "paused"
    assert state["broker"]["invalid_messages"] == 3
    assert "snapshot_jpeg_b64" in state["broker"]["last_invalid"]
    # The footer lists it with the ignored messages: it must not read as if the alert itself had been dropped.
    assert "alert evt-bad-snap kept without its picture" in state["broker"]["last_invalid"]
    (kept,) = state["alerts"]
    assert kept["event_id"] == "evt-bad-snap" and kept["snapshot_url"] is None


def test_ack_requires_the_csrf_header_and_persists(dashboard, publisher) -> None:
    snap = make_jpeg()
    publisher.publish("cam-1", TOPIC_ALERTS, alert("cam-1", "a/b c", snap))  # needs URL quoting
    wait_until(lambda: get_json(dashboard, "/api/alerts"), 5, "alert stored")
    path = "/api/alerts/a%2Fb%20c/ack"
    assert http_post(dashboard, path, b"{}")[0] == 403
    code, _, body = http_post(dashboard, path, b'{"by": "site lead"}', ACK_HEADERS)
    assert code == 200 and json.loads(body)["ack"]["by"] == "site lead"
    assert get_json(dashboard, "/api/alerts?include_acked=0") == []
    assert http_post(dashboard, "/api/alerts/nope/ack", b"{}", ACK_HEADERS)[0] == 404
    assert http_post(dashboard, path, b"[1]", ACK_HEADERS)[0] == 400


def test_broker_down_at_start_is_retried_and_reported(tmp_path: Path, mosquitto: Mosquitto) -> None:
    mosquitto.stop()
    with running_dashboard(tmp_path, mosquitto.port) as app:
        state = get_json(app, "/api/state")["broker"]
        assert state["connected"] is False and "127.0.0.1" in state["detail"]
        time.sleep(1.5)  # at least one failed retry
        assert app.state.broker.connected is False
        mosquitto.start()
        wait_until(lambda: app.state.broker.connected, 15, "connection once the broker is up")


def test_listening_beyond_loopback_needs_a_token(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(AuthConfigError, match="refusing to listen"):
        make_app(tmp_path, 1, host="0.0.0.0")
    monkeypatch.delenv("DRYWALLQA_DASHBOARD_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="without a token"):
        dashboard_main(["--host", "0.0.0.0", "--port", "0", "--store", str(tmp_path / "s.sqlite")])
    with pytest.raises(AuthConfigError, match="at least"):
        make_app(tmp_path, 1, token="short")


def test_token_protects_pages_api_and_stream(tmp_path: Path, mosquitto: Mosquitto) -> None:
    token = "s3cret-token-for-tests"
    with running_dashboard(tmp_path, mosquitto.port, token=token) as app:
        code, headers, _ = http_get(app, "/")
        assert code == 303 and headers["Location"] == "/login"
        assert http_get(app, "/api/state")[0] == 401
        assert http_get(app, "/events")[0] == 401
        assert http_get(app, "/review")[0] == 303
        assert http_get(app, "/healthz")[0] == 200
        assert (
            http_post(app, "/login", "token=wrong", {"Content-Type": "application/x-www-form-urlencoded"})[0]
            == 401
        )
        code, headers, _ = http_post(
            app, "/login", f"token={token}", {"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert code == 303 and "HttpOnly" in headers["Set-Cookie"] and token not in headers["Set-Cookie"]
        cookie = headers["Set-Cookie"].split(";")[0]
        assert http_get(app, "/api/state", {"Cookie": cookie})[0] == 200
        assert http_get(app, "/api/state", {"Authorization": f"Bearer {token}"})[0] == 200
        assert http_get(app, "/api/state", {"Authorization": "Bearer nope"})[0] == 401
        assert http_get(app, "/", {"Cookie": cookie})[0] == 200
        code, headers, _ = http_get(app, "/logout", {"Cookie": cookie})
        assert code == 303 and "Max-Age=0" in headers["Set-Cookie"]


def _write_review_folders(root: Path) -> tuple[Path, Path]:
    images, masks = root / "images", root / "pred"
    images.mkdir()
    masks.mkdir()
    for name in ("wall_001", "wall_002"):
        cv2.imwrite(str(images / f"{name}.jpg"), np.full((48, 64, 3), 128, np.uint8))
    crack = np.zeros((48, 64), np.uint8)
    crack[10:20, 10:30] = 255
    cv2.imwrite(str(masks / mask_filename("wall_001", "segment crack")), crack)
    cv2.imwrite(str(masks / mask_filename("wall_002", "segment joint/tape")), np.zeros((24, 32), np.uint8))
    cv2.imwrite(str(masks / mask_filename("ghost", "segment crack")), crack)
    return images, masks


def test_review_pairs_images_with_masks_and_draws_them(dashboard, tmp_path: Path) -> None:
    images, masks = _write_review_folders(tmp_path)
    # The masks folder is given relative to the review root.
    code, _, body = http_get(dashboard, f"/review?images={images}&masks=pred")
    page = body.decode()
    assert code == 200
    assert "wall_001" in page and "wall_002" in page and "segment_joint_tape" in page
    assert "1 mask file(s) match no image" in page

    code, headers, jpeg = http_get(
        dashboard, f"/review/overlay.jpg?images={images}&masks={masks}&id=wall_001"
    )
    assert code == 200 and headers["Content-Type"] == "image/jpeg"
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (48, 64, 3)
    b, g, r = (int(v) for v in img[15, 20])
    assert r > 160 and b < 120, "crack pixels are tinted red"
    assert abs(int(img[40, 50, 2]) - 128) < 12, "pixels outside the mask are unchanged"

    code, headers, _ = http_get(dashboard, f"/review/overlay.jpg?images={images}&masks={masks}&id=wall_002")
    assert code == 200 and "differs from image" in headers["X-Mask-Problems"]


def test_review_refuses_paths_outside_its_roots(dashboard, tmp_path: Path) -> None:
    code, _, body = http_get(dashboard, "/review?images=/etc")
    assert code == 400 and b"outside the review roots" in body
    assert http_get(dashboard, "/review/files/0/../../../../etc/passwd")[0] in (400, 404)
    (tmp_path / "secret.key").write_text("x")
    assert http_get(dashboard, "/review/files/0/secret.key")[0] == 403
    assert http_get(dashboard, "/review/overlay.jpg?images=/nonexistent")[0] == 400
    images, masks = _write_review_folders(tmp_path)
    for bad_id in ("missing", "../images/wall_001", ""):
        code, _, body = http_get(dashboard, f"/review/overlay.jpg?images={images}&masks={masks}&id={bad_id}")
        assert code == 400 and b" ID " in body, bad_id


def test_review_opens_an_eval_report_with_its_relative_links(dashboard, tmp_path: Path) -> None:
    report_dir = tmp_path / "runs" / "eval"
    report_dir.mkdir(parents=True)
    (report_dir / "report.html").write_text("<html><body><img src='img/a.png'>eval report</body></html>")
    (report_dir / "img").mkdir()
    cv2.imwrite(str(report_dir / "img" / "a.png"), np.zeros((4, 4), np.uint8))
    code, headers, _ = http_get(dashboard, f"/review?report={report_dir / 'report.html'}")
    assert code == 303
    location = headers["Location"]
    code, headers, body = http_get(dashboard, location)
    assert code == 200 and b"eval report" in body and headers["Content-Type"].startswith("text/html")
    sibling = location.rsplit("/", 1)[0] + "/img/a.png"
    assert http_get(dashboard, sibling)[0] == 200


def test_unknown_pages_and_missing_frames_are_404(dashboard) -> None:
    assert http_get(dashboard, "/nope")[0] == 404
    assert http_get(dashboard, "/devices/ghost/frame.jpg")[0] == 404
    assert http_get(dashboard, "/alerts/ghost/snapshot.jpg")[0] == 404
    assert http_get(dashboard, "/static/../server.py")[0] == 404


def test_snapshot_request_reaches_the_device_and_its_reply_becomes_the_frame(
    dashboard: DashboardApp, mosquitto: Mosquitto, publisher: Publisher
) -> None:
    received: list[CommandPayload] = []
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fake-device")
    device.on_message = lambda c, u, msg: received.append(CommandPayload.model_validate_json(msg.payload))
    device.connect("127.0.0.1", mosquitto.port)
    device.subscribe(topic(PREFIX, "cam-9", TOPIC_CMD), qos=1)
    device.loop_start()
    try:
        time.sleep(0.3)  # let the subscription settle before the command is sent
        assert http_post(dashboard, "/api/devices/cam-9/snapshot")[0] == 403  # CSRF header missing
        code, _, body = http_post(dashboard, "/api/devices/cam-9/snapshot", b"", ACK_HEADERS)
        assert code == 202
        request_id = json.loads(body)["request_id"]
        wait_until(lambda: received, 5, "the snapshot command at the device")
        assert received[0].command == "snapshot" and received[0].request_id == request_id
    finally:
        device.disconnect()
        device.loop_stop()

    jpeg = make_jpeg(40, 30)
    snap = SnapshotPayload(
        device_id="cam-9", timestamp=time.time(), frame_id=3, request_id=request_id, jpeg_b64=b64(jpeg)
    )
    publisher.publish("cam-9", TOPIC_SNAPSHOT, snap)
    wait_until(lambda: http_get(dashboard, "/devices/cam-9/frame.jpg")[2] == jpeg, 5, "the snapshot as frame")
    (dev,) = get_json(dashboard, "/api/state")["devices"]
    assert dev["frame"]["source"] == "snapshot"

    mosquitto.stop()
    wait_until(lambda: not dashboard.state.broker.connected, 5, "the broker link to drop")
    code, _, body = http_post(dashboard, "/api/devices/cam-9/snapshot", b"", ACK_HEADERS)
    assert code == 503 and b"not connected" in body


def test_payloads_that_would_break_the_page_or_lie_are_refused(dashboard, publisher) -> None:
    from drywallqa.dashboard.bridge import MAX_JPEG_BYTES

    good = status("cam-n").model_dump()
    publisher.publish("cam-n", TOPIC_STATUS, json.dumps({**good, "fps": float("nan")}))  # Python writes NaN
    publisher.publish("cam-n", TOPIC_STATUS, json.dumps({**good, "version": 99}))
    publisher.publish("cam-n", TOPIC_STATUS, status("spoofed"))  # another device's name on cam-n's topic
    huge = b"\xff\xd8" + bytes(MAX_JPEG_BYTES)
    publisher.publish("cam-n", TOPIC_ALERTS, alert("cam-n", "evt-huge", huge))
    publisher.publish("cam-n", TOPIC_STATUS, status("cam-n", state="paused"))
    wait_until(lambda: get_json(dashboard, "/api/state")["devices"], 5, "the valid status")
    code, _, body = http_get(dashboard, "/api/state")

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in /api/state: not JSON, a browser's JSON.parse fails on it")

    state = json.loads(body, parse_constant=no_constants)
    assert [d["status"]["device_id"] for d in state["devices"]] == ["cam-n"]
    assert state["devices"][0]["status"]["state"] == "paused"
    assert state["broker"]["invalid_messages"] == 4, (state["broker"], state["alerts"])
    (kept,) = state["alerts"]  # the alert itself is kept, without its oversized picture
    assert kept["event_id"] == "evt-huge" and kept["snapshot_url"] is None
    assert "over the 4 MiB limit" in state["broker"]["last_invalid"]


def test_review_lists_a_folder_whose_file_names_are_not_utf8(dashboard, tmp_path: Path) -> None:
    import os

    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "wall.jpg"), np.full((24, 32, 3), 128, np.uint8))
    odd = os.path.join(os.fsencode(images), b"caf\xe9.jpg")
    with open(odd, "wb") as f:
        f.write(cv2.imencode(".jpg", np.full((24, 32, 3), 90, np.uint8))[1].tobytes())
    code, _, body = http_get(dashboard, f"/review?images={images}")
    assert code == 200 and b"wall" in body
    assert b"1 file(s) skipped: their names are not UTF-8" in body


def test_negative_content_length_is_refused_at_once(dashboard) -> None:
    code, _, _ = http_post(dashboard, "/login", b"", {"Content-Length": "-1"})
    assert code == 400


def test_start_up_errors_name_what_is_wrong(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    (tmp_path / "token").write_bytes(b"\xff\xfe" + bytes(range(128, 160)))
    store = ["--port", "0", "--store", str(tmp_path / "s.sqlite")]
    cases = [
        (["--port", "0", "--store", str(tmp_path / "afile" / "x.sqlite")], "cannot open dashboard store"),
        ([*store, "--mqtt-tls-ca", str(tmp_path / "missing.pem")], "--mqtt-tls-ca"),
        ([*store, "--mqtt-tls-ca", str(tmp_path / "bad.pem")], "cannot load it as a CA file"),
        ([*store, "--prefix", "site/#"], "MQTT wildcards"),
        ([*store, "--review-root", str(tmp_path / "nowhere")], "is not a folder"),
        ([*store, "--token-file", str(tmp_path / "token")], "is not UTF-8 text"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exc:
            dashboard_main(argv)
        assert expected in str(exc.value) and "cannot listen" not in str(exc.value), (argv, exc.value)
    monkeypatch.setenv("DRYWALLQA_DASHBOARD_TOKEN", " " * 24)  # blank is no token, whatever its length
    with pytest.raises(SystemExit, match="without a token"):
        dashboard_main(["--host", "0.0.0.0", *store])


def test_alert_pages_and_totals_through_the_api(dashboard, publisher) -> None:
    snap = make_jpeg()
    sent = time.time() - 600  # a plausible device clock: listed by it
    for i in range(7):
        publisher.publish("cam-1", TOPIC_ALERTS, alert("cam-1", f"evt-{i}", snap, timestamp=sent + i))
    wait_until(lambda: len(get_json(dashboard, "/api/alerts")) == 7, 10, "7 alerts stored")
    first = get_json(dashboard, "/api/alerts?limit=3")
    assert [a["event_id"] for a in first] == ["evt-6", "evt-5", "evt-4"]
    last = first[-1]
    older = get_json(dashboard, f"/api/alerts?limit=10&before={last['sort_time']}&before_id={last['event_id']}")
    assert [a["event_id"] for a in older] == ["evt-3", "evt-2", "evt-1", "evt-0"]
    assert http_get(dashboard, "/api/alerts?before=soon")[0] == 400
    assert http_get(dashboard, "/api/alerts?before=nan")[0] == 400
    sse = SSE(dashboard)
    try:
        assert sse.wait_for("state")["alert_counts"] == {"open": 7, "acknowledged": 0, "total": 7}
        assert http_post(dashboard, "/api/alerts/evt-2/ack", b"{}", ACK_HEADERS)[0] == 200
        assert sse.wait_for("alert_counts") == {"open": 6, "acknowledged": 1, "total": 7}
    finally:
        sse.close()


def test_a_retained_last_will_and_a_forgotten_device(dashboard, publisher, mosquitto) -> None:
    """A will that was retained before the dashboard started keeps its own time (the dashboard cannot know when
    the device died); forgetting a device clears its retained status, so it stays gone after a restart."""
    died = time.time() - 3600
    publisher.publish("cam-gone", TOPIC_STATUS, status("cam-gone"), retain=True)  # it reports, then dies
    wait_until(lambda: get_json(dashboard, "/api/state")["devices"], 5, "the online status")
    will = status("cam-gone", state="offline", timestamp=died, frames_processed=50, last_will=True)
    publisher.publish("cam-gone", TOPIC_STATUS, will, retain=True)
    wait_until(lambda: get_json(dashboard, "/api/state")["devices"][0]["status"]["state"] == "offline", 5, "the will")
    (dev,) = get_json(dashboard, "/api/state")["devices"]
    assert dev["status"]["state"] == "offline" and dev["status"]["last_will"] is True
    # This will arrived live (the dashboard was running and heard the device), so it is dated on arrival.
    assert dev["status"]["timestamp"] > died + 3000

    assert http_post(dashboard, "/api/devices/cam-gone/forget", b"")[0] == 403  # CSRF header required
    code, _, body = http_post(dashboard, "/api/devices/cam-gone/forget", b"", {"X-DrywallQA": "1"})
    assert code == 200 and json.loads(body) == {"forgotten": "cam-gone"}
    assert get_json(dashboard, "/api/state")["devices"] == []
    time.sleep(0.5)  # the broker handles the cleared retained status
    with running_dashboard(dashboard.config.store_path.parent / "second", mosquitto.port) as second:
        wait_until(lambda: second.state.broker.connected, 10, "second dashboard connects")
        publisher.publish("cam-late", TOPIC_STATUS, will.model_copy(update={"device_id": "cam-late"}), retain=True)
        wait_until(lambda: get_json(second, "/api/state")["devices"], 5, "the retained will of cam-late")
        devices = get_json(second, "/api/state")["devices"]
    assert [d["device_id"] for d in devices] == ["cam-late"]  # cam-gone's retained status was cleared


def test_a_retained_will_seen_at_start_up_keeps_its_time(tmp_path: Path, mosquitto, publisher) -> None:
    died = time.time() - 3600
    will = status("cam-old", state="offline", timestamp=died, frames_processed=50, last_will=True)
    publisher.publish("cam-old", TOPIC_STATUS, will, retain=True)
    with running_dashboard(tmp_path, mosquitto.port) as app:
        wait_until(lambda: get_json(app, "/api/state")["devices"], 10, "the retained will")
        (dev,) = get_json(app, "/api/state")["devices"]
        connected = app.state.broker.since
    assert dev["status"]["timestamp"] == pytest.approx(died) and dev["status"]["frames_processed"] == 50
    assert dev["status"]["offline_since_before"] == connected  # the page: "offline since before <connection>"


def test_a_restarted_dashboard_never_reuses_a_frame_url(tmp_path: Path, mosquitto, publisher) -> None:
    """Frame URLs are cached by the browser for an hour: a page left open across a dashboard restart must not be
    shown the frame it cached before the restart under the URL of a new one."""
    frames = {}
    for run, color in (("first", (0, 0, 255)), ("second", (0, 255, 0))):
        with running_dashboard(tmp_path, mosquitto.port) as app:
            wait_until(lambda: app.state.broker.connected, 10, "dashboard to connect")
            jpeg = make_jpeg(color=color)
            publisher.publish("cam-1", TOPIC_DETECTIONS, detection("cam-1", preview=jpeg))
            (dev,) = wait_until(lambda: [d for d in get_json(app, "/api/state")["devices"] if d["frame"]], 10,  # noqa: B023
                                "the frame")
            assert http_get(app, dev["frame"]["url"])[2] == jpeg
            frames[run] = dev["frame"]["url"]
    assert frames["first"] != frames["second"]


def test_a_broker_replaying_retained_statuses_does_not_make_a_quiet_device_look_alive(tmp_path: Path) -> None:
    """A retained status is replayed by the broker at every (re)subscribe; it is not news from the device. Else a
    device that went quiet (powered off while the broker was down, so no last will) would be shown online again,
    with "nothing heard since" moved to now, after every broker restart or dashboard start."""
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()  # keeps the retained status over a restart
    try:
        sent = time.time() - 600
        with running_dashboard(tmp_path, broker.port) as app:
            wait_until(lambda: app.state.broker.connected, 10, "dashboard to connect")
            sse = SSE(app)
            try:
                sse.wait_for("state")
                with running_publisher(broker.port) as pub:
                    pub.publish("cam-quiet", TOPIC_STATUS, status("cam-quiet", timestamp=sent), retain=True)
                heard = sse.wait_for("device", lambda d: d["device_id"] == "cam-quiet")["last_seen"]
                assert heard > sent + 500  # it came live: heard now
                broker.stop()
                broker.start()
                replayed = sse.wait_for("device", lambda d: d["device_id"] == "cam-quiet", timeout=30)
            finally:
                sse.close()
        assert replayed["status"]["state"] == "online" and replayed["last_seen"] == heard
        with running_dashboard(tmp_path / "later", broker.port) as later:  # first seen as a retained status
            wait_until(lambda: get_json(later, "/api/state")["devices"], 10, "the retained status")
            (dev,) = get_json(later, "/api/state")["devices"]
        assert dev["last_seen"] == pytest.approx(sent, abs=1)
    finally:
        broker.stop()
