"""Model files from elsewhere (broken, foreign, inconsistent) given to predict, eval and the edge runtime: each is
refused before any work with one line naming what is wrong, on real ONNX Runtime / OpenVINO files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from _foundation_fixtures import random_onnx, small_project, write_jpeg

from drywallqa.cli import main
from drywallqa.contract import METADATA_KEY, InvalidModelError
from drywallqa.edge.backends import load_backend, read_metadata


def _metadata(path: Path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[METADATA_KEY])


def _with_metadata(dst: Path, edit=None, text: str | None = None) -> Path:
    """A copy of the random model whose metadata is `edit`ed (a function changing the dict) or replaced by `text`."""
    model = onnx.load(str(random_onnx()))
    entry = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    if edit is not None:
        meta = json.loads(entry.value)
        edit(meta)
        text = json.dumps(meta)
    entry.value = text
    onnx.save(model, str(dst))
    return dst


def _predict(model: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    image = write_jpeg(tmp_path / "photo.jpg", 30, 40)
    code = main(["predict", "--model", str(model), "--prompt", "segment crack", "--quiet", "--backend",
                 "onnxruntime", "--out", str(tmp_path / "masks"), str(image)])
    return code, capsys.readouterr().err


def _one_clear_line(err: str, *names: str) -> None:
    assert err.count("\n") == 1 and err.startswith("drywallqa: error: "), err
    assert "Traceback" not in err and "pydantic.dev" not in err and "input_value=" not in err, err
    for name in names:
        assert name in err, err


@pytest.mark.parametrize(("edit", "named"), [
    (lambda m: m.pop("thresholds"), "thresholds: missing"),
    (lambda m: m["input"].update(height="abc"), "input.height"),
    (lambda m: m.update(classes="crack"), "classes: Input should be a valid list"),
])
def test_invalid_metadata_is_one_line_naming_the_field(edit, named, tmp_path, capsys):
    model = _with_metadata(tmp_path / "foreign.onnx", edit)
    code, err = _predict(model, tmp_path, capsys)
    assert code == 2
    _one_clear_line(err, "foreign.onnx", named)
    assert not (tmp_path / "masks").exists()


def test_metadata_that_is_not_a_json_object_says_so(tmp_path):
    with pytest.raises(InvalidModelError, match="metadata is invalid: must be a JSON object, got list"):
        read_metadata(_with_metadata(tmp_path / "list.onnx", text="[1, 2]"))
    with pytest.raises(InvalidModelError, match="metadata is not valid JSON"):
        read_metadata(_with_metadata(tmp_path / "cut.onnx", text='{"model_name": "x", '))


@pytest.mark.parametrize(("edit", "named"), [
    (lambda m: m["thresholds"].update(mould=0.5), r"thresholds for classes not in `classes`: \['mould'\]"),
    (lambda m: m["thresholds"].update(crack=float("nan")), r"thresholds\.crack: .* \(got nan\)"),
    (lambda m: m["thresholds"].update(crack=7.0), r"thresholds\.crack: Input should be less than or equal to 1"),
    (lambda m: m.update(schema_version=99), "schema_version: 99 is newer than the 1 this DrywallQA reads"),
    (lambda m: m.update(classes=["crack", "crack"], prompts={k: "crack" for k in m["prompts"]}),
     r"classes listed twice: \['crack'\]"),
])
def test_inconsistent_metadata_is_refused(edit, named, tmp_path):
    """Before: accepted; a threshold of NaN or 7 meant a class that never fires, a newer schema was misread."""
    model = _with_metadata(tmp_path / "odd.onnx", edit)
    with pytest.raises(InvalidModelError, match=named):
        read_metadata(model)


def test_a_class_without_prompts_is_the_models_fault_not_the_configs(tmp_path, capsys, monkeypatch):
    """Before: predict said only "class 'crack' has no prompts" (no file named), and the edge runtime blamed its own
    analysis.aliases setting."""
    from drywallqa.edge.cli import main as edge_main

    model = _with_metadata(tmp_path / "noprompts.onnx",
                           lambda m: m.update(prompts={k: v for k, v in m["prompts"].items() if v != "crack"}))
    code, err = _predict(model, tmp_path, capsys)
    assert code == 2
    _one_clear_line(err, "noprompts.onnx", "metadata is invalid", "class 'crack' has no prompts")
    monkeypatch.setenv("DRYWALLQA_MODEL__PATH", str(model))
    monkeypatch.setenv("DRYWALLQA_MODEL__BACKEND", "onnxruntime")
    assert edge_main(["edge", "check-config", "--model-check"]) == 78
    err = capsys.readouterr().err
    assert "noprompts.onnx: 'drywallqa' metadata is invalid" in err and "analysis.aliases" not in err


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_metadata_input_size_must_match_the_graph(backend, tmp_path):
    """Before: the graph's 64 x 64 silently won over the metadata's 128 x 96 (which eval's report then printed)."""
    model = _with_metadata(tmp_path / "size.onnx", lambda m: m["input"].update(height=128, width=96))
    with pytest.raises(InvalidModelError, match="input 'image' is 64 x 64 but the metadata says 128 x 96"):
        load_backend(model, backend)


@pytest.fixture(scope="module")
def ir(tmp_path_factory) -> Path:
    from drywallqa.export.openvino_export import export_openvino

    model = random_onnx()
    return export_openvino(model, tmp_path_factory.mktemp("ir") / "m.xml", read_metadata(model), fp16=True)


def _copy_ir(ir: Path, dst: Path, weights: bytes | None) -> Path:
    shutil.copy(ir, dst)
    if weights is not None:
        dst.with_suffix(".bin").write_bytes(weights)
    return dst


def test_openvino_ir_problems_are_one_named_line(ir, tmp_path, capsys):
    """Before: OpenVINO's multi-line C++ report ('Exception from src/inference/...'), and for a text file named .xml
    TensorFlow's own log lines as well."""
    nobin = _copy_ir(ir, tmp_path / "nobin.xml", None)
    code, err = _predict(nobin, tmp_path, capsys)
    assert code == 2
    _one_clear_line(err, "nobin.xml", "its weights file nobin.bin is missing")

    cut = _copy_ir(ir, tmp_path / "cut.xml", ir.with_suffix(".bin").read_bytes()[:1000])
    code, err = _predict(cut, tmp_path, capsys)
    assert code == 2
    _one_clear_line(err, "cut.xml", "not a readable OpenVINO IR", "cut.bin")
    assert "src/" not in err

    readme = tmp_path / "readme.xml"
    readme.write_text("hello, this is no model\n")
    code, err = _predict(readme, tmp_path, capsys)
    assert code == 2
    _one_clear_line(err, "readme.xml", "not an OpenVINO IR")


def test_onnx_whose_external_weights_are_missing_names_the_file(tmp_path):
    model = onnx.load(str(random_onnx()))
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="ext.weights", size_threshold=0)
    (tmp_path / "ext.weights").unlink()
    with pytest.raises(InvalidModelError, match="its weights are stored in ext.weights, which is not beside it"):
        load_backend(path, "onnxruntime")


