"""End to end against a real mosquitto: alerts from a video, broker outage, kill -9 replay, SIGTERM, commands."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from _edge_helpers import clean_env, edge_cmd, make_video, start_edge, write_config
from _mqtt_fixtures import Collector, Mosquitto, free_port, mosquitto_fixture, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from drywallqa.edge.cli import EXIT_CONFIG

pytestmark = pytest.mark.slow
mosquitto = pytest.fixture(mosquitto_fixture, name="mosquitto")

OUTAGE_S = float(os.environ.get("DRYWALLQA_TEST_OUTAGE_S", "20"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="exporting the random test model needs torch")
    from _export_fixtures import export_random_model

    return export_random_model(tmp_path_factory.mktemp("model"), size=(64, 64))


def _spool_rows(path: Path) -> list[tuple[int, str]]:
    if not path.exists():
        return []
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT seq, event_id FROM outbox ORDER BY seq").fetchall()
    except sqlite3.OperationalError:  # created but its schema not yet committed
        return []
    finally:
        db.close()


def _dedup(alerts: list[dict]) -> tuple[list[dict], int]:
    seen, out = set(), []
    for a in alerts:
        if a["event_id"] not in seen:
            seen.add(a["event_id"])
            out.append(a)
    return out, len(alerts) - len(out)


def test_video_source_alerts_status_and_sd_notify(tmp_path, mosquitto, model):
    video = make_video(tmp_path / "clip.avi", 12)
    cfg = write_config(tmp_path / "edge.yaml", uri=str(video), model=model, port=mosquitto.port,
                       spool=tmp_path / "spool.sqlite")
    collector = Collector(mosquitto.port, "drywallqa/dev1/#")
    assert collector.connected.wait(10)
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(0.1)
    try:
        env = clean_env(NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="2000000")
        proc = subprocess.run(edge_cmd(cfg), env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["frames_processed"] == 12 and summary["alerts"] == 12 and summary["frame_errors"] == 0
        assert wait_until(lambda: len(collector.payloads("alerts")) >= 12, 15)
        alerts = collector.payloads("alerts")
        assert [a["frame_id"] for a in alerts] == list(range(12))
        assert len({a["event_id"] for a in alerts}) == 12
        assert all(a["class_name"] == "crack" and a["rule"] == "area_fraction>=0" for a in alerts)
        jpeg = np.frombuffer(base64.b64decode(alerts[0]["snapshot_jpeg_b64"]), np.uint8)
        assert cv2.imdecode(jpeg, cv2.IMREAD_COLOR).shape == (120, 160, 3)
        detections = collector.payloads("detections")
        assert detections and {r["class_name"] for r in detections[0]["results"]} == {"crack", "taping"}
        status = collector.payloads("status")
        assert status[0]["state"] == "online" and status[-1]["state"] == "offline"
        assert status[-1]["frames_processed"] == 12 and status[-1]["spooled_alerts"] == 0
        messages = []
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                break
        assert "READY=1" in messages and "STOPPING=1" in messages and "WATCHDOG=1" in messages
    finally:
        sock.close()
        collector.close()
    assert _spool_rows(tmp_path / "spool.sqlite") == []  # everything acknowledged -> deleted


def test_broker_keeps_persistent_sessions_and_its_log_across_a_restart(tmp_path, mosquitto):
    """What the outage test below relies on: a subscriber's persistent session (QoS 1) survives stop()/start(), so
    what is published while it reconnects waits for it. Also when the tests run as root, where mosquitto would
    otherwise switch to a user that cannot write the session store or the log."""
    collector = Collector(mosquitto.port, "drywallqa/dev1/alerts", client_id="restart-collector")
    assert collector.connected.wait(10)
    collector.close()  # gone before the restart: only its stored session can get the message to it
    mosquitto.stop()
    assert (mosquitto.workdir / "mosquitto.db").is_file()
    mosquitto.start()
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="restart-publisher")
    publisher.connect("127.0.0.1", mosquitto.port)
    publisher.loop_start()
    try:
        publisher.publish("drywallqa/dev1/alerts", json.dumps({"event_id": "while-away"}), qos=1).wait_for_publish(10)
    finally:
        publisher.disconnect()
        publisher.loop_stop()
    back = Collector(mosquitto.port, "drywallqa/dev1/alerts", client_id="restart-collector")
    try:
        assert wait_until(lambda: back.payloads("alerts"), 10, "the message queued for the persistent session")
    finally:
        back.close()
    assert back.payloads("alerts") == [{"event_id": "while-away"}]
    assert "restart-collector" in mosquitto.log()


def test_broker_outage_mid_run_loses_nothing(tmp_path, mosquitto, model):
    fps, frames = 4.0, int(4.0 * (OUTAGE_S + 8))
    video = make_video(tmp_path / "clip.avi", frames)
    cfg = write_config(tmp_path / "edge.yaml", uri=str(video), model=model, port=mosquitto.port,
                       spool=tmp_path / "spool.sqlite", source={"fps": fps, "realtime": False})
    collector = Collector(mosquitto.port, "drywallqa/dev1/alerts")
    assert collector.connected.wait(10)
    proc = start_edge(cfg, log=tmp_path / "edge.log")
    try:
        assert wait_until(lambda: len(collector.payloads("alerts")) >= 3, 60), (tmp_path / "edge.log").read_text()
        mosquitto.stop()
        time.sleep(OUTAGE_S)
        spooled_during_outage = len(_spool_rows(tmp_path / "spool.sqlite"))
        mosquitto.start()
        assert proc.wait(OUTAGE_S + 60) == 0, (tmp_path / "edge.log").read_text()[-3000:]
        assert wait_until(lambda: len(_dedup(collector.payloads("alerts"))[0]) >= frames, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
        collector.close()
    unique, duplicates = _dedup(collector.payloads("alerts"))
    assert spooled_during_outage > 0
    assert [a["frame_id"] for a in unique] == list(range(frames))  # every alert, in order, once after dedup
    assert _spool_rows(tmp_path / "spool.sqlite") == []
    print(f"outage {OUTAGE_S:.0f} s: {frames} alerts, {spooled_during_outage} spooled, {duplicates} duplicates")


def test_kill9_while_broker_down_then_replay(tmp_path, model):
    port = free_port()  # nothing listens yet
    video = make_video(tmp_path / "clip.avi", 6)
    spool = tmp_path / "state" / "spool.sqlite"
    cfg = write_config(tmp_path / "edge.yaml", uri=str(video), model=model, port=port, spool=spool,
                       source={"loop": True, "fps": 20.0})
    proc = start_edge(cfg, log=tmp_path / "edge1.log")
    try:
        assert wait_until(lambda: len(_spool_rows(spool)) >= 8, 60), (tmp_path / "edge1.log").read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    spooled = _spool_rows(spool)
    assert len(spooled) >= 8
    broker = Mosquitto(tmp_path / "broker", port).start()
    collector = Collector(port, "drywallqa/dev1/alerts")
    try:
        assert collector.connected.wait(10)
        proc = start_edge(cfg, "--max-frames", "2", log=tmp_path / "edge2.log")
        assert proc.wait(60) == 0, (tmp_path / "edge2.log").read_text()[-3000:]
        assert wait_until(lambda: len(_dedup(collector.payloads("alerts"))[0]) >= len(spooled) + 2, 20)
        unique, _ = _dedup(collector.payloads("alerts"))
        ids = [a["event_id"] for a in unique]
        assert ids[: len(spooled)] == [e for _, e in spooled]  # replayed first, in their original order
        assert _spool_rows(spool) == []
    finally:
        collector.close()
        broker.stop()


def test_sigterm_stops_cleanly_and_commands_work(tmp_path, mosquitto, model):
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=mosquitto.port,
                       spool=tmp_path / "spool.sqlite", rules=[], source={"fps": 10.0, "demo_size": [96, 128]})
    collector = Collector(mosquitto.port, "drywallqa/dev1/#")
    assert collector.connected.wait(10)
    proc = start_edge(cfg, log=tmp_path / "edge.log")
    try:
        assert wait_until(lambda: len(collector.payloads("detections")) >= 2, 60), (tmp_path / "edge.log").read_text()
        cmd_topic = "drywallqa/dev1/cmd"
        collector.client.publish(cmd_topic, json.dumps({"command": "snapshot", "request_id": "r1"}), qos=1)
        collector.client.publish(cmd_topic, json.dumps({"command": "set_prompts", "prompts": ["no such thing"]}),
                                 qos=1)
        collector.client.publish(cmd_topic, b"not json", qos=1)
        collector.client.publish(cmd_topic, json.dumps({"command": "pause"}), qos=1)
        assert wait_until(lambda: any(s["state"] == "paused" for s in collector.payloads("status")), 15)
        snaps = collector.payloads("snapshot")
        assert snaps and snaps[0]["request_id"] == "r1"
        rejected = [s for s in collector.payloads("status") if "set_prompts rejected" in s["last_error"]]
        assert rejected and "segment crack" in rejected[0]["last_error"]  # lists the known prompts
        collector.client.publish(cmd_topic, json.dumps({"command": "set_prompts", "prompts": ["crack"]}), qos=1)
        collector.client.publish(cmd_topic, json.dumps({"command": "resume"}), qos=1)
        assert wait_until(lambda: any(s["state"] == "online" and s["prompts"] == ["crack"]
                                      for s in collector.payloads("status")), 15)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_until(lambda: collector.payloads("status")[-1]["state"] == "offline", 10)
    retained = Collector(mosquitto.port, "drywallqa/dev1/status", client_id="late-reader")
    try:
        assert wait_until(lambda: bool(retained.payloads("status")), 10)
        assert retained.payloads("status")[-1]["state"] == "offline"
    finally:
        retained.close()
        collector.close()


def test_default_config_runs_with_embedded_broker_and_demo_source(tmp_path, model):
    """The packaged default config, only the model, port and spool overridden: demo frames + spawned mosquitto."""
    port = free_port()
    env = clean_env(DRYWALLQA_MODEL__PATH=str(model), DRYWALLQA_MQTT__PORT=str(port),
                    DRYWALLQA_SPOOL__PATH=str(tmp_path / "spool.sqlite"), DRYWALLQA_MODEL__BACKEND="openvino")
    proc = subprocess.run([*edge_cmd(Path("unused"))[:4], "--max-frames", "5"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["frames_processed"] == 5
    assert "embedded mosquitto listening on 127.0.0.1:" in proc.stderr


def test_unknown_prompt_stops_startup_listing_known_prompts(tmp_path, model):
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=free_port(),
                       spool=tmp_path / "spool.sqlite", analysis={"prompts": ["segment mould"]})
    proc = subprocess.run(edge_cmd(cfg), env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_CONFIG and "unknown prompt 'segment mould'" in proc.stderr
    assert "segment taping area" in proc.stderr and "Traceback" not in proc.stderr


def test_check_config_loads_model_and_resolves_prompts(tmp_path, model):
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=1883, spool=tmp_path / "s.sqlite",
                       mqtt={"password": "secret"})
    proc = subprocess.run([*edge_cmd(cfg)[:3], "check-config", "--config", str(cfg), "--model-check"],
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "'segment crack' -> crack" in proc.stdout and "secret" not in proc.stdout


def test_crack_skeleton_is_measured_only_when_something_reads_it(tmp_path, mosquitto, model):
    """Thinning, the costliest analysis, runs for published detections and for frames that could raise an
    alert, and not while the class cools down after one; every other measurement runs on every frame."""
    from drywallqa.edge.capture import Frame
    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import load_settings

    cfg = write_config(
        tmp_path / "edge.yaml", uri=str(make_video(tmp_path / "v.avi", 5)), model=model, port=mosquitto.port,
        spool=tmp_path / "spool.sqlite", mqtt={"detections_max_hz": 0.5},
        rules=[{"prompt": "segment crack", "metric": "skeleton_length_px", "min": 10, "persistence_frames": 1,
                "cooldown_s": 60}])
    runner = EdgeRunner(load_settings(cfg)).setup()
    probs = np.zeros((2, 64, 64), np.float32)
    probs[0, 10:50, 30:33] = 0.99  # a vertical crack, 40 cells long on the 64 x 64 model grid

    def crack(frame_id: int):
        frame = Frame(frame_id, np.zeros((128, 128, 3), np.uint8), time.monotonic(), time.time())
        return {r.class_name: r for r in runner.analyze_and_publish(frame, probs, 1.0)}["crack"]

    try:
        first = crack(1)  # a detection is due and the rule can fire: thinned, and the alert carries the length
        assert 60 < first.skeleton_length_px < 90 and runner.stats.alerts == 1  # ~2 x 38 source pixels
        cooling = crack(2)  # cooling down, next detection not due yet: nothing reads a length
        assert cooling.skeleton_length_px == 0.0 and cooling.regions[0].skeleton_length_px is None
        assert cooling.area_fraction == first.area_fraction and cooling.region_count == 1
        runner._last_detection -= 10  # the next detection is due: its payload carries the length again
        assert crack(3).skeleton_length_px == first.skeleton_length_px and runner.stats.alerts == 1
    finally:
        runner.shutdown()


def test_set_prompts_that_would_silence_an_alert_rule_is_rejected(tmp_path, mosquitto, model):
    from drywallqa.edge.payloads import CommandPayload
    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import load_settings

    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=mosquitto.port,
                       spool=tmp_path / "spool.sqlite")  # its rule watches crack
    runner = EdgeRunner(load_settings(cfg)).setup()
    try:
        before = [w.class_name for w in runner.watched]
        runner._handle_command(CommandPayload(command="set_prompts", prompts=["segment taping area"]))
        assert [w.class_name for w in runner.watched] == before
        assert "set_prompts rejected" in runner.last_error and "['crack']" in runner.last_error
        runner._handle_command(CommandPayload(command="set_prompts", prompts=["crack", "drywall seam"]))
        assert runner.last_error == "" and [w.prompt for w in runner.watched] == ["crack", "drywall seam"]
    finally:
        runner.shutdown()


def test_check_config_makes_the_start_up_checks_of_the_alert_rules(tmp_path, model):
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=1883, spool=tmp_path / "s.sqlite",
                       analysis={"prompts": ["segment taping area"]})  # the default rule watches crack
    check = subprocess.run([*edge_cmd(cfg)[:3], "check-config", "--config", str(cfg), "--model-check"],
                           env=clean_env(), capture_output=True, text=True, timeout=120)
    run = subprocess.run(edge_cmd(cfg), env=clean_env(), capture_output=True, text=True, timeout=120)
    assert check.returncode == run.returncode == EXIT_CONFIG
    assert "rules watch class(es) ['crack']" in check.stderr and "rules watch class(es) ['crack']" in run.stderr


def test_pause_holds_a_folder_where_it_is(tmp_path, mosquitto, model):
    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import load_settings

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        cv2.imwrite(str(folder / f"p{i}.png"), np.full((40, 48, 3), 30 * i, np.uint8))
    cfg = write_config(tmp_path / "edge.yaml", uri=str(folder), model=model, port=mosquitto.port,
                       spool=tmp_path / "spool.sqlite", rules=[])
    runner = EdgeRunner(load_settings(cfg)).setup()
    try:
        runner.paused = True
        assert runner.run_frames(duration_s=1.0) == 0
        runner.paused = False
        assert runner.run_frames(max_frames=10) == 6  # every photo once: none skipped while paused
        assert runner.capture.stats.dropped == 0 and runner.stats.processed == 6
    finally:
        runner.shutdown()


def test_unreachable_broker_is_logged_while_alerts_are_spooled(tmp_path, model):
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=free_port(),
                       spool=tmp_path / "spool.sqlite", source={"fps": 10.0, "demo_size": [64, 80]})
    proc = subprocess.run(edge_cmd(cfg, "--max-frames", "5"), env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MQTT broker 127.0.0.1:" in proc.stderr and "unreachable" in proc.stderr
    assert "still undelivered; they stay in the spool" in proc.stderr


def test_tls_file_that_holds_no_certificate_is_a_clear_error(tmp_path, model):
    bad = tmp_path / "ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=free_port(),
                       spool=tmp_path / "spool.sqlite", mqtt={"tls": {"enabled": True, "ca_certs": str(bad)}})
    proc = subprocess.run(edge_cmd(cfg), env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_CONFIG and "mqtt.tls: cannot load the certificates" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_kill9_last_will_keeps_the_dashboards_last_known_figures(tmp_path, mosquitto, model):
    """A device that dies without a clean stop: the broker publishes its last will (offline, `last_will`), whose
    figures date from the connection's start; the dashboard shows it offline with the figures it saw last."""
    from _dashboard_fixtures import running_dashboard

    from drywallqa.dashboard.bridge import BrokerConfig

    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=mosquitto.port,
                       spool=tmp_path / "spool.sqlite", rules=[], source={"fps": 10.0, "demo_size": [96, 128]})
    broker = BrokerConfig(host="127.0.0.1", port=mosquitto.port, prefix="drywallqa", client_id="dash-will",
                          keepalive=5, reconnect_max_s=1)
    collector = Collector(mosquitto.port, "drywallqa/dev1/status")
    with running_dashboard(tmp_path, mosquitto.port, broker=broker) as app:
        assert collector.connected.wait(10)
        proc = start_edge(cfg, log=tmp_path / "edge.log")
        try:
            def seen() -> dict:
                devices = app.state.devices_json()
                return (devices[0]["status"] or {}) if devices else {}

            assert wait_until(lambda: seen().get("frames_processed", 0) >= 5, 60), (tmp_path / "edge.log").read_text()
            last_known = seen()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert wait_until(lambda: any(s["last_will"] for s in collector.payloads("status")), 15)
        will = next(s for s in collector.payloads("status") if s["last_will"])
        assert will["state"] == "offline" and will["frames_processed"] < last_known["frames_processed"]
        assert wait_until(lambda: seen().get("state") == "offline", 10)
        shown = seen()
        collector.close()
    assert shown["last_will"] is True
    assert shown["frames_processed"] >= last_known["frames_processed"]  # not the will's start-up figures
    assert shown["timestamp"] >= last_known["timestamp"]  # dated when the will arrived, not at start-up


