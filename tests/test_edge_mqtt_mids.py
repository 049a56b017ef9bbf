"""paho-mqtt numbers every publish (QoS 0 detections, statuses and alerts alike) from one 16-bit counter that wraps
after 65,535 and skips no mid still in flight. An alert must be deleted from the spool only at its own PUBACK, and
not be lost when its mid comes round again, against a real mosquitto.

Instead of 65,535 real publishes, the tests set paho's counter (`Client._last_mid`, paho 2.x) so that the next
publish gets the mid of an alert still waiting for its PUBACK: what paho hands out then is exactly what it would
hand out after that many publishes."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator

import pytest
from _edge_helpers import fill, small_disk
from _mqtt_fixtures import Collector, Mosquitto, mosquitto_fixture, wait_until

from drywallqa.edge.mqtt_link import EdgeLink
from drywallqa.edge.payloads import AlertPayload, ClassResult, DetectionPayload, StatusPayload
from drywallqa.edge.settings import MqttSettings
from drywallqa.edge.spool import Spool

pytestmark = pytest.mark.slow
mosquitto = pytest.fixture(mosquitto_fixture, name="mosquitto")

DEVICE = "dev-mid"


def _status(state: str) -> StatusPayload:
    return StatusPayload(device_id=DEVICE, state=state, timestamp=time.time())


def _alert(event_id: str, snapshot_bytes: int = 30_000) -> AlertPayload:
    """An alert with an incompressible snapshot of about `snapshot_bytes` (big enough not to fit a full disk)."""
    return AlertPayload(event_id=event_id, device_id=DEVICE, timestamp=time.time(), frame_id=0, class_name="crack",
                        prompt="segment crack", rule="area_fraction>=0.0", area_fraction=0.1,
                        snapshot_jpeg_b64=base64.b64encode(os.urandom(snapshot_bytes * 3 // 4)).decode())


def _detection() -> DetectionPayload:
    result = ClassResult(class_name="crack", prompt="segment crack", area_fraction=0.1, region_count=1,
                         mean_confidence=0.9)
    return DetectionPayload(device_id=DEVICE, frame_id=1, timestamp=time.time(), width=64, height=64,
                            inference_ms=1.0, results=[result])


def _start_link(spool: Spool, port: int) -> EdgeLink:
    return EdgeLink(MqttSettings(host="127.0.0.1", port=port, device_id=DEVICE, reconnect_max_s=1), spool,
                    status=_status, on_command=lambda cmd: None).start()


def _held_by_paho(link: EdgeLink) -> list[int]:
    """The mids of the QoS 1 messages paho holds until their PUBACK."""
    client = link._client
    with client._out_message_mutex:
        return list(client._out_messages)


def _next_mid_is(link: EdgeLink, mid: int) -> None:
    """Make paho's next publish get `mid`, as after 65,535 further publishes (its counter goes 65,535 -> 1)."""
    client = link._client
    with client._mid_generate_mutex:
        client._last_mid = mid - 1 if mid > 1 else 65535


@contextlib.contextmanager
def _paused(broker: Mosquitto) -> Iterator[None]:
    """The broker process stopped (SIGSTOP) with its connections open: what is published reaches its socket, but no
    PUBACK comes until it goes on (SIGCONT)."""
    pid = broker._proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_detection_with_the_mid_of_an_unacknowledged_alert_does_not_delete_it(tmp_path, mosquitto, caplog):
    """Before: paho calls on_publish for a QoS 0 detection as soon as it is sent, and the link took that mid for the
    PUBACK of the alert with the same mid: the row was deleted although the broker had not acknowledged the alert
    (lost if the process died then). Now only the alert's own PUBACK deletes it; and a later alert whose mid is
    still in flight (paho refuses it) is handed at once with the next one, not after a failed attempt."""
    caplog.set_level(logging.WARNING, logger="drywallqa.edge.mqtt_link")
    collector = Collector(mosquitto.port, f"drywallqa/{DEVICE}/alerts", client_id="mid-collector")
    assert collector.connected.wait(10)
    spool = Spool(tmp_path / "spool.sqlite")
    link = _start_link(spool, mosquitto.port)
    try:
        wait_until(lambda: link.connected.is_set() and not _held_by_paho(link), 10, "the online status acknowledged")
        with _paused(mosquitto):
            assert link.send_alert(_alert("first"))
            (mid,) = wait_until(lambda: _held_by_paho(link), 10, "the first alert handed to paho")
            _next_mid_is(link, mid)
            assert link.send_detection(_detection())  # QoS 0, with the first alert's mid
            # paho writes its packets in order: once this later one is out, the detection's on_publish has run
            link._client.publish(f"drywallqa/{DEVICE}/barrier", b"", qos=0).wait_for_publish(10)
            _next_mid_is(link, mid)  # the second alert's first mid is the first one's too
            assert link.send_alert(_alert("second"))
            wait_until(lambda: len(_held_by_paho(link)) == 2, 10, "the second alert handed to paho")
            assert link.send_alert(_alert("third"))  # handed in a later pass of the delivery thread than the second,
            wait_until(lambda: len(_held_by_paho(link)) == 3, 10, "the third alert handed to paho")
            # ... so a whole pass, acknowledgements included, has run since the detection's on_publish
            assert [item.event_id for item in spool.pending()] == ["first", "second", "third"]
            assert link.pending() == 3 and link.delivered == 0
        wait_until(lambda: link.pending() == 0, 15, "the three PUBACKs")
        wait_until(lambda: len(collector.payloads("alerts")) >= 3, 15, "the three alerts at the subscriber")
        assert link.delivered == 3
    finally:
        link.stop(_status("offline"))
        spool.close()
        collector.close()
    assert [a["event_id"] for a in collector.payloads("alerts")] == ["first", "second", "third"]  # each once
    assert not [r.getMessage() for r in caplog.records if "publish of spooled alert" in r.getMessage()]


def test_an_alert_kept_in_memory_whose_mid_is_in_flight_is_not_lost(tmp_path, mosquitto):
    """The spool's disk is full and the broker down: alerts are published from memory (paho queues them with
    MQTT_ERR_NO_CONN). Before: an alert whose mid was still held by paho for an earlier one was refused by paho
    (MQTT_ERR_QUEUE_SIZE) and logged as lost. Now it is published with the next mid; both arrive, once each."""
    collector = Collector(mosquitto.port, f"drywallqa/{DEVICE}/alerts", client_id="mid-collector")
    assert collector.connected.wait(10)
    mosquitto.stop()  # its persistent session keeps the collector's subscription
    with small_disk(tmp_path / "disk") as disk:
        spool = Spool(disk / "spool.sqlite")
        link = _start_link(spool, mosquitto.port)
        try:
            fill(disk)
            assert link.send_alert(_alert("first")) is False
            (mid,) = _held_by_paho(link)
            _next_mid_is(link, mid)
            assert link.send_alert(_alert("second")) is False
            assert link.spool_dropped == 0 and link.pending() == 2
            mosquitto.start()
            wait_until(lambda: link.pending() == 0, 20, "both alerts acknowledged")
        finally:
            link.stop(_status("offline"))
            spool.close()
    wait_until(lambda: len(collector.payloads("alerts")) >= 2, 15, "both alerts at the subscriber")
    collector.close()
    assert [a["event_id"] for a in collector.payloads("alerts")] == ["first", "second"]
