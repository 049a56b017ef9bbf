"""`drywallqa export`: weights -> ONNX, OpenVINO FP16 + INT8, Jetson FP16 ONNX, all carrying the metadata."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from drywallqa.export.metadata import build_metadata

log = logging.getLogger(__name__)

TARGETS = ("onnx", "openvino", "jetson", "all")


INTERMEDIATE_DIR = "intermediate"  # inside the staging folder: files a target is made from, not shipped


def run_export(
    weights: str | Path,
    target: str,
    out_dir: str | Path,
    size: tuple[int, int] | None = None,
    dynamic_batch: bool = False,
    calib: int = 300,
) -> dict[str, Path]:
    """Returns {artifact name: path}. The FP32 ONNX is always written (the other targets start from it).

    Every file is first written to a staging folder inside `out_dir` and moved into place (a rename each) only
    once all of them are made: an export that fails or is interrupted (Ctrl-C during INT8 calibration, a full
    disk) leaves the files already in `out_dir` as they were, not a half-written model or a mixed set."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        made = _export_into(weights, target, staging, size, dynamic_batch, calib)
        for path in sorted(staging.iterdir(), key=lambda p: p.suffix == ".xml"):  # an IR's .bin before its .xml
            if path.is_file():  # folders hold intermediates (INTERMEDIATE_DIR), removed with the staging
                os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: out_dir / path.name for name, path in made.items()}


def _export_into(weights: str | Path, target: str, out_dir: Path, size: tuple[int, int] | None, dynamic_batch: bool,
                 calib: int) -> dict[str, Path]:
    from drywallqa.export.onnx_export import export_onnx
    from drywallqa.train.checkpoint import load_weights

    model, info = load_weights(weights)
    size = tuple(size or info.input_size)
    stem = Path(weights).stem
    meta = build_metadata(info, embed_dim=int(model.prompt_embeddings.shape[1]), input_size=size,
                          dynamic_batch=dynamic_batch, model_name=stem)
    out: dict[str, Path] = {}
    onnx_path = export_onnx(model, meta, out_dir / f"{stem}.onnx", dynamic_batch=dynamic_batch)
    out["onnx"] = onnx_path
    if target in ("openvino", "all"):
        from drywallqa.export.calibration import calibration_set
        from drywallqa.export.openvino_export import export_openvino, quantize_int8

        out["openvino_fp16"] = export_openvino(onnx_path, out_dir / f"{stem}_fp16.xml", meta, fp16=True)
        if calib > 0:
            images, source = calibration_set(calib, size)
            out["openvino_int8"] = quantize_int8(onnx_path, out_dir / f"{stem}_int8.xml", meta, images, source)
    if target in ("jetson", "all"):
        from drywallqa.export.jetson import make_jetson_onnx

        static = onnx_path
        if dynamic_batch:
            static = export_onnx(model, meta, out_dir / INTERMEDIATE_DIR / f"{stem}_static.onnx", dynamic_batch=False)
        out["jetson_onnx"] = make_jetson_onnx(static, out_dir / f"{stem}_jetson_fp16.onnx")
        out["jetson_metadata"] = out["jetson_onnx"].with_suffix(".json")  # build_engine.sh binds it to the engine
    return out