def test_after_a_reconnect_the_last_will_carries_recent_figures(tmp_path, mosquitto, model):
    """The will is fixed per connection; the edge refreshes it from its latest status before reconnecting, so a
    device that dies after a broker outage is reported with the figures it had, not those of its first start."""
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=mosquitto.port,
                       spool=tmp_path / "spool.sqlite", rules=[], source={"fps": 10.0, "demo_size": [96, 128]})
    proc = start_edge(cfg, log=tmp_path / "edge.log")
    collector = None
    try:
        first = Collector(mosquitto.port, "drywallqa/dev1/status", client_id="will-watch-1")
        assert wait_until(lambda: any(s["frames_processed"] >= 5 for s in first.payloads("status")), 60), \
            (tmp_path / "edge.log").read_text()[-3000:]
        before_outage = max(s["frames_processed"] for s in first.payloads("status"))
        first.close()
        mosquitto.stop()
        time.sleep(1.5)
        mosquitto.start()
        collector = Collector(mosquitto.port, "drywallqa/dev1/status", client_id="will-watch-2")
        assert wait_until(lambda: any(s["state"] == "online" and not s["last_will"] for s in collector.payloads("status")),
                          30), (tmp_path / "edge.log").read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    def wills_after_reconnect() -> list[dict]:  # mosquitto also sent the first connection's will when it stopped
        statuses = collector.payloads("status")
        back = max(i for i, s in enumerate(statuses) if s["state"] == "online" and not s["last_will"])
        return [s for s in statuses[back:] if s["last_will"]]

    try:
        assert wait_until(wills_after_reconnect, 15)
        will = wills_after_reconnect()[0]
    finally:
        collector.close()
    assert will["state"] == "offline" and before_outage > 0, will
    assert will["frames_processed"] >= before_outage, (will["frames_processed"], before_outage)


