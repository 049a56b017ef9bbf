"""MQTT -> dashboard bridge: subscribes to the edge topics, validates payloads, updates state and store."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import socket
import ssl
import sys
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from drywallqa.edge.mqtt_link import LogThrottle
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

from .limits import id_problem
from .state import LiveState
from .store import AlertStore, StoreError

log = logging.getLogger(__name__)

LEAVES = (TOPIC_STATUS, TOPIC_DETECTIONS, TOPIC_ALERTS, TOPIC_SNAPSHOT)


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "drywallqa"
    client_id: str = ""
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line or a traceback
    tls: bool = False  # TLS with the system's CAs; a CA file or a client certificate turns it on as well
    tls_ca: str | None = None
    tls_cert: str | None = None  # client certificate (PEM), for a broker with require_certificate
    tls_key: str | None = None  # its private key, unless the certificate file holds it
    tls_insecure: bool = False  # skip the host name check (testing only)
    keepalive: int = 15
    reconnect_max_s: int = 5

    @property
    def tls_enabled(self) -> bool:
        return self.tls or bool(self.tls_ca or self.tls_cert or self.tls_key)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls_enabled else 'mqtt'}://{self.host}:{self.port}"


class BrokerConfigError(ValueError):
    """Broker settings that cannot work (a prefix with MQTT wildcards, an unreadable CA file)."""


class PayloadError(ValueError):
    """A message on a dashboard topic that does not match the payload schema."""


class DeviceOfflineError(RuntimeError):
    """A command for a device the dashboard knows to be offline: it was not sent."""


PENDING_REQUESTS = 256  # snapshot requests remembered until answered (the oldest forgotten beyond that)


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
        if config.tls_enabled:
            _set_tls(self.client, config)
        elif config.tls_insecure:
            raise BrokerConfigError("--mqtt-tls-insecure without TLS: add --mqtt-tls or --mqtt-tls-ca")
        self.client.reconnect_delay_set(min_delay=1, max_delay=max(1, config.reconnect_max_s))
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.state.broker.url = config.url
        self._started = threading.Event()
        self._announce_lock = threading.Lock()
        self._trouble = LogThrottle()  # a broker that refuses or cannot be reached: logged once a minute
        self._refused = False  # the broker refused this connection's login: its disconnect says nothing new
        self._requests: OrderedDict[str, str] = OrderedDict()  # snapshot request id -> device id, until answered
        self._requests_lock = threading.Lock()

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
        """Ask a device for a fresh annotated frame (it answers on its `snapshot` topic); returns the request id.
        DeviceOfflineError, and nothing sent, for a device shown offline: it would not answer."""
        cmd_topic = self._device_topic(device_id, TOPIC_CMD)
        if not self.state.broker.connected:
            raise ConnectionError(self._not_connected("the snapshot request was not sent"))
        offline = self.state.offline_since(device_id)
        if offline is not None:
            when, before = offline
            raise DeviceOfflineError(
                f"device {device_id} is offline since {'before ' if before else ''}{_local_time(when)}; the snapshot "
                "request was not sent. Request one again once the device is back online."
            )
        request_id = uuid.uuid4().hex
        command = CommandPayload(command="snapshot", request_id=request_id)
        with self._requests_lock:
            self._requests[request_id] = device_id
            while len(self._requests) > PENDING_REQUESTS:
                self._requests.popitem(last=False)
        info = self.client.publish(cmd_topic, command.model_dump_json(), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"could not send the snapshot command: {mqtt.error_string(info.rc)}")
        return request_id

    def _answers_request(self, snap: SnapshotPayload) -> bool:
        """Whether a snapshot answers a request this dashboard sent to that device (each answers once)."""
        if snap.request_id is None:
            return False
        with self._requests_lock:
            if self._requests.get(snap.request_id) != snap.device_id:
                return False
            del self._requests[snap.request_id]
        return True

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
            raise ConnectionError(self._not_connected("the device's retained status was not cleared"))
        info = self.client.publish(self._device_topic(device_id, TOPIC_STATUS), b"", qos=1, retain=True)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"could not clear the device's retained status: {mqtt.error_string(info.rc)}")
        self.state.remove_device(device_id)

    def _not_connected(self, what: str) -> str:
        """Why a command was refused while the broker link is down, and what to do about it."""
        return (f"not connected to the broker {self.config.url} ({self.state.broker.detail}): {what}. The dashboard "
                "reconnects by itself: try again once the page shows 'broker: connected'.")

    def _device_topic(self, device_id: str, leaf: str) -> str:
        """A topic of one device: an id from a request that spans topic levels or holds a wildcard would send a
        command to (or clear the retained message of) some other topic under the prefix."""
        if not device_id or any(ch in device_id for ch in "/+#\0"):
            raise ValueError(f"invalid device id {device_id!r}: one MQTT topic level, without '/', '+' or '#'")
        return topic(self.prefix, device_id, leaf)

    # --- paho callbacks (run on the paho thread) ---------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:  # bad user name or password, not authorised, ...: paho retries
            self._refused = True
            detail = f"broker {self.config.url} refused the connection: {reason_code}"
            if reason_code.value in (134, 135):  # bad user name or password / not authorized
                detail += " (check --mqtt-username and the password in $DRYWALLQA_DASHBOARD_MQTT_PASSWORD)"
            self._trouble_detail(detail + "; retrying")
            return
        self._refused = False
        self._trouble.reset()
        client.subscribe([(f"{self.prefix}/+/{leaf}", 1) for leaf in LEAVES])
        self.state.set_broker(True, f"connected to {self.config.url}")
        log.info("connected to %s", self.config.url)

    def _on_connect_fail(self, client, userdata) -> None:
        """paho calls this inside its `except OSError`: the exception says why (refused, unknown host, TLS)."""
        detail = f"cannot reach broker {self.config.url}: {_connect_error(sys.exc_info()[1])}; retrying"
        self._trouble_detail(detail, logging.WARNING)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._refused:  # the broker closes a refused login: keep saying why
            return
        detail = f"connection lost ({reason_code}); reconnecting"
        if self.state.broker.connected:
            log.warning("disconnected from %s: %s", self.config.url, reason_code)
        self.state.set_broker(False, detail)

    def _trouble_detail(self, detail: str, level: int = logging.ERROR) -> None:
        """Show a connection trouble on the page at every retry and in the log at first and once a minute."""
        self.state.set_broker(False, detail)
        if self._trouble.hit():
            log.log(level, "%s (%d failed attempt(s) so far)", detail, self._trouble.count)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            self.handle(msg.topic, msg.payload, retained=bool(msg.retain))
        except PayloadError as exc:
            log.warning("ignored message on %s: %s", msg.topic, exc)
            self.state.note_invalid(f"{msg.topic}: {exc}")
        except StoreError as exc:  # the alert is lost (the broker has it acknowledged): say why, where it is seen
            log.error("%s: %s", msg.topic, exc)
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
        too_long = id_problem("the device id", device)
        if too_long:
            raise PayloadError(f"{too_long} (topic {topic[:80]}...)")
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
                self.state.update_detection(det, preview, retained=retained)
            elif leaf == TOPIC_SNAPSHOT:
                snap = _same_device(SnapshotPayload.model_validate_json(payload), device)
                jpeg = decode_jpeg_b64(snap.jpeg_b64, "jpeg_b64")
                self.state.update_snapshot(snap, jpeg, answers_request=self._answers_request(snap))
            elif leaf == TOPIC_ALERTS:
                self._handle_alert(_same_device(AlertPayload.model_validate_json(payload), device))
            else:
                raise PayloadError(f"unexpected topic leaf {leaf!r}")
        except ValidationError as exc:
            raise PayloadError(f"invalid {leaf} payload: {exc}") from exc

    def _handle_alert(self, alert: AlertPayload) -> None:
        too_long = id_problem("event_id", alert.event_id)
        if too_long:
            raise PayloadError(f"alert refused: its {too_long}")
        try:
            jpeg = decode_jpeg_b64(alert.snapshot_jpeg_b64, "snapshot_jpeg_b64")
            problem = ""
        except PayloadError as exc:  # keep the alert itself: losing it would be worse than a missing picture
            jpeg, problem = b"", str(exc)
        if not self.store.add_alert(alert, jpeg):
            return  # a repeat (QoS 1, a device's spool, a watched photo after a restart): already told
        stored = self.store.get(alert.event_id)
        if stored is not None:
            self.announce_alert(stored)
        if problem:  # reported with the ignored messages, but this alert is listed: say so
            raise PayloadError(f"alert {alert.event_id} kept without its picture: {problem}")


def _set_tls(client: mqtt.Client, config: BrokerConfig) -> None:
    """TLS to the broker, the server's certificate always verified; a file that cannot be used stops the start."""
    if config.tls_key and not config.tls_cert:
        raise BrokerConfigError("--mqtt-tls-key needs --mqtt-tls-cert (the client certificate it belongs to)")
    for option, path in (("--mqtt-tls-ca", config.tls_ca), ("--mqtt-tls-cert", config.tls_cert),
                         ("--mqtt-tls-key", config.tls_key)):
        if path and not os.path.isfile(os.path.expanduser(path)):
            raise BrokerConfigError(f"{option} {path}: no such file")
    try:
        client.tls_set(ca_certs=_expand(config.tls_ca), certfile=_expand(config.tls_cert),
                       keyfile=_expand(config.tls_key), cert_reqs=ssl.CERT_REQUIRED,
                       keyfile_password=_no_passphrase)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        what = (f"--mqtt-tls-ca {config.tls_ca}: cannot load it as a CA file" if config.tls_ca and not config.tls_cert
                else f"TLS files (--mqtt-tls-ca {config.tls_ca}, --mqtt-tls-cert {config.tls_cert}, "
                     f"--mqtt-tls-key {config.tls_key}): cannot load them")
        raise BrokerConfigError(f"{what}: {exc}") from exc
    client.tls_insecure_set(config.tls_insecure)
    if config.tls_insecure:
        log.warning("--mqtt-tls-insecure: the broker's certificate is not checked against %s (testing only)",
                    config.host)


def _local_time(timestamp: float) -> str:
    """A unix time as the dashboard host's local date and time, with its zone."""
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _expand(path: str | None) -> str | None:
    return os.path.expanduser(path) if path else None


def _no_passphrase() -> bytes:
    """An encrypted client key fails with an error instead of OpenSSL asking for its passphrase on the terminal."""
    return b""


def _connect_error(exc: BaseException | None) -> str:
    """Why a connection attempt failed, with what to check for the usual causes."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: the broker's certificate is not accepted ({exc.verify_message}; check --mqtt-tls-ca, and "
                "that --mqtt-host is a name the certificate is for)")
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc}; check --mqtt-tls-ca, --mqtt-tls-cert and --mqtt-tls-key)"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return "connection failed"


def _same_device(payload: _DevicePayload, topic_device: str) -> _DevicePayload:
    """A payload speaks for the device of its topic: one that names another device is refused, so a client on the
    broker cannot pass itself off as a camera it is not publishing for."""
    if payload.device_id != topic_device:
        raise PayloadError(f"payload device_id {payload.device_id!r} differs from the topic's device {topic_device!r}")
    return payload
