"""An alert the dashboard's store cannot write (disk full, file read-only) is held, not lost: real mosquitto (with
persistence, so a session survives a broker restart), real SQLite made to refuse writes with `PRAGMA query_only`
(root writes through chmod), real paho. Its PUBACK is withheld (up to a few), so the broker still has it."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _dashboard_fixtures import (
    PREFIX,
    Publisher,
    alert,
    make_app,
    make_jpeg,
    needs_node,
    run_app_js,
    running_publisher,
    status,
)
from _mqtt_fixtures import Mosquitto, free_port, wait_until

from drywallqa.dashboard.bridge import AlertHeld, BrokerConfig, HoldLimits, MqttBridge
from drywallqa.dashboard.state import LiveState
from drywallqa.dashboard.store import AlertStore
from drywallqa.edge.payloads import TOPIC_ALERTS, TOPIC_STATUS, topic

NO_TIMER = HoldLimits(retry_s=3600)  # held alerts are retried only when the test calls retry_held()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "broker").start()  # persistence on: sessions survive stop()/start()
    yield broker
    broker.stop()


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Iterator[Publisher]:
    with running_publisher(mosquitto.port) as pub:
        yield pub


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AlertStore]:
    s = AlertStore(tmp_path / "dashboard.sqlite")
    yield s
    s.close()


def writable(store: AlertStore, on: bool) -> None:
    """Make SQLite refuse (or take again) every write, as for a store file made read-only."""
    store._db.execute(f"PRAGMA query_only = {0 if on else 1}")


def bridge_config(port: int, client_id: str) -> BrokerConfig:
    return BrokerConfig(host="127.0.0.1", port=port, prefix=PREFIX, client_id=client_id, keepalive=5,
                        reconnect_max_s=1)


@contextlib.contextmanager
def running_bridge(port: int, store: AlertStore, publisher: Publisher, client_id: str = "",
                   hold: HoldLimits = NO_TIMER) -> Iterator[MqttBridge]:
    """A started bridge whose subscriptions are in place (a status it was sent has arrived)."""
    bridge = MqttBridge(bridge_config(port, client_id or f"dash-{uuid.uuid4().hex[:8]}"), LiveState(), store, hold)
    bridge.start()
    try:
        wait_until(lambda: bridge.state.broker.connected, 10, "the bridge to connect")
        publisher.publish("cam-0", TOPIC_STATUS, status("cam-0"))
        wait_until(lambda: bridge.state.devices_json(), 10, "the bridge's subscriptions")
        yield bridge
    finally:
        bridge.stop()


def announced(sub) -> list[str]:
    """The event ids of the alerts announced to a browser's subscription so far."""
    ids = []
    with contextlib.suppress(queue.Empty):
        while True:
            name, data = sub.get(timeout=0.01)
            if name == "alert":
                ids.append(data["event_id"])
    return ids


def test_an_alert_the_store_cannot_write_is_saved_and_announced_once_it_can(tmp_path, mosquitto, publisher) -> None:
    app = make_app(tmp_path, mosquitto.port)
    app.bridge.hold = HoldLimits(retry_s=0.05)
    app.start()
    try:
        wait_until(lambda: app.state.broker.connected, 10, "the dashboard to connect")
        publisher.publish("cam-0", TOPIC_STATUS, status("cam-0"))
        wait_until(lambda: app.state.devices_json(), 10, "the dashboard's subscriptions")
        sub = app.state.subscribe()
        writable(app.store, False)
        publisher.publish("cam-1", TOPIC_ALERTS, alert("cam-1", "e1", make_jpeg()))
        wait_until(lambda: app.state.alerts_held == 1, 10, "the failed write to be reported")
        banner = app.state.broker_json()
        assert banner["alerts_held"] == 1 and banner["held_detail"].startswith("alert e1 was not saved")
        assert "saved as soon as it can be written (the broker keeps them as well" in banner["held_detail"]
        assert app.state.invalid_messages == 0  # not an invalid message: a valid alert waiting for the store

        writable(app.store, True)
        wait_until(lambda: app.store.get("e1") is not None, 10, "the held alert to be saved")  # was lost for good
        assert app.store.snapshot("e1") == make_jpeg()
        wait_until(lambda: "e1" in announced(sub), 10, "the saved alert to be announced to browsers")
        wait_until(lambda: app.state.alerts_held == 0, 10, "the banner to go")
        assert app.state.broker_json()["held_detail"] == ""
    finally:
        app.stop()


