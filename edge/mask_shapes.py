"""How one class's probabilities become its mask: the class's threshold, then its shape rule.

`pixels`: every pixel at or above the threshold. `boxes`: every 8-connected region of those pixels is
filled to its axis-aligned bounding box. The drywall taping areas are labelled with boxes only, so their
model learns box-like blobs; reporting the box of each confident region scores 6-7 IoU points higher on
validation than the raw pixels (MODEL.md). Which rule a class uses is part of the model's metadata.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import get_args

import cv2
import numpy as np

from drywallqa.contract import MaskShape

MASK_SHAPES: tuple[MaskShape, ...] = get_args(MaskShape)


def fill_boxes(mask: np.ndarray, stats: np.ndarray, regions: Iterable[int], value: int | bool = 1) -> None:
    """Set the bounding box (rows of cv2 connectedComponentsWithStats) of each region in `mask`, in place."""
    for i in regions:
        x, y, w, h = (int(v) for v in stats[i, :4])
        mask[y:y + h, x:x + w] = value


def class_mask(probs: np.ndarray, threshold: float, shape: MaskShape = "pixels") -> np.ndarray:
    """h x w probabilities -> bool mask under the class's decision rule."""
    mask = np.asarray(probs) >= threshold
    if shape == "boxes" and mask.any():
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
        fill_boxes(mask, stats, range(1, n), True)
    elif shape not in MASK_SHAPES:
        raise ValueError(f"unknown mask shape {shape!r}; allowed: {', '.join(MASK_SHAPES)}")
    return mask
