"""What a restart finds and repeats: the alert cool-downs file survives a power cut, a watched photo processed again
raises its alerts with the event_ids they had, and a start reads (and warns about) a model's metadata once."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import yaml
from _edge_helpers import FakeCudart, FakeTensorRT, fill, make_video, small_disk, write_config
from _export_fixtures import export_random_model
from _mqtt_fixtures import Collector, free_port, mosquitto_fixture, wait_until

from drywallqa.edge.alerts import cooldowns_path, photo_event_id, read_cooldowns, write_cooldowns

mosquitto = pytest.fixture(mosquitto_fixture, name="mosquitto")

LITE = Path(__file__).resolve().parents[1] / "models" / "exported" / "lite_effnet_lite0.onnx"


@pytest.fixture
def lite_model() -> Path:
    if not LITE.is_file():
        pytest.skip(f"{LITE} is not exported")
    return LITE


def _amend(config: Path, **sections: dict) -> Path:
    """Change settings of a config write_config wrote (it takes the model and spool paths only)."""
    cfg = yaml.safe_load(config.read_text())
    for key, values in sections.items():
        cfg[key].update(values)
    config.write_text(yaml.safe_dump(cfg))
    return config


# -- the cool-downs file ----------------------------------------------------------------------------------------


def _syscalls(tmp_path: Path, code: str) -> list[str]:
    """The file system calls (open, fsync, rename) that `code` makes, run under strace in a child Python."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    trace = tmp_path / "trace.txt"
    proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat,fsync,fdatasync,rename,renameat,renameat2",
                           "-o", str(trace), sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return trace.read_text().splitlines()


def test_the_cooldowns_file_is_fsynced_before_it_replaces_the_old_one(tmp_path):
    """write_cooldowns renamed its staging file over the old one without an fsync: after a power cut the new name
    can point at a file whose data never reached the disk (empty). The staging file is fsynced before the rename."""
    path = cooldowns_path(tmp_path / "spool.sqlite")
    write_cooldowns(path, {"crack": 1.0})
    calls = _syscalls(tmp_path, "from pathlib import Path\nfrom drywallqa.edge.alerts import write_cooldowns\n"
                                f"write_cooldowns(Path({str(path)!r}), {{'crack': 1764115200.5}})\n")
    staging = next((i, line) for i, line in enumerate(calls) if ".cooldowns.json.tmp" in line and "openat" in line)
    fd = re.search(r"= (\d+)$", staging[1]).group(1)
    renamed = next(i for i, line in enumerate(calls) if "rename" in line and ".cooldowns.json.tmp" in line)
    between = calls[staging[0]:renamed + 1]
    assert any(re.search(rf"f(data)?sync\({fd}\)", line) for line in between), \
        [line for line in between if "cooldowns" in line or "sync(" in line]
    assert read_cooldowns(path) == {"crack": 1764115200.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool.sqlite.cooldowns.json", "trace.txt"]


def test_a_cooldowns_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_staging_file(tmp_path):
    """On a full disk the write fails (the runtime logs it): the previous file stays whole, and its half-written
    staging file does not stay behind taking space."""
    with small_disk(tmp_path / "disk") as disk:
        path = cooldowns_path(disk / "spool.sqlite")
        write_cooldowns(path, {"crack": 100.0})
        filler = fill(disk)
        with pytest.raises(OSError):
            write_cooldowns(path, {"crack": 200.0, "taping": 200.0})
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "spool.sqlite.cooldowns.json"]
        assert read_cooldowns(path) == {"crack": 100.0}
        filler.unlink()
        write_cooldowns(path, {"crack": 200.0})
        assert read_cooldowns(path) == {"crack": 200.0}


@pytest.mark.parametrize("text", ["", '{"crack": 17646', "[1, 2]", '{"crack": "soon"}'])
def test_a_cooldowns_file_cut_short_is_said_and_the_cooldowns_start_afresh(tmp_path, caplog, text):
    """An empty or cut-short file (a power cut on a disk that lied about its fsync) stops nothing: it is logged and
    the cool-downs start afresh; the next write replaces it whole."""
    path = cooldowns_path(tmp_path / "spool.sqlite")
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="drywallqa.edge.alerts"):
        assert read_cooldowns(path) == {}
    assert f"alert cool-downs {path} cannot be read" in caplog.text and "they start afresh" in caplog.text
    write_cooldowns(path, {"crack": 5.0})
    assert read_cooldowns(path) == {"crack": 5.0}


