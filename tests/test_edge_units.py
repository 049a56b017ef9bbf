"""Edge building blocks without a broker: settings, analysis, alert rules, spool, service files, imports."""

from __future__ import annotations

import math
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from _edge_helpers import run_as_nobody

from drywallqa.edge.alerts import AlertEngine, Rule
from drywallqa.edge.analysis import (
    WatchedClass,
    analyze_class,
    crack_length,
    skeleton_length,
    skeletonize,
)
from drywallqa.edge.cli import EXIT_CONFIG
from drywallqa.edge.payloads import ClassResult
from drywallqa.edge.render import draw_masks
from drywallqa.edge.settings import ConfigError, load_settings
from drywallqa.edge.spool import SPOOL_WAL_LIMIT_BYTES, Spool

# -- settings -------------------------------------------------------------------------------------------------


def test_default_config_loads_and_env_overrides(monkeypatch):
    monkeypatch.setenv("DRYWALLQA_MQTT__HOST", "broker.example")
    monkeypatch.setenv("DRYWALLQA_SOURCE__URI", "/dev/video2")
    s = load_settings()
    assert s.mqtt.host == "broker.example" and s.source.uri == "/dev/video2"
    assert s.model.path == "hrnet" and s.mqtt.embedded_broker == "auto" and s.alerts


