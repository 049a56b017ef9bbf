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
import time
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


class AlertHeld(StoreError):
    """The store could not write an alert: it is held in memory and written as soon as the store can be
    (MqttBridge.retry_held). `withheld`: its PUBACK is withheld, so the broker still has it as well."""

    def __init__(self, message: str, withheld: bool) -> None:
        super().__init__(message)
        self.withheld = withheld


# mosquitto sends a client at most max_inflight_messages (default 20) QoS 1 messages it has not acknowledged, then
# holds back every other one for it: withholding more than a few PUBACKs would stall statuses and alerts alike.
WITHHELD_ACKS = 8


@dataclass(frozen=True)
class HoldLimits:
    """Alerts the store could not write (disk full, file read-only) are held in memory and retried. Each one's
    PUBACK is withheld, up to `withheld_acks` of them, so the broker delivers it again if the dashboard stops
    first; the bounds apply to the others, held in memory only (beyond them the oldest is dropped: lost)."""

    alerts: int = 1000
    picture_bytes: int = 64 * 2**20
    withheld_acks: int = WITHHELD_ACKS
    retry_s: float = 5.0


@dataclass
class _HeldAlert:
    alert: AlertPayload
    jpeg: bytes
    problem: str  # why its picture was not kept, reported once it is stored
    received_at: float
    mid: int | None = None  # the PUBACK withheld for this message id of connection `link`; None: none withheld
    link: int = 0


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
    dashboard's link was down are delivered when it comes back, as long as the broker kept running. Messages are
    acknowledged once handled; an alert the store cannot write is held in memory and retried (HoldLimits).
    """

    def __init__(self, config: BrokerConfig, state: LiveState, store: AlertStore,
                 hold: HoldLimits = HoldLimits()) -> None:
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
            manual_ack=True,  # a QoS 1 message is acknowledged once handled: see _on_message
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
        self.hold = hold
        self._held: OrderedDict[str, _HeldAlert] = OrderedDict()  # event id -> alert not yet stored, in arrival order
        self._held_lock = threading.Lock()  # also orders acks against _link changes
        self._held_problem = ""  # the store's latest error while alerts are held
        self._link = 0  # the connection generation: a message id means something on its own connection only
        self._retry_trouble = LogThrottle()
        self._stopping = threading.Event()
        self._retry_thread = threading.Thread(target=self._retry_loop, name="dashboard-held-alerts", daemon=True)

    def start(self) -> None:
        """Connect in the background: a broker that is down at start-up is retried, not fatal."""
        self.state.set_broker(False, f"connecting to {self.config.url}")
        self.client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive)
        self.client.loop_start()
        self._retry_thread.start()
        self._started.set()

    def stop(self) -> None:
        if self._started.is_set():
            self._stopping.set()
            self._retry_thread.join()
            self.client.disconnect()
            self.client.loop_stop()
            self._warn_unsaved()

    def held_ids(self) -> list[str]:
        """The event ids of the alerts held in memory (the store could not write them), oldest first."""
        with self._held_lock:
            return list(self._held)

    def withheld_acks(self) -> int:
        """How many held alerts have their PUBACK withheld on the current connection (the broker keeps them)."""
        with self._held_lock:
            return self._withheld_now()

    def retry_held(self) -> int:
        """Store the held alerts, oldest first, until the store fails again; returns how many were stored. Each one
        stored (or found stored already) is announced and its PUBACK sent."""
        done = 0
        for held in self._held_snapshot():
            try:
                added = self.store.add_alert(held.alert, held.jpeg, received_at=held.received_at)
            except StoreError as exc:
                if self._retry_trouble.hit():
                    log.error("%d alert(s) still held in memory: %s", len(self._held_snapshot()), exc)
                if done:
                    self._show_held(str(exc))
                return done
            self._saved(held.alert.event_id, added, held.problem)
            done += 1
        if done:
            self._retry_trouble.reset()
            log.info("the store can be written again: %d held alert(s) saved", done)
        return done

    def _retry_loop(self) -> None:
        while not self._stopping.wait(self.hold.retry_s):
            try:
                self.retry_held()
            except Exception:  # never let one failure end the retries
                log.exception("error while saving held alerts")

    def _held_snapshot(self) -> list[_HeldAlert]:
        with self._held_lock:
            return list(self._held.values())

    def _withheld_now(self) -> int:
        """Held alerts whose PUBACK is withheld on the current connection (caller holds _held_lock)."""
        return sum(1 for h in self._held.values() if h.mid is not None and h.link == self._link)

    def _hold(self, held: _HeldAlert, mid: int | None) -> bool:
        """Keep an alert the store could not write; withhold the PUBACK of message `mid` (of the current connection)
        while fewer than hold.withheld_acks are. True when it is withheld: the caller must not send it."""
        event_id = held.alert.event_id
        with self._held_lock:
            held = self._held.setdefault(event_id, held)  # a copy delivered again replaces nothing
            withheld = mid is not None and self._withheld_now() < self.hold.withheld_acks
            if withheld and (held.mid is None or held.link != self._link):
                held.mid, held.link = mid, self._link
            else:
                withheld = False
                if held.mid is not None and held.link != self._link:
                    held.mid = None  # stale, and this copy is acknowledged: the broker no longer has it
            dropped = self._over_bounds()
        for lost in dropped:
            self._report_lost(lost)
        return withheld

    def _over_bounds(self) -> list[_HeldAlert]:
        """Drop the oldest alerts held in memory only (not withheld) beyond hold's bounds (caller holds the lock)."""
        dropped = []
        memory_only = [h for h in self._held.values() if h.mid is None or h.link != self._link]
        size = sum(len(h.jpeg) for h in memory_only)
        while memory_only and (len(self._held) > self.hold.alerts or size > self.hold.picture_bytes):
            lost = memory_only.pop(0)
            del self._held[lost.alert.event_id]
            size -= len(lost.jpeg)
            dropped.append(lost)
        return dropped

    def _held_note(self, withheld: bool) -> str:
        """What becomes of an alert just held, for the log."""
        count = len(self.held_ids())
        if withheld:
            return f"Held in memory ({count} alert(s) so far) and saved once the store can be written."
        return (f"Held in memory only ({count} alert(s) so far; the broker keeps at most {self.hold.withheld_acks}): "
                "lost if the dashboard stops before the store can be written.")

    def _show_held(self, problem: str | None = None) -> None:
        """Put the held alerts on the page's banner (none: the banner goes): why (`problem`, the store's latest
        error; None: the one shown so far), and what becomes of them. Counted and shown under _held_lock: the MQTT
        and retry threads both call this, and a count shown after a newer one would stay on the banner."""
        with self._held_lock:
            count, withheld = len(self._held), self._withheld_now()
            if problem is not None:
                self._held_problem = problem
            if withheld < count:
                fate = (f"{withheld} of them are kept by the broker as well; the other {count - withheld} are lost "
                        "if the dashboard stops before then")
            else:
                fate = "the broker keeps them as well, should the dashboard stop before then"
            self.state.set_alerts_held(count, f"{self._held_problem} They are saved as soon as it can be written "
                                              f"({fate}).")

    def _report_lost(self, lost: _HeldAlert) -> None:
        message = (f"alert {lost.alert.event_id} of {lost.alert.device_id} is lost: the store could not be written "
                   f"and more than {self.hold.alerts} alerts or {self.hold.picture_bytes / 2**20:.0f} MiB of "
                   "pictures were held in memory waiting for it. Free disk space or make the store writable.")
        log.error("%s", message)
        self.state.note_alert_lost(message)

    def _saved(self, event_id: str, added: bool, problem: str) -> None:
        """An alert is in the store: release its held copy (sending the PUBACK withheld on this connection, never
        one of an older connection, which could acknowledge another message) and announce it."""
        with self._held_lock:
            held = self._held.pop(event_id, None)
            if held is not None and held.mid is not None and held.link == self._link:
                self.client.ack(held.mid, 1)
        if held is not None:
            self._show_held()
        if held is None and not added:
            return  # a repeat (QoS 1, a device's spool, a watched photo after a restart): already told
        stored = self.store.get(event_id)
        if stored is not None:
            self.announce_alert(stored)
        if problem and added:  # a held alert whose picture was refused: say so now that it is listed
            self.state.note_invalid(f"alert {event_id} kept without its picture: {problem}")

    def _warn_unsaved(self) -> None:
        with self._held_lock:
            held, withheld = len(self._held), sum(1 for h in self._held.values() if h.mid is not None)
        if held:
            log.error("stopped with %d alert(s) not saved (the store could not be written): the broker delivers "
                      "%d of them again at the next start; the others are lost", held, withheld)

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
        self._new_link()
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
        self._new_link()
        if self._refused:  # the broker closes a refused login: keep saying why
            return
        detail = f"connection lost ({reason_code}); reconnecting"
        if self.state.broker.connected:
            log.warning("disconnected from %s: %s", self.config.url, reason_code)
        self.state.set_broker(False, detail)

    def _new_link(self) -> None:
        """A connection went down or came up: message ids withheld so far are void (the broker delivers those
        alerts again on the next connection, with the ids of that one)."""
        with self._held_lock:
            self._link += 1

    def _trouble_detail(self, detail: str, level: int = logging.ERROR) -> None:
        """Show a connection trouble on the page at every retry and in the log at first and once a minute."""
        self.state.set_broker(False, detail)
        if self._trouble.hit():
            log.log(level, "%s (%d failed attempt(s) so far)", detail, self._trouble.count)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        """Handle a message, then send its PUBACK (manual_ack): every one is acknowledged, invalid ones included,
        except an alert the store could not write and whose PUBACK is withheld (see _hold)."""
        withheld = False
        try:
            self.handle(msg.topic, msg.payload, retained=bool(msg.retain), mid=msg.mid if msg.qos else None)
        except PayloadError as exc:
            log.warning("ignored message on %s: %s", msg.topic, exc)
            self.state.note_invalid(f"{msg.topic}: {exc}")
        except AlertHeld as exc:  # on the page's banner already (_show_held)
            withheld = exc.withheld
            log.error("%s: %s", msg.topic, exc)
        except StoreError as exc:
            log.error("%s: %s", msg.topic, exc)
            self.state.note_invalid(f"{msg.topic}: {exc}")
        except Exception as exc:  # never let one message kill the network thread
            log.exception("error handling message on %s", msg.topic)
            self.state.note_invalid(f"{msg.topic}: internal error {exc!r}")
        finally:
            if msg.qos and not withheld:
                client.ack(msg.mid, msg.qos)

    # --- message handling (also called directly by tests) -----------------------------------------
    def handle(self, topic: str, payload: bytes, retained: bool = False, mid: int | None = None) -> None:
        """Validate and apply one message. `mid`: its id, for a QoS 1 message of the current connection whose PUBACK
        the caller sends unless AlertHeld says it is withheld."""
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
                self._handle_alert(_same_device(AlertPayload.model_validate_json(payload), device), mid)
            else:
                raise PayloadError(f"unexpected topic leaf {leaf!r}")
        except ValidationError as exc:
            raise PayloadError(f"invalid {leaf} payload: {exc}") from exc

    def _handle_alert(self, alert: AlertPayload, mid: int | None = None) -> None:
        too_long = id_problem("event_id", alert.event_id)
        if too_long:
            raise PayloadError(f"alert refused: its {too_long}")
        try:
            jpeg = decode_jpeg_b64(alert.snapshot_jpeg_b64, "snapshot_jpeg_b64")
            problem = ""
        except PayloadError as exc:  # keep the alert itself: losing it would be worse than a missing picture
            jpeg, problem = b"", str(exc)
        received_at = time.time()
        try:
            added = self.store.add_alert(alert, jpeg, received_at=received_at)
        except StoreError as exc:
            slim = alert.model_copy(update={"snapshot_jpeg_b64": ""})  # the store takes the decoded picture only
            withheld = self._hold(_HeldAlert(slim, jpeg, problem, received_at), mid)
            self._show_held(str(exc))
            raise AlertHeld(f"{exc} {self._held_note(withheld)}", withheld) from exc
        self._saved(alert.event_id, added, "")
        if added and problem:  # reported with the ignored messages, but this alert is listed: say so
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