# -- event_ids of alerts on photos ------------------------------------------------------------------------------


def test_a_photos_event_id_names_the_device_the_photo_as_it_was_and_the_finding():
    photo = ("/srv/photos/wall-3.jpg", 48_213, 1_764_115_200_123_456_789)
    first = photo_event_id("cam-1", photo, "crack", "area_fraction>=0.01")
    assert first == photo_event_id("cam-1", photo, "crack", "area_fraction>=0.01")
    assert re.fullmatch(r"[0-9a-f]{32}", first)  # the form of the random ids
    others = {photo_event_id("cam-2", photo, "crack", "area_fraction>=0.01"),
              photo_event_id("cam-1", (photo[0], photo[1] + 1, photo[2]), "crack", "area_fraction>=0.01"),
              photo_event_id("cam-1", (photo[0], photo[1], photo[2] + 1), "crack", "area_fraction>=0.01"),
              photo_event_id("cam-1", ("/srv/photos/wall-4.jpg", *photo[1:]), "crack", "area_fraction>=0.01"),
              photo_event_id("cam-1", photo, "taping", "area_fraction>=0.01"),
              photo_event_id("cam-1", photo, "crack", "region_count>=1")}
    assert len(others) == 6 and first not in others


def _photo(folder: Path, name: str, age_s: float) -> Path:
    """A wall photo with a crack and a taped seam, dated `age_s` back (settled: not being copied in)."""
    from drywallqa.edge.sources import DemoSource

    demo = DemoSource((96, 128))
    demo.open()
    path = folder / name
    cv2.imwrite(str(path), cv2.cvtColor(demo.read(), cv2.COLOR_RGB2BGR))
    os.utime(path, (os.path.getmtime(path) - age_s,) * 2)
    return path


@pytest.mark.slow
def test_a_watched_photo_processed_again_after_a_restart_repeats_its_alerts_event_id(tmp_path, mosquitto,
                                                                                     lite_model):
    """The spool's disk is full: the photo's alert reaches the broker from memory, so the photo is not recorded as
    processed and the next start processes it again. Its alert had a new random event_id then, and the dashboard
    (which deduplicates on event_id) listed the same finding twice. Now the repeat has the id of the first: the
    dashboard lists it once. A photo new to the second run still gets an alert of its own."""
    from _dashboard_fixtures import running_dashboard

    from drywallqa.dashboard.bridge import BrokerConfig
    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import load_settings

    folder = tmp_path / "sync"
    folder.mkdir()
    _photo(folder, "p0.png", 120)
    broker = BrokerConfig(host="127.0.0.1", port=mosquitto.port, prefix="drywallqa", client_id="dash-restart",
                          keepalive=5, reconnect_max_s=1)
    collector = Collector(mosquitto.port, "drywallqa/dev1/alerts")
    with running_dashboard(tmp_path / "dash", mosquitto.port, broker=broker) as app, \
            small_disk(tmp_path / "disk") as disk:
        assert collector.connected.wait(10)
        wait_until(lambda: app.state.broker.connected, 10, "the dashboard's broker link")
        cfg = write_config(tmp_path / "edge.yaml", uri=str(folder), model=lite_model, port=mosquitto.port,
                           spool=disk / "spool.sqlite", source={"watch": True})
        runner = EdgeRunner(load_settings(cfg)).setup()
        try:
            filler = fill(disk)
            runner.run_frames(max_frames=1)
            assert "alert spool cannot be written" in runner.status("online").last_error
            wait_until(lambda: app.store.counts()["total"] == 1, 15, "the alert sent from memory")
        finally:
            runner.shutdown()
        filler.unlink()
        _photo(folder, "p1.png", 60)  # newer than p0: processed after it

        runner = EdgeRunner(load_settings(cfg)).setup()  # the restart
        try:
            runner.run_frames(max_frames=2)
            assert runner.stats.alerts == 2 and runner.link.flush(10), runner.last_error
        finally:
            runner.shutdown()
        wait_until(lambda: len(collector.payloads("alerts")) >= 3, 15, "the alerts of the second run")
        sent = [a["event_id"] for a in collector.payloads("alerts")]
        wait_until(lambda: app.store.get(sent[-1]), 10, "the new photo's alert on the dashboard")  # after the repeat
        stored = app.store.counts()["total"]
    collector.close()
    assert stored == 2, sent  # p0 once, p1
    assert sent[0] == sent[1] != sent[2], sent  # p0 sent twice (from memory, then after the restart), with one id


