"""MQTT side of the edge runtime (paho-mqtt 2.x, CallbackAPIVersion.VERSION2).

Alerts never go to the client directly: they are appended to the durable Spool, and one delivery
thread hands spooled rows to paho in order (QoS 1, at most `inflight_window` unacknowledged) while
connected. A row is deleted only when its PUBACK arrives. paho re-sends unacknowledged QoS 1
messages itself after a reconnect; after a restart the spool replays every remaining row, so an
alert can arrive twice but never not at all - consumers deduplicate on event_id.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
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
from drywallqa.edge.settings import ConfigError, MqttSettings
from drywallqa.edge.spool import Spool

log = logging.getLogger(__name__)

CONNECT_FAIL_LOG_INTERVAL_S = 60.0
SPOOL_RETRY_S = 2.0  # while the spool cannot be written: how often the alerts kept in memory are written to it
OTHER_QOS1_IN_FLIGHT = 16  # QoS 1 statuses and snapshots paho may hold besides the alerts (see _publish_alert)


class LogThrottle:
    """A trouble that repeats (a broker that refuses or cannot be reached, a spool that fails on every try) is
    logged at its first occurrence and then at most once an interval, never per retry."""

    def __init__(self, interval_s: float = CONNECT_FAIL_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.count = 0  # occurrences since the last reset
        self.since: float | None = None  # monotonic time of the first of them
        self._logged: float | None = None

    def hit(self) -> bool:
        """Count one occurrence; True when it should be logged now."""
        now = time.monotonic()
        self.count += 1
        if self.since is None:
            self.since = now
        if self._logged is None or now - self._logged >= self.interval_s:
            self._logged = now
            return True
        return False

    def reset(self, count: bool = True) -> None:
        """The trouble is over: the next one is logged at once (`count=False` keeps the running total)."""
        self.since = self._logged = None
        if count:
            self.count = 0


# A broker that closes the connection within seconds of accepting it, time after time, is most often taking the
# session over for another client with our client id (MQTT 3.1.1 says no more; mosquitto logs "already connected").
SHORT_SESSION_S = 5.0
SHORT_SESSIONS_TO_WARN = 3


class EdgeLink:
    def __init__(
        self,
        settings: MqttSettings,
        spool: Spool,
        *,
        status: Callable[[str], StatusPayload],
        on_command: Callable[[CommandPayload], None],
    ) -> None:
        self.settings = settings
        self.spool = spool
        self._status = status
        self._on_command = on_command
        self.topic_status = topic(settings.prefix, settings.device_id, TOPIC_STATUS)
        self.topic_detections = topic(settings.prefix, settings.device_id, TOPIC_DETECTIONS)
        self.topic_alerts = topic(settings.prefix, settings.device_id, TOPIC_ALERTS)
        self.topic_snapshot = topic(settings.prefix, settings.device_id, TOPIC_SNAPSHOT)
        self.topic_cmd = topic(settings.prefix, settings.device_id, TOPIC_CMD)
        self.connected = threading.Event()
        self._connect_trouble = LogThrottle()  # its count: failed attempts so far, over every outage
        self._connected_at: float | None = None  # monotonic, while connected
        self._short_sessions = 0  # consecutive connections the broker closed within SHORT_SESSION_S
        self._takeover_trouble = LogThrottle()
        self.delivered = 0
        self._spool_counted_dropped = spool.dropped()  # the spool's persisted count, as last read
        self._dropped_in_memory = 0  # alerts dropped while the spool could not be written (not in its counter)
        self.spool_error = ""  # set while the spool cannot be written (disk full, read-only): for status
        # paho's info -> (event_id, payload) of alerts published from memory only (spool unwritable), until their
        # PUBACK. Alerts are known by their MQTTMessageInfo, never by mid: see _process_acks.
        self._unspooled: dict[mqtt.MQTTMessageInfo, tuple[str, bytes]] = {}
        self._unspooled_lock = threading.Lock()  # send_alert's thread adds entries, the delivery thread removes them
        self._failed_bytes = 0  # the size of the latest alert the spool could not take (what a probe writes)
        self._spool_tried_at = 0.0  # monotonic time of the latest retry (_retry_spool)
        self._handed_early: set[int] = set()  # seqs of rows written from memory: with paho already, not handed again
        self._delivery_trouble = LogThrottle()
        self._inflight: dict[mqtt.MQTTMessageInfo, int] = {}  # paho's info -> spool seq (the delivery thread's)
        self._last_handed = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._latest_status: StatusPayload | None = None
        self._client = self._make_client()
        self._thread = threading.Thread(target=self._deliver_loop, name="mqtt-deliver", daemon=True)

    # -- set-up ----------------------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self._client_id,
                             clean_session=True)
        self._set_will(client, self._status("offline"))
        if s.username:
            client.username_pw_set(s.username, s.password)
        if s.tls.enabled:
            try:
                client.tls_set(ca_certs=s.tls.ca_certs, certfile=s.tls.certfile, keyfile=s.tls.keyfile,
                               cert_reqs=ssl.CERT_REQUIRED)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError(f"mqtt.tls: cannot load the certificates (ca_certs={s.tls.ca_certs!r}, "
                                  f"certfile={s.tls.certfile!r}, keyfile={s.tls.keyfile!r}): {exc}") from exc
            client.tls_insecure_set(s.tls.insecure)
        client.reconnect_delay_set(1, s.reconnect_max_s)
        client.max_inflight_messages_set(s.inflight_window)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _set_will(self, client: mqtt.Client, latest: StatusPayload) -> None:
        """The broker sends the will when the device vanishes (power cut, crash, network gone). It is fixed
        when the client connects, so it is refreshed from the latest status before each reconnect: then it
        carries recent figures, and `last_will=True` tells consumers they are not from the moment it died.
        Only on paho's network thread (or before it starts): paho reads the will twice while it builds CONNECT."""
        will = latest.model_copy(update={"state": "offline", "last_will": True})
        client.will_set(self.topic_status, will.model_dump_json(), qos=1, retain=True)

    def start(self) -> EdgeLink:
        s = self.settings
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive_s)
        self._client.loop_start()
        self._thread.start()
        return self

    # -- paho callbacks (network thread) -----------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:  # bad credentials, not authorised, ...: paho retries; say so once a minute
            if self._connect_trouble.hit():
                log.error("MQTT broker %s:%d refused the connection: %s (%d failed attempt(s) so far; check "
                          "mqtt.username and mqtt.password); alerts are spooled until it accepts",
                          self.settings.host, self.settings.port, reason_code, self._connect_trouble.count)
            return
        log.info("MQTT connected to %s:%d", self.settings.host, self.settings.port)
        self._connected_at = time.monotonic()
        self._connect_trouble.reset(count=False)  # the next outage is reported at once again
        client.subscribe(self.topic_cmd, qos=1)
        online = self._status("online")
        client.publish(self.topic_status, online.model_dump_json(), qos=1, retain=True)
        self._set_will(client, online)
        self.connected.set()
        self._wake.set()

    def _on_connect_fail(self, client, userdata) -> None:
        """paho could not reach the broker (refused, unreachable, unknown host, TLS handshake): say so at the
        first failure and then once a minute, never silently."""
        if self._connect_trouble.hit():
            log.warning("MQTT broker %s:%d unreachable (%d failed attempt(s) so far; check mqtt.host, mqtt.port "
                        "and mqtt.tls); alerts are spooled until it answers", self.settings.host,
                        self.settings.port, self._connect_trouble.count)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._latest_status is not None:
            self._set_will(client, self._latest_status)
        if self.connected.is_set() and not self._stop.is_set():
            self._note_session_length()
            if self._short_sessions <= 1:  # not every second of a flapping link: see _note_session_length
                log.warning("MQTT disconnected (%s); alerts are spooled until the broker is back", reason_code)
        self.connected.clear()
        self._connected_at = None

    @property
    def _client_id(self) -> str:
        return f"drywallqa-edge-{self.settings.device_id}"

    @property
    def link_error(self) -> str:
        """For the status: why the broker keeps closing the connection, until a connection lasts."""
        lasting = self._connected_at is not None and time.monotonic() - self._connected_at >= SHORT_SESSION_S
        if lasting or self._short_sessions < SHORT_SESSIONS_TO_WARN:
            return ""
        return (f"the broker keeps closing the connection right after accepting it: another client probably uses "
                f"client id {self._client_id!r} (mqtt.device_id {self.settings.device_id!r} on two devices or "
                f"runtimes)")

    def _note_session_length(self) -> None:
        """Count connections the broker closed soon after accepting them. Two clients with one client id (two
        devices with one mqtt.device_id, or a second runtime on another machine) knock each other off the
        broker every second, for ever, and each side only sees a disconnect: name the likely cause, once a
        minute, in the log and in the status (`link_error`)."""
        lasted = time.monotonic() - self._connected_at if self._connected_at is not None else None
        if lasted is None or lasted >= SHORT_SESSION_S:
            self._short_sessions = 0
            self._takeover_trouble.reset()
            return
        self._short_sessions += 1
        if self._short_sessions < SHORT_SESSIONS_TO_WARN:
            return
        client_id = self._client_id
        if self._takeover_trouble.hit():
            log.error("MQTT broker %s:%d closed the connection %d times in a row within %.0f s of accepting it: "
                      "another client probably uses the client id %r, and each connection knocks the other off. "
                      "Give every device its own mqtt.device_id (mosquitto logs 'Client %s already connected, "
                      "closing old connection'); alerts are spooled meanwhile", self.settings.host,
                      self.settings.port, self._short_sessions, SHORT_SESSION_S, client_id, client_id)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # Only a wake-up: the mid does not say which alert, if any, was acknowledged (see _process_acks). paho calls
        # this with its lock held and marks the message published right after; should the delivery thread look in
        # between, its next pass (at most 0.5 s later) finds it.
        self._wake.set()

    def _on_message(self, client, userdata, message) -> None:
        try:
            cmd = CommandPayload.model_validate_json(message.payload)
        except ValidationError as exc:  # what was wrong, not the payload itself: junk may be megabytes
            log.warning("ignored invalid command on %s (%d bytes): %s", message.topic, len(message.payload),
                        exc.errors(include_url=False, include_input=False)[:2])
            return
        try:
            self._on_command(cmd)
        except Exception:  # noqa: BLE001 - a bad command must never take the client down
            log.exception("command %s failed", cmd.command)

    # -- delivery thread ---------------------------------------------------------------------------------
    def _process_acks(self) -> None:
        """Forget the alerts whose own PUBACK has come, and delete their rows. Asked of each alert's MQTTMessageInfo
        (paho marks a QoS 1 message published only at its PUBACK), not taken from on_publish's mid: paho numbers
        every publish, QoS 0 detections too, from one 16-bit counter that wraps after 65,535, and reports a QoS 0
        message as published once it is sent, so a detection can bring the mid of an alert still unacknowledged."""
        with self._unspooled_lock:
            for info in [i for i in self._unspooled if i.is_published()]:
                del self._unspooled[info]
        for info in [i for i in self._inflight if i.is_published()]:
            seq = self._inflight.pop(info)
            self._handed_early.discard(seq)
            self.spool.ack(seq)
            self.delivered += 1

    def _publish_alert(self, alert_topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        """Hand one alert to paho (QoS 1). paho refuses a QoS 1 publish whose mid (its counter wrapped) is still
        waiting for its PUBACK, with MQTT_ERR_QUEUE_SIZE (no max_queued_messages is set here, so that is its only
        cause): the next try gets the next mid. A publish while disconnected (MQTT_ERR_NO_CONN) is queued and sent
        at the reconnect; that rc is cleared, else is_published() would raise even after its PUBACK."""
        for _ in range(len(self._inflight) + len(self._unspooled) + OTHER_QOS1_IN_FLIGHT):
            info = self._client.publish(alert_topic, payload, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                break
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        return info

    def _deliver_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._process_acks()
                self._retry_spool()
                if not self.connected.is_set():
                    continue
                room = self.settings.inflight_window - len(self._inflight)
                if room <= 0:
                    continue
                for item in self.spool.pending(self._last_handed, room):
                    if item.seq in self._handed_early:  # written from memory (_retry_spool): paho has it already
                        self._handed_early.discard(item.seq)
                        self._last_handed = item.seq
                        continue
                    info = self._publish_alert(item.topic, item.payload)
                    if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        log.warning("publish of spooled alert %s failed: %s", item.event_id, info.rc)
                        break
                    self._inflight[info] = item.seq  # paho keeps and re-sends it until PUBACK
                    self._last_handed = item.seq
                self._process_acks()
                trouble = self._delivery_trouble
                if trouble.count:
                    log.warning("alert delivery works again after %d failed attempt(s)", trouble.count)
                    trouble.reset()
            except Exception as exc:  # noqa: BLE001 - keep delivering; the rows stay in the spool
                # the first failure with its traceback, then one line a minute: a spool that fails on every try
                # (damaged mid-run) must not write a traceback every half second for days
                trouble = self._delivery_trouble
                if trouble.hit():
                    if trouble.count == 1:
                        log.exception("alert delivery error (the alerts stay in the spool; while it lasts, logged "
                                      "once a minute)")
                    else:
                        log.error("alert delivery still failing for %.0f s (%d attempts): %s",
                                  time.monotonic() - trouble.since, trouble.count, exc)
                time.sleep(0.5)

    def _retry_spool(self) -> None:
        """While the spool cannot be written (or opened), every SPOOL_RETRY_S: write the alerts kept in memory and
        not yet acknowledged into it, so a restart replays them (paho already has them: their PUBACK deletes the
        rows, and they are not handed to paho again); with none, write as much as the alert that failed
        (Spool.probe). Once that succeeds the spool is writable again: spool_error clears now, not at the next
        alert, which on a quiet wall may come days later."""
        if not (self.spool_error or self.spool.open_error or self._unspooled):
            return
        if time.monotonic() - self._spool_tried_at < SPOOL_RETRY_S:
            return
        self._spool_tried_at = time.monotonic()
        with self._unspooled_lock:
            held = list(self._unspooled.items())  # only this thread removes entries (_process_acks)
        try:
            if held:
                seqs, dropped = self.spool.put_many([(eid, self.topic_alerts, payload) for _, (eid, payload) in held])
            else:
                self.spool.probe(self._failed_bytes)
                seqs, dropped = [], 0
        except sqlite3.Error as exc:
            self._spool_failed(exc)  # still not: said (again, should a success on another thread have cleared it)
            return
        with self._unspooled_lock:
            for (info, _), seq in zip(held, seqs, strict=True):
                self._unspooled.pop(info, None)
                self._inflight[info] = seq  # its PUBACK (perhaps come already) now deletes the row
                self._handed_early.add(seq)
        if held:
            log.warning("alert spool %s: %d alert(s) kept in memory written to it", self.spool.path, len(held))
        self._spool_writable(dropped)

    def _spool_writable(self, dropped: int) -> None:
        """A write to the spool succeeded: say so if it had failed, and log the oldest rows the bounds dropped."""
        if self.spool_error:
            log.warning("alert spool %s is writable again; alerts are spooled on disk again", self.spool.path)
            self.spool_error = ""
        if dropped:
            log.warning("spool full: dropped %d oldest alert(s) (%d in total)", dropped, self.spool_dropped)

    # -- API for the live loop -----------------------------------------------------------------------------
    def send_alert(self, alert: AlertPayload) -> bool:
        """Durably spool, then deliver in order (returns True once the row is on disk). When the spool cannot be
        written (disk full, read-only, damaged), the alert is published from memory instead: paho keeps it until
        its PUBACK, across reconnects (lost only if the process dies first), `spool_error` says why, and it returns
        False (the alert is not durable: the caller must not record its frame as done)."""
        payload = alert.model_dump_json().encode()
        try:
            dropped = self.spool.put(alert.event_id, self.topic_alerts, payload)
        except sqlite3.Error as exc:
            self._send_unspooled(alert, payload, exc)
            return False
        self._spool_writable(dropped)
        self._wake.set()
        return True

    def _spool_failed(self, exc: sqlite3.Error) -> None:
        """A write to the spool failed: say so (logged once, spool_error until a write succeeds). Not for a spool
        unopened since the start: it says so itself (Spool.open_error, logged once), and clears that when it opens."""
        if self.spool.open_error:
            return
        if not self.spool_error:
            log.error("alert spool %s cannot be written (%s): alerts are kept in memory only (lost if the process "
                      "dies before the broker has them) until it can (tried again every %.0f s); free disk space "
                      "or fix spool.path", self.spool.path, exc, SPOOL_RETRY_S)
        self.spool_error = f"alert spool cannot be written ({exc}); alerts kept in memory only"

    def _send_unspooled(self, alert: AlertPayload, payload: bytes, exc: sqlite3.Error) -> None:
        self._failed_bytes = len(payload)  # first: a retry in between would probe 0 bytes, which a full disk may take
        self._spool_failed(exc)
        if len(self._unspooled) >= self.spool.max_rows:  # bounded like the spool: memory must not run out
            self._dropped_in_memory += 1
            log.warning("alert %s dropped: the spool cannot be written and %d alerts already wait in memory "
                        "(%d dropped in total)", alert.event_id, len(self._unspooled), self.spool_dropped)
            return
        info = self._publish_alert(self.topic_alerts, payload)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            # paho keeps (and after a reconnect re-sends) it until its PUBACK; kept here to be spooled later
            with self._unspooled_lock:
                self._unspooled[info] = (alert.event_id, payload)
            return
        self._dropped_in_memory += 1
        log.error("alert %s lost: the spool cannot be written and publishing failed: %s", alert.event_id, info.rc)

    def send_detection(self, detection: DetectionPayload) -> bool:
        if not self.connected.is_set():
            return False
        return self._client.publish(self.topic_detections, detection.model_dump_json(), qos=0).rc == 0

    def send_status(self, status: StatusPayload) -> None:
        self._latest_status = status  # the next reconnect's will (set on the network thread, _on_disconnect)
        if self.connected.is_set():
            self._client.publish(self.topic_status, status.model_dump_json(), qos=1, retain=True)

    def send_snapshot(self, snapshot: SnapshotPayload) -> None:
        if self.connected.is_set():
            self._client.publish(self.topic_snapshot, snapshot.model_dump_json(), qos=1)

    @property
    def spool_dropped(self) -> int:
        """Alerts dropped: those the spool counts (persisted; read from it, which may have opened only after the
        start, see Spool.unopened) and those dropped from memory while it could not be written."""
        with contextlib.suppress(sqlite3.Error):  # a spool that cannot be read now: its count as last read
            self._spool_counted_dropped = self.spool.dropped()
        return self._spool_counted_dropped + self._dropped_in_memory

    def pending(self) -> int:
        """Alerts not yet acknowledged: spooled rows plus those kept in memory while the spool was unwritable."""
        return self.spool.count() + len(self._unspooled)

    def flush(self, timeout: float) -> bool:
        """Wait until every spooled alert is acknowledged (True) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pending() == 0:
                return True
            self._wake.set()
            time.sleep(0.05)
        return self.pending() == 0

    def stop(self, final_status: StatusPayload, timeout: float = 2.0) -> None:
        """Publish the final (offline) status, disconnect cleanly (no last will), stop threads."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.connected.is_set():
            info = self._client.publish(self.topic_status, final_status.model_dump_json(), qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self._client.disconnect()
        self._client.loop_stop()
