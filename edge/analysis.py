"""Per-frame measurements per class: area fraction, connected regions, crack skeleton length, confidence."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from drywallqa.edge.payloads import ClassResult, Region

SQRT2 = math.sqrt(2.0)


def _zhang_suen_pass(img: np.ndarray, first: bool) -> np.ndarray:
    """One Zhang-Suen sub-iteration on a padded 0/1 uint8 image; returns pixels to delete."""
    p = img
    p2, p3, p4 = p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:]
    p5, p6, p7 = p[2:, 2:], p[2:, 1:-1], p[2:, :-2]
    p8, p9 = p[1:-1, :-2], p[:-2, :-2]
    c = p[1:-1, 1:-1]
    neighbours = [p2, p3, p4, p5, p6, p7, p8, p9]
    b = sum(n.astype(np.uint8) for n in neighbours)
    seq = neighbours + [p2]
    a = sum(((seq[i] == 0) & (seq[i + 1] == 1)).astype(np.uint8) for i in range(8))
    cond = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0) if first else (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
    return (c == 1) & (b >= 2) & (b <= 6) & (a == 1) & cond


def skeletonize(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a binary mask -> 0/1 uint8 one-pixel-wide skeleton (8-connected)."""
    img = np.pad((mask > 0).astype(np.uint8), 1)
    while True:
        changed = False
        for first in (True, False):
            delete = _zhang_suen_pass(img, first)
            if delete.any():
                img[1:-1, 1:-1][delete] = 0
                changed = True
        if not changed:
            return _remove_redundant(img)[1:-1, 1:-1]


def _remove_redundant(img: np.ndarray) -> np.ndarray:
    """Remove skeleton pixels whose neighbours stay 8-connected without them (Yokoi connectivity 1, at least
    two neighbours): staircases and 2x2 clumps left by Zhang-Suen, which would overcount the length.
    Four parity classes, so no two adjacent pixels go in the same pass; endpoints are kept."""
    yy, xx = np.indices(img.shape[:2])
    parity = ((yy % 2) * 2 + (xx % 2))[1:-1, 1:-1]
    changed = True
    while changed:
        changed = False
        for cls in range(4):
            p = img.astype(np.int16)
            # neighbours x1..x8, counter-clockwise starting east
            x = [p[1:-1, 2:], p[:-2, 2:], p[:-2, 1:-1], p[:-2, :-2], p[1:-1, :-2], p[2:, :-2], p[2:, 1:-1], p[2:, 2:]]
            xb = [1 - v for v in x]
            c8 = sum(xb[k] - xb[k] * xb[(k + 1) % 8] * xb[(k + 2) % 8] for k in (0, 2, 4, 6))
            count = sum(x)
            sel = (p[1:-1, 1:-1] == 1) & (count >= 2) & (c8 == 1) & (parity == cls)
            if sel.any():
                img[1:-1, 1:-1][sel] = 0
                changed = True
    return img


def skeleton_length(skel: np.ndarray) -> float:
    """Length in pixels of a one-pixel-wide skeleton: orthogonal links count 1, diagonal links sqrt(2).

    A diagonal link is skipped when an orthogonal two-step path already joins the same pixels.
    """
    s = skel > 0
    horiz = int(np.count_nonzero(s[:, :-1] & s[:, 1:]))
    vert = int(np.count_nonzero(s[:-1, :] & s[1:, :]))
    a, b = s[:-1, :-1], s[1:, 1:]  # down-right diagonal
    c, d = s[:-1, 1:], s[1:, :-1]  # down-left diagonal
    dr = a & b & ~(s[:-1, 1:] | s[1:, :-1])
    dl = c & d & ~(s[:-1, :-1] | s[1:, 1:])
    return float(horiz + vert + SQRT2 * (int(np.count_nonzero(dr)) + int(np.count_nonzero(dl))))


def crack_length(mask: np.ndarray, max_side: int = 640, max_half_width: float = 8.0) -> float:
    """Skeleton length in source pixels.

    Thinning costs one pass per pixel of half-width, so thick blobs (and very large masks) are thinned
    at a reduced scale chosen from the distance transform, and the length is scaled back.
    """
    m = np.pad((mask > 0).astype(np.uint8), 1)  # background all round, also for tight crops
    h, w = m.shape
    if not m.any():
        return 0.0
    half_width = float(cv2.distanceTransform(m, cv2.DIST_L2, 3).max())
    scale = min(1.0, max_side / max(h, w), max_half_width / max(half_width, 1e-6))
    if scale < 1.0:
        m = cv2.resize(m, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        m = (m > 0).astype(np.uint8)
    return skeleton_length(skeletonize(m)) / scale


@dataclass(frozen=True)
class WatchedClass:
    class_name: str
    class_index: int
    prompt: str
    threshold: float


def analyze_class(
    probs: np.ndarray,
    watched: WatchedClass,
    *,
    min_region_area_px: int = 16,
    max_regions: int = 20,
    with_skeleton: bool = False,
    skeleton_max_side: int = 256,
) -> tuple[ClassResult, np.ndarray]:
    """probs: H x W probabilities of one class at source size -> (ClassResult, uint8 0/1 mask)."""
    mask = (probs >= watched.threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    order = sorted(range(1, n), key=lambda i: -int(stats[i, cv2.CC_STAT_AREA]))
    keep = [i for i in order if stats[i, cv2.CC_STAT_AREA] >= min_region_area_px]
    if len(keep) != n - 1:  # drop tiny specks from the mask too, so every figure agrees
        mask = np.isin(labels, keep).astype(np.uint8) if keep else np.zeros_like(mask)
    regions: list[Region] = []
    total_len = 0.0
    for rank, i in enumerate(keep):
        x, y, w, h, area = (int(v) for v in stats[i, :5])
        length = None
        if with_skeleton:
            crop = (labels[y:y + h, x:x + w] == i)
            length = crack_length(crop, skeleton_max_side)
            total_len += length
        if rank < max_regions:
            regions.append(Region(bbox=(x, y, w, h), area_px=area, skeleton_length_px=length))
    area_px = int(mask.sum())
    mean_conf = float(probs[mask > 0].mean()) if area_px else 0.0
    result = ClassResult(
        class_name=watched.class_name,
        prompt=watched.prompt,
        area_fraction=float(area_px / mask.size),
        region_count=len(keep),
        regions=regions,
        skeleton_length_px=round(total_len, 2),
        mean_confidence=min(1.0, max(0.0, mean_conf)),
    )
    return result, mask
