"""What the live runtime tells a dashboard about itself and its commands: undelivered alerts in the status,
which errors a command clears, snapshots asked for before the first frame, list settings in the environment."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _edge_helpers import fill, small_disk, write_config
from _mqtt_fixtures import Collector, free_port, mosquitto_fixture, wait_until

from drywallqa.edge.payloads import CommandPayload
from drywallqa.edge.settings import ConfigError, load_settings

mosquitto = pytest.fixture(mosquitto_fixture, name="mosquitto")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="exporting the random test model needs torch")
    from _export_fixtures import export_random_model

    return export_random_model(tmp_path_factory.mktemp("model"), size=(64, 64))


def _runner(cfg: Path):
    from drywallqa.edge.runner import EdgeRunner

    return EdgeRunner(load_settings(cfg)).setup()


@pytest.mark.slow
def test_status_counts_the_alerts_kept_in_memory_while_the_spool_cannot_be_written(tmp_path, model):
    """With the spool's disk full and no broker, alerts wait in memory: before, `spooled_alerts` counted only the
    spool's rows, and a dashboard saw fewer undelivered alerts than there were."""
    with small_disk(tmp_path / "disk") as disk:
        cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=free_port(),
                           spool=disk / "spool.sqlite", source={"demo_size": [64, 80]})
        runner = _runner(cfg)
        runner.settings.spool.flush_timeout_s = 0.0  # no broker: shutdown need not wait for one
        try:
            runner.run_frames(max_frames=1)
            fill(disk)
            for _ in range(20):  # the WAL may take a few rows more before the disk full shows
                runner.run_frames(max_frames=1)
                if runner.link.spool_error:
                    break
            assert runner.link.spool_error, "the full disk never refused an alert"
            status = runner.status("online")
            assert runner.spool.count() < runner.stats.alerts  # some alerts wait in memory only
            assert status.spooled_alerts == runner.stats.alerts, (status.spooled_alerts, runner.spool.count())
        finally:
            runner.shutdown()


@pytest.mark.slow
def test_an_accepted_set_prompts_clears_only_a_set_prompts_rejection(tmp_path, model):
    """Before, any accepted set_prompts emptied `last_error`, hiding an unrelated error (a failed frame)."""
    from drywallqa.edge.capture import Frame

    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=free_port(),
                       spool=tmp_path / "spool.sqlite", rules=[])
    runner = _runner(cfg)
    try:
        runner._frame_failed(Frame(7, np.zeros((8, 8, 3), np.uint8), 0.0, 0.0), RuntimeError("bad pixels"))
        runner._handle_command(CommandPayload(command="set_prompts", prompts=["crack"]))
        assert [w.prompt for w in runner.watched] == ["crack"]
        assert runner.last_error == "frame 7: RuntimeError: bad pixels"  # not its business
        runner._handle_command(CommandPayload(command="set_prompts", prompts=["no such thing"]))
        assert runner.last_error.startswith("set_prompts rejected: unknown prompt 'no such thing'")
        runner._handle_command(CommandPayload(command="set_prompts", prompts=["segment taping area"]))
        assert runner.last_error == "" and [w.prompt for w in runner.watched] == ["segment taping area"]
    finally:
        runner.shutdown()


@pytest.mark.slow
def test_snapshots_asked_for_before_the_first_frame_are_answered_once_it_is_analysed(tmp_path, mosquitto, model):
    """Before, a snapshot request before the first analysed frame got no reply: a dashboard waiting for its
    request_id never heard back. Now each waiting request (at most 8, the newest) gets its own snapshot."""
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=mosquitto.port,
                       spool=tmp_path / "spool.sqlite", rules=[], source={"demo_size": [64, 80]},
                       mqtt={"detections_max_hz": 0.0})
    collector = Collector(mosquitto.port, "drywallqa/dev1/snapshot")
    runner = _runner(cfg)
    try:
        assert collector.connected.wait(10) and runner.link.connected.wait(10)
        for i in range(10):
            runner._handle_command(CommandPayload(command="snapshot", request_id=f"r{i}"))
        assert "snapshot requested before the first frame" in runner.status("online").last_error
        assert runner.run_frames(max_frames=1) == 1
        wait_until(lambda: len(collector.payloads("snapshot")) >= 8, 10, "the waiting requests' snapshots")
        snaps = collector.payloads("snapshot")
        assert [s["request_id"] for s in snaps] == [f"r{i}" for i in range(2, 10)]  # the oldest two dropped
        assert all(s["jpeg_b64"] and s["frame_id"] == snaps[0]["frame_id"] for s in snaps)
        assert runner.status("online").last_error == ""
        runner._handle_command(CommandPayload(command="snapshot", request_id="later"))  # answered at once
        wait_until(lambda: len(collector.payloads("snapshot")) == 9, 10, "the later snapshot")
        assert collector.payloads("snapshot")[-1]["request_id"] == "later"
    finally:
        runner.shutdown()
        collector.close()


@pytest.mark.slow
def test_a_waiting_snapshot_never_hides_or_erases_an_error(tmp_path, mosquitto, model):
    """The waiting hint is shown only when there is no error: an error from before the request (here a failed frame;
    on a device a setup notice such as a spool moved aside, or a hung read) stays in `last_error` while the request
    waits and after it is answered, and so does one that comes meanwhile (review: the hint once overwrote it)."""
    from drywallqa.edge.capture import Frame

    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=mosquitto.port,
                       spool=tmp_path / "spool.sqlite", rules=[], source={"demo_size": [64, 80]})
    collector = Collector(mosquitto.port, "drywallqa/dev1/snapshot")
    runner = _runner(cfg)
    try:
        assert collector.connected.wait(10) and runner.link.connected.wait(10)
        runner._frame_failed(Frame(3, np.zeros((8, 8, 3), np.uint8), 0.0, 0.0), RuntimeError("bad pixels"))
        runner._handle_command(CommandPayload(command="snapshot", request_id="r1"))
        assert runner.status("online").last_error == "frame 3: RuntimeError: bad pixels"  # not the hint
        runner.run_frames(max_frames=1)
        wait_until(lambda: collector.payloads("snapshot"), 10, "the waiting request's snapshot")
        assert [s["request_id"] for s in collector.payloads("snapshot")] == ["r1"]
        assert runner.status("online").last_error == "frame 3: RuntimeError: bad pixels"
    finally:
        runner.shutdown()
        collector.close()


def _no_edge_env(monkeypatch) -> None:
    for var in os.environ:
        if var.upper().startswith("DRYWALLQA_"):
            monkeypatch.delenv(var)


@pytest.mark.parametrize(("var", "value", "whole"), [
    ("DRYWALLQA_ALERTS__0__MIN", "0.5", "DRYWALLQA_ALERTS"),
    ("DRYWALLQA_ANALYSIS__PROMPTS__0", "segment crack", "DRYWALLQA_ANALYSIS__PROMPTS"),
])
def test_a_list_item_set_in_the_environment_is_named_with_what_to_do(tmp_path, monkeypatch, var, value, whole):
    """Before, the error said only 'alerts: Input should be a valid list': not which variable, nor what to do."""
    _no_edge_env(monkeypatch)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("alerts:\n  - {prompt: segment crack, min: 0.1}\n")
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    text = str(err.value)
    assert f"set by the environment: {var}" in text, text
    assert f"set the whole list as JSON in {whole}" in text and "YAML" in text, text