@pytest.mark.parametrize(
    ("yaml_text", "env", "expected"),
    [
        ("mqtt: {port: 70000}\n", {}, ["mqtt.port", "65535"]),
        ("model: {backend: cuda}\n", {}, ["model.backend", "'openvino'", "'cuda'"]),
        ("mqtt: {embeded_broker: auto}\n", {}, ["mqtt.embeded_broker", "unknown setting"]),
        ("alerts: [{prompt: crack, metric: length, min: 1}]\n", {}, ["alerts.0.metric", "skeleton_length_px"]),
        ("{}\n", {"DRYWALLQA_MQTT__EMBEDDED_BROKER": "sometimes"}, ["mqtt.embedded_broker", "'never'"]),
        ("source: {uri: ' '}\n", {}, ["source.uri", "must not be empty"]),
        ("model: {opencv_threads: -1}\n", {}, ["model.opencv_threads", "greater than or equal to 0"]),
        ("model: {openvino_cpu_isa: avx}\n", {}, ["model.openvino_cpu_isa", "'avx2'", "'avx'"]),
        ("alerts: [{prompt: crack, metric: area_fraction, min: 5}]\n", {}, ["alerts.0", "can never be reached"]),
        ("alerts: [{prompt: crack, metric: mean_confidence, min: 1.5}]\n", {}, ["alerts.0", "between 0 and 1"]),
        ("source: {demo_size: [0, -5]}\n", {}, ["source.demo_size", "greater than 0"]),
        ("mqtt: {tls: {enabled: true, ca_certs: /nonexistent/ca.pem}}\n", {}, ["mqtt.tls", "no such file"]),
        ("{}\n", {"DRYWALLQA_ANALYSIS__PROMPTS": "segment crack"}, ["environment", "must be JSON"]),
        ("{}\n", {"DRYWALLQA_MQTT_HOST": "broker.example"}, ["DRYWALLQA_MQTT_HOST is not read", "DRYWALLQA_MQTT__HOST"]),
    ],
)
def test_bad_config_names_field_and_allowed(tmp_path, monkeypatch, yaml_text, env, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    for text in expected:
        assert text in str(info.value)


def test_a_list_setting_in_the_environment_as_json_works(monkeypatch):
    monkeypatch.setenv("DRYWALLQA_ANALYSIS__PROMPTS", '["segment crack"]')
    monkeypatch.setenv("DRYWALLQA_DASHBOARD_TOKEN", "x")  # other tools' DRYWALLQA_ variables are left alone
    assert load_settings().analysis.prompts == ["segment crack"]


def test_cli_source_override_that_is_invalid_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "drywallqa.edge", "run", "--source", " "],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_CONFIG and "source.uri" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("option", [["--max-frames", "0"], ["--max-frames", "-1"], ["--duration", "-5"]])
def test_cli_frame_and_time_limits_must_be_positive(option):
    proc = subprocess.run([sys.executable, "-m", "drywallqa.edge", "run", *option],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"argument {option[0]}" in proc.stderr


def test_spool_path_that_cannot_be_a_spool_is_a_config_error(tmp_path):
    from drywallqa.edge.runner import open_spool
    from drywallqa.edge.settings import SpoolSettings

    (tmp_path / "afile").write_text("x")
    (tmp_path / "notes.sqlite").write_text("these are my notes, not a database" * 20)
    for path in (tmp_path / "afile" / "spool.sqlite", tmp_path / "notes.sqlite"):
        with pytest.raises(ConfigError, match=f"spool.path: cannot open the alert spool {path}"):
            open_spool(SpoolSettings(path=str(path)))
    assert (tmp_path / "notes.sqlite").read_text().startswith("these are my notes")  # not overwritten


@pytest.mark.skipif(os.geteuid() != 0, reason="opens the spool as 'nobody' to get a real EACCES")
def test_a_spool_path_in_a_folder_the_service_may_not_enter_is_a_config_error():
    """A spool.path under a folder closed to the service's user is a wrong setting (exit 78, spool.path named).
    Before: looking whether the disk was full or read-only stat()ed that folder, and its PermissionError escaped
    from open_spool instead (exit 1: restarted, and refused again, every few seconds for good)."""
    import tempfile

    from drywallqa.edge.runner import open_spool
    from drywallqa.edge.settings import SpoolSettings

    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="spool-eacces-"))  # pytest's tmp_path is closed to 'nobody'
    try:
        base.chmod(0o755)
        (base / "closed" / "state").mkdir(parents=True)
        (base / "closed").chmod(0o700)  # root's
        settings = SpoolSettings(path=str(base / "closed" / "state" / "spool.sqlite"))

        def open_it() -> list[str]:
            try:
                open_spool(settings)
                return ["opened", ""]
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                return [type(exc).__name__, str(exc)]

        kind, message = run_as_nobody(open_it)
        assert kind == "ConfigError" and "spool.path: cannot open the alert spool" in message, (kind, message)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_status_counts_the_drops_of_a_spool_that_opened_after_the_start(tmp_path, monkeypatch):
    """A spool whose disk was full at start opens later (Spool.unopened); the drops it holds from before are part of
    `status.spool_dropped`, as after any start. Before: the link read the count once, from the empty stand-in."""
    import time

    import drywallqa.edge.spool as spool_module
    from drywallqa.edge.mqtt_link import EdgeLink
    from drywallqa.edge.payloads import StatusPayload
    from drywallqa.edge.settings import MqttSettings

    path = tmp_path / "spool.sqlite"
    before = Spool(path, max_rows=2)
    for i in range(5):
        before.put(f"e{i}", "t", b"x")
    assert before.dropped() == 3
    before.close()
    monkeypatch.setattr(spool_module, "SPOOL_REOPEN_S", 0.0)
    spool = Spool.unopened(path, 2, 2**20, "database or disk is full")
    link = EdgeLink(MqttSettings(host="127.0.0.1", port=1, device_id="dev-drops"), spool,
                    status=lambda state: StatusPayload(device_id="dev-drops", state=state, timestamp=time.time()),
                    on_command=lambda cmd: None)
    try:
        assert link.spool_dropped == 0
        assert [it.event_id for it in spool.pending()] == ["e3", "e4"] and spool.open_error == ""  # opened
        assert link.spool_dropped == 3
        spool.put("e5", "t", b"x")  # one more dropped by the bounds
        assert link.spool_dropped == 4 == spool.dropped()
    finally:
        spool.close()


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mqtt: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


