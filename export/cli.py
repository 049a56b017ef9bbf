"""CLI: `drywallqa export` and `drywallqa bench` (heavy imports happen inside the handlers)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from drywallqa.argtypes import non_negative_int, positive_int

if TYPE_CHECKING:
    from drywallqa.train.checkpoint import CheckpointInfo
    from drywallqa.train.models.segmenter import Segmenter


def _weights(args: argparse.Namespace) -> Path:
    from drywallqa.paths import profile_weights

    if args.weights:
        path = Path(args.weights)
        if path.is_dir():
            raise FileNotFoundError(f"--weights {path} is a folder; give the .safetensors file in it")
        if not path.is_file():
            raise FileNotFoundError(f"no weights at {path} (--weights wants a .safetensors file from training)")
        return path
    path = profile_weights(args.profile)
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}. Pass --weights FILE.safetensors, or train/ship the "
                                f"{args.profile!r} profile first (for a dry run: --random-arch).")
    return path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from drywallqa.paths import DEFAULT_PROFILE, PROFILES

    g = p.add_mutually_exclusive_group()
    g.add_argument("--weights", help="checkpoint (.safetensors from training); default: the --profile's shipped file")
    g.add_argument("--random-arch", choices=("hrnet_w18", "effnet_lite0_fpn"),
                   help="use a randomly initialised model of this architecture (no trained weights needed)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE,
                   help=f"shipped model profile whose weights to use (default {DEFAULT_PROFILE})")


def _resolve_weights(args: argparse.Namespace, tmp: Path) -> Path:
    if args.random_arch:
        from drywallqa.export.random_weights import write_random_weights

        return write_random_weights(tmp / f"random_{args.random_arch}.safetensors", args.random_arch)
    return _weights(args)


TORCH_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
_TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save: a zip file (torch >= 1.6), or a bare pickle


def _is_torch_checkpoint(path: Path) -> bool:
    if path.suffix.lower() in TORCH_CHECKPOINT_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    # A safetensors file is an 8-byte header length, then its JSON header: its first byte can be 0x80 too.
    return head.startswith(_TORCH_SAVE_MAGIC) and head[8:9] != b"{"


def load_checked_weights(path: Path) -> tuple[Segmenter, CheckpointInfo]:
    """load_weights(path), with what to do instead when `path` is a torch checkpoint: a training run's resume file
    (runs/<name>/last.pt) is the first file a user finds in the run's folder, but export reads the .safetensors
    file the run writes (its config's `output:`)."""
    from drywallqa.train.checkpoint import CheckpointError, load_weights

    try:
        return load_weights(path)
    except CheckpointError as exc:
        if not _is_torch_checkpoint(path):
            raise
        raise CheckpointError(f"{path} is a torch checkpoint (a training run's resume file), which export does not "
                              f"read: give --weights the .safetensors file the run wrote, the `output:` of its "
                              f"training config (e.g. models/lite_effnet_lite0.safetensors)") from exc


def _exit_on_signal(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def _checked_output_and_calibration(args: argparse.Namespace) -> list[Path] | None:
    """Checks made before minutes of export and INT8 calibration, not after: --out takes files, and a
    --calib-config that is missing, invalid or without photos stops here. Returns its photos (None: no such config),
    passed on to the export rather than listed again."""
    from drywallqa.outdir import ensure_writable_dir

    ensure_writable_dir(args.out)
    if args.calib_config is None or not args.calib or args.target not in ("openvino", "all"):
        return None
    from drywallqa.export.calibration import calibration_paths

    return calibration_paths(args.calib_config)


def _export(args: argparse.Namespace) -> int:
    import contextlib
    import logging
    import signal
    import tempfile

    from drywallqa.export.pipeline import run_export

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM (a `timeout`, a CI job or service stopping) ends the export as Ctrl-C does: through the `finally`s
    # that remove its staging folder, instead of leaving the half-made files there.
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        with contextlib.ExitStack() as stack:  # a temp folder only for random weights, which need a file
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory())) if args.random_arch else Path()
            weights = _resolve_weights(args, tmp)
            loaded = load_checked_weights(weights)  # a wrong file stops here, before --out is made
            calib_paths = _checked_output_and_calibration(args)
            out = run_export(weights, args.target, args.out, tuple(args.size) if args.size else None,
                             args.dynamic_batch, args.calib, args.calib_config, calib_paths, loaded)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    for name, path in out.items():
        size = sum(p.stat().st_size for p in (path, path.with_suffix(".bin")) if p.is_file())
        print(f"{name:14s} {path}  ({size / 2**20:.1f} MiB)")
    _warn_stale_siblings(args, out)
    return 0


def _warn_stale_siblings(args: argparse.Namespace, out: dict[str, Path]) -> None:
    """Files of this model name left in --out by an earlier export (another --target) or engine build are another
    model now: a device given one would run the old weights or the old thresholds."""
    import logging

    from drywallqa.export.pipeline import stale_siblings

    stale = stale_siblings(args.out, out)
    if stale:
        logging.getLogger("drywallqa.export").warning(
            "in %s, %s: made by an earlier export or engine build, not remade by this one, and another model than "
            "this export. Export again with --target all, rebuild the engine (export/build_engine.sh), or delete "
            "them, so that no device runs the old model", args.out, "; ".join(stale))


def _bench(args: argparse.Namespace) -> int:
    from drywallqa.export.bench import main_from_args

    return main_from_args(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    from drywallqa.paths import EXPORTED_DIR

    p = subparsers.add_parser(
        "export", help="export weights to ONNX / OpenVINO (FP16, INT8) / Jetson TensorRT-ready ONNX",
        description="Export a checkpoint; every output file carries the model metadata (classes, prompts, "
                    "thresholds, input size) that the edge runtime reads.")
    _add_model_args(p)
    p.add_argument("--target", choices=("onnx", "openvino", "jetson", "all"), default="all",
                   help="onnx: FP32 ONNX; openvino: + IR FP16 and NNCF INT8; jetson: + FP16 static ONNX for "
                        "TensorRT (then run export/build_engine.sh on the device); all: everything (default)")
    p.add_argument("--out", default=str(EXPORTED_DIR),
                   help="output folder (default: the project's models/exported, where --model hrnet|lite looks)")
    p.add_argument("--size", type=positive_int, nargs=2, metavar=("H", "W"),
                   help="input size (default: the checkpoint's)")
    p.add_argument("--dynamic-batch", action="store_true", help="dynamic batch dimension (default static 1)")
    p.add_argument("--calib", type=non_negative_int, default=300,
                   help="INT8 calibration images from the training split (default 300; 0 skips INT8)")
    p.add_argument("--calib-config", type=Path, default=None, metavar="DATA_YAML",
                   help="calibrate INT8 on the training split of this data config, e.g. your own photos "
                        "(configs/own_data.yaml) for a model fine-tuned on them (default: configs/data.yaml)")
    p.set_defaults(func=_export)

    b = subparsers.add_parser(
        "bench", help="benchmark torch / ONNX Runtime / OpenVINO FP16 / INT8 side by side",
        description="Latency p50/p95, FPS at batch 1 and 4, peak RSS (one subprocess per backend), file size, "
                    "speed vs torch eager and vs this machine's compute bound (model FLOPs / measured GFLOP/s).")
    from drywallqa.export.bench import register_arguments

    register_arguments(b)
    b.set_defaults(func=_bench)
