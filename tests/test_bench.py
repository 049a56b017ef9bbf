"""`drywallqa bench` on a tiny random model (64x64): JSON structure and sane numbers per backend; no timing targets."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from drywallqa.export import bench, cli
from drywallqa.export.flops import count_macs

EXPECTED_ROWS = {"torch_eager", "onnxruntime", "openvino_fp32", "openvino_fp16", "openvino_int8"} | (
    {"openvino_fp16_avx2"} if bench.cpu_has_avx512() else set())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    parser = argparse.ArgumentParser(prog="drywallqa")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--random-arch", "effnet_lite0_fpn", "--size", "64", "64", "--iters", "3",
                              "--calib", "2", "--rounds", "2", "--workdir", str(tmp / "work"), "--json", str(out)])
    assert args.func(args) == 0
    return json.loads(out.read_text())


def test_report_structure(report):
    assert report["settings"]["size"] == [64, 64] and report["settings"]["threads"] == 2
    mm = report["machine"]["matmul"]
    assert mm["gflops"] > 0 and mm["gflops"] == max(mm["numpy_gflops"], mm.get("torch_gflops", 0))
    (model,) = report["models"]
    assert model["architecture"] == "effnet_lite0_fpn" and model["profile"] == "lite"
    assert model["gflops"] == pytest.approx(2 * model["macs"] / 1e9) and model["macs"] > 0
    assert model["flops_uncounted_nodes"] == []
    seen = model["matmul_gflops_seen"]  # the start's rate and one measured next to this model's runs
    assert len(seen) == 2 and seen[0] == mm["gflops"] and min(seen) > 0
    assert model["compute_bound_ms"] == pytest.approx(model["gflops"] / max(seen) * 1e3)  # the tightest bound
    for stage in ("preprocess", "postprocess", "threshold"):
        assert model["prepost"][stage]["p50_ms"] > 0
    assert model["prepost"]["input_shape"] == [bench.N_IMAGES, 64, 64, 3]
    assert {r["name"] for r in model["backends"]} == EXPECTED_ROWS
    assert set(model["targets"]) >= {"best_fp32_within_1.25x_bound", "int8_1.6x_faster_than_best_fp32",
                                     "int8_3x_faster_than_torch"}


def test_every_backend_row_is_sane(report):
    (model,) = report["models"]
    classes = len(model["classes"])
    for row in model["backends"]:
        assert "error" not in row, row
        assert row["output"]["shape"] == [4, classes, 64, 64]  # last measured batch is 4
        assert row["output"]["finite"] and 0.0 <= row["output"]["min"] <= row["output"]["max"] <= 1.0
        for b in ("1", "4"):
            stats = row["batches"][b]
            assert stats["iters"] >= 1
            assert 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["p95_ms"]
            assert stats["fps"] == pytest.approx(int(b) * 1e3 / stats["mean_ms"])
        assert len(row["rounds_p50_ms"]) == 2  # interleaved batch-1 rounds; the row keeps the best
        assert row["batches"]["1"]["p50_ms"] == min(row["rounds_p50_ms"])
        assert 50 < row["peak_rss_mib"] < 8000  # a whole interpreter, per process, not the parent's
        assert row["file_mib"] > 0
        assert math.isfinite(row["speedup_vs_torch"]) and row["ratio_to_compute_bound"] > 0
    rows = {r["name"]: r for r in model["backends"]}
    assert rows["torch_eager"]["speedup_vs_torch"] == 1.0
    assert rows["torch_eager"]["max_abs_diff_vs_torch"] == 0.0
    assert rows["onnxruntime"]["max_abs_diff_vs_torch"] < 1e-3  # same fp32 network
    assert rows["openvino_int8"]["file_mib"] < rows["onnxruntime"]["file_mib"]
    assert rows["openvino_int8"]["settings"]["PERFORMANCE_HINT"] == "LATENCY"
    assert rows["openvino_int8"]["settings"]["INFERENCE_NUM_THREADS"] == "2"
    assert rows["openvino_fp16"]["settings"]["ONEDNN_MAX_CPU_ISA"] == "native"
    if "openvino_fp16_avx2" in rows:  # the same IR with its kernels capped at AVX2: same numbers, other kernels
        assert rows["openvino_fp16_avx2"]["settings"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
        assert rows["openvino_fp16_avx2"]["max_abs_diff_vs_torch"] == pytest.approx(
            rows["openvino_fp16"]["max_abs_diff_vs_torch"], abs=1e-3)  # fp16 weights: both differ from torch alike


def test_a_later_round_replaces_batch_1_only_when_faster():
    def row(p50, rss):
        return {"batches": {"1": {"p50_ms": p50}, "4": {"p50_ms": 4 * p50}}, "peak_rss_mib": rss, "output": {}}

    first = row(50.0, 300.0)
    slower = bench.merge_round(first, row(60.0, 310.0))
    assert slower["batches"]["1"]["p50_ms"] == 50.0 and slower["rounds_p50_ms"] == [50.0, 60.0]
    faster = bench.merge_round(slower, row(35.0, 290.0))
    assert faster["batches"]["1"]["p50_ms"] == 35.0 and faster["batches"]["4"]["p50_ms"] == 200.0
    assert faster["rounds_p50_ms"] == [50.0, 60.0, 35.0] and faster["peak_rss_mib"] == 310.0
    failed = bench.merge_round(faster, {"error": "worker exited 1"})
    assert failed["batches"]["1"]["p50_ms"] == 35.0 and failed["round_errors"] == ["worker exited 1"]


def test_markdown_lists_every_backend(report):
    text = bench.markdown(report)
    for label in ("torch eager", "ONNX Runtime CPU", "OpenVINO FP16 IR", "OpenVINO INT8 IR", "compute bound"):
        assert label in text


def test_flops_of_known_graph():
    """Conv 3->8, 3x3, stride 2 on 1x3x32x32 (16x16 out) then MatMul 16x16 @ 16x4: MACs by hand."""
    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    m = numpy_helper.from_array(np.zeros((16, 4), np.float32), "m")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("MatMul", ["y", "m"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w, m])
    count = count_macs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    conv = 8 * 16 * 16 * 3 * 3 * 3
    matmul = 8 * 16 * 4 * 16
    assert count.by_op == {"Conv": conv, "MatMul": matmul} and count.macs == conv + matmul
    assert count.gflops == pytest.approx(2 * (conv + matmul) / 1e9)


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights at"):
        bench.main(["--weights", str(tmp_path / "nope.safetensors"), "--workdir", str(tmp_path)])


def test_a_file_that_is_not_a_checkpoint_stops_before_any_measurement(tmp_path, capsys):
    """The header is checked first: no matmul run, no JSON written, one line naming the file."""
    from drywallqa.cli import main

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    out = tmp_path / "bench.json"
    code = main(["bench", "--weights", str(bad), "--workdir", str(tmp_path / "work"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and str(bad) in captured.err
    assert "matmul" not in captured.out and not out.exists()


def test_unusable_json_path_stops_before_the_benchmark(tmp_path, capsys):
    from drywallqa.cli import main

    (tmp_path / "afile").write_text("x")
    code = main(["bench", "--random-arch", "effnet_lite0_fpn", "--out", str(tmp_path / "afile" / "b.json")])
    assert code == 2 and "a file of that name exists" in capsys.readouterr().err
    for option in (["--iters", "0"], ["--threads", "0"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            main(["bench", "--random-arch", "effnet_lite0_fpn", *option])
        assert "must be 1 or more" in capsys.readouterr().err
