"""MQTT -> dashboard bridge: subscribes to the edge topics, validates payloads, updates state and store."""

from __future__ import annotations

import base64
import binascii
import logging
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import TypeVar

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from drywallqa.edge.payloads import (
    TOPIC_ALERTS,
    TOPIC_CMD,
    TOPIC_DETECTIONS,
    TOPIC_SNAPSHOT,
    TOPIC_STATUS,
    AlertPayload,
    CommandPayload,
    DetectionPayload,
    SnapshotPayload,
    StatusPayload,
    topic,
)

from .state import LiveState
from .store import AlertStore

log = logging.getLogger(__name__)

LEAVES = (TOPIC_STATUS, TOPIC_DETECTIONS, TOPIC_ALERTS, TOPIC_SNAPSHOT)


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "drywallqa"
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    keepalive: int = 15
    reconnect_max_s: int = 5

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls_ca else 'mqtt'}://{self.host}:{self.port}"


class BrokerConfigError(ValueError):
    """Broker settings that cannot work (a prefix with MQTT wildcards, an unreadable CA file)."""


class PayloadError(ValueError):
    """A message on a dashboard topic that does not match the payload schema."""


MAX_JPEG_BYTES = 4 * 2**20  # the edge sends <= 640-px snapshots (~0.1 MiB); far beyond that is not a snapshot


