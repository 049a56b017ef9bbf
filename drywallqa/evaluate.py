"""`drywallqa eval`: a model on one side of configs/split.json at native resolution.

Per class and per prompt (every synonym, through the model's own prompt resolution and thresholds):
IoU and Dice as the mean over images and pooled over all pixels. Convention: an image where prediction
and truth are both empty scores 1.0 in the mean (see drywallqa.metrics). False positives: each class
on the images of datasets labelled with another class (which cannot contain it). Also latency per image
(pre-processing, network, post-processing) and the model file size. Optional sweep of the decision rule:
every threshold in SWEEP_THRESHOLDS under every mask shape (edge/mask_shapes.py).
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drywallqa.contract import InvalidModelError, MaskShape
from drywallqa.edge.mask_shapes import MASK_SHAPES, class_mask
from drywallqa.metrics import (
    FalsePositiveStats,
    SegmentationScores,
    counts,
    iou_from_counts,
    threshold_counts,
)
from drywallqa.outdir import ensure_writable_dir
from drywallqa.predict import resolve_model
from drywallqa.progress import progress_bar

# 0.05 .. 0.95, then finer at the top, where box-shaped classes peak (MODEL.md)
SWEEP_THRESHOLDS = (*(round(0.05 * i, 2) for i in range(1, 20)), 0.96, 0.97, 0.98, 0.99)
GALLERY_PER_CLASS = 3  # best and worst images shown per class


@dataclass
class EvalResult:
    data: dict
    markdown: str
    out_dir: Path | None = None


def sweep_counts(prob: np.ndarray, truth: np.ndarray, shape: MaskShape) -> np.ndarray:
    """T x 3 (intersection, |pred|, |truth|) of the class mask at every SWEEP_THRESHOLDS value."""
    if shape == "pixels":  # one histogram pass instead of T thresholdings
        return threshold_counts(prob, truth, np.array(SWEEP_THRESHOLDS))
    return np.array([counts(class_mask(prob, t, shape), truth) for t in SWEEP_THRESHOLDS], np.int64)


@dataclass
class _Sweep:
    """Per class and mask shape: per-image counts at every sweep threshold (own images) and fired counts
    (other images)."""

    own: list[np.ndarray] = field(default_factory=list)  # each T x 3 (inter, pred, truth)
    other_fired: list[np.ndarray] = field(default_factory=list)  # each T bool

    def rows(self, thresholds: tuple[float, ...], shape: MaskShape) -> list[dict]:
        rows = []
        for k, t in enumerate(thresholds):
            per_image = [iou_from_counts(*c[k]) for c in self.own]
            total = np.sum([c[k] for c in self.own], axis=0) if self.own else np.zeros(3)
            rows.append({
                "shape": shape,
                "threshold": t,
                "iou_mean": float(np.mean(per_image)) if per_image else None,
                "iou_pooled": _pooled_iou(total) if self.own else None,
                "fp_image_rate": float(np.mean([f[k] for f in self.other_fired])) if self.other_fired else None,
            })
        return rows


def sweep_summary(sweeps: dict[MaskShape, _Sweep]) -> dict:
    """Every (shape, threshold) row; the best by mean IoU, ties going to pixels and then closest to 0.5."""
    rows = [r for shape, sw in sweeps.items() for r in sw.rows(SWEEP_THRESHOLDS, shape)]
    scored = [r for r in rows if r["iou_mean"] is not None]
    best = max(scored, key=lambda r: (r["iou_mean"], r["shape"] == "pixels", -abs(r["threshold"] - 0.5))) \
        if scored else None
    return {"best_threshold": best["threshold"] if best else None, "best_shape": best["shape"] if best else None,
            "best": best, "rows": rows}


def _pooled_iou(total: np.ndarray) -> float | None:
    inter, pred, truth = (int(v) for v in total)
    return None if pred + truth == 0 else iou_from_counts(inter, pred, truth)


def model_file_size(path: Path) -> int:
    """Bytes on disk, counting an OpenVINO IR's .bin and any ONNX external data next to it."""
    size = path.stat().st_size
    if path.suffix.lower() == ".xml" and path.with_suffix(".bin").is_file():
        size += path.with_suffix(".bin").stat().st_size
    data = path.with_name(path.name + ".data")
    if data.is_file():
        size += data.stat().st_size
    return size


