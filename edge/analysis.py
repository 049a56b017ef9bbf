"""Per-frame measurements per class: area fraction, connected regions, crack skeleton length, confidence."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from drywallqa.contract import MaskShape
from drywallqa.edge.mask_shapes import fill_boxes
from drywallqa.edge.payloads import ClassResult, Region

# Each pixel's 8 neighbours as one byte: bit k set when neighbour k is on. Neighbours in Zhang-Suen's order,
# clockwise from north: P2 (N), P3 (NE), P4 (E), P5 (SE), P6 (S), P7 (SW), P8 (W), P9 (NW).
_NEIGHBOUR_BITS = np.array([[128, 1, 2],
                            [64, 0, 4],
                            [32, 16, 8]], np.float32)


def _neighbour_code(img: np.ndarray) -> np.ndarray:
    """uint8 code of each pixel's 8-neighbourhood (one filter2D call; outside the image counts as off).
    The weights of a 0/1 image sum to at most 255, so the uint8 result is exact."""
    return cv2.filter2D(img, cv2.CV_8U, _NEIGHBOUR_BITS, borderType=cv2.BORDER_CONSTANT)


def _pad1(mask: np.ndarray) -> np.ndarray:
    """0/1 uint8 copy of a mask with one pixel of background all round (cv2: ~10x cheaper than np.pad)."""
    return cv2.copyMakeBorder((mask > 0).astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)


def _bits(code: int) -> list[int]:
    return [(code >> k) & 1 for k in range(8)]  # P2..P9


def _zhang_suen_table(first: bool) -> np.ndarray:
    """Deletable neighbourhood codes for one Zhang-Suen sub-iteration."""
    table = np.zeros(256, np.uint8)
    for code in range(256):
        p2, p3, p4, p5, p6, p7, p8, p9 = _bits(code)
        seq = [p2, p3, p4, p5, p6, p7, p8, p9, p2]
        b = sum(seq[:8])
        a = sum(seq[i] == 0 and seq[i + 1] == 1 for i in range(8))
        cond = (p2 * p4 * p6 == 0 and p4 * p6 * p8 == 0) if first else (p2 * p4 * p8 == 0 and p2 * p6 * p8 == 0)
        table[code] = 2 <= b <= 6 and a == 1 and cond
    return table


def _redundant_table() -> np.ndarray:
    """Codes of pixels whose neighbours stay 8-connected without them (Yokoi connectivity 1), with at least
    two neighbours: staircase corners and 2x2 clumps that Zhang-Suen leaves."""
    table = np.zeros(256, np.uint8)
    for code in range(256):
        p2, p3, p4, p5, p6, p7, p8, p9 = _bits(code)
        x = [p4, p3, p2, p9, p8, p7, p6, p5]  # counter-clockwise from east
        xb = [1 - v for v in x]
        c8 = sum(xb[k] - xb[k] * xb[(k + 1) % 8] * xb[(k + 2) % 8] for k in (0, 2, 4, 6))
        table[code] = sum(x) >= 2 and c8 == 1
    return table


_DELETE_FIRST, _DELETE_SECOND, _REDUNDANT = _zhang_suen_table(True), _zhang_suen_table(False), _redundant_table()


def _lookup(img: np.ndarray, table: np.ndarray) -> np.ndarray:
    """0/1 uint8: pixels that are on and whose neighbourhood code the table marks."""
    return cv2.bitwise_and(img, cv2.LUT(_neighbour_code(img), table))


def skeletonize(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a binary mask -> 0/1 uint8 one-pixel-wide skeleton (8-connected).

    Each sub-iteration is one neighbourhood-code pass plus a table lookup (the classic parallel rule,
    decided for all pixels on the same image), which keeps a live frame's thinning to about a millisecond.
    """
    img = _pad1(mask)
    while True:
        changed = False
        for table in (_DELETE_FIRST, _DELETE_SECOND):
            delete = _lookup(img, table)
            if cv2.countNonZero(delete):
                img -= delete
                changed = True
        if not changed:
            return _remove_redundant(img)[1:-1, 1:-1]