def test_two_devices_with_one_device_id_are_told_why_they_keep_dropping(tmp_path, mosquitto, model):
    """Two devices (or runtimes) with one mqtt.device_id share an MQTT client id: the broker drops each one when the
    other connects, every second, for ever, and MQTT 3.1.1 says nothing more than a disconnect. Each side names the
    likely cause once (not every second) and puts it in its status, for the dashboard."""
    collector = Collector(mosquitto.port, "drywallqa/twin/status")
    procs = []
    try:
        assert collector.connected.wait(10)
        for name in ("a", "b"):
            cfg = write_config(tmp_path / f"edge_{name}.yaml", uri="demo", model=model, port=mosquitto.port,
                               spool=tmp_path / f"spool_{name}.sqlite", device_id="twin",
                               source={"fps": 5.0, "demo_size": [64, 80]})
            procs.append(start_edge(cfg, "--duration", "14", log=tmp_path / f"edge_{name}.log"))
        for p in procs:
            assert p.wait(60) == 0
        logs = [(tmp_path / f"edge_{name}.log").read_text() for name in ("a", "b")]
        named = [log.count("another client probably uses the client id 'drywallqa-edge-twin'") for log in logs]
        assert all(n == 1 for n in named), (named, logs[0][-3000:])  # each side, once: logged once a minute
        assert all(log.count("MQTT disconnected") <= 2 for log in logs), logs[0][-3000:]  # not one per drop
        assert any("another client probably uses client id 'drywallqa-edge-twin'" in s["last_error"]
                   for s in collector.payloads("status"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        collector.close()


def test_commands_do_not_hide_why_the_source_is_down(tmp_path, mosquitto, model):
    """An operator whose camera is down asks for a snapshot, or mistypes a prompt: before, `status.last_error` then
    said 'snapshot requested before the first frame' (or 'set_prompts rejected') for as long as the device ran, and
    no longer why the source was down. Junk commands are refused within bounds, and logged without their payload."""
    camera = tmp_path / "camera"
    cfg = write_config(tmp_path / "edge.yaml", uri=str(camera / "*.jpg"), model=model, port=mosquitto.port,
                       spool=tmp_path / "spool.sqlite", rules=[])
    collector = Collector(mosquitto.port, "drywallqa/dev1/#")
    assert collector.connected.wait(10)
    log = tmp_path / "edge.log"
    proc = start_edge(cfg, log=log)
    try:
        assert wait_until(lambda: any(s["source_state"] == "reconnecting" for s in collector.payloads("status")),
                          60, "the source reported down"), log.read_text()
        cmd_topic = "drywallqa/dev1/cmd"
        for command in ({"command": "snapshot", "request_id": "r1"},
                        {"command": "set_prompts", "prompts": ["no such thing"]},
                        {"command": "set_prompts", "prompts": ["x" * 50_000]}):
            collector.client.publish(cmd_topic, json.dumps(command), qos=1)
        collector.client.publish(cmd_topic, b"junk" * 100_000, qos=1)
        collector.client.publish(cmd_topic, json.dumps({"command": "pause"}), qos=1)
        assert wait_until(lambda: any(s["state"] == "paused" for s in collector.payloads("status")), 15)
        seen = len(collector.payloads("status"))
        wait_until(lambda: len(collector.payloads("status")) >= seen + 2, 10, "two more status messages")
        after = [s for s in collector.payloads("status") if s["state"] == "paused"]
        assert all("folder not found" in s["last_error"] for s in after), [s["last_error"][:80] for s in after]
        assert not collector.payloads("snapshot")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        collector.close()
    text = log.read_text()
    assert text.count("ignored invalid command") == 2 and "set_prompts rejected: unknown prompt 'no such" in text
    assert max(len(line) for line in text.splitlines()) < 5000  # no line quotes the 400 kB or 50 kB junk


def test_sighup_stops_cleanly(tmp_path, mosquitto, model):
    """A closed terminal (an ssh session that drops while `edge run` runs in it) sends SIGHUP: before, it killed
    the runtime mid-frame, and the broker published its last will instead of the `offline` of a clean stop."""
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=mosquitto.port,
                       spool=tmp_path / "spool.sqlite", source={"fps": 10.0, "demo_size": [64, 80]})
    collector = Collector(mosquitto.port, "drywallqa/dev1/status")
    assert collector.connected.wait(10)
    proc = subprocess.Popen(edge_cmd(cfg), env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        assert wait_until(lambda: any(s["frames_processed"] for s in collector.payloads("status")), 60)
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["frames_processed"] > 0
        assert wait_until(lambda: collector.payloads("status")[-1]["state"] == "offline", 10)
        assert collector.payloads("status")[-1]["last_will"] is False
    finally:
        if proc.poll() is None:
            proc.kill()
        collector.close()


def test_a_source_read_that_never_returns_stops_the_watchdog_until_it_does(tmp_path, mosquitto, model, monkeypatch):
    """A camera read can hang past OpenCV's and the driver's timeouts, and a thread stuck in C cannot be interrupted.
    The unit promises a restart for that (WatchdogSec): the loop stops sending WATCHDOG=1 once the reader has been
    inside one source call too long, says why in the status, and when the call returns sends it again and no longer
    reports the hang."""
    import threading

    from drywallqa.edge import runner as runner_module
    from drywallqa.edge.capture import Capture
    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import load_settings
    from drywallqa.edge.sources import DemoSource

    release = threading.Event()

    class HangingCamera(DemoSource):
        """The demo camera, whose 6th read blocks until released (as a wedged driver's does)."""

        reads = 0

        def read(self):
            HangingCamera.reads += 1
            if HangingCamera.reads == 6:
                release.wait(60)
            return super().read()

    monkeypatch.setattr(runner_module, "STUCK_SOURCE_MIN_S", 1.0)  # the 60 s of a device, shortened
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a kick every 0.1 s
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=mosquitto.port,
                       spool=tmp_path / "spool.sqlite", source={"stall_timeout_s": 0.1, "demo_size": [64, 80]})
    runner = EdgeRunner(load_settings(cfg)).setup()
    runner.capture.stop()
    runner.capture = Capture(HangingCamera((64, 80)), realtime=False, fps=20.0, stall_timeout_s=0.1).start()
    kicks: list[float] = []

    def listen() -> None:
        sock.settimeout(0.2)
        while not release.is_set() or time.monotonic() - released_at[0] < 2.0:
            try:
                if sock.recv(4096) == b"WATCHDOG=1":
                    kicks.append(time.monotonic())
            except TimeoutError:
                pass

    released_at = [float("inf")]
    listener = threading.Thread(target=listen)
    listener.start()
    try:
        loop = threading.Thread(target=runner.run_frames, kwargs={"duration_s": 6.0})
        loop.start()
        assert wait_until(lambda: "has not returned" in runner.status("online").last_error, 10, "the hang reported")
        hung_at = time.monotonic()
        time.sleep(1.0)
        assert not [k for k in kicks if k > hung_at], "WATCHDOG=1 was still sent while the read hung"
        released_at[0] = time.monotonic()
        release.set()
        assert wait_until(lambda: any(k > released_at[0] for k in kicks), 5, "the watchdog kicked again")
        # the read returned: the hang is over, and the status says so (before, it reported the hang for good)
        assert wait_until(lambda: "has not returned" not in runner.status("online").last_error, 5, "the hang cleared")
        loop.join(15)
    finally:
        release.set()
        listener.join(10)
        sock.close()  # before shutdown's STOPPING=1: nobody reads the socket any more
        runner.shutdown()
    assert runner.stats.processed >= 5
