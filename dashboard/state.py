"""Live dashboard state (devices, latest frames, broker link) and the fan-out of changes to browsers."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import quote

from drywallqa.edge.payloads import DetectionPayload, SnapshotPayload, StatusPayload

Event = tuple[str, dict]


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
        }


@dataclass
class BrokerView:
    url: str = ""
    connected: bool = False
    since: float = field(default_factory=time.time)
    detail: str = "not connected yet"

    def to_json(self) -> dict:
        return {"url": self.url, "connected": self.connected, "since": self.since, "detail": self.detail}


class LiveState:
    """Thread-safe latest-value store; every change is published to all subscriptions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceView] = {}
        self.broker = BrokerView()
        self.invalid_messages = 0
        self.last_invalid = ""
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
        return data

    # --- writes (called from the MQTT thread) ---------------------------------------------------
    def _device(self, device_id: str, sent_at: float | None = None) -> DeviceView:
        """The device's view, marked as heard from now; `sent_at` (a retained status's own time) for a message the
        broker replays on every (re)subscribe, which says nothing about the device being alive now: it dates a
        device first seen that way and leaves a known one's last contact as it was."""
        dev = self._devices.get(device_id)
        if dev is None:
            dev = self._devices[device_id] = DeviceView(device_id)
            if sent_at is not None:
                dev.last_seen = min(sent_at, time.time())
        if sent_at is None:
            dev.last_seen = time.time()
        return dev

    def _set_frame(self, dev: DeviceView, jpeg: bytes, source: str, timestamp: float) -> None:
        if timestamp < dev.frame_timestamp:  # an older snapshot arriving late must not replace a newer frame
            return
        self._frame_seq += 1
        dev.frame_jpeg, dev.frame_seq, dev.frame_source, dev.frame_timestamp = (
            jpeg,
            self._frame_seq,
            source,
            timestamp,
        )

    def update_status(self, status: StatusPayload, retained: bool = False) -> None:
        """A last will carries the figures of the device's latest status before its link dropped; the figures
        shown stay the newest ones this dashboard saw, and a will that arrives live (not a retained copy from
        before the dashboard started) dates the outage at its arrival."""
        with self._lock:
            dev = self._device(status.device_id, sent_at=status.timestamp if retained else None)
            data = status.model_dump()
            if status.last_will:
                if dev.status is not None and dev.status["timestamp"] >= status.timestamp:
                    data = {**dev.status, "state": "offline", "last_will": True}
                if not retained:
                    data["timestamp"] = max(data["timestamp"], time.time())
            dev.status = data
            out = dev.to_json()
        self.publish("device", out)

    def remove_device(self, device_id: str) -> bool:
        """Forget a device (its retained status was cleared); False if it was not known."""
        with self._lock:
            known = self._devices.pop(device_id, None) is not None
        if known:
            self.publish("device_removed", {"device_id": device_id})
        return known

    def update_detection(self, det: DetectionPayload, preview_jpeg: bytes | None) -> None:
        with self._lock:
            dev = self._device(det.device_id)
            dev.detection = det.model_dump(exclude={"preview_jpeg_b64"})
            if preview_jpeg:
                self._set_frame(dev, preview_jpeg, "detection", det.timestamp)
            out = dev.to_json()
        self.publish("device", out)

    def update_snapshot(self, snap: SnapshotPayload, jpeg: bytes) -> None:
        with self._lock:
            dev = self._device(snap.device_id)
            self._set_frame(dev, jpeg, "snapshot", snap.timestamp)
            out = dev.to_json()
        self.publish("device", out)

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
            self.last_invalid = message[:500]
        self.publish("broker", self.broker_json())
