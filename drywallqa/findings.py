"""What `predict` found in each image: one row per image and prompt, for an inspector who has a folder of
photos and wants to know which ones to open, without opening every mask. An image that got no masks (corrupt,
missing) has rows too, with its `error` and the measurements left empty.

The CSV is written row by row and flushed after every image, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np

from drywallqa.edge.analysis import crack_length, label_regions


@dataclass(frozen=True)
class Finding:
    image: str
    prompt: str
    class_name: str
    mask_file: str
    mask_share: float  # share of the image's pixels in the mask, 0..1
    regions: int  # 8-connected regions of the mask
    max_probability: float  # the class's highest probability anywhere in the image (a near miss shows here)
    mean_probability_in_mask: float  # 0.0 when the mask is empty
    error: str = ""  # why this image has no mask (then every measurement is left empty); "" when it has one
    # Skeleton length of the mask in source pixels (the edge's skeleton_length_px), for classes whose mask shape is
    # `pixels`, as cracks are: which photo has the longest crack. None (an empty cell) for `boxes` classes. Last, so
    # that the columns of reports written before it keep their places.
    length_px: float | None = None


FIELDS = [f.name for f in fields(Finding)]
# What makes a CSV a findings report for a reader (the dashboard's review): reports written before a measurement
# column was added still qualify.
KEY_FIELDS = frozenset({"image", "prompt", "class_name", "mask_file"})


class ReportWriteError(OSError):
    """The findings CSV cannot be created where it was asked for."""


def measure(mask: np.ndarray, class_probs: np.ndarray, length: bool = True
            ) -> tuple[float, int, float, float, float | None]:
    """(mask_share, regions, max_probability, mean_probability_in_mask, length_px) of one {0,255} mask and the
    probabilities it was made from, both H x W at the source size; length_px is None unless `length`."""
    on = mask > 0
    share = float(on.mean()) if on.size else 0.0
    regions = 0
    mean_in = 0.0
    length_px = 0.0 if length else None
    if on.any():
        regions = label_regions(on.view(np.uint8))[0] - 1
        mean_in = float(cv2.mean(class_probs.astype(np.float32, copy=False), mask=on.view(np.uint8))[0])
        if length:
            length_px = crack_length(on.view(np.uint8))
    return share, regions, float(class_probs.max()) if class_probs.size else 0.0, mean_in, length_px


class FindingsWriter:
    """CSV of `Finding` rows with a header; `add` writes and flushes one image's rows."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", newline="", encoding="utf-8")
        except OSError as exc:
            raise ReportWriteError(f"cannot write the findings report {self.path}: {exc.strerror or exc}") from exc
        self._writer = csv.DictWriter(self._file, fieldnames=FIELDS)
        self._writer.writeheader()

    def add(self, rows: list[Finding]) -> None:
        for row in rows:
            record = asdict(row)
            for key in ("mask_share", "max_probability", "mean_probability_in_mask"):
                record[key] = f"{record[key]:.6f}"
            record["length_px"] = "" if row.length_px is None else f"{row.length_px:.1f}"
            self._writer.writerow(record)
        self._file.flush()

    def add_failure(self, image: str, prompts_and_classes: list[tuple[str, str]], why: str) -> None:
        """Rows for an image that got no masks, so a reader sorting the CSV still sees it and why."""
        for prompt, class_name in prompts_and_classes:
            self._writer.writerow({**dict.fromkeys(FIELDS, ""), "image": image, "prompt": prompt,
                                   "class_name": class_name, "error": why})
        self._file.flush()

    def close(self) -> None:
        self._file.close()

