"""MQTT -> dashboard bridge: subscribes to the edge topics, validates payloads, updates state and store."""

from __future__ import annotations

import base64
import binascii
import logging
import socket
import threading
import uuid
from dataclasses import dataclass

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


class PayloadError(ValueError):
    """A message on a dashboard topic that does not match the payload schema."""


def decode_jpeg_b64(text: str, what: str) -> bytes:
    """Base64 -> JPEG bytes; PayloadError when it is not base64 or not a JPEG."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadError(f"{what} is not valid base64: {exc}") from exc
    if not data.startswith(b"\xff\xd8"):
        raise PayloadError(f"{what} is not a JPEG (missing FFD8 start marker)")
    return data


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
            self.client.tls_set(ca_certs=config.tls_ca)
        self.client.reconnect_delay_set(min_delay=1, max_delay=max(1, config.reconnect_max_s))
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.state.broker.url = config.url
        self._started = threading.Event()

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
            self.handle(msg.topic, msg.payload)
        except PayloadError as exc:
            log.warning("ignored message on %s: %s", msg.topic, exc)
            self.state.note_invalid(f"{msg.topic}: {exc}")
        except Exception as exc:  # never let one message kill the network thread
            log.exception("error handling message on %s", msg.topic)
            self.state.note_invalid(f"{msg.topic}: internal error {exc!r}")

    # --- message handling (also called directly by tests) -----------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) < 2 or "/".join(parts[:-2]) != self.prefix:
            raise PayloadError(f"unexpected topic {topic!r} (prefix {self.prefix!r})")
        leaf = parts[-1]
        if not payload:  # a cleared retained message
            return
        try:
            if leaf == TOPIC_STATUS:
                self.state.update_status(StatusPayload.model_validate_json(payload))
            elif leaf == TOPIC_DETECTIONS:
                det = DetectionPayload.model_validate_json(payload)
                preview = (
                    decode_jpeg_b64(det.preview_jpeg_b64, "preview_jpeg_b64")
                    if det.preview_jpeg_b64
                    else None
                )
                self.state.update_detection(det, preview)
            elif leaf == TOPIC_SNAPSHOT:
                snap = SnapshotPayload.model_validate_json(payload)
                self.state.update_snapshot(snap, decode_jpeg_b64(snap.jpeg_b64, "jpeg_b64"))
            elif leaf == TOPIC_ALERTS:
                self._handle_alert(AlertPayload.model_validate_json(payload))
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
                self.state.publish("alert", stored)
        if problem:
            raise PayloadError(f"alert {alert.event_id}: {problem}")
