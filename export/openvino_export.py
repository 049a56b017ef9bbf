"""ONNX -> OpenVINO IR (FP32/FP16) and INT8 by NNCF post-training quantisation; metadata kept in rt_info."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from drywallqa.contract import METADATA_KEY, ModelMetadata
from drywallqa.export.metadata import with_precision

log = logging.getLogger(__name__)

# NNCF's full bias correction (each quantised layer's output mean corrected on the calibration photos, layer by layer)
# for `lite`: INT8 then costs 0.0 crack and 0.2 taping IoU points on the validation split instead of 0.2 and 1.0 with the
# fast one, at the same speed, in ~80 s and 3.4 GB (session 11, MODEL.md). For HRNet-W18 it needs more than 24 GB with
# 300 photos, and the fast correction already costs that model at most 0.4 points.
FULL_BIAS_CORRECTION_PROFILES = frozenset({"lite"})


def _attach(model, metadata: ModelMetadata) -> None:
    model.set_rt_info(metadata.to_json(), [METADATA_KEY])


def export_openvino(onnx_path: str | Path, out_xml: str | Path, metadata: ModelMetadata, fp16: bool = True) -> Path:
    """IR with weights compressed to FP16 (the CPU plugin still computes in f32 unless told otherwise)."""
    import openvino as ov

    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    _attach(model, with_precision(metadata, "fp16" if fp16 else "fp32"))
    ov.save_model(model, str(out_xml), compress_to_fp16=fp16)
    return out_xml


def quantize_int8(
    onnx_path: str | Path,
    out_xml: str | Path,
    metadata: ModelMetadata,
    calibration: np.ndarray,
    calibration_source: str = "",
    full_bias_correction: bool | None = None,
) -> Path:
    """NNCF PTQ (8-bit, performance preset) on uint8 N x H x W x 3 calibration images. Bias correction is NNCF's
    full one for the profiles in FULL_BIAS_CORRECTION_PROFILES and its fast one otherwise, unless told."""
    import nncf
    import openvino as ov

    if calibration.ndim != 4 or calibration.dtype != np.uint8 or len(calibration) == 0:
        raise ValueError(f"calibration images must be a non-empty uint8 N x H x W x 3 array, got "
                         f"{calibration.dtype} {calibration.shape}")
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    if full_bias_correction is None:
        full_bias_correction = metadata.profile in FULL_BIAS_CORRECTION_PROFILES
    model = ov.convert_model(str(onnx_path))
    dataset = nncf.Dataset(list(calibration), lambda img: img[None])
    quantized = nncf.quantize(
        model,
        dataset,
        preset=nncf.QuantizationPreset.PERFORMANCE,
        target_device=nncf.TargetDevice.CPU,
        subset_size=len(calibration),
        fast_bias_correction=not full_bias_correction,
    )
    meta = with_precision(metadata, "int8")
    meta.extra["calibration_images"] = len(calibration)
    meta.extra["bias_correction"] = "full" if full_bias_correction else "fast"
    if calibration_source:
        meta.extra["calibration_source"] = calibration_source
    _attach(quantized, meta)
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return out_xml