def _remove_redundant(img: np.ndarray) -> np.ndarray:
    """Drop redundant skeleton pixels (see _redundant_table), which would overcount the length. Four parity
    classes, so no two adjacent pixels go in the same pass; endpoints are kept. Most skeletons have none,
    so one lookup decides whether a round of passes is needed at all."""
    classes: list[np.ndarray] | None = None
    while cv2.countNonZero(_lookup(img, _REDUNDANT)):  # a round that starts with candidates removes one
        if classes is None:
            classes = _parity_classes(img.shape[:2])
        for in_class in classes:
            sel = cv2.bitwise_and(_lookup(img, _REDUNDANT), in_class)
            if cv2.countNonZero(sel):
                img -= sel
    return img


def _parity_classes(shape: tuple[int, int]) -> list[np.ndarray]:
    """0/1 masks of the four (row, column) parity classes."""
    out = []
    for r, c in ((0, 0), (0, 1), (1, 0), (1, 1)):
        m = np.zeros(shape, np.uint8)
        m[r::2, c::2] = 1
        out.append(m)
    return out


def skeleton_length(skel: np.ndarray, pixel_w: float = 1.0, pixel_h: float = 1.0) -> float:
    """Length of a one-pixel-wide skeleton: horizontal links count `pixel_w`, vertical ones `pixel_h`,
    diagonal ones their hypotenuse (sqrt(2) for square pixels), so a mask analysed on a resampled grid
    still measures in source pixels.

    A diagonal link is skipped when an orthogonal two-step path already joins the same pixels.
    """
    s = skel > 0
    horiz = int(np.count_nonzero(s[:, :-1] & s[:, 1:]))
    vert = int(np.count_nonzero(s[:-1, :] & s[1:, :]))
    a, b = s[:-1, :-1], s[1:, 1:]  # down-right diagonal
    c, d = s[:-1, 1:], s[1:, :-1]  # down-left diagonal
    dr = a & b & ~(s[:-1, 1:] | s[1:, :-1])
    dl = c & d & ~(s[:-1, :-1] | s[1:, 1:])
    diagonal = math.hypot(pixel_w, pixel_h)
    return float(horiz * pixel_w + vert * pixel_h + diagonal * (int(np.count_nonzero(dr)) + int(np.count_nonzero(dl))))


