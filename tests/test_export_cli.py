"""`drywallqa export` end to end (random weights, tiny size): every artifact loads and carries the metadata."""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx
import pytest

from drywallqa.edge.backends import load_backend, read_metadata
from drywallqa.export import cli
from drywallqa.export.jetson import tensorrt_problems
from drywallqa.export.random_weights import write_random_weights


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="drywallqa")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    weights = write_random_weights(out / "w.safetensors", "effnet_lite0_fpn", (64, 64))
    args = _parse(["export", "--weights", str(weights), "--target", "all", "--out", str(out / "m"),
                   "--size", "64", "96", "--calib", "4"])
    assert args.func(args) == 0
    return out / "m"


def test_all_artifacts(exported):
    names = sorted(p.name for p in exported.iterdir())
    assert names == sorted(["w.onnx", "w_fp16.xml", "w_fp16.bin", "w_int8.xml", "w_int8.bin",
                            "w_jetson_fp16.onnx", "w_jetson_fp16.json"])
    precision = {"w.onnx": "fp32", "w_fp16.xml": "fp16", "w_int8.xml": "int8", "w_jetson_fp16.onnx": "fp16"}
    for name, prec in precision.items():
        meta = read_metadata(exported / name)
        assert meta.precision == prec and (meta.input.height, meta.input.width) == (64, 96)
        assert meta.model_name == "w" and meta.data_fingerprint == "random"


def test_onnx_is_static_opset17_and_checked(exported):
    model = onnx.load(str(exported / "w.onnx"))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 64, 96, 3]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_jetson_onnx_constraints(exported):
    path = exported / "w_jetson_fp16.onnx"
    assert tensorrt_problems(path) == []
    assert tensorrt_problems(exported / "w.onnx")  # the FP32 export is not Jetson-ready: has fp32 weights
    be = load_backend(path, "onnxruntime")
    assert be.infer(be_input(be)).dtype.name == "float32"


def be_input(be):
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (1, *be.input_hw, 3), dtype=np.uint8)


def test_dynamic_batch_export(tmp_path):
    weights = write_random_weights(tmp_path / "d.safetensors", "effnet_lite0_fpn", (64, 64))
    args = _parse(["export", "--weights", str(weights), "--target", "onnx", "--out", str(tmp_path / "o"),
                   "--dynamic-batch"])
    args.func(args)
    be = load_backend(tmp_path / "o" / "d.onnx", "onnxruntime")
    assert be.fixed_batch is None and be.infer(be_input(be).repeat(3, 0)).shape[0] == 3


def test_missing_weights_is_clear(tmp_path):
    args = _parse(["export", "--weights", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no weights at"):
        args.func(args)
    folder = tmp_path / "run"
    folder.mkdir()
    args = _parse(["export", "--weights", str(folder), "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="is a folder; give the .safetensors file in it"):
        args.func(args)


def test_int8_calibrates_on_the_data_config_it_is_given(tmp_path, capsys):
    """A model fine-tuned on one's own photos is calibrated on them (--calib-config), and the INT8 file says so;
    a config with no photos stops the export before anything is made."""
    from _foundation_fixtures import small_project

    from drywallqa.cli import main

    data = small_project(tmp_path / "site", n_crack=3, n_wall=3)
    assert main(["data", "split", "--config", str(data)]) == 0
    weights = write_random_weights(tmp_path / "w.safetensors", "effnet_lite0_fpn", (64, 64))
    out = tmp_path / "m"
    args = _parse(["export", "--weights", str(weights), "--target", "openvino", "--out", str(out),
                   "--calib", "4", "--calib-config", str(data)])
    assert args.func(args) == 0
    source = read_metadata(out / "w_int8.xml").extra["calibration_source"]
    assert source.startswith("data.yaml train split, ") and source.endswith(" images")

    empty_cfg = Path(__file__).resolve().parents[1] / "configs" / "own_data.yaml"  # the template: roots not there
    capsys.readouterr()
    code = main(["export", "--weights", str(weights), "--target", "openvino", "--out", str(tmp_path / "m2"),
                 "--calib", "4", "--calib-config", str(empty_cfg)])
    assert code == 2 and "calib-config" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists() or not any((tmp_path / "m2").glob("*.xml"))
