"""Helpers for the data/predict/eval/CLI tests: tiny synthetic datasets on disk and a cached random model."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from drywallqa.paths import SHARED_DATA_DIR

REAL_DATA = SHARED_DATA_DIR
needs_real_data = pytest.mark.skipif(
    not (REAL_DATA / "cracks" / "train" / "images").is_dir(),
    reason=f"the real datasets are not at {REAL_DATA} (shared data absent on this machine)",
)

_MODELS: dict[tuple[str, tuple[int, int]], Path] = {}
_MODEL_DIR: Path | None = None


def random_onnx(size: tuple[int, int] = (64, 64), architecture: str = "effnet_lite0_fpn") -> Path:
    """A random DrywallQA model exported once per test session (exporting costs a few seconds)."""
    global _MODEL_DIR
    key = (architecture, size)
    if key not in _MODELS:
        from _export_fixtures import export_random_model

        if _MODEL_DIR is None:
            _MODEL_DIR = Path(tempfile.mkdtemp(prefix="dqa_models_"))
            atexit.register(shutil.rmtree, _MODEL_DIR, True)
        _MODELS[key] = export_random_model(_MODEL_DIR, architecture=architecture, size=size)
    return _MODELS[key]


def write_jpeg(path: Path, h: int, w: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
    return path


def make_yolo_dataset(root: Path, names: list[str], h: int = 40, w: int = 48,
                      lines: dict[str, list[str]] | None = None) -> Path:
    """root/train/images/<name>.jpg + root/train/labels/<name>.txt (default: one box per image)."""
    for i, name in enumerate(names):
        write_jpeg(root / "train" / "images" / f"{name}.jpg", h, w, seed=i)
        label = (lines or {}).get(name, ["0 0.5 0.5 0.5 0.25"])
        (root / "train" / "labels").mkdir(parents=True, exist_ok=True)
        (root / "train" / "labels" / f"{name}.txt").write_text("\n".join(label) + "\n")
    return root


def make_coco_dataset(root: Path, images: dict[str, list[dict]], h: int = 40, w: int = 48) -> Path:
    """root/train/<name>.jpg + root/train/_annotations.coco.json with the given annotations per image."""
    split = root / "train"
    entries, anns = [], []
    for i, (name, objects) in enumerate(images.items(), start=1):
        write_jpeg(split / name, h, w, seed=100 + i)
        entries.append({"id": i, "file_name": name, "height": h, "width": w})
        for obj in objects:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, **obj})
    doc = {"images": entries, "annotations": anns, "categories": [{"id": 1, "name": "crack"}]}
    (split / "_annotations.coco.json").write_text(json.dumps(doc))
    return root


def write_data_config(path: Path, datasets: list[dict], split_file: Path | None, box_strategy: str = "filled_box",
                      val_fraction: float = 0.5) -> Path:
    """A data config; split_file None leaves split.file out (the default beside the config applies)."""
    split: dict = {"val_fraction": val_fraction, "seed": 0}
    if split_file is not None:
        split["file"] = str(split_file)
    cfg = {"datasets": datasets, "box_strategy": box_strategy, "split": split}
    path.write_text(yaml.safe_dump(cfg))
    return path


def small_project(tmp: Path, n_crack: int = 6, n_wall: int = 6) -> Path:
    """Two tiny YOLO datasets (crack polygons, taping boxes) and a config pointing at them."""
    cracks = [f"c{i:02d}_jpg.rf.{i:032x}" for i in range(n_crack)]
    walls = [f"w{i:02d}_jpg.rf.{i + 99:032x}" for i in range(n_wall)]
    poly = "0 0.1 0.1 0.9 0.1 0.9 0.3 0.1 0.3"
    make_yolo_dataset(tmp / "cracks", cracks, lines={n: [poly] for n in cracks})
    make_yolo_dataset(tmp / "walls", walls)
    return write_data_config(tmp / "data.yaml", [
        {"name": "cracks", "root": str(tmp / "cracks"), "splits": ["train"], "format": "yolo", "class": "crack"},
        {"name": "walls", "root": str(tmp / "walls"), "splits": ["train"], "format": "yolo", "class": "taping"},
    ], tmp / "split.json")