def crack_length(mask: np.ndarray, max_side: int = 640, max_half_width: float = 8.0,
                 pixel_size: tuple[float, float] = (1.0, 1.0)) -> float:
    """Skeleton length in source pixels (`pixel_size`: source pixels per mask pixel, width and height).

    Thinning costs one pass per pixel of half-width, so thick blobs (and very large masks) are thinned
    at a reduced scale chosen from the distance transform, and the length is scaled back. A mask larger
    than `max_side` is shrunk first, so that nothing (the padded copy, the float32 distance transform) is
    made at its full size: a 48 MP photo's mask would cost ~240 MB.
    """
    h, w = mask.shape
    fit = (max_side - 2) / max(h, w, 1)  # - 2: the pad of one pixel all round
    if fit < 1.0:
        size = (max(1, round(w * fit)), max(1, round(h * fit)))
        on = (mask > 0).view(np.uint8)  # a fresh copy: scaled in place to 0/255, so that INTER_AREA keeps every
        on *= 255  # pixel a crack crosses (at 0/1 it rounds, keeping half-covered ones: a thin crack vanished)
        mask = cv2.resize(on, size, interpolation=cv2.INTER_AREA)
        pixel_size = (pixel_size[0] * w / size[0], pixel_size[1] * h / size[1])
    m = _pad1(mask)  # background all round, also for tight crops
    h, w = m.shape
    if not m.any():
        return 0.0
    half_width = float(cv2.distanceTransform(m, cv2.DIST_L2, 3).max())
    scale = min(1.0, max_half_width / max(half_width, 1e-6))
    if scale < 1.0:
        m = cv2.resize(m, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        m = (m > 0).astype(np.uint8)
    return skeleton_length(skeletonize(m), pixel_size[0] / scale, pixel_size[1] / scale)


@dataclass(frozen=True)
class WatchedClass:
    class_name: str
    class_index: int
    prompt: str
    threshold: float
    mask_shape: MaskShape = "pixels"


def analyze_class(
    probs: np.ndarray,
    watched: WatchedClass,
    *,
    min_region_area_px: int = 16,
    max_regions: int = 20,
    with_skeleton: bool = False,
    skeleton_max_side: int = 256,
    source_hw: tuple[int, int] | None = None,
) -> tuple[ClassResult, np.ndarray]:
    """probs: h x w probabilities of one class -> (ClassResult, uint8 0/1 mask at h x w).

    `probs` may sit on the model's grid rather than the source's (`source_hw`): the live loop analyses
    there, which skips upsampling every class to the camera's size each frame. Boxes, areas and lengths
    are still reported in source pixels. A class with mask shape `boxes` has each kept region filled to
    its bounding box (edge/mask_shapes.py); its mean confidence stays that of the predicted pixels.
    """
    h, w = probs.shape
    src_h, src_w = source_hw or (h, w)
    sx, sy = src_w / w, src_h / h  # source pixels per analysed pixel
    probs = np.asarray(probs, dtype=np.float32)
    mask = (probs >= watched.threshold).view(np.uint8)  # 0/1 without a conversion pass
    if not cv2.countNonZero(mask):  # the common case on a site: nothing there, no labelling needed
        return ClassResult(class_name=watched.class_name, prompt=watched.prompt, area_fraction=0.0,
                           region_count=0, mean_confidence=0.0), mask
    # Label only the box around what is on: cracks usually cover a small part of the frame.
    ox, oy, ow, oh = cv2.boundingRect(mask)
    roi = mask[oy:oy + oh, ox:ox + ow]
    n, labels, stats = label_regions(roi)
    order = sorted(range(1, n), key=lambda i: -int(stats[i, cv2.CC_STAT_AREA]))
    keep = [i for i in order if stats[i, cv2.CC_STAT_AREA] * sx * sy >= min_region_area_px]
    if len(keep) != n - 1:  # drop tiny specks from the mask too, so every figure agrees
        kept = np.zeros(n, np.uint8)
        kept[keep] = 1
        roi[:] = kept[labels]  # a view: this edits `mask`
    mean_conf = float(cv2.mean(probs[oy:oy + oh, ox:ox + ow], mask=roi)[0]) if keep else 0.0
    if watched.mask_shape == "boxes":
        fill_boxes(roi, stats, keep)
    regions: list[Region] = []
    total_len = 0.0
    for rank, i in enumerate(keep):
        x, y, bw, bh, area = (int(v) for v in stats[i, :5])
        if watched.mask_shape == "boxes":
            area = bw * bh
        length = None
        if with_skeleton:
            crop = (labels[y:y + bh, x:x + bw] == i)
            length = crack_length(crop, skeleton_max_side, pixel_size=(sx, sy))
            total_len += length
        if rank < max_regions:
            x, y = x + ox, y + oy
            x0, y0 = math.floor(x * sx), math.floor(y * sy)
            bbox = (x0, y0, min(src_w, math.ceil((x + bw) * sx)) - x0, min(src_h, math.ceil((y + bh) * sy)) - y0)
            regions.append(Region(bbox=bbox, area_px=round(area * sx * sy), skeleton_length_px=length))
    area_px = cv2.countNonZero(mask)
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


def label_regions(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected labelling with stats; 16-bit labels (about twice as fast), 32-bit when a mask has more
    regions than 16 bits can count."""
    try:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_16U)
    except cv2.error:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_32S)
    return n, labels, stats
