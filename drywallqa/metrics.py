"""Segmentation metrics (pure numpy): IoU and Dice per image and pooled, false-positive statistics.

Convention for an image whose prediction and truth are both empty: IoU = Dice = 1.0 (a correct
"nothing here"), counted in the per-image mean. Pooled metrics sum intersection and union over all
pixels of all images, so they need no convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EMPTY_BOTH_SCORE = 1.0


def _bool(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype == bool else a > 0


def counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """(intersection, |pred|, |truth|) in pixels."""
    p, t = _bool(pred), _bool(truth)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} differ in shape")
    return int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(np.count_nonzero(t))


def iou_from_counts(inter: int, n_pred: int, n_truth: int, empty: float = EMPTY_BOTH_SCORE) -> float:
    union = n_pred + n_truth - inter
    return empty if union == 0 else inter / union


def dice_from_counts(inter: int, n_pred: int, n_truth: int, empty: float = EMPTY_BOTH_SCORE) -> float:
    total = n_pred + n_truth
    return empty if total == 0 else 2.0 * inter / total


def iou(pred: np.ndarray, truth: np.ndarray, empty: float = EMPTY_BOTH_SCORE) -> float:
    return iou_from_counts(*counts(pred, truth), empty=empty)


def dice(pred: np.ndarray, truth: np.ndarray, empty: float = EMPTY_BOTH_SCORE) -> float:
    return dice_from_counts(*counts(pred, truth), empty=empty)


@dataclass
class SegmentationScores:
    """Accumulates per-image and pooled IoU/Dice over a set of images."""

    ious: list[float] = field(default_factory=list)
    dices: list[float] = field(default_factory=list)
    inter: int = 0
    pred: int = 0
    truth: int = 0
    both_empty: int = 0

    def add(self, pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
        i, p, t = counts(pred, truth)
        return self.add_counts(i, p, t)

    def add_counts(self, inter: int, n_pred: int, n_truth: int) -> tuple[float, float]:
        self.inter += inter
        self.pred += n_pred
        self.truth += n_truth
        self.both_empty += int(n_pred + n_truth == 0)
        score = (iou_from_counts(inter, n_pred, n_truth), dice_from_counts(inter, n_pred, n_truth))
        self.ious.append(score[0])
        self.dices.append(score[1])
        return score

    @property
    def images(self) -> int:
        return len(self.ious)

    def summary(self) -> dict[str, float | int | None]:
        n = self.images
        return {
            "images": n,
            "iou_mean": float(np.mean(self.ious)) if n else None,
            "dice_mean": float(np.mean(self.dices)) if n else None,
            # Pooled scores are undefined (None) when no image has any predicted or true pixel.
            "iou_pooled": iou_from_counts(self.inter, self.pred, self.truth) if self.pred + self.truth else None,
            "dice_pooled": dice_from_counts(self.inter, self.pred, self.truth) if self.pred + self.truth else None,
            "both_empty_images": self.both_empty,
        }


@dataclass
class FalsePositiveStats:
    """A prompt run on images that cannot contain its class: how often and how much it fires."""

    fired: int = 0
    areas: list[float] = field(default_factory=list)

    def add(self, pred: np.ndarray) -> float:
        p = _bool(pred)
        area = float(np.count_nonzero(p)) / p.size if p.size else 0.0
        self.fired += int(area > 0)
        self.areas.append(area)
        return area

    def summary(self) -> dict[str, float | int | None]:
        n = len(self.areas)
        return {
            "images": n,
            "fp_image_rate": self.fired / n if n else None,
            "mean_pred_area": float(np.mean(self.areas)) if n else None,
        }


def threshold_counts(prob: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold: (intersection, |pred|, |truth|) of `prob >= t` vs truth -> T x 3 int64.

    One sort-free pass via histograms, so a sweep costs about one evaluation.
    """
    t = _bool(truth).ravel()
    p = np.asarray(prob, np.float32).ravel()
    # Round thresholds to float32 first: `prob >= 0.7` on a float32 array compares in float32, and the sweep
    # must agree with that exactly.
    thresholds = np.asarray(thresholds, np.float32).astype(np.float64)
    order = np.argsort(thresholds)
    edges = np.concatenate([[-np.inf], thresholds[order], [np.inf]])
    all_hist = np.histogram(p, bins=edges)[0]
    pos_hist = np.histogram(p[t], bins=edges)[0]
    # count of p >= thresholds[order[k]] = sum of bins k+1 .. end
    n_pred = np.cumsum(all_hist[::-1])[::-1][1:]
    inter = np.cumsum(pos_hist[::-1])[::-1][1:]
    out = np.empty((len(thresholds), 3), np.int64)
    out[order, 0] = inter
    out[order, 1] = n_pred
    out[:, 2] = int(np.count_nonzero(t))
    return out
