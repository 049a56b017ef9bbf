"""Live dashboard state (devices, latest frames, broker link) and the fan-out of changes to browsers."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import quote

from drywallqa.edge.payloads import EARLIEST_PLAUSIBLE_TIME, DetectionPayload, SnapshotPayload, StatusPayload

from .limits import MESSAGE_CHARS, bounded, clip
from .store import CLOCK_AHEAD_MARGIN_S, alert_sort_time

log = logging.getLogger(__name__)

Event = tuple[str, dict]

DEFAULT_MAX_DEVICES = 500
# A device's clock may be this far off the dashboard's and its will still count as seen live (see _will_status).
WILL_CLOCK_MARGIN_S = 60.0


def coalescing_key(name: str, data: dict) -> str | None:
    """The key under which a pending event is replaced by a newer one, or None for events that must all be
    delivered. A device's card, the broker line, the alert totals and one alert's state are latest values:
    a browser that has not read the older one yet only needs the newest."""
    if name in ("alert_counts", "broker"):
        return name
    if name in ("device", "device_removed"):
        return f"device:{data.get('device_id')}"
    if name == "alert" and data.get("event_id"):
        return f"alert:{data['event_id']}"
    return None


class Subscription:
    """One browser's pending events, in order. An event with a coalescing key replaces its pending predecessor
    and moves to the back, so what the browser reads is the original sequence minus superseded values: a burst
    of frames costs one slot per device and an alert's totals one slot in all. When distinct events still
    overflow (a slow client) the backlog is dropped and the client is flagged for a full resync, instead of
    blocking the MQTT thread or growing without bound."""

    def __init__(self, maxsize: int = 500) -> None:
        self.maxsize = maxsize
        self.needs_resync = False
        self._pending: OrderedDict[object, Event] = OrderedDict()
        self._serial = itertools.count()
        self._ready = threading.Condition()

    def put(self, event: Event) -> None:
        name, data = event
        key = coalescing_key(name, data)
        with self._ready:
            if key is not None and key in self._pending:
                del self._pending[key]
            elif len(self._pending) >= self.maxsize:
                self.needs_resync = True
                self._pending.clear()  # the stale backlog; the client will get a fresh full state
            self._pending[key if key is not None else next(self._serial)] = event
            self._ready.notify()

    def get(self, timeout: float) -> Event:
        """The oldest pending event; raises queue.Empty after `timeout` seconds without one."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._pending, timeout=timeout):
                raise queue.Empty
            return self._pending.popitem(last=False)[1]

    def pending(self) -> int:
        with self._ready:
            return len(self._pending)


@dataclass
class DeviceView:
    device_id: str
    status: dict | None = None
    detection: dict | None = None
    frame_jpeg: bytes | None = None
    frame_seq: int = 0
    frame_source: str = ""
    frame_timestamp: float = 0.0
    last_seen: float = 0.0
    device_time: float | None = None  # the device's clock in its latest status, detection or snapshot
    # Its clock minus this dashboard's at its latest live message (None: unknown, or the device is offline), and
    # whether its alerts are listed by the time received then (its clock before 2020 or ahead: alert_sort_time).
    clock_offset_s: float | None = None
    clock_alerts_by_receipt: bool = False

    @property
    def offline(self) -> bool:
        return self.status is not None and self.status["state"] == "offline"

    def to_json(self) -> dict:
        return {
            "device_id": self.device_id,
            "status": self.status,
            "detection": self.detection,
            "frame": (
                {
                    "url": f"/devices/{quote(self.device_id, safe='')}/frame.jpg?v={self.frame_seq}",
                    "source": self.frame_source,
                    "timestamp": self.frame_timestamp,
                }
                if self.frame_jpeg
                else None
            ),
            "last_seen": self.last_seen,
            "clock_offset_s": self.clock_offset_s,
            "clock_off": self.clock_offset_s is not None and abs(self.clock_offset_s) > CLOCK_AHEAD_MARGIN_S,
            "clock_alerts_by_receipt": self.clock_alerts_by_receipt,
        }

    def note_clock(self, sent_at: float | None) -> None:
        """Compare the device's clock with this dashboard's: `sent_at` is the device's time on a message sent just
        now (a live one); None when the device went offline, which leaves no clock to compare (and the statuses
        queued for a dashboard that was away end with an old one)."""
        if sent_at is None:
            self.clock_offset_s, self.clock_alerts_by_receipt = None, False
            return
        received = time.time()
        self.clock_offset_s = sent_at - received
        self.clock_alerts_by_receipt = alert_sort_time(sent_at, received) != sent_at


