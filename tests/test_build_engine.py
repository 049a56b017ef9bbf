"""export/build_engine.sh and the engine's metadata sidecar.

TensorRT cannot be installed on these machines, so `trtexec` is replaced by a small stand-in script that
records its arguments and writes an "engine" file. What is tested is the script's own work: argument checks,
the engine name the edge runtime looks for, the metadata taken from the ONNX and bound to the engine by hash,
and that a failed build replaces nothing. The real build runs on the Jetson (Dockerfile.jetson).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drywallqa.contract import InvalidModelError
from drywallqa.edge.backends import ENGINE_HASH_KEY, load_backend, read_metadata

SCRIPT = Path(__file__).resolve().parents[1] / "export" / "build_engine.sh"

STAND_IN_TRTEXEC = """#!/usr/bin/env bash
# Stand-in for NVIDIA's trtexec: records its arguments, writes an engine file unless told to fail.
printf '%s\\n' "$@" > "$(dirname "$0")/trtexec.args"
[ -n "${FAKE_TRTEXEC_FAIL:-}" ] && { echo "[E] stand-in build failure" >&2; exit 1; }
for a in "$@"; do case "$a" in --saveEngine=*) out="${a#--saveEngine=}";; esac; done
printf 'engine built %s\\n' "${FAKE_ENGINE_TAG:-1}" > "$out"
"""


@pytest.fixture(scope="module")
def jetson_onnx(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="exporting the random test model needs torch")
    from _export_fixtures import export_random_model

    from drywallqa.export.jetson import make_jetson_onnx

    root = tmp_path_factory.mktemp("jetson")
    fp32 = export_random_model(root, size=(64, 64))
    out = root / "exported"
    out.mkdir()
    return make_jetson_onnx(fp32, out / "hrnet_w18_student_jetson_fp16.onnx")


def _run(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    trtexec = bin_dir / "trtexec"
    trtexec.write_text(STAND_IN_TRTEXEC)
    trtexec.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PATH": path, **env})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_engine_lands_where_the_runtime_looks_with_bound_metadata(jetson_onnx: Path, tmp_path: Path) -> None:
    res = _run(str(jetson_onnx), tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    engine = jetson_onnx.parent / "hrnet_w18_student.engine"  # what `model.path: hrnet` + tensorrt opens
    sidecar = engine.with_suffix(".json")
    assert engine.is_file() and sidecar.is_file()
    assert not list(jetson_onnx.parent.glob("*.partial"))
    args = (tmp_path / "bin" / "trtexec.args").read_text().split()
    assert f"--onnx={jetson_onnx}" in args and "--fp16" in args and "--memPoolSize=workspace:1024" in args
    meta = json.loads(sidecar.read_text())
    assert meta["extra"][ENGINE_HASH_KEY] == _sha256(engine)
    assert read_metadata(engine).precision == "fp16"
    assert read_metadata(engine).classes == read_metadata(jetson_onnx).classes

    # Another build's engine next to this metadata: refused, naming the fix.
    engine.write_text("engine built 2\n")
    with pytest.raises(InvalidModelError, match="written for another engine"):
        read_metadata(engine)


def test_a_failed_build_replaces_nothing(jetson_onnx: Path, tmp_path: Path) -> None:
    engine = tmp_path / "out" / "m.engine"
    engine.parent.mkdir()
    assert _run(str(jetson_onnx), str(engine), "512", tmp_path=tmp_path, FAKE_ENGINE_TAG="good").returncode == 0
    before = (engine.read_bytes(), engine.with_suffix(".json").read_bytes())
    res = _run(str(jetson_onnx), str(engine), tmp_path=tmp_path, FAKE_TRTEXEC_FAIL="1")
    assert res.returncode == 1 and "trtexec failed" in res.stderr and "nothing was replaced" in res.stderr
    assert (engine.read_bytes(), engine.with_suffix(".json").read_bytes()) == before
    assert sorted(p.name for p in engine.parent.iterdir()) == ["m.engine", "m.json"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 2, "usage: build_engine.sh"),
        (["{onnx}", "out.engine", "1GiB"], 2, "whole number of MiB"),
        (["{onnx}", "out.txt"], 2, "must end in .engine or .plan"),
        (["{onnx}", "a.engine", "64", "extra"], 2, "got 4 arguments"),
        (["model.json"], 2, "is not an .onnx file"),
        (["{missing}"], 1, "not found: write it with `drywallqa export"),
    ],
)
def test_bad_arguments_get_one_clear_line(jetson_onnx, tmp_path, args, code, message) -> None:
    args = [a.format(onnx=jetson_onnx, missing=tmp_path / "nope.onnx") for a in args]
    res = _run(*args, tmp_path=tmp_path)
    assert res.returncode == code and message in res.stderr, res.stderr
    assert not (tmp_path / "bin" / "trtexec.args").exists()  # refused before any build started


def test_help_is_not_an_error(tmp_path: Path) -> None:
    res = _run("--help", tmp_path=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("usage: build_engine.sh")


def test_metadata_naming_other_classes_than_the_outputs_is_refused(jetson_onnx: Path, tmp_path: Path) -> None:
    """A model whose metadata names one class while its output has two channels (metadata from another model):
    refused when loaded, instead of pairing thresholds with the wrong channels."""
    import onnx

    from drywallqa.export.onnx_export import set_metadata

    meta = read_metadata(jetson_onnx)
    keep = meta.classes[0]
    one_class = meta.model_copy(update={
        "classes": [keep],
        "prompts": {p: c for p, c in meta.prompts.items() if c == keep},
        "thresholds": {keep: meta.thresholds[keep]},
        "mask_shapes": {c: s for c, s in meta.mask_shapes.items() if c == keep},
    })
    model = onnx.load(str(jetson_onnx))
    set_metadata(model, one_class)
    wrong = tmp_path / "wrong.onnx"
    onnx.save(model, str(wrong))
    with pytest.raises(InvalidModelError, match="2 channels but the metadata names 1 classes"):
        load_backend(wrong, "onnxruntime", threads=1)


def test_the_fp32_onnx_beside_the_jetson_one_is_refused(jetson_onnx: Path, tmp_path: Path) -> None:
    """`--target all` writes <model>.onnx beside <model>_jetson_fp16.onnx; the FP32 one used to be built into an engine
    whose metadata said fp32 (the engine is FP16) and whose shapes could be dynamic (--dynamic-batch)."""
    fp32 = tmp_path / "exported" / "hrnet_w18_student.onnx"
    fp32.parent.mkdir()
    fp32.write_bytes((jetson_onnx.parents[1] / "effnet_lite0_fpn_64x64.onnx").read_bytes())
    res = _run(str(fp32), tmp_path=tmp_path)
    assert res.returncode == 1 and "is not the Jetson export" in res.stderr, res.stderr
    assert "give hrnet_w18_student_jetson_fp16.onnx, written by `drywallqa export --target jetson`" in res.stderr
    assert not (tmp_path / "bin" / "trtexec.args").exists()
    assert sorted(p.name for p in fp32.parent.iterdir()) == ["hrnet_w18_student.onnx"]


def test_re_exporting_other_weights_names_the_engine_built_from_the_old_ones(tmp_path: Path, caplog) -> None:
    """On a Jetson the runtime takes <model>.engine first: re-exporting new weights (a new fine-tune run, or a new
    threshold) left the engine of the old ones in use without a word. The export now names it."""
    from drywallqa.cli import main
    from drywallqa.export.random_weights import write_random_weights

    weights = write_random_weights(tmp_path / "w.safetensors", "effnet_lite0_fpn", (64, 64), seed=0)
    out = tmp_path / "exported"
    argv = ["export", "--weights", str(weights), "--target", "jetson", "--size", "64", "64", "--out", str(out)]
    assert main(argv) == 0
    assert _run(str(out / "w_jetson_fp16.onnx"), tmp_path=tmp_path).returncode == 0
    caplog.clear()
    assert main(argv) == 0  # the same weights again: the engine is still theirs
    assert "another model" not in caplog.text
    write_random_weights(weights, "effnet_lite0_fpn", (64, 64), seed=1)  # same header, other weights
    caplog.clear()
    assert main(argv) == 0
    assert "w.engine (made from other weights)" in caplog.text and "export/build_engine.sh" in caplog.text
    assert _run(str(out / "w_jetson_fp16.onnx"), tmp_path=tmp_path).returncode == 0
    caplog.clear()
    assert main([*argv[:-5], "--size", "64", "96", "--out", str(out)]) == 0
    assert "w.engine (input size)" in caplog.text
