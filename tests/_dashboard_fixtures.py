"""Shared helpers for the dashboard tests: a real mosquitto on a free loopback port (_mqtt_fixtures.Mosquitto),
payload builders, a dashboard app bound to a free port, and small real JPEGs. Test modules wrap the context managers
in their own small fixtures."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from _mqtt_fixtures import MOSQUITTO, Mosquitto, free_port, wait_until

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
# What the page sends with a POST (the server refuses a POST without the custom header: CSRF).
POST_HEADERS = {"X-DrywallQA": "1", "Content-Type": "application/json"}


@contextlib.contextmanager
def running_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started broker without persistence (the test is skipped when mosquitto is not installed); stopped on exit."""
    broker = Mosquitto(tmp_path, persistence=False).start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class SecuredBroker:
    """A mosquitto on 127.0.0.1:port that takes only TLS (certificate for localhost and 127.0.0.1, from `ca`) and
    the login `username` / `password`; with require_certificate, also only clients with a cert from `ca`."""

    port: int
    ca: Path
    other_ca: Path  # a CA that did not sign the broker's certificate
    client_cert: Path
    client_key: Path
    username: str = "dashboard"
    password: str = "mqtt-pass-Qx7"

    def log(self) -> str:
        return _read(self.ca.parent / "mosquitto.log")


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _make_certificates(d: Path) -> None:
    """ca.pem, other_ca.pem, server.pem/.key (localhost, 127.0.0.1) and client.pem/.key, signed by ca.pem."""
    for name in ("ca", "other_ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                 "-keyout", d / f"{name}.key", "-out", d / f"{name}.pem")
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", d / "san.cnf"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", d / f"{name}.key",
                 "-out", d / f"{name}.csr")
        _openssl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", d / f"{name}.pem", *ext)


@contextlib.contextmanager
def secured_mosquitto(tmp_path: Path, *, require_certificate: bool = False) -> Iterator[SecuredBroker]:
    if MOSQUITTO is None or shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("needs mosquitto, mosquitto_passwd and openssl")
    d = tmp_path / "tls-broker"
    d.mkdir()
    _make_certificates(d)
    broker = SecuredBroker(free_port(), d / "ca.pem", d / "other_ca.pem", d / "client.pem", d / "client.key")
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(d / "passwd"), broker.username, broker.password], check=True)
    (d / "mosquitto.conf").write_text(
        f"listener {broker.port} 127.0.0.1\ncafile {d / 'ca.pem'}\ncertfile {d / 'server.pem'}\n"
        f"keyfile {d / 'server.key'}\nrequire_certificate {str(require_certificate).lower()}\n"
        f"allow_anonymous false\npassword_file {d / 'passwd'}\nlog_dest file {d / 'mosquitto.log'}\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    proc = subprocess.Popen([MOSQUITTO, "-c", str(d / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: "running" in _read(d / "mosquitto.log") or proc.poll() is not None, 10, "mosquitto")
        assert proc.poll() is None, _read(d / "mosquitto.log")
        yield broker
    finally:
        proc.terminate()
        proc.wait(10)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def make_app(
    tmp_path: Path, broker_port: int, clock: Callable[[], float] = time.time, **overrides
) -> DashboardApp:
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
    return DashboardApp(config, clock=clock)


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
    app: DashboardApp,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    source: str | None = None,
) -> tuple[int, dict, bytes]:
    """One request on a fresh connection; `source` picks the client's address (any 127.x.y.z on Linux)."""
    host, port = app.address
    conn = http.client.HTTPConnection(host, port, timeout=10, source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        res = conn.getresponse()
        return res.status, dict(res.getheaders()), res.read()
    finally:
        conn.close()


def http_get(
    app: DashboardApp, path: str, headers: dict[str, str] | None = None, source: str | None = None
) -> tuple[int, dict, bytes]:
    return http_request(app, "GET", path, headers=headers, source=source)


def http_post(
    app: DashboardApp,
    path: str,
    body: bytes | str = b"",
    headers: dict[str, str] | None = None,
    source: str | None = None,
) -> tuple[int, dict, bytes]:
    return http_request(app, "POST", path, body, headers, source)


def get_json(app: DashboardApp, path: str, headers: dict[str, str] | None = None) -> object:
    code, _, body = http_get(app, path, headers)
    assert code == 200, (code, body[:300])
    return json.loads(body)


NODE = shutil.which("node") or shutil.which("nodejs")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (apt-get install nodejs)")
APP_JS = Path(__file__).resolve().parents[1] / "dashboard" / "static" / "app.js"

# The page's app.js in Node with a minimal DOM: each element is a plain object keeping its text and children, so a
# test calls the page's own render functions and reads what they would show. The test's script runs after app.js,
# with `app(name)` (a top-level name of app.js), `nodes` (elements fetched by id), `text(element)` (its text and
# its children's) and `args` (run_app_js's arguments) in scope, and prints its result as JSON last.
_APP_JS_HARNESS = """
const fs = require("fs"), vm = require("vm");
const nodes = {};
const node = (tag) => ({ tag, textContent: "", hidden: false, title: "", children: [], dataset: {},
  append(...c) { this.children.push(...c); }, setAttribute() {}, addEventListener() {}, replaceChildren() {} });
const document = { getElementById: (id) => nodes[id] ??= node(id), createElement: node, addEventListener() {},
  body: { dataset: {} } };
const context = { document, console, Date, Map, Set, Math, JSON, URLSearchParams, window: {}, setTimeout: () => 0,
  setInterval() {}, EventSource: function () {} };
vm.createContext(context);
vm.runInContext(fs.readFileSync(process.argv[1], "utf8"), context);
const app = (name) => vm.runInContext(name, context);
const text = (n) => n == null ? "" : typeof n === "string" ? n : n.textContent + " " + n.children.map(text).join(" ");
const args = process.argv.slice(2);
"""


def run_app_js(script: str, *args: str) -> object:
    """Run dashboard/static/app.js, then `script` (see _APP_JS_HARNESS), in Node; returns what it printed last."""
    assert NODE is not None, "node is not installed (apt-get install nodejs)"
    out = subprocess.run([NODE, "-e", _APP_JS_HARNESS + script, str(APP_JS), *args], capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
