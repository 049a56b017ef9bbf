"""Exported models vs torch on real images (../shared/data when present, else synthetic): probabilities and masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from drywallqa.edge.backends import load_backend
from drywallqa.export.bench import cpu_has_vnni
from drywallqa.export.calibration import calibration_set, load_resized, pick_evenly, training_images
from drywallqa.export.metadata import build_metadata
from drywallqa.export.onnx_export import export_onnx, probe_images
from drywallqa.export.openvino_export import export_openvino, quantize_int8
from drywallqa.export.random_weights import RANDOM_EMBED_DIM, random_model

SIZE = (128, 128)
# Max abs diff on probabilities. FP16 weight rounding moves steep-sigmoid pixels more; its mean stays tiny.
# The reference model has fp16-rounded weights, exactly like shipped weights (load_weights of fp16 safetensors),
# so FP16 IR compression only re-rounds BN-folded weights. Random nets amplify perturbations far more than trained
# ones, so the INT8 bounds below only catch a broken quantisation; tighten them once trained weights exist.
FLOAT_ATOL = {"onnxruntime": 2e-3, "openvino_fp32": 2e-3, "openvino_fp16": 0.2}
FLOAT_MEAN_ATOL = {"onnxruntime": 1e-4, "openvino_fp32": 1e-4, "openvino_fp16": 1.2e-2}
# FP16 on *random* weights measured min IoU 0.95-0.97 (BN folding re-rounds weights); target 0.99 with trained ones.
FLOAT_MIN_IOU = {"onnxruntime": 0.99, "openvino_fp32": 0.99, "openvino_fp16": 0.94}
# Without VNNI (session 12's Zen 3 VM) OpenVINO's INT8 convolutions sum u8 x s8 products in saturating 16-bit pairs.
# Random nets, with weights and activations spread over the whole 8-bit range, hit that far more than trained ones:
# the random `lite` measured mean diff 0.33-0.35 and mean mask IoU 0.42-0.45 there (fast or full bias correction),
# so such CPUs get looser bounds. The shipped `lite`'s INT8 is held to IoU >= 0.9 against torch on real photos on every
# CPU (tests/test_shipped_models.py), and both profiles' INT8 to their validation IoU in MODEL.md.
INT8_MEAN_ATOL = 0.3 if cpu_has_vnni() else 0.4
INT8_MEAN_IOU = 0.55 if cpu_has_vnni() else 0.35


def _eval_images(n: int = 6) -> np.ndarray:
    try:
        paths = training_images()
    except FileNotFoundError:
        paths = []
    if paths:
        return load_resized(pick_evenly(paths, n + 7)[1::2][:n], SIZE)  # not the calibration picks
    return probe_images(SIZE, n, seed=99)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.fixture(scope="module", params=["effnet_lite0_fpn", pytest.param("hrnet_w18", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    model, info = random_model(request.param, SIZE, seed=1)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())  # what load_weights of a shipped fp16 checkpoint yields
    meta = build_metadata(info, embed_dim=RANDOM_EMBED_DIM, input_size=SIZE)
    onnx_path = export_onnx(model, meta, out / "m.onnx")
    images = _eval_images()
    with torch.no_grad():
        ref = model.probabilities(torch.from_numpy(images)).numpy()
    calib, source = calibration_set(16, SIZE)
    paths = {
        "onnxruntime": onnx_path,
        "openvino_fp32": export_openvino(onnx_path, out / "fp32.xml", meta, fp16=False),
        "openvino_fp16": export_openvino(onnx_path, out / "fp16.xml", meta, fp16=True),
        "openvino_int8": quantize_int8(onnx_path, out / "int8.xml", meta, calib, source),
    }
    return images, ref, paths, meta


def _compare(images, ref, path, backend, thresholds):
    probs = load_backend(path, backend, threads=2).infer(images)
    diff = float(np.abs(probs - ref).max())
    _compare.mean_diff = float(np.abs(probs - ref).mean())
    ious = [_iou(probs[i, c] >= thresholds[k], ref[i, c] >= thresholds[k])
            for i in range(len(images)) for c, k in enumerate(thresholds)]
    _compare.mean_iou = float(np.mean(ious))
    return diff, min(ious)


@pytest.mark.parametrize("variant", ["onnxruntime", "openvino_fp32", "openvino_fp16"])
def test_float_parity(exported, variant):
    images, ref, paths, meta = exported
    backend = "onnxruntime" if variant == "onnxruntime" else "openvino"
    assert 0.05 < (ref >= 0.5).mean() < 0.95, "random model must give non-trivial masks for the test to mean much"
    diff, iou = _compare(images, ref, paths[variant], backend, meta.thresholds)
    assert diff < FLOAT_ATOL[variant], f"{variant}: max abs diff {diff:.2e}"
    assert _compare.mean_diff < FLOAT_MEAN_ATOL[variant], f"{variant}: mean abs diff {_compare.mean_diff:.2e}"
    assert iou >= FLOAT_MIN_IOU[variant], f"{variant}: min mask IoU {iou:.4f}"


def test_int8_parity(exported):
    images, ref, paths, meta = exported
    _compare(images, ref, paths["openvino_int8"], "openvino", meta.thresholds)
    assert _compare.mean_diff < INT8_MEAN_ATOL, f"int8: mean abs diff {_compare.mean_diff:.3f}"
    assert _compare.mean_iou >= INT8_MEAN_IOU, f"int8: mean mask IoU {_compare.mean_iou:.4f}"
    got = load_backend(paths["openvino_int8"], "openvino").metadata
    assert got.precision == "int8"
    assert got.extra["bias_correction"] == ("full" if meta.profile == "lite" else "fast")  # the file says how it was made


def test_metadata_travels_in_ir(exported):
    _, _, paths, meta = exported
    for key in ("openvino_fp32", "openvino_fp16", "openvino_int8"):
        got = load_backend(paths[key], "openvino").metadata
        assert got.classes == meta.classes and got.prompts == meta.prompts and got.thresholds == meta.thresholds
    assert Path(paths["openvino_fp16"]).with_suffix(".bin").stat().st_size < \
        0.6 * Path(paths["openvino_fp32"]).with_suffix(".bin").stat().st_size
