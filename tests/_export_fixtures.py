"""Shared test helpers: a random DrywallQA model exported to ONNX with full metadata (no trained weights needed)."""

from __future__ import annotations

from pathlib import Path

from drywallqa.export.metadata import build_metadata
from drywallqa.export.onnx_export import export_onnx
from drywallqa.export.random_weights import RANDOM_EMBED_DIM, random_model


def export_random_model(
    out_dir: str | Path,
    architecture: str = "effnet_lite0_fpn",
    size: tuple[int, int] = (128, 128),
    dynamic_batch: bool = False,
    seed: int = 0,
) -> Path:
    """Build a random Segmenter for the real vocabulary and export it to `<out_dir>/<arch>_<h>x<w>.onnx`."""
    model, info = random_model(architecture, size, seed=seed)
    meta = build_metadata(info, embed_dim=RANDOM_EMBED_DIM, input_size=size, dynamic_batch=dynamic_batch)
    suffix = "_dyn" if dynamic_batch else ""
    out = Path(out_dir) / f"{architecture}_{size[0]}x{size[1]}{suffix}.onnx"
    return export_onnx(model, meta, out, dynamic_batch=dynamic_batch)