def _two_frames(tmp_path: Path, kind: str) -> str:
    """The uri of a 2-frame video, or of a folder of 2 photos (not watched)."""
    if kind == "video":
        return str(make_video(tmp_path / "site.avi", 2, size=(96, 128)))
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        _photo(folder, f"p{i}.png", 60 - i)
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["video", "unwatched folder"])
def test_alerts_on_video_frames_keep_random_event_ids_across_a_restart(tmp_path, lite_model, kind):
    """A video played again after a restart shows its frames again, numbered as before; a folder that is not
    watched is run again from its first photo: their alerts are new alerts, each with an id of its own (only a
    watched folder's photos, each processed once, repeat their ids)."""
    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import load_settings
    from drywallqa.edge.spool import Spool

    spool = tmp_path / "state" / "spool.sqlite"
    cfg = _amend(write_config(tmp_path / "edge.yaml", uri=_two_frames(tmp_path, kind), model=lite_model,
                              port=free_port(), spool=spool), spool={"flush_timeout_s": 0.1})  # no broker: no wait
    for _ in range(2):
        runner = EdgeRunner(load_settings(cfg)).setup()
        try:
            runner.run_frames(max_frames=2)
            assert runner.stats.alerts == 2, runner.last_error
        finally:
            runner.shutdown()
    outbox = Spool(spool)
    try:
        ids = [item.event_id for item in outbox.pending()]
    finally:
        outbox.close()
    assert len(ids) == 4 and len(set(ids)) == 4, ids


# -- a model's metadata at start --------------------------------------------------------------------------------


def test_a_start_on_an_engine_reads_its_sidecar_once_and_warns_once(tmp_path, monkeypatch, caplog):
    """A profile that finds an engine compares it with the ONNX beside it (weights), then loads it: its sidecar was
    read twice, and one without engine_sha256 (built by an older build_engine.sh) was warned about twice in every
    start. It is read, and said, once."""
    from drywallqa.edge import backends
    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import load_settings

    exported = tmp_path / "home" / "models" / "exported"
    onnx = export_random_model(exported, "effnet_lite0_fpn", (64, 64)).rename(exported / "lite_effnet_lite0.onnx")
    meta = backends.read_metadata(onnx)
    assert backends.ENGINE_HASH_KEY not in meta.extra
    (exported / "lite_effnet_lite0.engine").write_bytes(b"an engine built on the device")
    (exported / "lite_effnet_lite0.json").write_text(meta.to_json())  # as an older build_engine.sh wrote it
    trt = FakeTensorRT((meta.input.height, meta.input.width), len(meta.classes), context=object())
    monkeypatch.setattr(backends, "_import_tensorrt", lambda: (trt, FakeCudart))
    monkeypatch.setenv("DRYWALLQA_HOME", str(tmp_path / "home"))
    cfg = _amend(write_config(tmp_path / "edge.yaml", uri="demo", model=Path("lite"), port=free_port(),
                              spool=tmp_path / "spool.sqlite"),
                 model={"backend": "tensorrt"}, spool={"flush_timeout_s": 0.1})
    with caplog.at_level(logging.WARNING):
        runner = EdgeRunner(load_settings(cfg))
        try:
            runner.setup()
            assert runner.model_path.name == "lite_effnet_lite0.engine"
            assert runner.segmenter.backend.name == "tensorrt" and runner.meta.classes == meta.classes
        finally:
            runner.shutdown()
    said = [r.getMessage() for r in caplog.records if f"carries no {backends.ENGINE_HASH_KEY}" in r.getMessage()]
    assert len(said) == 1, said
