"""`drywallqa export`: weights -> ONNX, OpenVINO FP16 + INT8, Jetson FP16 ONNX, all carrying the metadata."""

from __future__ import annotations

import logging
from pathlib import Path

from drywallqa.export.metadata import build_metadata

log = logging.getLogger(__name__)

TARGETS = ("onnx", "openvino", "jetson", "all")


def run_export(
    weights: str | Path,
    target: str,
    out_dir: str | Path,
    size: tuple[int, int] | None = None,
    dynamic_batch: bool = False,
    calib: int = 300,
) -> dict[str, Path]:
    """Returns {artifact name: path}. The FP32 ONNX is always written (the other targets start from it)."""
    from drywallqa.export.onnx_export import export_onnx
    from drywallqa.train.checkpoint import load_weights

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    model, info = load_weights(weights)
    size = tuple(size or info.input_size)
    out_dir = Path(out_dir)
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
            static = export_onnx(model, meta, out_dir / f"{stem}_static.onnx", dynamic_batch=False)
        out["jetson_onnx"] = make_jetson_onnx(static, out_dir / f"{stem}_jetson_fp16.onnx")
    return out