def evaluate(
    segmenter,
    examples,
    class_of_dataset: dict[str, str],
    tune_thresholds: bool = False,
    progress: bool = True,
    total: int | None = None,
) -> tuple[dict, dict[str, list[tuple[float, object]]]]:
    """Score a PromptSegmenter on `examples` (iterable of prepare.Example, truth masks {0,255}).

    Returns (results dict, per-class [(iou, record)] for the gallery).
    """
    meta = segmenter.metadata
    classes = list(meta.classes)
    prompts = list(meta.prompts)
    per_class = {c: SegmentationScores() for c in classes}
    per_prompt = {p: SegmentationScores() for p in prompts}
    fp_class: dict[str, dict[str, FalsePositiveStats]] = {c: defaultdict(FalsePositiveStats) for c in classes}
    fp_prompt = {p: FalsePositiveStats() for p in prompts}
    sweeps = {c: {shape: _Sweep() for shape in MASK_SHAPES} for c in classes}
    ranked: dict[str, list[tuple[float, object]]] = {c: [] for c in classes}
    timing = defaultdict(list)
    skipped: list[str] = []
    images = defaultdict(int)
    bar = progress_bar(total or 0, "eval", progress)
    for ex in examples:
        bar.update(1)
        if ex.skipped is not None:
            skipped.append(ex.skipped)
            continue
        rec = ex.record
        images[rec.dataset] += 1
        truth_class = class_of_dataset[rec.dataset]
        truth = ex.mask > 0
        t0 = time.perf_counter()
        x = segmenter.preprocess(ex.image)[None]
        t1 = time.perf_counter()
        raw = segmenter.network(x)[0]
        t2 = time.perf_counter()
        probs = segmenter.postprocess(raw, ex.image.shape[:2])
        t3 = time.perf_counter()
        timing["pre"].append(t1 - t0)
        timing["network"].append(t2 - t1)
        timing["post"].append(t3 - t2)
        for k, cls in enumerate(classes):
            pred = segmenter.class_mask(probs, cls)
            if cls == truth_class:
                score = per_class[cls].add(pred, truth)
                ranked[cls].append((score[0], rec))
            else:
                fp_class[cls][rec.dataset].add(pred)
            if tune_thresholds and cls == truth_class:
                for shape, sweep in sweeps[cls].items():
                    sweep.own.append(sweep_counts(probs[k], truth, shape))
            elif tune_thresholds:  # a box fires exactly where its pixels do: one count serves every shape
                fired = threshold_counts(probs[k], truth, np.array(SWEEP_THRESHOLDS))[:, 1] > 0
                for sweep in sweeps[cls].values():
                    sweep.other_fired.append(fired)
        for prompt, mask in segmenter.masks_from_probabilities(probs, prompts).items():
            if meta.prompts[prompt] == truth_class:
                per_prompt[prompt].add(mask, truth)
            else:
                fp_prompt[prompt].add(mask)
    bar.close()
    ms = {k: 1000.0 * float(np.mean(v)) for k, v in timing.items()}
    data = {
        "images": dict(images),
        "skipped": skipped,
        "thresholds": dict(meta.thresholds),
        "convention": "IoU/Dice mean: average over images; an image where prediction and truth are both empty "
                      "scores 1.0. Pooled: intersection and union summed over all pixels of all images. "
                      "False positives: a class's prompts on images of datasets labelled with another class.",
        "per_class": {c: {**per_class[c].summary(), "threshold": meta.thresholds[c], "mask_shape": meta.mask_shape(c)}
                      for c in classes},
        "per_prompt": {p: {"class": meta.prompts[p], **per_prompt[p].summary()} for p in prompts},
        "false_positives": {c: {ds: s.summary() for ds, s in fp_class[c].items()} for c in classes},
        "false_positives_per_prompt": {p: fp_prompt[p].summary() for p in prompts},
        "latency_ms": {"total": sum(ms.values()), **ms} if ms else {},
    }
    if tune_thresholds:
        data["threshold_sweep"] = {c: sweep_summary(sweeps[c]) for c in classes}
    return data, ranked


