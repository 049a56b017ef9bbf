"""`drywallqa data prepare` / `data split`: labels -> native-size masks -> grouped split -> resized caches.

Reads every dataset in configs/data.yaml (YOLO polygons/boxes or COCO JSON), rasterises pixel-exact masks
at native size, writes the grouped split file and caches decoded, resized images and masks per size.
Nothing here needs torch.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drywallqa.imageio import ImageReadError, read_image_rgb
from drywallqa.paths import PROJECT_ROOT
from drywallqa.progress import progress_bar
from drywallqa.train.data import coco
from drywallqa.train.data.cache import CacheWriter, resize_pair
from drywallqa.train.data.labels import (
    BOX_MASK_STRATEGIES,
    MASK_RULE,
    LabelIssue,
    ParsedLabels,
    rasterize,
    read_yolo_labels,
)
from drywallqa.train.data.sources import (
    DatasetSpec,
    ImageRecord,
    dataset_specs,
    load_data_config,
    yolo_records,
)
from drywallqa.train.data.split import grouped_split, leaked_bases, read_split, split_sizes, write_split
from drywallqa.vocab import load_vocabulary

FORMATS = ("yolo", "coco")


class DataConfigError(ValueError):
    """configs/data.yaml holds a value that cannot work; the message names the field."""


@dataclass
class DataSetup:
    specs: list[DatasetSpec]
    box_strategy: str
    split_file: Path
    val_fraction: float
    seed: int
    config_path: Path


def load_setup(config_path: str | Path | None = None) -> DataSetup:
    """Read and validate the data config (formats, classes, box strategy, split settings)."""
    path = Path(config_path) if config_path else PROJECT_ROOT / "configs" / "data.yaml"
    if not path.is_file():
        raise DataConfigError(f"data config not found: {path}")
    try:
        cfg = load_data_config(path)
        specs = dataset_specs(cfg)
    except (KeyError, TypeError) as exc:
        raise DataConfigError(f"{path}: every dataset needs 'name', 'root' and 'class' ({exc!r})") from exc
    if not specs:
        raise DataConfigError(f"{path}: 'datasets' is empty")
    vocab = load_vocabulary()
    for spec in specs:
        if spec.format not in FORMATS:
            raise DataConfigError(f"{path}: dataset {spec.name!r}: format {spec.format!r} is not one of {FORMATS}")
        if spec.class_name not in vocab.classes:
            raise DataConfigError(f"{path}: dataset {spec.name!r}: class {spec.class_name!r} is not in the "
                                  f"vocabulary (known: {list(vocab.classes)})")
    strategy = cfg.get("box_strategy", "filled_box")
    if strategy not in BOX_MASK_STRATEGIES:
        raise DataConfigError(f"{path}: box_strategy {strategy!r} is not one of {sorted(BOX_MASK_STRATEGIES)}")
    split = cfg.get("split") or {}
    split_file = Path(split.get("file", "configs/split.json"))
    if not split_file.is_absolute():
        split_file = PROJECT_ROOT / split_file
    try:
        val_fraction = float(split.get("val_fraction", 0.15))
        seed = int(split.get("seed", 0))
    except (TypeError, ValueError) as exc:
        raise DataConfigError(f"{path}: split.val_fraction must be a number and split.seed an integer") from exc
    if not 0.0 < val_fraction < 1.0:
        raise DataConfigError(f"{path}: split.val_fraction must be in (0, 1), got {val_fraction}")
    return DataSetup(specs, strategy, split_file, val_fraction, seed, path)


def records_for(spec: DatasetSpec) -> list[ImageRecord]:
    if spec.format == "coco":
        return coco.coco_records(spec)
    return yolo_records(spec)


def labels_for(record: ImageRecord, fmt: str, height: int, width: int) -> ParsedLabels:
    if fmt == "coco":
        return coco.labels_for_image(record.label_path, record.image_path.name, height, width)
    return read_yolo_labels(record.label_path, width, height)


@dataclass
class Example:
    """One decoded example at native size, or the reason it was skipped."""

    record: ImageRecord
    image: np.ndarray | None = None
    mask: np.ndarray | None = None  # uint8 {0, 255}
    labels: ParsedLabels = field(default_factory=ParsedLabels)
    skipped: str | None = None


def load_labelled(record: ImageRecord, fmt: str, box_strategy: str) -> Example:
    """Decode + rasterise one image; unreadable images and missing label files become a skip reason."""
    try:
        image = read_image_rgb(record.image_path)
    except ImageReadError as exc:
        return Example(record, skipped=str(exc))
    h, w = image.shape[:2]
    labels = labels_for(record, fmt, h, w)
    missing = [i for i in labels.issues if i.line == 0]
    if missing:
        return Example(record, labels=labels, skipped=f"{record.image_path}: {missing[0].reason} ({missing[0].path})")
    try:
        mask = rasterize(labels.objects, h, w, box_strategy)
    except ValueError as exc:
        return Example(record, labels=labels, skipped=f"{record.image_path}: cannot rasterise labels: {exc}")
    return Example(record, image, mask, labels)


def build_split(setup: DataSetup, records: dict[str, list[ImageRecord]]) -> dict[str, dict[str, str]]:
    split = {
        ds: grouped_split(ds, [r.image_path.name for r in recs], setup.val_fraction, setup.seed)
        for ds, recs in records.items()
    }
    leaks = leaked_bases(split)
    if leaks:  # cannot happen with hash-by-base; guards against a future change of the naming rule
        raise RuntimeError(f"split puts base photos on both sides: {leaks}")
    return split


def fingerprint(records: dict[str, list[ImageRecord]], box_strategy: str) -> str:
    """Hash of file names, image sizes in bytes and label contents: changes whenever the data does."""
    h = hashlib.sha256(f"{box_strategy}|{MASK_RULE}".encode())
    seen_labels: set[Path] = set()
    for ds in sorted(records):
        for r in records[ds]:
            h.update(f"{ds}/{r.image_path.name}:{r.image_path.stat().st_size}".encode())
            if r.label_path.is_file() and r.label_path not in seen_labels:
                seen_labels.add(r.label_path)
                h.update(r.label_path.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class PrepareSummary:
    images: Counter = field(default_factory=Counter)  # dataset -> images kept
    objects: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # dataset -> kind -> n
    coverage: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # class -> per-image
    skipped: list[str] = field(default_factory=list)
    issues: list[LabelIssue] = field(default_factory=list)
    split: dict[str, dict[str, int]] = field(default_factory=dict)
    caches: dict[int, str] = field(default_factory=dict)
    split_file: str = ""
    fingerprint: str = ""

    def as_dict(self) -> dict:
        return {
            "images": dict(self.images),
            "objects": {ds: dict(c) for ds, c in self.objects.items()},
            "mask_coverage": {c: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v)),
                                  "empty_images": int(sum(x == 0 for x in v))}
                              for c, v in self.coverage.items() if v},
            "skipped": self.skipped,
            "label_issues": [str(i) for i in self.issues],
            "split": self.split,
            "split_file": self.split_file,
            "caches": {str(k): v for k, v in self.caches.items()},
            "fingerprint": self.fingerprint,
        }

    def format(self, max_listed: int = 20) -> str:
        d = self.as_dict()
        lines = ["Data summary", f"  images kept: {sum(self.images.values())} " + str(d["images"])]
        for ds, kinds in d["objects"].items():
            lines.append(f"  objects in {ds}: {sum(kinds.values())} " + ", ".join(f"{k}={v}" for k, v in kinds.items()))
        for c, cov in d["mask_coverage"].items():
            lines.append(f"  mask coverage {c}: mean {cov['mean']:.2%} (min {cov['min']:.2%}, max {cov['max']:.2%}, "
                         f"empty masks {cov['empty_images']})")
        for ds, s in d["split"].items():
            lines.append(f"  split {ds}: train {s['train']} images / {s['train_bases']} base photos, "
                         f"val {s['val']} images / {s['val_bases']} base photos")
        lines.append(f"  split file: {self.split_file}")
        for size, path in d["caches"].items():
            lines.append(f"  cache {size}: {path}")
        lines.append(f"  data fingerprint: {self.fingerprint}")
        lines.append(f"  skipped files: {len(self.skipped)}")
        lines += [f"    {s}" for s in self.skipped[:max_listed]]
        if len(self.skipped) > max_listed:
            lines.append(f"    ... and {len(self.skipped) - max_listed} more")
        lines.append(f"  label issues (line skipped): {len(self.issues)}")
        lines += [f"    {i}" for i in self.issues[:max_listed]]
        if len(self.issues) > max_listed:
            lines.append(f"    ... and {len(self.issues) - max_listed} more")
        return "\n".join(lines)


def collect_records(setup: DataSetup) -> dict[str, list[ImageRecord]]:
    out = {}
    for spec in setup.specs:
        try:
            out[spec.name] = records_for(spec)
        except FileNotFoundError as exc:
            raise DataConfigError(f"{setup.config_path}: dataset {spec.name!r}: {exc}") from exc
    return out


def write_split_file(setup: DataSetup, split_file: Path | None = None) -> tuple[Path, dict[str, dict[str, int]]]:
    """`drywallqa data split`: (re)write the grouped split file only."""
    records = collect_records(setup)
    split = build_split(setup, records)
    target = split_file or setup.split_file
    write_split(target, split, setup.seed, setup.val_fraction)
    return target, split_sizes(split)


def _iter_examples(items: list[tuple[ImageRecord, str]], box_strategy: str, workers: int) -> Iterator[Example]:
    if workers <= 1:
        for rec, fmt in items:
            yield load_labelled(rec, fmt, box_strategy)
        return
    with ThreadPoolExecutor(workers) as pool:
        # Bounded look-ahead so memory stays flat on large datasets.
        window = workers * 4
        futures = [pool.submit(load_labelled, rec, fmt, box_strategy) for rec, fmt in items[:window]]
        nxt = len(futures)
        for i in range(len(items)):
            yield futures[i].result()
            futures[i] = None  # type: ignore[call-overload]
            if nxt < len(items):
                rec, fmt = items[nxt]
                futures.append(pool.submit(load_labelled, rec, fmt, box_strategy))
                nxt += 1


def prepare(
    setup: DataSetup,
    sizes: list[int],
    out_dir: str | Path,
    split_file: Path | None = None,
    workers: int = 2,
    progress: bool = True,
) -> PrepareSummary:
    """Rasterise, split and cache every configured dataset; returns the summary (also written as JSON)."""
    if not sizes or any(s <= 0 for s in sizes):
        raise DataConfigError(f"--sizes must be positive integers, got {sizes}")
    vocab = load_vocabulary()
    records = collect_records(setup)
    split = build_split(setup, records)
    target = split_file or setup.split_file
    write_split(target, split, setup.seed, setup.val_fraction)

    summary = PrepareSummary(split=split_sizes(split), split_file=str(target),
                             fingerprint=fingerprint(records, setup.box_strategy))
    for spec in setup.specs:  # COCO problems not tied to one image (e.g. unknown image_id)
        if spec.format == "coco":
            for ann_file in sorted({r.label_path for r in records[spec.name]}):
                summary.issues += coco.load_coco_cached(ann_file).issues
    fmt_of = {s.name: s.format for s in setup.specs}
    items = [(r, fmt_of[ds]) for ds in records for r in records[ds]]
    out_dir = Path(out_dir)
    writers = {s: CacheWriter(out_dir, s, len(items)) for s in sorted(set(sizes))}
    meta: list[dict] = []
    try:
        bar = progress_bar(len(items), "prepare", progress)
        for ex in _iter_examples(items, setup.box_strategy, workers):
            bar.update(1)
            rec = ex.record
            summary.issues += [i for i in ex.labels.issues if i.line != 0]
            if ex.skipped is not None:
                summary.skipped.append(ex.skipped)
                continue
            assert ex.image is not None and ex.mask is not None
            summary.images[rec.dataset] += 1
            for obj in ex.labels.objects:
                summary.objects[rec.dataset][obj.kind] += 1
            summary.coverage[rec.class_name].append(float(np.count_nonzero(ex.mask)) / ex.mask.size)
            for size, writer in writers.items():
                writer.put(*resize_pair(ex.image, ex.mask, size))
            meta.append({"id": rec.image_id, "dataset": rec.dataset, "class": vocab.class_index(rec.class_name),
                         "class_name": rec.class_name, "split": split[rec.dataset][rec.image_path.name],
                         "file": rec.image_path.name})
        bar.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    info = {"classes": list(vocab.classes), "box_strategy": setup.box_strategy, "mask_values": [0, 1],
            "fingerprint": summary.fingerprint, "split_file": str(target)}
    for size, writer in writers.items():
        summary.caches[size] = str(writer.finish(meta, info))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prepare_summary.json").write_text(json.dumps(summary.as_dict(), indent=1) + "\n", encoding="utf-8")
    return summary


def records_in_split(setup: DataSetup, side: str, skip_missing: bool = False) -> dict[str, list[ImageRecord]]:
    """Each dataset's records on one side ('train' or 'val') of the split file (computed if it is absent).

    The one way every consumer (training pack, INT8 calibration, evaluation scripts) picks a split side.
    """
    specs = [s for s in setup.specs if s.root.is_dir()] if skip_missing else setup.specs
    records = collect_records(DataSetup(specs, setup.box_strategy, setup.split_file, setup.val_fraction,
                                        setup.seed, setup.config_path))
    split = read_split(setup.split_file) if setup.split_file.is_file() else build_split(setup, records)
    return {ds: [r for r in recs if split.get(ds, {}).get(r.image_path.name) == side] for ds, recs in records.items()}