def test_a_folder_named_like_a_model_is_called_a_folder(tmp_path, capsys):
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    code, err = _predict(folder, tmp_path, capsys)
    assert code == 2
    _one_clear_line(err, "model.onnx is a folder, not a model file")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        read_metadata(folder)


def test_training_weights_given_as_the_model_say_to_export_them_first(tmp_path, capsys):
    """`drywallqa train` writes .safetensors; predict and the edge read exported files. The error used to list the
    suffixes it reads and stop there."""
    weights = tmp_path / "own.safetensors"
    weights.write_bytes(b"weights")
    code, err = _predict(weights, tmp_path, capsys)
    assert code == 2
    _one_clear_line(err, "own.safetensors holds training weights", f"drywallqa export --weights {weights}")
    with pytest.raises(InvalidModelError, match="export them first"):
        read_metadata(weights)


def test_a_resume_checkpoint_given_as_the_model_is_not_sent_to_export(tmp_path, capsys):
    """runs/<name>/last.pt is the run's resume checkpoint (torch.save), which `drywallqa export --weights` cannot read
    (safetensors only). Before: the error told to run exactly that, on last.pt, which then failed in turn."""
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"\x80\x04 a torch pickle")
    code, err = _predict(checkpoint, tmp_path, capsys)
    assert code == 2
    _one_clear_line(err, "last.pt is a training checkpoint", "export the .safetensors file the run wrote")
    assert f"--weights {checkpoint}" not in err, err
    with pytest.raises(InvalidModelError, match="training checkpoint") as exc:
        read_metadata(checkpoint)
    assert f"--weights {checkpoint}" not in str(exc.value)


