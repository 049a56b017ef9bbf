"""Read YOLO polygon/box labels and rasterise them into pixel masks at the image's native size.

Box-to-mask strategies are pluggable (`BOX_MASK_STRATEGIES`); the shipped model used `filled_box`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np


@dataclass
class LabelObject:
    class_id: int
    kind: str  # "polygon" or "box"
    points: np.ndarray  # polygon: K x 2 (x, y) in pixels; box: (x0, y0, x1, y1) in pixels


@dataclass
class LabelIssue:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class ParsedLabels:
    objects: list[LabelObject] = field(default_factory=list)
    issues: list[LabelIssue] = field(default_factory=list)


def parse_yolo_line(values: list[float], width: int, height: int) -> LabelObject:
    """`cls xc yc w h` is a box; `cls x1 y1 x2 y2 x3 y3 ...` (>= 3 points) is a polygon. Normalised coords."""
    class_id = int(values[0])
    coords = values[1:]
    if any(not np.isfinite(c) for c in coords):
        raise ValueError("non-finite coordinate")
    if len(coords) == 4:
        xc, yc, w, h = coords
        if w <= 0 or h <= 0:
            raise ValueError(f"box with non-positive size w={w} h={h}")
        box = np.array([(xc - w / 2) * width, (yc - h / 2) * height, (xc + w / 2) * width, (yc + h / 2) * height])
        return LabelObject(class_id, "box", box)
    if len(coords) >= 6 and len(coords) % 2 == 0:
        pts = np.asarray(coords, dtype=np.float64).reshape(-1, 2) * np.array([width, height])
        return LabelObject(class_id, "polygon", pts)
    raise ValueError(f"expected 4 box values or an even count >= 6 of polygon values, got {len(coords)}")


def read_yolo_labels(path: str | Path, width: int, height: int) -> ParsedLabels:
    """Parse a YOLO label file; malformed lines are reported (file and line) and skipped."""
    out = ParsedLabels()
    path = Path(path)
    if not path.exists():
        out.issues.append(LabelIssue(str(path), 0, "label file missing"))
        return out
    for lineno, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            values = [float(v) for v in line.split()]
            out.objects.append(parse_yolo_line(values, width, height))
        except ValueError as exc:
            out.issues.append(LabelIssue(str(path), lineno, f"malformed label line ({exc}): {line[:60]!r}"))
    return out


def rasterize_polygon(mask: np.ndarray, points: np.ndarray) -> None:
    """Fill a polygon given in pixel coordinates (pixel centres at integer + 0.5, like COCO)."""
    # cv2 treats integer coordinates as pixel centres; shift by -0.5 and use 4 fractional bits.
    shift = 4
    pts = np.round((points - 0.5) * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_8, shift=shift)


def filled_box(mask: np.ndarray, box: np.ndarray) -> None:
    """The plain strategy: every pixel whose centre lies inside the box is foreground."""
    h, w = mask.shape
    x0, y0, x1, y1 = box
    c0, r0 = int(np.clip(np.ceil(x0 - 0.5), 0, w)), int(np.clip(np.ceil(y0 - 0.5), 0, h))
    c1, r1 = int(np.clip(np.ceil(x1 - 0.5), 0, w)), int(np.clip(np.ceil(y1 - 0.5), 0, h))
    mask[r0:r1, c0:c1] = 255


def centre_band(mask: np.ndarray, box: np.ndarray, fraction: float = 0.5) -> None:
    """Alternative: a band along the box's long axis, `fraction` of its short side wide (a seam is a line)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if w >= h:
        cy, half = (y0 + y1) / 2, h * fraction / 2
        filled_box(mask, np.array([x0, cy - half, x1, cy + half]))
    else:
        cx, half = (x0 + x1) / 2, w * fraction / 2
        filled_box(mask, np.array([cx - half, y0, cx + half, y1]))


BOX_MASK_STRATEGIES: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {
    "filled_box": filled_box,
    "centre_band": centre_band,
}


def rasterize(objects: list[LabelObject], height: int, width: int, box_strategy: str = "filled_box") -> np.ndarray:
    """Union of all objects as a uint8 mask with values {0, 255} at (height, width)."""
    if box_strategy not in BOX_MASK_STRATEGIES:
        raise ValueError(f"unknown box strategy {box_strategy!r}; known: {sorted(BOX_MASK_STRATEGIES)}")
    mask = np.zeros((height, width), np.uint8)
    for obj in objects:
        if obj.kind == "polygon":
            rasterize_polygon(mask, obj.points)
        else:
            BOX_MASK_STRATEGIES[box_strategy](mask, obj.points)
    return mask