def test_a_withheld_alert_is_delivered_again_to_the_next_dashboard(mosquitto, publisher, store) -> None:
    writable(store, False)
    with running_bridge(mosquitto.port, store, publisher, client_id="dash-same") as bridge:
        publisher.publish("cam-1", TOPIC_ALERTS, alert("cam-1", "e1", make_jpeg()))
        wait_until(lambda: bridge.state.alerts_held == 1, 10, "the failed write")
    # the dashboard stopped with the alert unsaved; the store is writable at its next start
    writable(store, True)
    with running_bridge(mosquitto.port, store, publisher, client_id="dash-same"):
        # the broker delivers it again only because its PUBACK was withheld (paho used to send it at once)
        wait_until(lambda: store.get("e1") is not None, 10, "the broker to deliver the withheld alert again")


PUBACK = r"Sending PUBACK \(Mid: (\d+)\)"


def _mids(lines: list[str], pattern: str) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.search(pattern, line))]


def test_a_message_id_withheld_on_an_older_connection_is_never_acknowledged(mosquitto, publisher, store) -> None:
    with running_bridge(mosquitto.port, store, publisher) as bridge:
        paho_log: list[str] = []
        bridge.client.on_log = lambda client, userdata, level, line: paho_log.append(line)
        writable(store, False)
        publisher.publish("cam-1", TOPIC_ALERTS, alert("cam-1", "e1", make_jpeg()))
        wait_until(lambda: bridge.withheld_acks() == 1, 10, "the alert's PUBACK to be withheld")

        mosquitto.stop()  # the connection drops; the broker keeps the session and the unacknowledged alert
        wait_until(lambda: not bridge.state.broker.connected, 10, "the bridge to notice")
        writable(store, True)
        mark = len(paho_log)
        mosquitto.start()
        wait_until(lambda: store.get("e1") is not None, 15, "the alert delivered again on the new connection")
        # messages are handled one at a time: once a later one's PUBACK is sent, every earlier PUBACK is
        wait_until(publisher.client.is_connected, 15, "the device to reconnect")
        publisher.publish("cam-5", TOPIC_STATUS, status("cam-5"))
        later = wait_until(lambda: _mids(paho_log[mark:], r"m(\d+)\), 'dqtest/cam-5/status'"), 10, "a later status")
        wait_until(lambda: later[0] in _mids(paho_log[mark:], PUBACK), 10, "the later status's PUBACK")
        # one PUBACK for each message of this connection; the id withheld on the old one is dropped, not sent too
        received = _mids(paho_log[mark:], r"Received PUBLISH \(d\d, q1, .*m(\d+)\)")
        assert sorted(_mids(paho_log[mark:], PUBACK)) == sorted(received), paho_log[mark:]
        assert bridge.held_ids() == [] and bridge.withheld_acks() == 0


def test_statuses_flow_while_alerts_are_held_and_few_acks_are_withheld(mosquitto, publisher, store) -> None:
    with running_bridge(mosquitto.port, store, publisher) as bridge:
        writable(store, False)
        ids = [f"e{i}" for i in range(25)]  # more than mosquitto's 20 unacknowledged messages a client
        for event_id in ids:
            publisher.publish("cam-1", TOPIC_ALERTS, alert("cam-1", event_id, make_jpeg()))
        for _ in range(25):  # invalid payloads are acknowledged as well
            publisher.publish("cam-1", TOPIC_ALERTS, b"not json")
        publisher.publish("cam-9", TOPIC_STATUS, status("cam-9"))
        wait_until(lambda: any(d["device_id"] == "cam-9" for d in bridge.state.devices_json()), 10,
                   "a status sent after the held alerts (delivery must not stall)")
        wait_until(lambda: len(bridge.held_ids()) == 25, 10, "every alert to be held")
        assert bridge.held_ids() == ids
        assert bridge.withheld_acks() == HoldLimits().withheld_acks == 8

        writable(store, True)
        assert bridge.retry_held() == 25
        assert sorted(a["event_id"] for a in store.alerts()) == sorted(ids)
        assert bridge.held_ids() == [] and bridge.withheld_acks() == 0


def test_a_held_alert_not_withheld_says_it_is_lost_if_the_dashboard_stops(mosquitto, publisher, store) -> None:
    with running_bridge(mosquitto.port, store, publisher, hold=HoldLimits(retry_s=3600, withheld_acks=1)) as bridge:
        writable(store, False)
        for event_id in ("e1", "e2"):
            publisher.publish("cam-1", TOPIC_ALERTS, alert("cam-1", event_id, make_jpeg()))
        wait_until(lambda: bridge.state.alerts_held == 2, 10, "the second failed write")
        assert bridge.state.held_detail.startswith("alert e2 was not saved")
        assert "1 of them are kept by the broker as well; the other 1 are lost if the dashboard stops" \
            in bridge.state.held_detail
        assert bridge.withheld_acks() == 1


