"""Segmenter -> ONNX (uint8 NHWC RGB in, probabilities out) with the DrywallQA metadata embedded.

Steps: torch.onnx.export (TorchScript exporter, opset >= 17) -> onnx.checker -> onnxslim (kept only when
ONNX Runtime gives the same outputs on a probe image) -> metadata_props["drywallqa"].
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from drywallqa.contract import INPUT_NAME, METADATA_KEY, OUTPUT_NAME, ModelMetadata
from drywallqa.train.models.segmenter import ExportWrapper, Segmenter

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
SLIM_TOLERANCE = 1e-5  # max abs change in probabilities that onnxslim may introduce


def set_metadata(model: onnx.ModelProto, metadata: ModelMetadata) -> onnx.ModelProto:
    """Write (or replace) the metadata entry; also fills the standard producer/doc fields."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = metadata.to_json()
    model.producer_name = "drywallqa"
    model.doc_string = (f"DrywallQA {metadata.architecture} ({metadata.profile}); input '{INPUT_NAME}' uint8 NHWC RGB "
                        f"{metadata.input.height}x{metadata.input.width}; output '{OUTPUT_NAME}' probabilities "
                        f"N x {len(metadata.classes)} x H x W for classes {metadata.classes}")
    return model


def probe_images(size: tuple[int, int], n: int = 2, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 images (not white noise, so activations resemble real photos)."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        noise = rng.integers(-12, 13, (h, w, 3))
        out.append(np.clip(img.astype(np.int32) + noise, 0, 255).astype(np.uint8))
    return np.stack(out)


def _ort_run(model: onnx.ModelProto | str | Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    batch_dim = sess.get_inputs()[0].shape[0]
    if isinstance(batch_dim, int):
        return np.concatenate([sess.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + 1]})[0]
                               for i in range(len(images))])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def try_slim(model: onnx.ModelProto, probe: np.ndarray, tolerance: float = SLIM_TOLERANCE) -> onnx.ModelProto:
    """onnxslim the graph; return the original when slimming fails or changes the outputs."""
    try:
        import onnxslim
    except ImportError:
        log.warning("onnxslim not installed; keeping the unsimplified graph")
        return model
    try:
        slim = onnxslim.slim(model)
        onnx.checker.check_model(slim)
        diff = float(np.abs(_ort_run(slim, probe) - _ort_run(model, probe)).max())
    except Exception as exc:  # any failure of an optional optimisation must not break the export
        log.warning("onnxslim failed (%s); keeping the unsimplified graph", exc)
        return model
    if diff > tolerance:
        log.warning("onnxslim changed outputs by %.2e > %.0e; keeping the unsimplified graph", diff, tolerance)
        return model
    return slim


def export_onnx(
    model: Segmenter,
    metadata: ModelMetadata,
    out_path: str | Path,
    *,
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
) -> Path:
    """Export the deployable graph at metadata.input size. Static 1 x H x W x 3 unless dynamic_batch."""
    if opset < 17:
        raise ValueError(f"opset {opset} < 17 is not supported (LayerNorm/resize semantics)")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    h, w = metadata.input.height, metadata.input.width
    wrapper = ExportWrapper(model.eval()).eval()
    example = torch.from_numpy(probe_images((h, w), 1))
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    # The traced graph's scratch file sits beside the output (in run_export, inside its staging folder), not in the
    # system temp folder: an export killed outright leaves it where the next export removes it.
    with tempfile.TemporaryDirectory(prefix=".onnx-trace-", dir=out_path.parent) as tmp, torch.no_grad(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: no onnxscript needed
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            wrapper, (example,), str(raw), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
        proto = onnx.load(str(raw))
    onnx.checker.check_model(proto)
    if simplify:
        proto = try_slim(proto, probe_images((h, w), 2 if dynamic_batch else 1, seed=1))
    metadata = metadata.model_copy(deep=True)
    metadata.input.dynamic_batch = dynamic_batch
    set_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out_path))
    return out_path
