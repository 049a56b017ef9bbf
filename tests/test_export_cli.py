"""`drywallqa export` end to end (random weights, tiny size): every artifact loads and carries the metadata."""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx
import pytest

from drywallqa.contract import ModelMetadata
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
    # One contract in every file, and which weights file they were all made from (what tells a stale file apart).
    import hashlib
    import json

    from drywallqa.export.pipeline import CONTRACT_FIELDS, WEIGHTS_HASH_KEY

    weights_hash = hashlib.sha256((exported.parent / "w.safetensors").read_bytes()).hexdigest()
    metas = [read_metadata(exported / name) for name in precision]
    metas.append(ModelMetadata.from_json((exported / "w_jetson_fp16.json").read_text()))
    for meta in metas:
        assert meta.extra[WEIGHTS_HASH_KEY] == weights_hash
        assert json.loads(meta.model_dump_json(include=set(CONTRACT_FIELDS) | {"input"})) == \
            json.loads(metas[0].model_dump_json(include=set(CONTRACT_FIELDS) | {"input"}))


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


def _config(path: Path, roots: dict[str, Path]) -> Path:
    from _foundation_fixtures import write_data_config

    classes = ["crack", "taping"]
    return write_data_config(path, [{"name": name, "root": str(root), "splits": ["train"], "format": "yolo",
                                     "class": classes[i % 2]} for i, (name, root) in enumerate(roots.items())],
                             path.with_suffix(".split.json"), val_fraction=0.2)


def test_a_calib_config_whose_data_folder_is_not_there_names_it(tmp_path, capsys):
    """It used to say only 'its training split has no photos', not that the folder it names does not exist."""
    from drywallqa.cli import main

    weights = write_random_weights(tmp_path / "w.safetensors", "effnet_lite0_fpn", (32, 32))
    cfg = _config(tmp_path / "site.yaml", {"site_cracks": tmp_path / "photos" / "cracks"})
    out = tmp_path / "m"
    code = main(["export", "--weights", str(weights), "--target", "openvino", "--out", str(out), "--calib", "2",
                 "--calib-config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and f"the data folder of 'site_cracks' ({tmp_path / 'photos' / 'cracks'}) is not there" in err
    assert "set each dataset's `root`" in err.lower() and "--calib 0" in err
    assert not any(out.glob("*.onnx"))  # refused before the export


def test_a_calib_config_with_one_data_folder_missing_warns_and_calibrates_on_the_others(tmp_path, caplog):
    """A typo in one dataset's root used to drop its photos from INT8 calibration without a word."""
    from _foundation_fixtures import make_yolo_dataset

    from drywallqa.export.calibration import calibration_paths

    make_yolo_dataset(tmp_path / "cracks", [f"c{i}" for i in range(4)])
    cfg = _config(tmp_path / "site.yaml", {"cracks": tmp_path / "cracks", "taping": tmp_path / "tapng"})
    with caplog.at_level("WARNING", logger="drywallqa.export.calibration"):
        paths = calibration_paths(cfg)
    assert paths and all(p.parent == tmp_path / "cracks" / "train" / "images" for p in paths)
    assert f"the data folder of 'taping' ({tmp_path / 'tapng'}) is not there; INT8 is calibrated without it" \
        in caplog.text


def test_calibration_photos_none_of_which_reads_are_one_clear_error(tmp_path):
    """Every picked photo unreadable (a git-lfs pointer, a truncated copy) was a bare ValueError: a traceback."""
    from _foundation_fixtures import make_yolo_dataset

    from drywallqa.export.calibration import calibration_set
    from drywallqa.imageio import ImageReadError

    make_yolo_dataset(tmp_path / "cracks", [f"c{i}" for i in range(3)])
    for photo in (tmp_path / "cracks" / "train" / "images").iterdir():
        photo.write_text("version https://git-lfs.github.com/spec/v1\n")
    cfg = _config(tmp_path / "site.yaml", {"cracks": tmp_path / "cracks"})
    with pytest.raises(ImageReadError, match=r"none of the \d calibration photos could be read .*--calib 0"):
        calibration_set(2, (32, 32), cfg)