@pytest.mark.parametrize("limits", [HoldLimits(alerts=3), HoldLimits(picture_bytes=3 * len(make_jpeg()) + 10)])
def test_beyond_the_bound_the_oldest_held_alert_is_dropped_and_said_lost(store, caplog, limits) -> None:
    bridge = MqttBridge(bridge_config(free_port(), "dash-b"), LiveState(), store, limits)  # not started
    writable(store, False)
    for event_id in ("e1", "e2", "e3", "e4", "e5"):
        with pytest.raises(AlertHeld):
            bridge.handle(topic(PREFIX, "cam-1", TOPIC_ALERTS), alert("cam-1", event_id, make_jpeg()).model_dump_json())
    assert bridge.held_ids() == ["e3", "e4", "e5"]
    lost = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "is lost" in r.getMessage()]
    assert len(lost) == 2 and lost[0].startswith("alert e1 of cam-1 is lost: the store could not be written")
    assert bridge.state.last_lost.startswith("alert e2 of cam-1 is lost") and bridge.state.alerts_lost == 2
    assert bridge.state.alerts_held == 3

    writable(store, True)
    assert bridge.retry_held() == 3
    assert [a["event_id"] for a in store.alerts()] == ["e5", "e4", "e3"] and bridge.held_ids() == []


_BANNER = """
const model = app("model");
model.streamUp = true;
model.broker = JSON.parse(args[0]);
app("renderLinks")();
console.log(JSON.stringify({ banner: nodes.banner.textContent, hidden: nodes.banner.hidden,
  footer: nodes.invalid.textContent }));
"""


@needs_node
def test_the_page_banner_says_alerts_wait_for_the_store_and_the_footer_counts_lost_ones(store) -> None:
    bridge = MqttBridge(bridge_config(free_port(), "dash-p"), LiveState(), store, HoldLimits(alerts=2))  # not started
    writable(store, False)
    for event_id in ("e1", "e2", "e3"):
        with pytest.raises(AlertHeld):
            bridge.handle(topic(PREFIX, "cam-1", TOPIC_ALERTS), alert("cam-1", event_id, make_jpeg()).model_dump_json())

    def page() -> dict:
        return run_app_js(_BANNER, json.dumps(dict(bridge.state.broker_json(), connected=True)))

    held = page()
    assert not held["hidden"] and held["banner"].startswith("2 alert(s) received but not saved yet: alert e3 was not")
    assert "1 alert(s) lost (the store could not be written); last: alert e1 of cam-1 is lost" in held["footer"]
    writable(store, True)
    assert bridge.retry_held() == 2
    assert page()["hidden"]  # all saved: the banner goes, the loss stays in the footer


class _StoreWritableAgainMidBanner(LiveState):
    """The real LiveState, except that the first time the banner is to show held alerts the store becomes writable
    and the retry thread runs: it saves the alert while the MQTT thread is about to show it held."""

    def __init__(self) -> None:
        super().__init__()
        self.bridge: MqttBridge | None = None
        self.retry: threading.Thread | None = None

    def set_alerts_held(self, count: int, detail: str) -> None:
        if count and self.retry is None and self.bridge is not None:
            writable(self.bridge.store, True)
            self.retry = threading.Thread(target=self.bridge.retry_held)
            self.retry.start()
            self.retry.join(1)  # it overtook this banner, unless it waits for it (the banner is shown under a lock)
        super().set_alerts_held(count, detail)


def test_the_banner_never_keeps_a_held_count_that_the_retry_thread_already_cleared(store) -> None:
    state = _StoreWritableAgainMidBanner()
    bridge = MqttBridge(bridge_config(free_port(), "dash-r"), state, store, NO_TIMER)  # not started
    state.bridge = bridge
    writable(store, False)
    with pytest.raises(AlertHeld):
        bridge.handle(topic(PREFIX, "cam-1", TOPIC_ALERTS), alert("cam-1", "e1", make_jpeg()).model_dump_json())
    state.retry.join()
    assert store.get("e1") is not None and bridge.held_ids() == []
    assert state.alerts_held == 0 and state.broker_json()["held_detail"] == ""  # was 1: "1 alert(s) ... not saved"
