"""Calibration images for INT8: a deterministic sample of the *training* split, resized to the model input."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from drywallqa.edge.inference import resize_interpolation
from drywallqa.imageio import ImageReadError, read_image_rgb

log = logging.getLogger(__name__)


def training_images(config_path: str | Path | None = None) -> list[Path]:
    """Training-split image paths of every configured dataset that is present (configs/split.json)."""
    from drywallqa.train.data.prepare import load_setup, records_in_split

    per_dataset = records_in_split(load_setup(config_path), "train", skip_missing=True)
    return [r.image_path for recs in per_dataset.values() for r in recs]


def pick_evenly(paths: list[Path], n: int) -> list[Path]:
    """n paths spread evenly over the sorted list (deterministic, covers every dataset)."""
    paths = sorted(paths)
    if n >= len(paths):
        return paths
    idx = np.linspace(0, len(paths) - 1, n).round().astype(int)
    return [paths[i] for i in idx]


def load_resized(paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    """The photos as uint8 N x H x W x 3; an unreadable one is skipped (logged), none readable is an
    ImageReadError (one line from the CLI, not a traceback)."""
    h, w = size
    images, errors = [], []
    for p in paths:
        try:
            rgb = read_image_rgb(p)  # resized as the runtime resizes (PromptSegmenter.preprocess)
            images.append(cv2.resize(rgb, (w, h), interpolation=resize_interpolation(rgb.shape[:2], size)))
        except ImageReadError as exc:
            log.warning("skipping unreadable calibration image: %s", exc)
            errors.append(exc)
    if not images:
        first = f" ({errors[0]})" if errors else ""
        raise ImageReadError(f"none of the {len(paths)} calibration photos could be read{first}; check the photos of "
                             f"the training split, or pass --calib 0 to skip INT8")
    return np.stack(images)


def calibration_paths(data_config: str | Path | None = None) -> list[Path]:
    """The training-split photos to calibrate INT8 on: those of `data_config`, which must have some (a config named
    on purpose that is missing, invalid or empty is an error, not a silent fallback); else those of
    configs/data.yaml, [] (logged) when that data is not here."""
    if data_config is not None:
        return _configured_paths(data_config)
    try:
        return training_images()
    except FileNotFoundError as exc:
        log.warning("training data not found (%s)", exc)
        return []


def _configured_paths(data_config: str | Path) -> list[Path]:
    """The training-split photos of a config named with --calib-config. A dataset whose folder is not there is
    skipped with a warning when others have photos (INT8 is then calibrated without it), an error when none do."""
    from drywallqa.train.data.prepare import load_setup

    specs = load_setup(data_config).specs
    missing = [f"{s.name!r} ({s.root})" for s in specs if not s.root.is_dir()]
    not_there = (f"the data folder{'s' if len(missing) > 1 else ''} of {', '.join(missing)} "
                 f"{'are' if len(missing) > 1 else 'is'} not there")
    paths = training_images(data_config)
    if paths and missing:
        log.warning("--calib-config %s: %s; INT8 is calibrated without %s", data_config, not_there,
                    "them" if len(missing) > 1 else "it")
    if paths:
        return paths
    if missing:
        why = not_there
    else:
        why = f"no photos in the training split of {', '.join(f'{s.name!r} ({s.root})' for s in specs)}"
    raise FileNotFoundError(f"--calib-config {data_config}: no photos to calibrate INT8 on: {why}. Set each "
                            f"dataset's `root` to the folder of your training photos (see configs/own_data.yaml), "
                            f"or pass --calib 0 to skip INT8")


def calibration_set(n: int, size: tuple[int, int], data_config: str | Path | None = None,
                    paths: list[Path] | None = None) -> tuple[np.ndarray, str]:
    """(uint8 N x H x W x 3, description) from `paths`, those `calibration_paths(data_config)` listed (listed here
    when None: a caller that checked them early passes them on, so the photos are not listed twice). Falls back to
    synthetic images, loudly, when configs/data.yaml's data is not present."""
    if paths is None:
        paths = calibration_paths(data_config)
    if paths:
        where = f"{Path(data_config).name} " if data_config is not None else ""
        return load_resized(pick_evenly(paths, n), size), f"{where}train split, {min(n, len(paths))} images"
    from drywallqa.export.onnx_export import probe_images

    log.warning("no training images found; INT8 calibration falls back to %d synthetic images "
                "(expect worse INT8 accuracy)", n)
    return probe_images(size, n, seed=123), f"synthetic, {n} images"
