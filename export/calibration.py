"""Calibration images for INT8: a deterministic sample of the *training* split, resized to the model input."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from drywallqa.imageio import ImageReadError, read_image_rgb
from drywallqa.paths import PROJECT_ROOT

log = logging.getLogger(__name__)


def training_images(config_path: str | Path | None = None) -> list[Path]:
    """Training-split image paths of every configured dataset (configs/split.json, else the grouped split)."""
    from drywallqa.train.data.sources import dataset_specs, load_data_config, yolo_records
    from drywallqa.train.data.split import grouped_split, read_split

    cfg = load_data_config(config_path)
    split_file = PROJECT_ROOT / cfg["split"]["file"]
    saved = read_split(split_file) if split_file.is_file() else {}
    paths: list[Path] = []
    for spec in dataset_specs(cfg):
        if not spec.root.is_dir():
            continue
        records = yolo_records(spec)
        names = [r.image_path.name for r in records]
        split = saved.get(spec.name) or grouped_split(spec.name, names, cfg["split"]["val_fraction"],
                                                      cfg["split"]["seed"])
        paths += [r.image_path for r in records if split.get(r.image_path.name) == "train"]
    return paths


def pick_evenly(paths: list[Path], n: int) -> list[Path]:
    """n paths spread evenly over the sorted list (deterministic, covers every dataset)."""
    paths = sorted(paths)
    if n >= len(paths):
        return paths
    idx = np.linspace(0, len(paths) - 1, n).round().astype(int)
    return [paths[i] for i in idx]


def load_resized(paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    h, w = size
    images = []
    for p in paths:
        try:
            images.append(cv2.resize(read_image_rgb(p), (w, h), interpolation=cv2.INTER_AREA))
        except ImageReadError as exc:
            log.warning("skipping unreadable calibration image: %s", exc)
    if not images:
        raise ValueError("no readable calibration images")
    return np.stack(images)


def calibration_set(n: int, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """(uint8 N x H x W x 3, description). Falls back to synthetic images, loudly, when no data is present."""
    try:
        paths = training_images()
    except FileNotFoundError as exc:
        log.warning("training data not found (%s)", exc)
        paths = []
    if paths:
        return load_resized(pick_evenly(paths, n), size), f"train split, {min(n, len(paths))} images"
    from drywallqa.export.onnx_export import probe_images

    log.warning("no training images found; INT8 calibration falls back to %d synthetic images "
                "(expect worse INT8 accuracy)", n)
    return probe_images(size, n, seed=123), f"synthetic, {n} images"
