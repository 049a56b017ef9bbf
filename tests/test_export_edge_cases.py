"""`drywallqa export` / `drywallqa bench` command-line edge cases: interruption, bad values, reuse of a --workdir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drywallqa.cli import main
from drywallqa.edge.backends import read_metadata
from drywallqa.export.random_weights import write_random_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_random_weights(tmp_path_factory.mktemp("w") / "w.safetensors", "effnet_lite0_fpn", (64, 64))


def test_ctrl_c_during_int8_leaves_the_previous_export_untouched(weights, tmp_path):
    """An export stopped after its ONNX and FP16 IR are made (here: Ctrl-C while NNCF calibrates INT8) must not
    leave a new ONNX beside the old IRs, or any half-made file, where the previous export was."""
    out = tmp_path / "models"
    assert main(["export", "--weights", str(weights), "--target", "onnx", "--size", "64", "64", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert list(before) == ["w.onnx"]
    # A real SIGINT to the real export process, sent by itself as INT8 calibration starts (the ONNX and the FP16 IR
    # are made by then), with Ctrl-C's default action restored as a terminal gives it: pytest started in the
    # background by a shell (`cmd &`) ignores SIGINT, and a child would inherit that and finish the export.
    ctrl_c_at_int8 = (
        "import os, signal, sys\n"
        "import drywallqa.export.openvino_export as ov\n"
        "quantize = ov.quantize_int8\n"
        "def ctrl_c_then_quantize(*args, **kwargs):\n"
        "    print('ctrl-c as int8 starts', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return quantize(*args, **kwargs)\n"
        "ov.quantize_int8 = ctrl_c_then_quantize\n"
        "from drywallqa.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [sys.executable, "-c", ctrl_c_at_int8, "export", "--weights", str(weights), "--target", "openvino",
           "--size", "64", "96", "--calib", "8", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130 and "interrupted" in proc.stderr, (proc.stdout[-1000:], proc.stderr[-2000:])
    assert "ctrl-c as int8 starts" in proc.stdout  # so the ONNX and the FP16 IR were made in the staging folder
    after = {p.name: p.read_bytes() for p in out.iterdir()}  # hidden staging folders included
    assert after == before
    meta = read_metadata(out / "w.onnx")
    assert (meta.input.height, meta.input.width) == (64, 64)


def test_sigterm_during_an_export_leaves_no_half_made_files(weights, tmp_path):
    """SIGTERM (`timeout`, a CI job cancelled) used to kill the export on the spot, leaving its staging folder with
    the half-made set in the output folder; now it ends as Ctrl-C does, through the clean-up."""
    out = tmp_path / "models"
    term_at_jetson = (
        "import os, signal, sys\n"
        "import drywallqa.export.jetson as jetson\n"
        "make = jetson.make_jetson_onnx\n"
        "def term_then_make(*args, **kwargs):\n"
        "    print('sigterm as the jetson onnx starts', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return make(*args, **kwargs)\n"
        "jetson.make_jetson_onnx = term_then_make\n"
        "from drywallqa.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [sys.executable, "-c", term_at_jetson, "export", "--weights", str(weights), "--target", "jetson",
           "--size", "64", "64", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "sigterm as the jetson onnx starts" in proc.stdout, proc.stderr[-2000:]  # the ONNX was staged by then
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert list(out.iterdir()) == []  # hidden staging folders included


def test_export_replaces_a_previous_export_whole(weights, tmp_path):
    out = tmp_path / "models"
    assert main(["export", "--weights", str(weights), "--target", "onnx", "--size", "64", "64", "--out", str(out)]) == 0
    assert main(["export", "--weights", str(weights), "--target", "onnx", "--size", "64", "96", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["w.onnx"]  # no staging left behind
    meta = read_metadata(out / "w.onnx")
    assert (meta.input.height, meta.input.width) == (64, 96)
    assert oct((out / "w.onnx").stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not the staging folder's 0700


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("command, calib", [("export", "-1"), ("bench", "0"), ("bench", "-3")])
def test_calibration_count_below_its_minimum_is_refused(command, calib, tmp_path, capsys):
    """export --calib -1 used to skip INT8 silently (like 0); bench --calib 0 or -3 silently calibrated on 1 image."""
    tiny = {"export": ["--target", "onnx", "--out", str(tmp_path / "o")],  # what runs if the value got through
            "bench": ["--iters", "1", "--rounds", "1", "--backends", "onnxruntime", "--workdir", str(tmp_path / "w"),
                      "--json", str(tmp_path / "b.json")]}[command]
    with pytest.raises(SystemExit):
        main([command, "--calib", calib, "--random-arch", "effnet_lite0_fpn", "--size", "32", "32", *tiny])
    assert "must be" in capsys.readouterr().err


def test_bench_refuses_bad_options_before_measuring(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    base = ["bench", "--random-arch", "effnet_lite0_fpn", "--size", "64", "64", "--json", str(tmp_path / "b.json")]
    cases = {  # each used to cost a traceback, a silently missing row, or the matmul measurement first
        "a file of that name exists": ["--workdir", str(tmp_path / "afile")],
        "no TensorRT engine at": ["--engine", str(tmp_path / "nope.engine")],
        "unknown or unavailable --backends ['onnxruntim']": ["--backends", "onnxruntim"],
    }
    for message, option in cases.items():
        started = time.monotonic()
        assert main([*base, *option]) == 2
        assert message in capsys.readouterr().err
        assert time.monotonic() - started < 30  # no export, no matmul measurement
    assert not (tmp_path / "b.json").exists()


def test_a_weights_file_named_twice_is_benchmarked_once(tmp_path):
    from drywallqa.export import bench

    args = main_parser_namespace(["bench", "--profile", "lite", "lite"])
    assert bench._resolve_weights(args, tmp_path) == [ROOT / "models" / "lite_effnet_lite0.safetensors"]
    args = main_parser_namespace(["bench", "--random-arch", "effnet_lite0_fpn", "effnet_lite0_fpn",
                                  "--size", "32", "32"])
    assert [p.name for p in bench._resolve_weights(args, tmp_path)] == ["random_effnet_lite0_fpn.safetensors"]


def main_parser_namespace(argv: list[str]):
    from drywallqa.cli import build_parser

    return build_parser().parse_args(argv)


def test_bench_keeps_same_named_checkpoints_apart_and_redoes_int8_for_another_calib(weights, tmp_path):
    """runs/a/w.safetensors and runs/b/w.safetensors in one --workdir: the second model used to be timed on the
    first one's exported files. And a --workdir export made with --calib 1 was reused for --calib 2."""
    from drywallqa.export import bench
    from drywallqa.train.checkpoint import set_thresholds

    other = tmp_path / "b" / "w.safetensors"
    other.parent.mkdir()
    other.write_bytes(weights.read_bytes())
    set_thresholds(other, {"crack": 0.25})
    work, out = tmp_path / "work", tmp_path / "bench.json"
    assert main(["bench", "--weights", str(weights), str(other), "--size", "64", "64", "--iters", "1", "--rounds", "1",
                 "--calib", "1", "--backends", "onnxruntime", "--workdir", str(work), "--json", str(out)]) == 0
    models = json.loads(out.read_text())["models"]
    assert [m["name"] for m in models] == ["w", "w_2"]
    files = [Path(m["backends"][0]["file"]) for m in models]
    assert files[0] != files[1]
    assert read_metadata(files[0]).thresholds["crack"] == 0.5  # the random weights' own rule
    assert read_metadata(files[1]).thresholds["crack"] == 0.25
    again = bench.prepare_artifacts(other, (64, 64), 1, work, "w_2")
    assert again["onnx"].stat().st_mtime_ns == files[1].stat().st_mtime_ns  # same source, same calib: reused
    more = bench.prepare_artifacts(other, (64, 64), 2, work, "w_2")
    assert read_metadata(more["int8"]).extra["calibration_images"] == 2


