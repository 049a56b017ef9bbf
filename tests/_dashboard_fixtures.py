"""Shared helpers for the dashboard tests: a real mosquitto on a free loopback port (_mqtt_fixtures.Mosquitto),
payload builders, a dashboard app bound to a free port, and small real JPEGs. Test modules wrap the context managers
in their own small fixtures."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
from _mqtt_fixtures import Mosquitto

from drywallqa.dashboard.bridge import BrokerConfig
from drywallqa.dashboard.server import DashboardApp, DashboardConfig
from drywallqa.edge.payloads import (
    AlertPayload,
    ClassResult,
    DetectionPayload,
    Region,
    StatusPayload,
    topic,
)

PREFIX = "dqtest"


@contextlib.contextmanager
def running_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started broker without persistence (the test is skipped when mosquitto is not installed); stopped on exit."""
    broker = Mosquitto(tmp_path, persistence=False).start()
    try:
        yield broker
    finally:
        broker.stop()


def make_app(tmp_path: Path, broker_port: int, **overrides) -> DashboardApp:
    config = DashboardConfig(
        host="127.0.0.1",
        port=0,
        store_path=tmp_path / "dashboard.sqlite",
        review_roots=[tmp_path],
        broker=BrokerConfig(
            host="127.0.0.1",
            port=broker_port,
            prefix=PREFIX,
            client_id=f"dash-{uuid.uuid4().hex[:8]}",
            keepalive=5,
            reconnect_max_s=1,
        ),
        heartbeat_s=1.0,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return DashboardApp(config)


@contextlib.contextmanager
def running_dashboard(tmp_path: Path, broker_port: int, **overrides) -> Iterator[DashboardApp]:
    """A started dashboard on a free port; waits for its broker link unless the broker is meant to be down."""
    app = make_app(tmp_path, broker_port, **overrides).start()
    try:
        yield app
    finally:
        app.stop()


class Publisher:
    """A device-side MQTT client publishing validated payloads (QoS 1, waits for the broker's ack)."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, device_id: str, leaf: str, payload: bytes | str | object, retain: bool = False) -> None:
        data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else payload
        info = self.client.publish(topic(PREFIX, device_id, leaf), data, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def running_publisher(port: int) -> Iterator[Publisher]:
    pub = Publisher(port)
    try:
        yield pub
    finally:
        pub.close()


def make_jpeg(width: int = 96, height: int = 64, color: tuple[int, int, int] = (30, 30, 220)) -> bytes:
    """A small real JPEG (BGR color) with a diagonal 'crack' line on it."""
    img = np.full((height, width, 3), 200, np.uint8)
    cv2.line(img, (5, 5), (width - 5, height - 5), color, 3)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def status(device_id: str, state: str = "online", **kw) -> StatusPayload:
    base = dict(
        device_id=device_id,
        state=state,
        timestamp=time.time(),
        model="hrnet_w18_student",
        source="demo",
        source_state="open",
        prompts=["segment crack", "segment taping area"],
        frames_processed=120,
        fps=9.5,
    )
    return StatusPayload(**{**base, **kw})


def detection(device_id: str, frame_id: int = 7, preview: bytes | None = None) -> DetectionPayload:
    return DetectionPayload(
        device_id=device_id,
        frame_id=frame_id,
        timestamp=time.time(),
        width=96,
        height=64,
        inference_ms=12.5,
        results=[
            ClassResult(
                class_name="crack",
                prompt="segment crack",
                area_fraction=0.015,
                region_count=2,
                regions=[Region(bbox=(5, 5, 80, 50), area_px=90, skeleton_length_px=100.0)],
                skeleton_length_px=123.4,
                mean_confidence=0.81,
            ),
            ClassResult(
                class_name="taping",
                prompt="segment taping area",
                area_fraction=0.25,
                region_count=1,
                mean_confidence=0.66,
            ),
        ],
        preview_jpeg_b64=b64(preview) if preview else None,
    )


def alert(
    device_id: str, event_id: str, snapshot: bytes | None, class_name: str = "crack", **kw
) -> AlertPayload:
    base = dict(
        event_id=event_id,
        device_id=device_id,
        timestamp=time.time(),
        frame_id=7,
        class_name=class_name,
        prompt="segment crack" if class_name == "crack" else "segment taping area",
        rule="skeleton_length_px>=80" if class_name == "crack" else "area_fraction>=0.2",
        area_fraction=0.015,
        skeleton_length_px=123.4 if class_name == "crack" else 0.0,
        region_count=2,
        mean_confidence=0.81,
        persisted_frames=3,
        snapshot_jpeg_b64=b64(snapshot) if snapshot is not None else "not-base64!",
    )
    return AlertPayload(**{**base, **kw})


def http_request(
    app: DashboardApp, method: str, path: str, body: bytes | str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict, bytes]:
    host, port = app.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        res = conn.getresponse()
        return res.status, dict(res.getheaders()), res.read()
    finally:
        conn.close()


def http_get(app: DashboardApp, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    return http_request(app, "GET", path, headers=headers)


def http_post(
    app: DashboardApp, path: str, body: bytes | str = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict, bytes]:
    return http_request(app, "POST", path, body, headers)


def get_json(app: DashboardApp, path: str, headers: dict[str, str] | None = None) -> object:
    code, _, body = http_get(app, path, headers)
    assert code == 200, (code, body[:300])
    return json.loads(body)
