"""crack_length on masks larger than its working size: shrunk first, a thin crack must not vanish on the way."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from drywallqa.edge.analysis import WatchedClass, analyze_class, crack_length


@pytest.mark.parametrize("side,max_side", [(1300, 640), (2600, 640), (600, 256)])
def test_a_one_pixel_crack_in_a_mask_larger_than_max_side_keeps_its_length(side, max_side):
    """Shrunk 2-4x, a 1-px line covers under half of every pixel it crosses: rounded, it was all gone (length 0)."""
    mask = np.zeros((side, side), np.uint8)
    start, end = (10, side // 2), (side - 10, side // 3)
    cv2.line(mask, start, end, 1, 1)
    assert crack_length(mask, max_side) == pytest.approx(math.dist(start, end), rel=0.1)


def test_the_live_loop_measures_a_thin_crack_longer_than_its_skeleton_max_side():
    """analyze_class on the model's grid: a 1-px crack spanning more than skeleton_max_side (256) pixels."""
    probs = np.zeros((512, 512), np.float32)
    start, end = (20, 400), (490, 120)
    cv2.line(probs, start, end, 0.9, 1)
    watched = WatchedClass("crack", 0, "segment crack", threshold=0.5)
    result, _ = analyze_class(probs, watched, with_skeleton=True, skeleton_max_side=256, source_hw=(1024, 1024))
    assert result.region_count == 1
    assert result.skeleton_length_px == pytest.approx(2 * math.dist(start, end), rel=0.1)
