"""Live-loop audit findings, end to end with real processes and a real mosquitto."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from _edge_helpers import clean_env, edge_cmd, start_edge, write_config
from _mqtt_fixtures import Collector, mosquitto_fixture, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from drywallqa.edge.cli import EXIT_CONFIG

pytestmark = pytest.mark.slow
mosquitto = pytest.fixture(mosquitto_fixture, name="mosquitto")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="exporting the random test model needs torch")
    from _export_fixtures import export_random_model

    return export_random_model(tmp_path_factory.mktemp("model"), size=(64, 64))


def test_a_paused_device_still_says_paused_after_the_broker_restarts(tmp_path, mosquitto, model):
    """The retained status sent on reconnecting must not say `online` while the device is paused (it did until the
    next status_interval_s: a dashboard showed a paused camera as running)."""
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=mosquitto.port,
                       spool=tmp_path / "spool.sqlite", rules=[],
                       source={"fps": 10.0, "demo_size": [96, 128]}, mqtt={"status_interval_s": 600.0})
    proc = start_edge(cfg, log=tmp_path / "edge.log")
    watch = None
    try:
        first = Collector(mosquitto.port, "drywallqa/dev1/status", client_id="pause-watch-1")
        assert wait_until(lambda: any(s["state"] == "online" for s in first.payloads("status")), 60), \
            (tmp_path / "edge.log").read_text()[-3000:]
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pause-cmd")
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        pub.publish("drywallqa/dev1/cmd", json.dumps({"command": "pause"}), qos=1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
        assert wait_until(lambda: any(s["state"] == "paused" for s in first.payloads("status")), 20), \
            (tmp_path / "edge.log").read_text()[-3000:]
        first.close()
        mosquitto.stop()
        restarted = time.time()
        mosquitto.start()
        watch = Collector(mosquitto.port, "drywallqa/dev1/status", client_id="pause-watch-2")

        def after() -> list[dict]:  # the edge's status on reconnecting, not one the broker kept from before
            return [s for s in watch.payloads("status") if not s["last_will"] and s["timestamp"] > restarted]

        assert wait_until(after, 30), (tmp_path / "edge.log").read_text()[-3000:]
        seen = after()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        if watch is not None:
            watch.close()
    assert [s["state"] for s in seen] == ["paused"] * len(seen), seen


def test_a_length_rule_on_a_class_without_skeleton_is_refused(tmp_path, model):
    """A skeleton_length_px rule on a class whose length is never measured (not in analysis.skeleton_classes: a typo
    there, or a rule on taping) could never fire: refused at start and by check-config, not left silent."""
    rule = {"prompt": "segment crack", "metric": "skeleton_length_px", "min": 40.0, "persistence_frames": 1}
    taping_rule = rule | {"prompt": "segment taping area"}
    for name, rules, analysis, expected in (
            ("typo", [rule], {"skeleton_classes": ["cracks"]},
             ("analysis.skeleton_classes: 'cracks' is not a class of the model", "did you mean 'crack'")),
            ("taping", [taping_rule], {}, ("alerts.0", "analysis.skeleton_classes"))):
        cfg = write_config(tmp_path / f"{name}.yaml", uri="demo", model=model, port=1, spool=tmp_path / "s.sqlite",
                           rules=rules, analysis=analysis)
        check = subprocess.run([*edge_cmd(cfg)[:3], "check-config", "--config", str(cfg), "--model-check"],
                               env=clean_env(), capture_output=True, text=True, timeout=120)
        run = subprocess.run(edge_cmd(cfg, "--max-frames", "1"), env=clean_env(), capture_output=True, text=True,
                             timeout=120)
        assert check.returncode == run.returncode == EXIT_CONFIG, (name, check.stderr, run.stderr)
        for out in (check.stderr, run.stderr):
            assert all(e in out for e in expected), (name, out)
    # the same rule with the class measured starts
    ok = write_config(tmp_path / "ok.yaml", uri="demo", model=model, port=1, spool=tmp_path / "s.sqlite",
                      rules=[rule])
    check_ok = subprocess.run([*edge_cmd(ok)[:3], "check-config", "--config", str(ok), "--model-check"],
                              env=clean_env(), capture_output=True, text=True, timeout=120)
    assert check_ok.returncode == 0, check_ok.stderr


def test_a_folder_of_photos_alerts_on_every_photo_with_a_finding(tmp_path, model):
    """With the shipped config's rules (persistence_frames 3, cooldown_s 60) a folder of photos, each showing what the
    rule looks for, raised one alert, on the third photo: a crack had to be in three photos in a row, and the
    cool-down then silenced the rest of the batch. Each photo is a wall of its own: every one alerts."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        assert cv2.imwrite(str(photos / f"wall-{i}.png"), np.full((64, 64, 3), 60 * i, np.uint8))
    rule = {"prompt": "segment crack", "metric": "area_fraction", "min": 0.0,  # holds on every photo
            "persistence_frames": 3, "cooldown_s": 60}
    spool = tmp_path / "spool.sqlite"
    cfg = write_config(tmp_path / "edge.yaml", uri=str(photos), model=model, port=1, spool=spool, rules=[rule])
    run = subprocess.run(edge_cmd(cfg), env=clean_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    with sqlite3.connect(spool) as db:  # no broker: every alert is still in the spool
        alerts = [json.loads(p) for (p,) in db.execute("SELECT payload FROM outbox ORDER BY seq")]
    assert [a["frame_id"] for a in alerts] == [0, 1, 2, 3], alerts


def test_a_restart_keeps_the_cool_down_of_the_alert_it_sent_before(tmp_path, model):
    """A watchdog restart, a crash loop or an update restarts the runtime: with the cool-down kept in memory only,
    each start alerted again at once on the crack it had alerted on a minute before (one alert per restart). The
    classes' last alert times are kept beside the spool, so the second run inside the cool-down sends none."""
    rule = {"prompt": "segment crack", "metric": "area_fraction", "min": 0.0,  # holds on every frame
            "persistence_frames": 1, "cooldown_s": 3600}
    spool = tmp_path / "spool.sqlite"
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=1, spool=spool, rules=[rule],
                       source={"fps": 20.0, "demo_size": [64, 80]})

    def alerts_in_spool() -> int:
        with sqlite3.connect(spool) as db:  # no broker: every alert is still in the spool
            return db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    for expected in (1, 1):
        run = subprocess.run(edge_cmd(cfg, "--max-frames", "3"), env=clean_env(), capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        assert alerts_in_spool() == expected, run.stderr[-3000:]
    cooldowns = json.loads((tmp_path / "spool.sqlite.cooldowns.json").read_text())
    assert set(cooldowns) == {"crack"}

    cooldowns["crack"] -= 7200  # two hours ago: the cool-down is over, the next run alerts
    (tmp_path / "spool.sqlite.cooldowns.json").write_text(json.dumps(cooldowns))
    run = subprocess.run(edge_cmd(cfg, "--max-frames", "3"), env=clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and alerts_in_spool() == 2, run.stderr[-3000:]
