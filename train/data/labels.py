"""Read YOLO polygon/box labels and rasterise them into pixel masks at the image's native size.

Box-to-mask strategies are pluggable (`BOX_MASK_STRATEGIES`); the shipped model used `filled_box`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Names the rasterisation rule; part of the data fingerprint so caches made by an older rule are told apart.
MASK_RULE = "pixel-centre sampling, non-zero winding, half-open edges (v2)"


@dataclass
class LabelObject:
    class_id: int
    kind: str  # "polygon", "box" or "mask"
    points: np.ndarray  # polygon: K x 2 (x, y) in pixels; box: (x0, y0, x1, y1) in pixels; mask: H x W bool


@dataclass
class LabelIssue:
    path: str
    line: int
    reason: str
    fatal: bool = False  # the image has no usable labels at all (file missing/unreadable, not listed)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class ParsedLabels:
    objects: list[LabelObject] = field(default_factory=list)
    issues: list[LabelIssue] = field(default_factory=list)


# Normalised coordinates this far outside [0, 1] are clipped (rounding in exporters); further out is an error.
COORD_TOLERANCE = 1e-3


def parse_class_id(value: float, class_ids: Collection[int] | None = None) -> int:
    """A class id: a whole number >= 0, and one of `class_ids` when given."""
    if not math.isfinite(value) or value < 0 or not float(value).is_integer():
        raise ValueError(f"class id {value} is not a whole number >= 0")
    class_id = int(value)
    if class_ids is not None and class_id not in class_ids:
        raise ValueError(f"class id {class_id} is not one of this dataset's class ids {sorted(class_ids)} "
                         f"(set class_ids in the data config to accept it)")
    return class_id


def normalised_coords(coords: list[float]) -> np.ndarray:
    """Coordinates in [0, 1]: within COORD_TOLERANCE of it they are clipped, beyond it they are an error."""
    values = np.asarray(coords, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("non-finite coordinate")
    outside = values[(values < -COORD_TOLERANCE) | (values > 1 + COORD_TOLERANCE)]
    if outside.size:
        raise ValueError(f"coordinate {outside[0]:g} is outside [0, 1] (YOLO labels are normalised to the image "
                         f"size, not pixels)")
    return np.clip(values, 0.0, 1.0)


def parse_yolo_line(values: list[float], width: int, height: int,
                    class_ids: Collection[int] | None = None) -> LabelObject:
    """`cls xc yc w h` is a box; `cls x1 y1 x2 y2 x3 y3 ...` (>= 3 points) is a polygon. Normalised coords.

    Raises ValueError for an unknown class id (see `parse_class_id`) or coordinates outside [0, 1]."""
    class_id = parse_class_id(values[0], class_ids)
    coords = values[1:]
    if len(coords) == 4:
        xc, yc, w, h = normalised_coords(coords)
        if w <= 0 or h <= 0:
            raise ValueError(f"box with non-positive size w={w:g} h={h:g}")
        box = np.array([(xc - w / 2) * width, (yc - h / 2) * height, (xc + w / 2) * width, (yc + h / 2) * height])
        return LabelObject(class_id, "box", box)
    if len(coords) >= 6 and len(coords) % 2 == 0:
        pts = normalised_coords(coords).reshape(-1, 2) * np.array([width, height])
        return LabelObject(class_id, "polygon", pts)
    raise ValueError(f"expected 4 box values or an even count >= 6 of polygon values, got {len(coords)}")


def read_yolo_labels(path: str | Path, width: int, height: int,
                     class_ids: Collection[int] | None = None) -> ParsedLabels:
    """Parse a YOLO label file; malformed lines are reported (file and line) and skipped.

    An empty file is a genuine negative (no objects, no issues). A missing or unreadable file is a fatal issue.
    """
    out = ParsedLabels()
    path = Path(path)
    if not path.exists():
        # Ultralytics reads an image without a label file as a negative; here it is skipped, so say how to keep it.
        out.issues.append(LabelIssue(str(path), 0, "label file missing; an empty label file marks an image with "
                                     "nothing to find", fatal=True))
        return out
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")  # -sig: a BOM must not spoil line 1
    except OSError as exc:
        out.issues.append(LabelIssue(str(path), 0, f"cannot read label file: {exc.strerror or exc}", fatal=True))
        return out
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            values = [float(v) for v in line.split()]
            out.objects.append(parse_yolo_line(values, width, height, class_ids))
        except ValueError as exc:
            out.issues.append(LabelIssue(str(path), lineno, f"malformed label line ({exc}): {line[:60]!r}"))
    return out


def polygon_coverage(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bool H x W: pixels whose centre (c + 0.5, r + 0.5) lies inside the polygon (non-zero winding rule).

    Exact sampling at pixel centres, the same rule `filled_box` uses, so a polygon tracing a box gives
    exactly that box's pixels. Edges are half-open in y (top-left rule): a centre on a shared edge is
    counted once, and a degenerate (zero-area) polygon covers nothing.
    """
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    out = np.zeros((height, width), bool)
    if len(pts) < 3:
        return out
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    r_lo = max(int(np.floor(pts[:, 1].min() - 0.5)), 0)
    r_hi = min(int(np.ceil(pts[:, 1].max() - 0.5)), height - 1)
    if r_hi < r_lo:
        return out
    yc = np.arange(r_lo, r_hi + 1, dtype=np.float64)[:, None] + 0.5  # R x 1 row centres
    up = (y0 <= yc) & (yc < y1)  # R x E edges crossing the row going down the image (+1)
    down = (y1 <= yc) & (yc < y0)  # ... going up (-1)
    crosses = up | down
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = np.where(crosses, x0 + (yc - y0) * (x1 - x0) / (y1 - y0), np.inf)
    direction = np.where(up, 1, np.where(down, -1, 0))
    order = np.argsort(xs, axis=1, kind="stable")
    xs = np.take_along_axis(xs, order, axis=1)
    winding = np.cumsum(np.take_along_axis(direction, order, axis=1), axis=1)
    # Interval k spans [xs[k], xs[k+1]) and is inside where the winding number after crossing k is non-zero.
    inside = (winding[:, :-1] != 0) & np.isfinite(xs[:, 1:])
    rows, ks = np.nonzero(inside)
    c0 = np.clip(np.ceil(xs[rows, ks] - 0.5), 0, width).astype(np.int64)
    c1 = np.clip(np.ceil(xs[rows, ks + 1] - 0.5), 0, width).astype(np.int64)
    keep = c1 > c0
    diff = np.zeros((len(yc), width + 1), np.int32)
    np.add.at(diff, (rows[keep], c0[keep]), 1)
    np.add.at(diff, (rows[keep], c1[keep]), -1)
    out[r_lo:r_hi + 1] = np.cumsum(diff[:, :width], axis=1) > 0
    return out


def rasterize_polygon(mask: np.ndarray, points: np.ndarray) -> None:
    """Fill a polygon given in pixel coordinates (pixel centres at integer + 0.5, like COCO).

    Only pixels whose centre is inside are set (cv2.fillPoly would also set every pixel the outline
    touches, growing each polygon by about one pixel, which matters for thin cracks).
    """
    mask[polygon_coverage(points, *mask.shape)] = 255


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
        elif obj.kind == "box":
            BOX_MASK_STRATEGIES[box_strategy](mask, obj.points)
        elif obj.kind == "mask":
            if obj.points.shape != mask.shape:
                raise ValueError(f"mask object of shape {obj.points.shape} does not match image {mask.shape}")
            mask[obj.points.astype(bool)] = 255
        else:
            raise ValueError(f"unknown label object kind {obj.kind!r}")
    return mask
