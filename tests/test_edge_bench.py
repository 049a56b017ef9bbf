"""`drywallqa edge bench`: a device with the edge install (no torch) times its exported model as `edge run` loads
it, on real ONNX Runtime and OpenVINO sessions."""

from __future__ import annotations

import json

import pytest
from _foundation_fixtures import random_onnx

from drywallqa.cli import main
from drywallqa.edge.cli import EXIT_CONFIG


def test_two_models_are_timed_side_by_side_on_the_backends_asked_for(tmp_path, capsys):
    model = random_onnx()
    out = tmp_path / "bench.json"
    code = main(["edge", "bench", "--model", str(model), "--model", str(model), "--backend", "onnxruntime",
                 "--threads", "1", "--frame-size", "160x120", "--iters", "3", "--rounds", "2", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["model_settings"]["backend"] == "onnxruntime" and report["model_settings"]["threads"] == 1
    rows = report["rows"]
    assert [r["model"] for r in rows] == [str(model), str(model)]
    for row in rows:
        assert row["backend"] == "onnxruntime" and row["input_hw"] == [64, 64] and row["frame_hw"] == [120, 160]
        assert row["network_ms"] > 0 and row["preprocess_ms"] >= 0 and row["decision_ms"] >= 0
        assert len(row["rounds_total_ms"]) == 2 and row["total_ms"] == min(row["rounds_total_ms"])
        assert row["fps"] == pytest.approx(1000 / row["total_ms"], abs=0.05)
    assert "frame 160x120, threads 1" in printed and printed.count("onnxruntime") == 2


def test_the_config_model_settings_are_what_is_timed(tmp_path, capsys):
    """Without --model the config's model (path, backend) is timed, as `edge run` would load it."""
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"model: {{path: {random_onnx()}, backend: openvino, threads: 1}}\n")
    code = main(["edge", "bench", "--config", str(cfg), "--iters", "2", "--rounds", "1", "--json",
                 str(tmp_path / "b.json")])
    assert code == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["backend"] == "openvino" and rows[0]["model"] == str(random_onnx())


def test_a_missing_model_is_one_line_naming_it(tmp_path, capsys):
    code = main(["edge", "bench", "--model", str(tmp_path / "nosuch.onnx")])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG and err.count("\n") == 1 and "nosuch.onnx" in err and "Traceback" not in err


@pytest.mark.parametrize("size", ["640", "0x480", "axb"])
def test_a_bad_frame_size_is_a_usage_error(size, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["edge", "bench", "--frame-size", size])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument --frame-size: {size!r}" in err, err