def run_eval(
    model: str | None,
    split: str = "val",
    out_dir: str | Path | None = None,
    data_config: str | Path | None = None,
    split_file: str | Path | None = None,
    backend: str = "auto",
    threads: int | None = None,
    tune_thresholds: bool = False,
    limit: int | None = None,
    progress: bool = True,
    flip_tta: bool = False,
) -> EvalResult:
    from drywallqa.edge.backends import load_backend
    from drywallqa.edge.inference import PromptSegmenter
    from drywallqa.report import gallery, to_html, to_markdown
    from drywallqa.train.data.errors import DataError
    from drywallqa.train.data.prepare import (
        collect_records,
        load_labelled,
        load_setup,
        unassigned_images,
        warn_unassigned,
    )
    from drywallqa.train.data.split import read_split

    path = resolve_model(model)
    out = ensure_writable_dir(out_dir) if out_dir else None  # before the evaluation, not after it
    setup = load_setup(data_config)
    split_path = Path(split_file) if split_file else setup.split_file
    if not split_path.is_file():
        raise FileNotFoundError(f"split file not found: {split_path}; run `drywallqa data split` first")
    sides = read_split(split_path)
    records = collect_records(setup)
    warn_unassigned(unassigned_images(sides, records), split_path)  # new photos: on neither side until re-split
    chosen = []
    missing: list[str] = []  # on this side of the split file, gone from disk: named, not silently left out
    for spec in setup.specs:
        side = sides.get(spec.name, {})
        if not side:
            raise FileNotFoundError(f"dataset {spec.name!r} is not in {split_path}; run `drywallqa data split`")
        on_disk = {r.file for r in records[spec.name]}
        missing += [f"{spec.name}/{name}: in the split file, but not found in {spec.root}"
                    for name, s in side.items() if s == split and name not in on_disk]
        recs = [r for r in records[spec.name] if side.get(r.file) == split]
        chosen += [(r, spec.format) for r in recs[:limit]]
    if not chosen:
        raise FileNotFoundError(f"no images on the {split!r} side of {split_path}"
                                + (f": all {len(missing)} it lists are missing, e.g. {missing[0]}" if missing else ""))
    if missing:
        print(f"drywallqa: warning: {len(missing)} image(s) on the {split!r} side of {split_path} are missing and "
              f"left out (listed under skipped images; restore them, or run `drywallqa data split`), e.g. "
              f"{missing[0]}", file=sys.stderr)

    be = load_backend(path, backend=backend, threads=threads)
    labelled = sorted({s.class_name for s in setup.specs})
    if not set(labelled) & set(be.metadata.classes):  # else a report of n/a everywhere, exit status 0
        raise InvalidModelError(f"{path}: its classes {be.metadata.classes} include none of the classes the datasets "
                                f"are labelled with ({', '.join(labelled)}), so nothing could be scored; evaluate a "
                                f"model trained for them")
    segmenter = PromptSegmenter(be, flip_tta=flip_tta)
    examples = (load_labelled(r, fmt, setup.box_strategy) for r, fmt in chosen)
    class_of = {s.name: s.class_name for s in setup.specs}
    data, ranked = evaluate(segmenter, examples, class_of, tune_thresholds, progress, total=len(chosen))
    if not data["images"]:  # a report of n/a everywhere with exit status 0 would read as a pass
        reasons = "; ".join(data["skipped"][:3]) + (" ..." if len(data["skipped"]) > 3 else "")
        raise DataError(f"none of the {len(chosen)} images on the {split!r} side could be scored, every one was "
                         f"skipped: {reasons}")
    data["skipped"] = missing + data["skipped"]
    meta = segmenter.metadata
    data["model"] = {"path": str(path), "name": meta.model_name, "profile": meta.profile,
                     "architecture": meta.architecture, "version": meta.version, "precision": meta.precision,
                     "input": [meta.input.height, meta.input.width], "backend": be.name,
                     "threads": threads, "file_bytes": model_file_size(path), "flip_tta": flip_tta}
    data["split"] = {"name": split, "file": str(split_path), "box_strategy": setup.box_strategy}
    markdown = to_markdown(data)
    if out is not None:
        fmt_of = {s.name: s.format for s in setup.specs}
        shots = gallery(segmenter, ranked, lambda rec: load_labelled(rec, fmt_of[rec.dataset], setup.box_strategy),
                        GALLERY_PER_CLASS)
        (out / "eval.json").write_text(json.dumps(data, indent=1, default=_json_default) + "\n", encoding="utf-8")
        (out / "eval.md").write_text(markdown + "\n", encoding="utf-8")
        (out / "eval.html").write_text(to_html(data, shots), encoding="utf-8")
    return EvalResult(data, markdown, out)


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