def test_default_out_is_where_the_runtime_looks_from_any_folder(weights, tmp_path):
    """`--model lite` resolves to <project>/models/exported; the export's default --out was models/exported under
    the current folder, so an export run from anywhere else left the runtime on the old model."""
    home, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (home / "models").mkdir(parents=True)
    elsewhere.mkdir()
    (home / "configs").symlink_to(ROOT / "configs")
    (home / "models" / "lite_effnet_lite0.safetensors").write_bytes(weights.read_bytes())
    env = {**os.environ, "DRYWALLQA_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "drywallqa.cli", "export", "--profile", "lite", "--target", "onnx",
                           "--size", "32", "32"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (home / "models" / "exported" / "lite_effnet_lite0.onnx").is_file()
    assert not (elsewhere / "models").exists()


def test_a_dynamic_batch_jetson_export_leaves_only_what_it_lists(weights, tmp_path, capsys):
    """The static ONNX the Jetson file is made from is an intermediate: it must not be left in --out unlisted."""
    out = tmp_path / "exp"
    assert main(["export", "--weights", str(weights), "--target", "jetson", "--dynamic-batch", "--size", "64", "64",
                 "--out", str(out)]) == 0
    stem = weights.stem
    made = [f"{stem}.onnx", f"{stem}_jetson_fp16.onnx", f"{stem}_jetson_fp16.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(made)
    printed = capsys.readouterr().out
    assert all(str(out / name) in printed for name in made), printed


def test_a_torch_checkpoint_as_weights_says_which_file_to_give(tmp_path, capsys):
    """runs/<name>/last.pt (the run's resume file, the first file in its folder) got 'cannot read it as a
    safetensors weights file: header too large', and a wrong weights file left an empty --out folder behind."""
    import torch

    last = tmp_path / "runs" / "finetune" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, last)
    renamed = last.with_name("resume.safetensors")
    renamed.write_bytes(last.read_bytes())
    for path in (last, renamed):
        out = tmp_path / "exported"
        assert main(["export", "--weights", str(path), "--target", "onnx", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{path} is a torch checkpoint" in err and "the .safetensors file the run wrote" in err, err
        assert not out.exists()
    garbage = tmp_path / "w.safetensors"
    garbage.write_text("not weights")
    assert main(["export", "--weights", str(garbage), "--target", "onnx", "--out", str(tmp_path / "exported")]) == 2
    assert "cannot read it as a safetensors weights file" in capsys.readouterr().err
    assert not (tmp_path / "exported").exists()


def test_a_partial_re_export_names_the_files_it_left_from_other_weights(weights, tmp_path, caplog):
    """README's 'write a better threshold into the weights, then export again' with --target onnx left the Jetson
    ONNX (and the IRs) of the old rule beside the new ONNX, silently: a device given one ran the old thresholds."""
    from drywallqa.train.checkpoint import set_thresholds

    own = tmp_path / "w.safetensors"
    own.write_bytes(weights.read_bytes())
    out = tmp_path / "exported"
    argv = ["export", "--weights", str(own), "--size", "64", "64", "--out", str(out)]
    assert main([*argv, "--target", "jetson"]) == 0
    set_thresholds(own, {"crack": 0.3})
    caplog.clear()
    assert main([*argv, "--target", "onnx"]) == 0
    assert "w_jetson_fp16.onnx (thresholds)" in caplog.text and "--target all" in caplog.text
    assert read_metadata(out / "w.onnx").thresholds["crack"] == 0.3
    caplog.clear()
    assert main([*argv, "--target", "jetson"]) == 0  # the whole family remade: nothing to say
    assert "another model" not in caplog.text
    assert read_metadata(out / "w_jetson_fp16.onnx").thresholds["crack"] == 0.3


def _without_weights_hash(ir: Path) -> None:
    """Rewrite an IR as an export of an older DrywallQA left it: metadata without weights_sha256."""
    import openvino as ov

    from drywallqa.contract import METADATA_KEY, WEIGHTS_HASH_KEY

    meta = read_metadata(ir)
    del meta.extra[WEIGHTS_HASH_KEY]
    model = ov.Core().read_model(str(ir))
    model.set_rt_info(meta.to_json(), [METADATA_KEY])
    older = ir.with_name("older.xml")
    ov.save_model(model, str(older), compress_to_fp16=True)
    older.replace(ir)
    older.with_suffix(".bin").replace(ir.with_suffix(".bin"))


def test_a_profile_passes_over_an_ir_that_is_not_the_model_of_its_onnx(weights, tmp_path, monkeypatch, caplog):
    """A profile on OpenVINO runs its IR first. After a fine-tune (or a new threshold) exported with --target onnx,
    the IR beside the new ONNX is the old model: the device ran it, with a warning, though every export rewrites the
    ONNX. An IR of an older DrywallQA (no weights recorded) beside a newer ONNX was run without a word, where before
    IRs were looked for the ONNX ran. Either is passed over now, said, and the ONNX runs."""
    import logging

    from drywallqa.edge.runner import resolve_model_path
    from drywallqa.train.checkpoint import set_thresholds

    own = tmp_path / "lite_effnet_lite0.safetensors"
    own.write_bytes(weights.read_bytes())
    exported = tmp_path / "home" / "models" / "exported"
    argv = ["export", "--weights", str(own), "--size", "64", "64", "--out", str(exported)]
    assert main([*argv, "--target", "openvino", "--calib", "0"]) == 0
    monkeypatch.setenv("DRYWALLQA_HOME", str(tmp_path / "home"))
    with caplog.at_level(logging.WARNING, logger="drywallqa.edge.runner"):
        assert resolve_model_path("lite", "openvino").name == "lite_effnet_lite0_fp16.xml"
    assert "passed over" not in caplog.text  # one export: one model

    _without_weights_hash(exported / "lite_effnet_lite0_fp16.xml")  # as an export before weights_sha256 left it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drywallqa.edge.runner"):
        assert resolve_model_path("lite", "openvino").name == "lite_effnet_lite0.onnx"
    assert "lite_effnet_lite0_fp16.xml passed over: it records no weights" in caplog.text

    assert main([*argv, "--target", "openvino", "--calib", "0"]) == 0
    set_thresholds(own, {"crack": 0.3})  # another file: the IR is now another model than the ONNX made next
    assert main([*argv, "--target", "onnx"]) == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drywallqa.edge.runner"):
        assert resolve_model_path("lite", "openvino").name == "lite_effnet_lite0.onnx"
    assert "lite_effnet_lite0_fp16.xml passed over: it was made from other weights (compared with " \
           "lite_effnet_lite0.onnx" in caplog.text


def test_a_safetensors_file_whose_header_length_starts_with_0x80_is_not_called_a_torch_checkpoint(weights, tmp_path,
                                                                                                  capsys):
    """A bare pickle starts with byte 0x80, and so does every safetensors file whose header length is 128 modulo 256:
    a weights file whose tensors do not make its model (1 in 256 of them) was called a torch checkpoint, and the
    real problem was not said."""
    import struct

    from safetensors.torch import save_file

    from drywallqa.train.checkpoint import read_raw

    header, tensors = read_raw(weights)
    tensors.pop(sorted(tensors)[-1])  # a tensor short: the model cannot be built from it
    broken = tmp_path / "w.safetensors"
    for pad in range(256):
        save_file(tensors, str(broken), metadata={**header, "note": "x" * pad})
        if struct.unpack("<Q", broken.read_bytes()[:8])[0] % 256 == 0x80:
            break
    assert broken.read_bytes()[:1] == b"\x80"
    assert main(["export", "--weights", str(broken), "--target", "onnx", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "its tensors do not make that model" in err and "torch checkpoint" not in err, err