def decode_jpeg_b64(text: str, what: str) -> bytes:
    """Base64 -> JPEG bytes; PayloadError when it is not base64, not a JPEG, or over MAX_JPEG_BYTES (each device's
    latest frames are kept in memory and every alert's picture on disk, so their size must be bounded)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadError(f"{what} is not valid base64: {exc}") from exc
    if len(data) > MAX_JPEG_BYTES:
        raise PayloadError(f"{what} is {len(data) / 2**20:.1f} MiB, over the {MAX_JPEG_BYTES // 2**20} MiB limit for "
                           f"a picture")
    if not data.startswith(b"\xff\xd8"):
        raise PayloadError(f"{what} is not a JPEG (missing FFD8 start marker)")
    return data


_DevicePayload = TypeVar("_DevicePayload", StatusPayload, DetectionPayload, SnapshotPayload, AlertPayload)


class MqttBridge:
    """Owns one paho client running in its own thread; reconnects forever with a capped back-off.

    The session is persistent (clean_session=False, stable client id), so QoS 1 alerts published while the
    dashboard's link was down are delivered when it comes back, as long as the broker kept running.
    """

    def __init__(self, config: BrokerConfig, state: LiveState, store: AlertStore) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.prefix = config.prefix.strip("/")
        if not self.prefix or any(ch in self.prefix for ch in "+#\0"):
            raise BrokerConfigError(f"--prefix {config.prefix!r}: must be non-empty, without '+', '#' (MQTT "
                                    f"wildcards) or NUL")
        client_id = config.client_id or f"drywallqa-dashboard-{socket.gethostname()}"
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        if config.username:
            self.client.username_pw_set(config.username, config.password)
        if config.tls_ca:
            try:
                self.client.tls_set(ca_certs=config.tls_ca)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise BrokerConfigError(f"--mqtt-tls-ca {config.tls_ca}: cannot load it as a CA file: {exc}") from exc
        self.client.reconnect_delay_set(min_delay=1, max_delay=max(1, config.reconnect_max_s))
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.state.broker.url = config.url
        self._started = threading.Event()
        self._announce_lock = threading.Lock()

    def start(self) -> None:
        """Connect in the background: a broker that is down at start-up is retried, not fatal."""
        self.state.set_broker(False, f"connecting to {self.config.url}")
        self.client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive)
        self.client.loop_start()
        self._started.set()

    def stop(self) -> None:
        if self._started.is_set():
            self.client.disconnect()
            self.client.loop_stop()

    def request_snapshot(self, device_id: str) -> str:
        """Ask a device for a fresh annotated frame (it answers on its `snapshot` topic); returns the request id."""
        if not self.state.broker.connected:
            raise ConnectionError(f"not connected to the broker {self.config.url}")
        request_id = uuid.uuid4().hex
        command = CommandPayload(command="snapshot", request_id=request_id)
        info = self.client.publish(topic(self.prefix, device_id, TOPIC_CMD), command.model_dump_json(), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"could not send the snapshot command: {mqtt.error_string(info.rc)}")
        return request_id

    def announce_alert(self, item: dict) -> None:
        """Tell every browser about a new or (un)acknowledged alert, and the store's new totals. Called from the
        MQTT thread (new alerts) and HTTP threads (acks): one at a time, so older totals never follow newer ones."""
        with self._announce_lock:
            self.state.publish("alert", item)
            self.state.publish("alert_counts", self.store.counts())

    def forget_device(self, device_id: str) -> None:
        """Clear the device's retained status on the broker (so neither this dashboard after a restart nor any
        other consumer brings it back) and drop it from the page. A device that is still running reappears with
        its next status."""
        if not self.state.broker.connected:
            raise ConnectionError(f"not connected to the broker {self.config.url}")
        info = self.client.publish(topic(self.prefix, device_id, TOPIC_STATUS), b"", qos=1, retain=True)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"could not clear the device's retained status: {mqtt.error_string(info.rc)}")
        self.state.remove_device(device_id)

    # --- paho callbacks (run on the paho thread) ---------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.state.set_broker(False, f"broker refused connection: {reason_code}")
            return
        client.subscribe([(f"{self.prefix}/+/{leaf}", 1) for leaf in LEAVES])
        self.state.set_broker(True, f"connected to {self.config.url}")
        log.info("connected to %s", self.config.url)

    def _on_connect_fail(self, client, userdata) -> None:
        self.state.set_broker(False, f"cannot reach broker {self.config.url}; retrying")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.state.set_broker(False, f"connection lost ({reason_code}); reconnecting")
        log.warning("disconnected from %s: %s", self.config.url, reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            self.handle(msg.topic, msg.payload, retained=bool(msg.retain))
        except PayloadError as exc:
            log.warning("ignored message on %s: %s", msg.topic, exc)
            self.state.note_invalid(f"{msg.topic}: {exc}")
        except Exception as exc:  # never let one message kill the network thread
            log.exception("error handling message on %s", msg.topic)
            self.state.note_invalid(f"{msg.topic}: internal error {exc!r}")

    # --- message handling (also called directly by tests) -----------------------------------------
    def handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        parts = topic.split("/")
        if len(parts) < 2 or "/".join(parts[:-2]) != self.prefix:
            raise PayloadError(f"unexpected topic {topic!r} (prefix {self.prefix!r})")
        leaf, device = parts[-1], parts[-2]
        if not payload:  # a cleared retained message: a cleared status means the device was retired
            if leaf == TOPIC_STATUS:
                self.state.remove_device(device)
            return
        try:
            if leaf == TOPIC_STATUS:
                status = _same_device(StatusPayload.model_validate_json(payload), device)
                self.state.update_status(status, retained=retained)
            elif leaf == TOPIC_DETECTIONS:
                det = _same_device(DetectionPayload.model_validate_json(payload), device)
                preview = (
                    decode_jpeg_b64(det.preview_jpeg_b64, "preview_jpeg_b64")
                    if det.preview_jpeg_b64
                    else None
                )
                self.state.update_detection(det, preview)
            elif leaf == TOPIC_SNAPSHOT:
                snap = _same_device(SnapshotPayload.model_validate_json(payload), device)
                self.state.update_snapshot(snap, decode_jpeg_b64(snap.jpeg_b64, "jpeg_b64"))
            elif leaf == TOPIC_ALERTS:
                self._handle_alert(_same_device(AlertPayload.model_validate_json(payload), device))
            else:
                raise PayloadError(f"unexpected topic leaf {leaf!r}")
        except ValidationError as exc:
            raise PayloadError(f"invalid {leaf} payload: {exc}") from exc

    def _handle_alert(self, alert: AlertPayload) -> None:
        try:
            jpeg = decode_jpeg_b64(alert.snapshot_jpeg_b64, "snapshot_jpeg_b64")
            problem = ""
        except PayloadError as exc:  # keep the alert itself: losing it would be worse than a missing picture
            jpeg, problem = b"", str(exc)
        if self.store.add_alert(alert, jpeg):
            stored = self.store.get(alert.event_id)
            if stored is not None:  # None only if it was trimmed at once (max_alerts reached by older times)
                self.announce_alert(stored)
        if problem:
            raise PayloadError(f"alert {alert.event_id}: {problem}")


def _same_device(payload: _DevicePayload, topic_device: str) -> _DevicePayload:
    """A payload speaks for the device of its topic: one that names another device is refused, so a client on the
    broker cannot pass itself off as a camera it is not publishing for."""
    if payload.device_id != topic_device:
        raise PayloadError(f"payload device_id {payload.device_id!r} differs from the topic's device {topic_device!r}")
    return payload