def test_an_unreadable_engine_sidecar_is_named(tmp_path, capsys):
    """Before: UnicodeDecodeError with a traceback; and the metadata errors named the engine, not the .json."""
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine bytes")
    sidecar = engine.with_suffix(".json")
    sidecar.write_bytes(b"\xff\xfe binary")
    with pytest.raises(InvalidModelError, match=r"m\.json: cannot read the metadata of m\.engine"):
        read_metadata(engine)
    code, err = _predict(engine, tmp_path, capsys)  # --backend onnxruntime reads the metadata first
    assert code == 2
    _one_clear_line(err, "m.json")
    sidecar.write_text(json.dumps({**_metadata(random_onnx()), "thresholds": {}}))
    with pytest.raises(InvalidModelError, match=r"m\.json: 'drywallqa' metadata is invalid: no threshold"):
        read_metadata(engine)


def test_eval_refuses_a_model_of_other_classes_instead_of_a_report_of_nothing(tmp_path, capsys):
    """Before: exit status 0 and eval.json/md/html with n/a for every class."""
    rename = {"crack": "fissure", "taping": "joint"}

    def other_classes(m: dict) -> None:
        m.update(classes=[rename[c] for c in m["classes"]], prompts={k: rename[v] for k, v in m["prompts"].items()},
                 thresholds={rename[k]: v for k, v in m["thresholds"].items()},
                 mask_shapes={rename[k]: v for k, v in m["mask_shapes"].items()})

    model = _with_metadata(tmp_path / "other.onnx", other_classes)
    cfg = small_project(tmp_path, n_crack=2, n_wall=2)
    assert main(["data", "split", "--config", str(cfg)]) == 0
    capsys.readouterr()
    code = main(["eval", "--model", str(model), "--config", str(cfg), "--out", str(tmp_path / "rep"), "--quiet",
                 "--backend", "onnxruntime"])
    assert code == 2
    _one_clear_line(capsys.readouterr().err, "other.onnx", "['fissure', 'joint']", "crack, taping")
    assert not list((tmp_path / "rep").glob("eval.*"))


# ------------------------------------------------------------------ weights files (safetensors checkpoints)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from drywallqa.export.random_weights import write_random_weights

    return write_random_weights(tmp_path_factory.mktemp("w") / "w.safetensors", "effnet_lite0_fpn", (64, 64))


def _with_header(src: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint `src` whose header (all strings) is `edit`ed; tensors as they were."""
    from drywallqa.train.checkpoint import read_raw
    from drywallqa.train.safetensors_io import write_safetensors

    header, tensors = read_raw(src)
    edit(header)
    return write_safetensors(tensors, dst, metadata=header)


@pytest.mark.parametrize(("edit", "named"), [
    (lambda h: h.pop("profile"), "profile: missing"),
    (lambda h: [h.pop("profile"), h.pop("text_encoder")], "profile: missing; text_encoder: missing"),
    (lambda h: h.update(thresholds="{crack: 0.5"), "thresholds: Invalid JSON"),
    (lambda h: h.update(input_size="[0, 64]"), "input_size.0: Input should be greater than 0"),
    (lambda h: h.update(mask_shapes='{"taping": "hull"}'), "mask_shapes.taping: Input should be 'pixels' or 'boxes'"),
])
def test_a_weights_header_without_a_required_field_is_one_line_naming_it(edit, named, weights, tmp_path, capsys):
    """Before: a header lacking `profile` (a file from an older tool) was 'its tensors do not make that model:
    KeyError: 'profile'', a malformed JSON field a JSONDecodeError said to be the tensors' fault."""
    foreign = _with_header(weights, tmp_path / "older.safetensors", edit)
    out = tmp_path / "exported"
    code = main(["export", "--weights", str(foreign), "--target", "onnx", "--out", str(out)])
    assert code == 2
    _one_clear_line(capsys.readouterr().err, "older.safetensors: weights header is invalid: ", named)
    assert not out.exists() or list(out.iterdir()) == []


def test_average_weights_names_the_file_whose_header_lacks_a_field(weights, tmp_path):
    """Before: a bare KeyError traceback from `python -m drywallqa.train.average_weights`."""
    older = _with_header(weights, tmp_path / "older.safetensors", lambda h: h.pop("profile"))
    out = tmp_path / "soup.safetensors"
    proc = subprocess.run([sys.executable, "-m", "drywallqa.train.average_weights", str(weights), str(older),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{older}: weights header is invalid: profile: missing" in proc.stderr
    assert not out.exists()
