"""configs/mosquitto/drywallqa.conf, the site broker's drop-in, in a real mosquitto: with mosquitto's default a
subscriber that is away (a dashboard restarting while a device replays its spool) gets only the first 1000
queued alerts; with the drop-in it gets them all. Also: the embedded broker uses the same number."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from _mqtt_fixtures import free_port, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from drywallqa.edge.broker import BROKER_MAX_QUEUED_MESSAGES, port_open

DROP_IN = Path(__file__).resolve().parents[1] / "configs" / "mosquitto" / "drywallqa.conf"
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
pytestmark = pytest.mark.slow


def _site_broker(workdir: Path, with_drop_in: bool) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf_d = workdir / "conf.d"
    conf_d.mkdir(parents=True)
    if with_drop_in:
        shutil.copy(DROP_IN, conf_d / "drywallqa.conf")
    (workdir / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n"
        f"log_dest file {workdir / 'mosquitto.log'}\ninclude_dir {conf_d}\n"
    )
    proc = subprocess.Popen([MOSQUITTO, "-c", str(workdir / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    if not wait_until(lambda: port_open("127.0.0.1", port) or proc.poll() is not None, 10) or proc.poll():
        raise AssertionError(f"mosquitto did not start: {proc.stderr.read().decode(errors='replace')}")
    return proc, port


def _queued_for_an_absent_subscriber(port: int, count: int) -> int:
    """A persistent subscriber goes away; `count` QoS 1 messages are published; how many reach it on return."""
    sub_id = f"dashboard-{uuid.uuid4().hex[:6]}"
    received: list[bytes] = []
    lock = threading.Lock()

    def on_message(client, userdata, msg) -> None:
        with lock:
            received.append(msg.payload)

    def subscriber() -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=sub_id, clean_session=False)
        client.on_message = on_message
        client.connect("127.0.0.1", port)
        client.loop_start()
        return client

    away = subscriber()
    away.subscribe("site/cam/alerts", qos=1)
    time.sleep(0.3)
    away.disconnect()
    away.loop_stop()

    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"device-{uuid.uuid4().hex[:6]}")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    try:
        infos = [pub.publish("site/cam/alerts", f"alert {i}", qos=1) for i in range(count)]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        pub.disconnect()
        pub.loop_stop()

    back = subscriber()
    try:
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 1.5:  # until nothing more arrives for 1.5 s
            time.sleep(0.2)
            with lock:
                n = len(received)
            if n != last:
                last, stable_since = n, time.monotonic()
    finally:
        back.disconnect()
        back.loop_stop()
    return last


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (apt-get install mosquitto)")
@pytest.mark.parametrize("with_drop_in", [False, True], ids=["mosquitto default", "with the drop-in"])
def test_the_drop_in_keeps_a_whole_replay_for_an_absent_dashboard(tmp_path: Path, with_drop_in: bool) -> None:
    proc, port = _site_broker(tmp_path, with_drop_in)
    try:
        got = _queued_for_an_absent_subscriber(port, 1500)
    finally:
        proc.terminate()
        proc.wait(10)
    if with_drop_in:
        assert got == 1500
    else:
        assert got == 1000  # what the drop-in is for: mosquitto's default silently drops the rest


def test_the_embedded_broker_and_the_drop_in_agree() -> None:
    (value,) = re.findall(r"^max_queued_messages\s+(\d+)\s*$", DROP_IN.read_text(), flags=re.MULTILINE)
    assert int(value) == BROKER_MAX_QUEUED_MESSAGES
