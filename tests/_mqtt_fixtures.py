"""Test helpers: a real mosquitto on a free loopback port (stoppable/restartable) and a message collector."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from drywallqa.edge.broker import EmbeddedBroker

MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, what: str | None = None, *, interval: float = 0.05
) -> object:
    """The first truthy value of predicate() within timeout s (checked once more at the deadline). On timeout:
    raise AssertionError when `what` names the awaited thing, else return the last (falsy) value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    value = predicate()
    if not value and what is not None:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    return value


class Mosquitto(EmbeddedBroker):
    """The edge's own embedded broker on 127.0.0.1:port (a free one by default), config and log in workdir;
    with persistence (the default) sessions survive stop()/start(). Skips the test when mosquitto is missing."""

    def __init__(self, workdir: Path, port: int | None = None, *, persistence: bool = True) -> None:
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        super().__init__(port or free_port(), MOSQUITTO, workdir=workdir, persistence=persistence)

    def log(self) -> str:
        p = self.workdir / "mosquitto.log"
        return p.read_text(errors="replace") if p.exists() else ""


class Collector:
    """Subscribes (QoS 1, persistent session) and records every message; reconnects by itself."""

    def __init__(self, port: int, topics: str | list[str] = "#", client_id: str = "test-collector") -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.topics = [topics] if isinstance(topics, str) else topics
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        for t in self.topics:
            client.subscribe(t, qos=1)
        self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def payloads(self, suffix: str) -> list[dict]:
        with self._lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith("/" + suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mosquitto_fixture(tmp_path: Path) -> Iterator[Mosquitto]:
    """Use as `mosquitto = pytest.fixture(mosquitto_fixture, name="mosquitto")` (or register it in conftest.py)."""
    broker = Mosquitto(tmp_path / "broker").start()
    yield broker
    broker.stop()