def test_cli_bad_config_exits_with_the_config_status_and_a_message(tmp_path):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("mqtt: {port: -1}\n")
    proc = subprocess.run([sys.executable, "-m", "drywallqa.edge", "run", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_CONFIG and "mqtt.port" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_missing_model_profile_tells_how_to_export(tmp_path, monkeypatch):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("model: {path: lite}\nmqtt: {embedded_broker: never}\n")
    env = {"DRYWALLQA_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "drywallqa.edge", "run", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == EXIT_CONFIG and "drywallqa export --profile lite" in proc.stderr


def test_a_profile_on_openvino_runs_the_int8_ir_export_wrote_first(tmp_path, monkeypatch):
    """`export --target openvino` writes <model>_fp16.xml and <model>_int8.xml, and a profile name looked only for
    <model>.xml, so `model.path: hrnet` on a NUC ran the FP32 ONNX: 2-3x slower than the INT8 IR, which costs no
    measurable IoU. Now: INT8 first, then FP16, then the ONNX; ONNX Runtime still takes the ONNX."""
    from drywallqa.edge.backends import tensorrt_unavailable_reason
    from drywallqa.edge.runner import resolve_model_path

    exported = tmp_path / "models" / "exported"
    exported.mkdir(parents=True)
    for name in ("lite_effnet_lite0.onnx", "lite_effnet_lite0_fp16.xml", "lite_effnet_lite0_int8.xml"):
        (exported / name).write_text("stand-in: only the names are looked at")
    monkeypatch.setenv("DRYWALLQA_HOME", str(tmp_path))
    assert resolve_model_path("lite", "openvino").name == "lite_effnet_lite0_int8.xml"
    if tensorrt_unavailable_reason() is not None:  # where TensorRT runs, `auto` looks for an engine first
        assert resolve_model_path("lite", "auto").name == "lite_effnet_lite0_int8.xml"
    assert resolve_model_path("lite", "onnxruntime").name == "lite_effnet_lite0.onnx"
    (exported / "lite_effnet_lite0_int8.xml").unlink()
    assert resolve_model_path("lite", "openvino").name == "lite_effnet_lite0_fp16.xml"


def test_auto_takes_a_profiles_ir_only_where_it_runs_the_onnx_on_openvino_too(tmp_path):
    """`auto` runs an ONNX on ONNX Runtime where OpenVINO is not (an ARM board, an install without it), but a profile
    still took the IRs of a models/exported/ copied from the x86 machine that exported them: OpenVINO in place of the
    ONNX Runtime the device ran before (or, without OpenVINO, a traceback). There the profile means its ONNX."""
    exported = tmp_path / "models" / "exported"
    exported.mkdir(parents=True)
    for name in ("lite_effnet_lite0.onnx", "lite_effnet_lite0_fp16.xml", "lite_effnet_lite0_int8.xml"):
        (exported / name).write_text("stand-in: only the names are looked at")
    no_openvino = tmp_path / "site"
    (no_openvino / "openvino").mkdir(parents=True)  # an install without OpenVINO, as auto_backend_name sees it
    (no_openvino / "openvino" / "__init__.py").write_text("raise ImportError('OpenVINO is not installed here')\n")
    code = ("from drywallqa.edge.backends import auto_backend_name\n"
            "from drywallqa.edge.runner import resolve_model_path\n"
            "assert auto_backend_name('model.onnx') == 'onnxruntime'\n"
            "print(resolve_model_path('lite', 'auto').name)\n")
    env = {**os.environ, "DRYWALLQA_HOME": str(tmp_path), "PYTHONPATH": str(no_openvino)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "lite_effnet_lite0.onnx"


def test_a_folder_named_like_a_model_is_called_a_folder(tmp_path):
    (tmp_path / "model.onnx").mkdir()
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"model: {{path: {tmp_path / 'model.onnx'}}}\nmqtt: {{embedded_broker: never}}\n")
    proc = subprocess.run([sys.executable, "-m", "drywallqa.edge", "check-config", "--config", str(cfg),
                           "--model-check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_CONFIG and "model.onnx is a folder, not a model file" in proc.stderr, proc.stderr


# -- analysis ----------------------------------------------------------------------------------------------------


def test_skeleton_length_of_lines():
    m = np.zeros((100, 200), np.uint8)
    m[40:47, 10:110] = 1  # 100 px long, 7 px thick bar
    assert abs(crack_length(m) - 100) <= 10
    m = np.zeros((200, 200), np.uint8)
    cv2.line(m, (10, 10), (150, 150), 1, 5)  # diagonal, length 140*sqrt(2) = 198
    assert abs(crack_length(m) - 140 * math.sqrt(2)) <= 12
    sk = skeletonize(m)
    assert sk.sum() < m.sum() / 3 and set(np.unique(sk)) <= {0, 1}
    line = np.zeros((5, 20), np.uint8)
    line[2, 3:13] = 1
    assert skeleton_length(line) == pytest.approx(9.0)


def test_thick_blob_is_fast_and_finite():
    m = np.ones((640, 640), np.uint8)
    m[300:340] = 0
    assert 0 <= crack_length(m) < 2000


def test_analyze_class_regions_area_confidence():
    probs = np.zeros((100, 100), np.float32)
    probs[10:20, 10:40] = 0.9  # 300 px region
    probs[60:90, 70:72] = 0.7  # 60 px thin region
    probs[0, 99] = 0.8  # 1 px speck, below min area
    w = WatchedClass("crack", 0, "segment crack", 0.5)
    result, mask = analyze_class(probs, w, min_region_area_px=4, with_skeleton=True)
    assert result.region_count == 2 and mask.sum() == 360
    assert result.area_fraction == pytest.approx(0.036)
    assert result.regions[0].bbox == (10, 10, 30, 10) and result.regions[0].area_px == 300
    assert result.mean_confidence == pytest.approx((300 * 0.9 + 60 * 0.7) / 360, rel=1e-5)
    assert result.skeleton_length_px > 40
    empty, _ = analyze_class(np.zeros((8, 8), np.float32), w)
    assert empty.region_count == 0 and empty.mean_confidence == 0.0 and empty.area_fraction == 0.0


def test_more_regions_than_16_bit_labels_can_count():
    probs = np.zeros((520, 520), np.float32)
    probs[::2, ::2] = 0.9  # 260 x 260 isolated pixels: 67,600 regions, beyond 16-bit labels
    w = WatchedClass("crack", 0, "segment crack", 0.5)
    result, mask = analyze_class(probs, w, min_region_area_px=0, max_regions=3)
    assert result.region_count == 260 * 260 and len(result.regions) == 3 and int(mask.sum()) == 260 * 260


# -- alert rules ---------------------------------------------------------------------------------------------


def _result(area: float) -> ClassResult:
    return ClassResult(class_name="crack", prompt="crack", area_fraction=area, region_count=1, mean_confidence=0.9)


def test_alert_persistence_and_cooldown():
    engine = AlertEngine([Rule("crack", "area_fraction", 0.1, persistence_frames=3, cooldown_s=10)])
    fired = [bool(engine.update([_result(a)], now=t)) for t, a in enumerate([0.2, 0.2, 0.0, 0.2, 0.2, 0.2, 0.2])]
    assert fired == [False, False, False, False, False, True, False]  # streak broken at t=2; cool-down after t=5
    assert engine.update([_result(0.5)], now=16)[0].persisted_frames == 5
    assert engine.update([_result(0.5)], now=17) == []


# -- spool -----------------------------------------------------------------------------------------------------


def test_spool_order_persistence_and_bounds(tmp_path):
    path = tmp_path / "s.sqlite"
    spool = Spool(path, max_rows=5)
    for i in range(8):
        spool.put(f"e{i}", "t", f"payload {i}".encode())
    spool.put("e7", "t", b"duplicate id ignored")
    assert [it.event_id for it in spool.pending()] == ["e3", "e4", "e5", "e6", "e7"]  # oldest dropped
    assert spool.dropped() == 3
    first = spool.pending(limit=1)[0]
    spool.ack(first.seq)
    spool.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    again = Spool(path, max_rows=5)  # reopened (as after a restart): same rows, same order, counter kept
    assert [it.event_id for it in again.pending()] == ["e4", "e5", "e6", "e7"] and again.dropped() == 3
    assert [it.event_id for it in again.pending(after_seq=again.pending()[1].seq)] == ["e6", "e7"]
    again.close()
    small = Spool(tmp_path / "b.sqlite", max_bytes=1000)
    for i in range(10):
        small.put(f"b{i}", "t", b"x" * 300)
    assert small.count() == 3 and small.dropped() == 7
    small.close()


def test_spool_wal_file_stays_small_on_a_long_run(tmp_path):
    """A device's spool sees every alert written, published and deleted. SQLite's WAL file keeps its high-water
    mark (about 4 MiB at the default 1000-page checkpoint) unless a size limit truncates it after a checkpoint:
    on a small data partition that is space the alerts themselves would need."""
    path = tmp_path / "s.sqlite"
    spool = Spool(path)
    for i in range(1500):
        spool.put(f"e{i}", "t", b"x" * 2048)
        for item in spool.pending():
            spool.ack(item.seq)
    wal = path.with_name(path.name + "-wal")
    assert spool.count() == 0
    assert wal.stat().st_size <= SPOOL_WAL_LIMIT_BYTES + 64 * 1024, wal.stat().st_size
    spool.close()


# -- service ---------------------------------------------------------------------------------------------------


def test_install_service_exec_given_as_a_bare_program_runs_the_edge():
    from drywallqa.edge.service import exec_argv, unit_command

    assert unit_command(exec_argv("/opt/dq/bin/drywallqa")) == "/opt/dq/bin/drywallqa edge run"
    assert unit_command(exec_argv("/opt/dq/bin/python3")) == "/opt/dq/bin/python3 -m drywallqa.edge run"
    assert unit_command(exec_argv("/opt/dq/bin/drywallqa edge run")) == "/opt/dq/bin/drywallqa edge run"
    assert unit_command(exec_argv(None)).endswith(("drywallqa edge run", "-m drywallqa.edge run"))


def test_install_service_into_prefix_and_dry_run(tmp_path, capsys):
    from drywallqa.edge.service import install_service

    assert install_service(prefix=tmp_path, exec_path="/opt/dq/bin/drywallqa edge run", dry_run=True) == 0
    assert not (tmp_path / "etc").exists() and "Type=notify" in capsys.readouterr().out
    assert install_service(prefix=tmp_path, exec_path="/opt/dq/bin/drywallqa edge run") == 0
    unit = (tmp_path / "etc/systemd/system/drywallqa-edge.service").read_text()
    assert "ExecStart=/opt/dq/bin/drywallqa edge run --config /etc/drywallqa/edge.yaml" in unit
    assert "@" not in unit.split("[Unit]", 1)[1]
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=drywallqa", "ProtectSystem=strict",
                 "NoNewPrivileges=yes", "PrivateTmp=yes", "StateDirectory=drywallqa-edge",
                 "SupplementaryGroups=video"):
        assert line in unit
    assert (tmp_path / "etc/drywallqa/edge.yaml").read_text().startswith("# DrywallQA edge runtime")
    assert (tmp_path / "etc/drywallqa/edge.env").stat().st_mode & 0o777 == 0o600
    assert not [ln for ln in unit.splitlines() if ln.startswith("Group=")]  # the user's own primary group
    installed = load_settings(tmp_path / "etc/drywallqa/edge.yaml")
    assert installed.mqtt.embedded_broker == "never"  # a service never squats the port of the real broker
    assert load_settings().mqtt.embedded_broker == "auto"  # the packaged default (demo, laptops) keeps auto


def test_service_command_is_the_virtualenv_of_the_installer(tmp_path, monkeypatch, capsys):
    from drywallqa.edge.service import default_exec, hidden_by_protect_home, install_service

    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)  # as a virtualenv has it: a link to the base interpreter
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    assert default_exec() == f"{venv_bin / 'python'} -m drywallqa.edge run"  # the link itself, not its target
    (venv_bin / "drywallqa").write_text("#!/bin/sh\n")
    assert default_exec() == f"{venv_bin / 'drywallqa'} edge run"
    assert hidden_by_protect_home("/root/.venv/bin/drywallqa edge run")
    assert hidden_by_protect_home("/home/site/dq/bin/python -m drywallqa.edge run")
    assert not hidden_by_protect_home("/opt/drywallqa/bin/drywallqa edge run")
    assert install_service(prefix=tmp_path / "root", exec_path="/home/site/bin/drywallqa edge run", dry_run=True) == 0
    assert "ProtectHome=yes" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    from drywallqa.edge.service import render_unit

    unit = tmp_path / "drywallqa-edge.service"
    unit.write_text(render_unit("/bin/true edge run", Path("/etc/drywallqa/edge.yaml"), "root"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in proc.stderr.splitlines() if "drywallqa-edge.service" in ln]
    assert proc.returncode == 0 and not problems, proc.stderr


# -- import hygiene ------------------------------------------------------------------------------------------


def test_edge_never_imports_torch_or_transformers():
    code = (
        "import sys, pkgutil, importlib, drywallqa.edge as e\n"
        "for m in pkgutil.iter_modules(e.__path__):\n"
        "    if m.name != '__main__': importlib.import_module('drywallqa.edge.' + m.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_analysis_on_the_model_grid_reports_in_source_pixels():
    """The live loop analyses 512x512 model output for a 640x480 frame: boxes, areas and crack lengths
    must come out in source pixels, close to analysing the full-size mask."""
    src = np.zeros((480, 640), np.float32)
    cv2.line(src, (100, 60), (560, 420), 1.0, 5)  # a diagonal crack, ~584 px long
    cv2.rectangle(src, (20, 300), (60, 460), 1.0, -1)  # a blob
    grid = cv2.resize(src, (512, 512), interpolation=cv2.INTER_LINEAR)
    watched = WatchedClass("crack", 0, "segment crack", 0.5)
    full, full_mask = analyze_class(src, watched, with_skeleton=True, skeleton_max_side=640)
    small, small_mask = analyze_class(grid, watched, with_skeleton=True, skeleton_max_side=640, source_hw=(480, 640))
    assert small_mask.shape == (512, 512) and full_mask.shape == (480, 640)
    assert small.region_count == full.region_count == 2
    for a, b in zip(full.regions, small.regions, strict=True):
        assert all(abs(p - q) <= 3 for p, q in zip(a.bbox, b.bbox, strict=True)), (a.bbox, b.bbox)
        assert b.area_px == pytest.approx(a.area_px, rel=0.1)
    assert small.skeleton_length_px == pytest.approx(full.skeleton_length_px, rel=0.05)
    assert small.area_fraction == pytest.approx(full.area_fraction, rel=0.1)
    # Drawn over the 640x480 frame, the grid mask lands where the full-size one is (nearest-neighbour scaling).
    frame = np.zeros((480, 640, 3), np.uint8)
    drawn = draw_masks(frame, {"crack": small_mask}).any(axis=2)
    assert drawn.shape == (480, 640)
    assert (drawn & (full_mask > 0)).sum() / (drawn | (full_mask > 0)).sum() > 0.85
    preview = draw_masks(frame, {"crack": small_mask}, max_side=320)
    assert preview.shape == (240, 320, 3) and preview.any()


def test_draw_masks_tints_only_the_mask():
    image = np.full((60, 80, 3), 100, np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    mask[10:30, 20:50] = 255
    out = draw_masks(image, {"crack": mask, "taping": np.zeros((60, 80), np.uint8)})
    changed = (out != 100).any(axis=2)
    assert changed[12:28, 22:48].all() and not changed[:9].any() and not changed[:, 51:].any()
    assert out[20, 30].tolist() == [round(100 * 0.55 + c * 0.45) for c in (230, 40, 40)]  # crack red, 45 %
    assert (image == 100).all()  # the frame itself is untouched


def _reference_thinning(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen plus redundant-pixel removal written out pixel by pixel (slow, for small test masks)."""
    img = np.pad((mask > 0).astype(np.uint8), 1).tolist()
    h, w = len(img), len(img[0])

    def ring(y: int, x: int) -> list[int]:  # P2..P9, clockwise from north
        return [img[y - 1][x], img[y - 1][x + 1], img[y][x + 1], img[y + 1][x + 1], img[y + 1][x],
                img[y + 1][x - 1], img[y][x - 1], img[y - 1][x - 1]]

    def sweep(rule) -> bool:
        hits = [(y, x) for y in range(1, h - 1) for x in range(1, w - 1) if img[y][x] and rule(y, x, ring(y, x))]
        for y, x in hits:
            img[y][x] = 0
        return bool(hits)

    def zhang_suen(first: bool):
        def rule(_y: int, _x: int, n: list[int]) -> bool:
            p2, _, p4, _, p6, _, p8, _ = n
            transitions = sum(n[i] == 0 and n[(i + 1) % 8] == 1 for i in range(8))
            side = (p2 * p4 * p6 == 0 and p4 * p6 * p8 == 0) if first else (p2 * p4 * p8 == 0 and p2 * p6 * p8 == 0)
            return 2 <= sum(n) <= 6 and transitions == 1 and side
        return rule

    def redundant(parity: int):
        def rule(y: int, x: int, n: list[int]) -> bool:
            ccw = [n[2], n[1], n[0], n[7], n[6], n[5], n[4], n[3]]  # from east, counter-clockwise
            off = [1 - v for v in ccw]
            yokoi = sum(off[k] - off[k] * off[(k + 1) % 8] * off[(k + 2) % 8] for k in (0, 2, 4, 6))
            return (y % 2) * 2 + x % 2 == parity and sum(ccw) >= 2 and yokoi == 1
        return rule

    while any([sweep(zhang_suen(True)), sweep(zhang_suen(False))]):
        pass
    while any([sweep(redundant(k)) for k in range(4)]):
        pass
    return np.array(img, np.uint8)[1:-1, 1:-1]


def test_table_driven_thinning_matches_the_pixel_by_pixel_rule():
    rng = np.random.default_rng(1)
    for i in range(25):
        h, w = (int(v) for v in rng.integers(4, 40, 2))
        m = np.zeros((h, w), np.uint8)
        for _ in range(3):
            cv2.line(m, tuple(int(v) for v in rng.integers(0, 40, 2)), tuple(int(v) for v in rng.integers(0, 40, 2)),
                     1, int(rng.integers(1, 7)))
        if i % 2:
            m |= (rng.random((h, w)) < 0.25).astype(np.uint8)  # speckle: branches, holes, isolated pixels
        assert np.array_equal(skeletonize(m), _reference_thinning(m)), f"mask {i}"


def test_resize_is_bilinear_below_a_2x_shrink_and_area_averaging_beyond():
    import cv2

    from drywallqa.edge.inference import resize_interpolation

    assert resize_interpolation((640, 640), (512, 512)) == cv2.INTER_LINEAR  # the dataset / common camera case
    assert resize_interpolation((480, 640), (512, 512)) == cv2.INTER_LINEAR  # enlarging
    assert resize_interpolation((1080, 1920), (512, 512)) == cv2.INTER_AREA  # 3.75x: bilinear would alias
    assert resize_interpolation((1024, 600), (512, 512)) == cv2.INTER_AREA  # the larger factor decides



def test_can_fire_follows_the_cooldown_of_the_class():
    engine = AlertEngine([Rule("crack", "skeleton_length_px", 50, persistence_frames=1, cooldown_s=10)])
    assert engine.can_fire("crack", now=0) and not engine.can_fire("taping", now=0)  # no rule for taping
    assert engine.update([ClassResult(class_name="crack", prompt="crack", area_fraction=0.1, region_count=1,
                                      mean_confidence=0.9, skeleton_length_px=80)], now=1)
    assert not engine.can_fire("crack", now=5) and engine.can_fire("crack", now=11)


def _crack(area: float = 0.2) -> ClassResult:
    return ClassResult(class_name="crack", prompt="segment crack", area_fraction=area, region_count=1,
                       mean_confidence=0.9)


def _fired_on_two_frames(settings) -> int:
    engine = AlertEngine.from_settings(settings.alerts, lambda prompt: "crack")
    return sum(len(engine.update([_crack()], now=t)) for t in (0.0, 1.0))


def test_rules_judge_each_photo_alone_on_a_folder_and_count_frames_on_a_camera(tmp_path):
    """On a folder of photos a rule with persistence_frames 3 and cooldown_s 60 (the shipped config's) alerted on no
    photo with a crack unless the two before it had one too, and then on no other photo of a batch synced within the
    minute: each photo is its own wall, so each finding alerts. A camera (and `--source` switching from a folder
    to one, which re-validates the settings) keeps both."""
    photos = tmp_path / "photos"
    photos.mkdir()
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"source: {{uri: '{photos}'}}\n"
                   "alerts: [{prompt: segment crack, min: 0.01, persistence_frames: 3, cooldown_s: 60}]\n")
    on_photos = load_settings(cfg)
    assert _fired_on_two_frames(on_photos) == 2
    assert on_photos.alerts[0].persistence_frames == 3  # as written (check-config shows it so)
    data = on_photos.model_dump()
    data["source"]["uri"] = "demo"  # what `edge run --source demo` does
    on_camera = type(on_photos).model_validate(data)
    assert _fired_on_two_frames(on_camera) == 0
    data["source"]["uri"] = str(photos / "*.jpg")  # a glob of photos
    assert _fired_on_two_frames(type(on_photos).model_validate(data)) == 2


def test_a_looped_folder_of_photos_keeps_the_cool_down(tmp_path):
    """`loop: true` shows a folder's photos again and again: judged one by one without a cool-down, every photo with
    a finding alerted again at every pass, several alerts a second for ever. The rules count as on a camera there."""
    photos = tmp_path / "photos"
    photos.mkdir()
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"source: {{uri: '{photos}', loop: true}}\n"
                   "alerts: [{prompt: segment crack, min: 0.01, persistence_frames: 1, cooldown_s: 60}]\n")
    assert _fired_on_two_frames(load_settings(cfg)) == 1  # the same crack a second later: cooling down


def test_alerts_with_every_rule_commented_out_mean_no_rules(tmp_path):
    """`alerts:` left with its rules commented out was refused as 'alerts: Input should be a valid list'."""
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("alerts:\n#  - {prompt: segment crack, min: 0.01}\n")
    assert load_settings(cfg).alerts == []


@pytest.mark.parametrize(("rules", "expected"), [
    ("alerts:\n  prompt: segment crack\n  min: 0.01\n", "alerts: must be a list of rules, each starting with '- '"),
    ("alerts: [{prompt: crack, min: 5}]\n", "area_fraction is a fraction between 0 and 1 (a percentage? 5 % is 0.05)"),
])
def test_a_misshapen_alert_rule_says_what_to_write(tmp_path, rules, expected):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(rules)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert expected in str(info.value), info.value


def test_cool_downs_carried_over_a_restart_count_from_the_last_alert_and_a_clock_stepped_back():
    engine = AlertEngine([Rule("crack", "area_fraction", 0.0, persistence_frames=1, cooldown_s=60)])
    engine.carry_over({"crack": 1000.0, "taping": 1000.0}, now=5.0, now_wall=1030.0)  # crack fired 30 s ago
    assert engine.fired_wall_times(5.0, 1030.0) == {"crack": 1000.0}  # no rule watches taping: not kept
    assert not engine.can_fire("crack", 5.0 + 29) and engine.can_fire("crack", 5.0 + 30)
    later = AlertEngine([Rule("crack", "area_fraction", 0.0, persistence_frames=1, cooldown_s=60)])
    later.carry_over({"crack": 5000.0}, now=0.0, now_wall=1000.0)  # the clock stepped back: as if just fired
    assert not later.can_fire("crack", 59.0) and later.can_fire("crack", 60.0)