@dataclass
class BrokerView:
    url: str = ""
    connected: bool = False
    since: float = field(default_factory=time.time)
    detail: str = "not connected yet"

    def to_json(self) -> dict:
        return {"url": self.url, "connected": self.connected, "since": self.since, "detail": self.detail}


class LiveState:
    """Thread-safe latest-value store; every change is published to all subscriptions.

    At most `max_devices` devices are tracked: any client of the broker can publish under new device ids, and each
    one would otherwise be kept, and sent to every browser, for good."""

    def __init__(self, max_devices: int = DEFAULT_MAX_DEVICES) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceView] = {}
        self.max_devices = max_devices
        self.devices_dropped = 0
        self._dropped_now: list[str] = []  # evicted under the lock, announced after it
        self.broker = BrokerView()
        self.invalid_messages = 0
        self.last_invalid = ""
        self.alerts_held = 0  # alerts the store could not write, held in memory by the bridge until it can
        self.held_detail = ""  # why, and what becomes of them
        self.alerts_lost = 0
        self.last_lost = ""
        self._subs: set[Subscription] = set()
        # Frame URLs carry this counter and are cached by browsers for an hour: it starts at the time of start-up
        # (in microseconds), so a restarted dashboard never hands out a URL that an open page cached before.
        self._frame_seq = time.time_ns() // 1000

    # --- subscriptions -------------------------------------------------------------------------
    def subscribe(self) -> Subscription:
        sub = Subscription()
        with self._lock:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subs)

    def publish(self, name: str, data: dict) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            sub.put((name, data))

    # --- reads ---------------------------------------------------------------------------------
    def devices_json(self) -> list[dict]:
        with self._lock:
            return [d.to_json() for d in sorted(self._devices.values(), key=lambda d: d.device_id)]

    def frame(self, device_id: str) -> bytes | None:
        with self._lock:
            dev = self._devices.get(device_id)
            return dev.frame_jpeg if dev else None

    def broker_json(self) -> dict:
        with self._lock:
            data = self.broker.to_json()
        data["invalid_messages"] = self.invalid_messages
        data["last_invalid"] = self.last_invalid
        data["alerts_held"] = self.alerts_held
        data["held_detail"] = self.held_detail
        data["alerts_lost"] = self.alerts_lost
        data["last_lost"] = self.last_lost
        data["devices_dropped"] = self.devices_dropped
        data["max_devices"] = self.max_devices
        return data

    def offline_since(self, device_id: str) -> tuple[float, bool] | None:
        """For a device shown offline: since when, and whether that is only "before" that time (it went offline
        while this dashboard was not connected); None for a device not known to be offline."""
        with self._lock:
            dev = self._devices.get(device_id)
            status = dev.status if dev is not None else None
            if status is None or status["state"] != "offline":
                return None
            before = status.get("offline_since_before")
            return (before, True) if before is not None else (status["timestamp"], False)

    # --- writes (called from the MQTT thread) ---------------------------------------------------
    def _device(self, device_id: str, sent_at: float | None = None) -> DeviceView:
        """The device's view, marked as heard from now; `sent_at` (a retained status's own time) for a message the
        broker replays on every (re)subscribe, which says nothing about the device being alive now: it dates a
        device first seen that way and leaves a known one's last contact as it was."""
        dev = self._devices.get(device_id)
        if dev is None:
            if len(self._devices) >= self.max_devices:
                self._drop_one()
            dev = self._devices[device_id] = DeviceView(device_id)
            if sent_at is not None:
                dev.last_seen = min(sent_at, time.time())
        if sent_at is None:
            dev.last_seen = time.time()
        return dev

    def _drop_one(self) -> None:
        """Make room for a new device: drop the offline one silent longest, else the device silent longest."""
        victim = min(self._devices.values(), key=lambda d: (not d.offline, d.last_seen))
        del self._devices[victim.device_id]
        self._dropped_now.append(victim.device_id)
        if not self.devices_dropped:
            log.warning(
                "more than %d devices on the broker: dropped %r (the %s device silent longest) from the list; "
                "devices beyond the limit keep replacing the longest-silent ones. Raise --max-devices if the site "
                "has that many, else look for a client publishing under made-up device ids (logged once)",
                self.max_devices, victim.device_id, "offline" if victim.offline else "online or unknown",
            )
        self.devices_dropped += 1

    def _announce(self, out: dict) -> None:
        """Publish a device's new card, after the cards of devices dropped to make room for it (lock not held)."""
        with self._lock:
            dropped, self._dropped_now = self._dropped_now, []
        for device_id in dropped:
            self.publish("device_removed", {"device_id": device_id})
        if dropped:
            self.publish("broker", self.broker_json())  # the page's count of dropped devices
        self.publish("device", out)

    def _set_frame(self, dev: DeviceView, jpeg: bytes, source: str, timestamp: float, fresh: bool) -> None:
        """Show a frame. A `fresh` one (a live detection's preview, a reply to this dashboard's own request) is
        newer than the shown one by its arrival, whatever the device's clock says: a clock set back (NTP, a restart
        without a real-time clock) must not freeze the picture until it catches up. Any other one (a snapshot
        the broker delivers late, e.g. queued while the dashboard was away) must not replace a newer frame."""
        if not fresh and timestamp < dev.frame_timestamp:
            return
        self._frame_seq += 1
        dev.frame_jpeg, dev.frame_seq, dev.frame_source, dev.frame_timestamp = (
            jpeg,
            self._frame_seq,
            source,
            timestamp,
        )

    def update_status(self, status: StatusPayload, retained: bool = False) -> None:
        """A status (free text clipped); a last will is shown as _will_status says."""
        with self._lock:
            known = self._devices.get(status.device_id)
            if status.last_will:
                data = self._will_status(known, status, retained)
                seen_live = not retained and "offline_since_before" not in data
            else:
                data = bounded(status.model_dump())
                seen_live = not retained
            dev = self._device(status.device_id, sent_at=None if seen_live else status.timestamp)
            if not status.last_will:
                dev.device_time = status.timestamp
            if status.state == "offline":
                dev.note_clock(None)
            elif not retained and not self._may_have_waited(status.timestamp):
                dev.note_clock(status.timestamp)  # a retained status may be old: the broker replays it at subscribe
            dev.status = data
            out = dev.to_json()
        self._announce(out)

    def _may_have_waited(self, sent_at: float) -> bool:
        """Whether a live (QoS 1) status dated `sent_at` may have waited in this dashboard's persistent session
        while it was away (a restart, a dropped link) rather than come from a clock that is behind: it is dated
        before this broker connection came up and more than the margin behind now. Such a status's age is how long
        it waited, as likely as the clock's error, so it is not read as the clock. A time before 2020 is never a
        wait (the clock was never set), and a clock that is truly behind shows in its detections, and in its
        statuses once the connection has been up longer than the clock is behind."""
        now = time.time()
        return EARLIEST_PLAUSIBLE_TIME <= sent_at < self.broker.since and sent_at < now - CLOCK_AHEAD_MARGIN_S

    def _will_status(self, known: DeviceView | None, will: StatusPayload, retained: bool) -> dict:
        """The status to show for a last will. The broker fixed the will's figures and time when the device's
        connection opened: the figures shown stay the newest ones this dashboard saw.

        The will is dated at its arrival only if this dashboard saw it happen: it came live (not a retained copy)
        and the device was heard from, by its own clock, while the current broker connection was up. Otherwise the
        device went offline while the dashboard was away: its will is a retained copy, or was queued in the
        dashboard's persistent session and comes (as a live message would) just after it connects. Its arrival
        says nothing then; it keeps the time of the device's latest status and gets `offline_since_before`: the
        start of this connection."""
        last = known.status if known is not None else None
        if last is not None and last.get("last_will") and last["timestamp"] >= will.timestamp:
            return last  # a copy of the will already shown (the retained one, replayed at a re-subscribe)
        data = bounded(will.model_dump())
        if last is not None and last["timestamp"] >= will.timestamp:
            data = {**last, "state": "offline", "last_will": True}
        link_up = self.broker.since
        heard = known.device_time if known is not None and known.device_time is not None else will.timestamp
        if not retained and heard >= link_up - WILL_CLOCK_MARGIN_S:
            data["timestamp"] = max(data["timestamp"], time.time())
            data.pop("offline_since_before", None)
        else:
            data["offline_since_before"] = link_up
        return data

    def remove_device(self, device_id: str) -> bool:
        """Forget a device (its retained status was cleared); False if it was not known."""
        with self._lock:
            known = self._devices.pop(device_id, None) is not None
        if known:
            self.publish("device_removed", {"device_id": device_id})
        return known

    def update_detection(self, det: DetectionPayload, preview_jpeg: bytes | None, retained: bool = False) -> None:
        """A detection; it is sent at QoS 0, which the broker never queues: unless retained it is live."""
        with self._lock:
            dev = self._device(det.device_id)
            dev.detection = bounded(det.model_dump(exclude={"preview_jpeg_b64"}))
            dev.device_time = det.timestamp
            if not retained:
                dev.note_clock(det.timestamp)
            if preview_jpeg:
                self._set_frame(dev, preview_jpeg, "detection", det.timestamp, fresh=not retained)
            out = dev.to_json()
        self._announce(out)

    def update_snapshot(self, snap: SnapshotPayload, jpeg: bytes, answers_request: bool = False) -> None:
        """A snapshot; `answers_request`: it answers a request this dashboard sent, so it was taken after it."""
        with self._lock:
            dev = self._device(snap.device_id)
            dev.device_time = snap.timestamp
            if answers_request:  # any other one may have waited in the broker's queue for this dashboard
                dev.note_clock(snap.timestamp)
            self._set_frame(dev, jpeg, "snapshot", snap.timestamp, fresh=answers_request)
            out = dev.to_json()
        self._announce(out)

    def set_broker(self, connected: bool, detail: str) -> None:
        with self._lock:
            if connected != self.broker.connected:
                self.broker.since = time.time()
            self.broker.connected = connected
            self.broker.detail = detail
        self.publish("broker", self.broker_json())

    def note_invalid(self, message: str) -> None:
        with self._lock:
            self.invalid_messages += 1
            self.last_invalid = clip(message, MESSAGE_CHARS)
        self.publish("broker", self.broker_json())

    def set_alerts_held(self, count: int, detail: str) -> None:
        """How many alerts wait in memory for the store to be writable (0: none), and why: shown on the page's
        banner, since they are lost if the dashboard stops (beyond those the broker keeps)."""
        with self._lock:
            self.alerts_held = count
            self.held_detail = clip(detail, MESSAGE_CHARS) if count else ""
        self.publish("broker", self.broker_json())

    def note_alert_lost(self, message: str) -> None:
        with self._lock:
            self.alerts_lost += 1
            self.last_lost = clip(message, MESSAGE_CHARS)
        self.publish("broker", self.broker_json())
