"""scripts/bench_loop.py (the whole edge loop timed) on a tiny random model (64x64) and a short synthetic video:
its JSON fields agree with each other, and bad arguments stop it with a clear message. No timing targets."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _edge_helpers import make_video
from _export_fixtures import export_random_model
from _mqtt_fixtures import MOSQUITTO

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_loop.py"
BALLAST_MB = 500  # held by the process that starts the benchmark: must not show up as the benchmark's peak RSS

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="needs the mosquitto binary")


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_loop", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_loop")
    return {"model": export_random_model(tmp, size=(64, 64)), "video": make_video(tmp / "wall.avi", 20)}


@pytest.mark.slow
def test_lossless_run_fields_agree(files, tmp_path):
    """One --model, lossless: the row is that model's alone, and its numbers are consistent with each other."""
    out = tmp_path / "loop.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    args = ["--model", f"tiny={files['model']}", "--source-fps", "0", "--seconds", "1", "--segments", "2",
            "--threads", "1", "--video", str(files["video"]), "--json", str(out)]
    # The benchmark is started by a process holding BALLAST_MB: Linux carries ru_maxrss over fork+exec, so a
    # peak read from it would be this parent's, not the loop's.
    starter = (f"import numpy as np, runpy, sys; ballast = np.ones({BALLAST_MB} * 2**20 // 8); "
               "sys.argv = [sys.argv[1]] + sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", starter, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TMPDIR": str(scratch)}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())  # only the --model given: no random 512 px models of both profiles
    assert row["profile"] == "tiny" and row["model"] == files["model"].name and row["input"] == [64, 64]
    assert "loop_fps" in proc.stdout.splitlines()[0] and proc.stdout.splitlines()[1].startswith("tiny | ")

    assert row["frames"] == row["segments"] * row["frames_per_segment"] and row["segments"] == 2
    assert row["loop_fps"] == pytest.approx(1000 / row["loop_ms_per_frame"], rel=0.01)
    # `seconds` is the loop's own time: with two equal segments, frames / seconds is the loop FPS itself
    # (it was the whole run's, model-only windows included, about a third more)
    assert row["frames"] / row["seconds"] == pytest.approx(row["loop_fps"], rel=0.03)
    assert len(row["loop_overhead_pct_segments"]) == 2
    assert row["loop_overhead_pct"] == pytest.approx(sum(row["loop_overhead_pct_segments"]) / 2, abs=0.11)  # each rounded to 0.1
    assert 0 < row["model_only_p50_ms"] <= row["model_only_p95_ms"]
    assert row["latency_p50_ms"] is None and row["latency_p95_ms"] is None  # lossless: no camera latency
    assert row["cpu_percent"] > 0 and row["dropped"] == 0
    assert 50 < row["end_rss_mb"] <= row["peak_rss_mb"] + 1 and row["peak_rss_mb"] < BALLAST_MB
    assert not list(scratch.glob("bench-loop-*"))  # the spool's temporary folder is removed


@pytest.mark.slow
def test_paced_run_has_latency_and_no_overhead_figure(files):
    """Played like a 10 fps camera the loop waits for frames: no overhead over the model is claimed."""
    bl = _load_script()
    row = bl.run_one("tiny", files["model"], 1.0, 10.0, "openvino", 1, files["video"])
    assert row["loop_overhead_pct"] is None
    assert row["frames"] > 0 and row["loop_fps"] == pytest.approx(row["frames"] / row["seconds"], rel=0.02)
    assert row["loop_fps"] < 10 * 1.5  # paced by the source
    assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
    assert 0 < row["model_only_p50_ms"] <= row["model_only_p95_ms"]


def test_bad_arguments_stop_with_a_clear_message(files, tmp_path, capsys):
    bl = _load_script()
    garbage = tmp_path / "garbage.avi"
    garbage.write_text("not a video")
    model = f"tiny={files['model']}"
    cases = [
        (["--model", str(files["model"])], "expected NAME=PATH"),
        (["--model", f"tiny={tmp_path / 'nope.xml'}"], "file not found"),
        (["--model", model, "--model", model], "given twice"),
        (["--model", model, "--video", str(garbage)], "cannot read a frame"),
        (["--model", model, "--video", str(tmp_path / "nope.avi")], "cannot read a frame"),
        (["--model", model, "--segments", "0"], "must be 1 or more"),
        (["--model", model, "--source-fps", "-1"], "must be 0 or more"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            bl.main([*argv, "--json", str(tmp_path / "out.json")])
        assert exc.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "out.json").exists()
