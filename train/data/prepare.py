"""`drywallqa data prepare` / `data split`: labels -> native-size masks -> grouped split -> resized caches.

Reads every dataset in configs/data.yaml (YOLO polygons/boxes or COCO JSON), rasterises pixel-exact masks
at native size, writes the grouped split file and caches decoded, resized images and masks per size.
Nothing here needs torch.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from drywallqa.imageio import ImageReadError, read_image_rgb
from drywallqa.outdir import ensure_writable_dir
from drywallqa.paths import PROJECT_ROOT
from drywallqa.progress import progress_bar
from drywallqa.train.data import coco
from drywallqa.train.data.cache import MAX_CACHE_SIZE, CacheWriter, check_free_space, resize_pair
from drywallqa.train.data.errors import DataConfigError, DataError
from drywallqa.train.data.labels import (
    BOX_MASK_STRATEGIES,
    MASK_RULE,
    LabelIssue,
    ParsedLabels,
    rasterize,
    read_yolo_labels,
)
from drywallqa.train.data.sources import (
    READ_SUFFIXES,
    DatasetSpec,
    ImageRecord,
    MissingSplitError,
    dataset_specs,
    load_data_config,
    orphan_labels,
    yolo_dirs,
    yolo_records,
)
from drywallqa.train.data.split import (
    check_split_target,
    grouped_split,
    leaked_bases,
    read_split,
    side_sizes,
    split_sizes,
    write_split,
)
from drywallqa.train.interrupts import sigterm_as_interrupt
from drywallqa.vocab import load_vocabulary

FORMATS = ("yolo", "coco")


@dataclass
class DataSetup:
    specs: list[DatasetSpec]
    box_strategy: str
    split_file: Path
    val_fraction: float
    seed: int
    config_path: Path


def _one_line(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or ' '.join(str(exc).split())}{where}"


def _read_config(path: Path) -> dict:
    """The config as a mapping with a 'datasets' list; DataConfigError for anything else."""
    try:
        cfg = load_data_config(path)
    except yaml.YAMLError as exc:
        raise DataConfigError(f"{path} is not valid YAML ({_one_line(exc)}); fix the file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataConfigError(f"cannot read the data config {path}: {exc}") from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("datasets"), list):
        raise DataConfigError(f"{path}: expected a mapping with a 'datasets' list (see configs/data.yaml)")
    return cfg


# Every key a data config may hold: a misspelt one (`box_stratgy`, `splitz`, `clas_ids`) would otherwise be
# ignored and its default used without a word (other masks, another split, every label line rejected). Keys that
# start with `_` or `x-` are the user's own (a block of YAML anchors to reuse) and are let through.
CONFIG_KEYS = ("datasets", "box_strategy", "split")
DATASET_KEYS = ("name", "root", "splits", "format", "class", "class_ids")
SPLIT_KEYS = ("file", "val_fraction", "seed")


def _check_keys(path: Path, where: str, table: object, known: tuple[str, ...]) -> None:
    if not isinstance(table, dict):
        return  # the type checks that follow name what is wrong
    for key in table:
        if key not in known and not str(key).startswith(("_", "x-")):  # `x-common: &c` holds YAML anchors
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DataConfigError(f"{path}: unknown key {key!r} in {where} ({hint}known: {', '.join(known)})")


def _check_config_keys(path: Path, cfg: dict) -> None:
    _check_keys(path, "the data config", cfg, CONFIG_KEYS)
    for i, d in enumerate(cfg["datasets"]):
        name = d.get("name") if isinstance(d, dict) else None
        _check_keys(path, f"dataset {name!r}" if name else f"dataset {i + 1}", d, DATASET_KEYS)
    _check_keys(path, "split", cfg.get("split"), SPLIT_KEYS)


def _read_specs(path: Path, cfg: dict) -> list[DatasetSpec]:
    _check_config_keys(path, cfg)
    try:
        specs = dataset_specs(cfg)
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataConfigError(f"{path}: every dataset needs 'name', 'root' and 'class' "
                              f"({type(exc).__name__}: {exc})") from exc
    except ValueError as exc:
        raise DataConfigError(f"{path}: {exc}") from exc
    if not specs:
        raise DataConfigError(f"{path}: 'datasets' is empty")
    return specs


def _check_specs(path: Path, specs: list[DatasetSpec]) -> None:
    vocab = load_vocabulary()
    names = [spec.name for spec in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataConfigError(f"{path}: dataset name {twice[0]!r} is used more than once; give each dataset its "
                              f"own name")
    for spec in specs:
        if spec.format not in FORMATS:
            raise DataConfigError(f"{path}: dataset {spec.name!r}: format {spec.format!r} is not one of {FORMATS}")
        if spec.class_name not in vocab.classes:
            raise DataConfigError(f"{path}: dataset {spec.name!r}: class {spec.class_name!r} is not in the "
                                  f"vocabulary (known: {list(vocab.classes)})")
        if spec.class_ids is not None and spec.format != "yolo":
            raise DataConfigError(f"{path}: dataset {spec.name!r}: class_ids is read for yolo datasets only; "
                                  f"remove it")


def default_split_file(config_path: Path) -> Path:
    """`split.json` beside a config named data.yaml, `<name>.split.json` beside any other config.

    So the project's configs/data.yaml gives configs/split.json, and no other config shares that file."""
    config_path = config_path.resolve()
    name = "split.json" if config_path.stem == "data" else f"{config_path.stem}.split.json"
    return config_path.parent / name


def default_cache_dir(config_path: Path) -> Path:
    """The project's cache/ for the project's configs/data.yaml, `cache/<config name>/` for any other config.

    So preparing a data config of one's own (e.g. site photos to fine-tune on) without --out never replaces the
    caches the shipped training configs read."""
    from drywallqa import paths  # read at call time (tests point CACHE_DIR elsewhere)

    if Path(config_path).resolve() == (paths.PROJECT_ROOT / "configs" / "data.yaml").resolve():
        return paths.CACHE_DIR
    return paths.CACHE_DIR / Path(config_path).stem


def _split_file(path: Path, split: dict) -> Path:
    if "file" not in split:
        return default_split_file(path)
    value = split["file"]
    if not isinstance(value, str) or not value.strip():
        raise DataConfigError(f"{path}: split.file must be a path, got {value!r}; give one or remove the key "
                              f"(default: {default_split_file(path)})")
    file = Path(value)
    return file if file.is_absolute() else PROJECT_ROOT / file


def _split_settings(path: Path, cfg: dict) -> tuple[Path, float, int]:
    split = cfg.get("split")
    split = {} if split is None else split
    if not isinstance(split, dict):
        raise DataConfigError(f"{path}: 'split' must be a mapping with file, val_fraction and seed, got {split!r}")
    fraction, seed = split.get("val_fraction", 0.15), split.get("seed", 0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise DataConfigError(f"{path}: split.val_fraction must be a number in (0, 1), got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataConfigError(f"{path}: split.seed must be a whole number, got {seed!r}")
    return _split_file(path, split), float(fraction), seed


def load_setup(config_path: str | Path | None = None) -> DataSetup:
    """Read and validate the data config (formats, classes, box strategy, split settings).

    split.file, when relative, is relative to the project root like the dataset roots; without it the split
    file is `default_split_file(config)`, so a custom config never overwrites the project's split."""
    path = Path(config_path) if config_path else PROJECT_ROOT / "configs" / "data.yaml"
    if not path.is_file():
        raise DataConfigError(f"data config not found: {path}")
    cfg = _read_config(path)
    specs = _read_specs(path, cfg)
    _check_specs(path, specs)
    strategy = cfg.get("box_strategy", "filled_box")
    if not isinstance(strategy, str) or strategy not in BOX_MASK_STRATEGIES:
        raise DataConfigError(f"{path}: box_strategy {strategy!r} is not one of {sorted(BOX_MASK_STRATEGIES)}")
    split_file, val_fraction, seed = _split_settings(path, cfg)
    return DataSetup(specs, strategy, split_file, val_fraction, seed, path)


def records_for(spec: DatasetSpec) -> list[ImageRecord]:
    if spec.format == "coco":
        return coco.coco_records(spec)
    return yolo_records(spec)


def labels_for(record: ImageRecord, fmt: str, height: int, width: int) -> ParsedLabels:
    if fmt == "coco":
        return coco.labels_for_image(record.label_path, record.file, height, width)
    return read_yolo_labels(record.label_path, width, height, record.class_ids)


@dataclass
class Example:
    """One decoded example at native size, or the reason it was skipped."""

    record: ImageRecord
    image: np.ndarray | None = None
    mask: np.ndarray | None = None  # uint8 {0, 255}
    labels: ParsedLabels = field(default_factory=ParsedLabels)
    skipped: str | None = None


def _label_skip(record: ImageRecord, labels: ParsedLabels) -> str | None:
    """Why an image's labels cannot be used (file missing or unreadable, not in its COCO file, every line rejected);
    None for usable labels, an empty label file (a genuine negative) too."""
    fatal = [i for i in labels.issues if i.fatal]
    if fatal:
        return f"{record.image_path}: {fatal[0].reason} ({fatal[0].path})"
    if labels.issues and not labels.objects:
        return (f"{record.image_path}: no usable label ({len(labels.issues)} rejected, see the label issues); fix "
                f"{record.label_path} (an empty label file marks an image with nothing to find)")
    return None


def load_labelled(record: ImageRecord, fmt: str, box_strategy: str) -> Example:
    """Decode + rasterise one image; unreadable images, missing label files and label files whose every
    line was rejected become a skip reason (an empty label file is a genuine negative and is kept)."""
    try:
        image = read_image_rgb(record.image_path)
    except ImageReadError as exc:
        return Example(record, skipped=str(exc))
    h, w = image.shape[:2]
    labels = labels_for(record, fmt, h, w)
    skipped = _label_skip(record, labels)
    if skipped is not None:
        return Example(record, labels=labels, skipped=skipped)
    try:
        mask = rasterize(labels.objects, h, w, box_strategy)
    except ValueError as exc:
        return Example(record, labels=labels, skipped=f"{record.image_path}: cannot rasterise labels: {exc}")
    return Example(record, image, mask, labels)


def label_skip_reason(record: ImageRecord) -> str | None:
    """`load_labelled`'s skip reason for the labels alone, read without decoding the image (YOLO coordinates are
    normalised; a COCO image is read at the size its file gives), with the first rejected line; None: usable."""
    if record.label_format == "coco":
        entry = coco.load_coco_cached(record.label_path).images.get(record.file, {})  # absent: "not listed"
        labels = labels_for(record, "coco", int(entry.get("height", 0)), int(entry.get("width", 0)))
    else:
        labels = read_yolo_labels(record.label_path, 1, 1, record.class_ids)
    reason = _label_skip(record, labels)
    rejected = [i for i in labels.issues if not i.fatal]
    return f"{reason}; first rejected line: {rejected[0]}" if reason and rejected else reason


def split_records(records: dict[str, list[ImageRecord]]) -> tuple[dict[str, list[ImageRecord]], dict[str, list[str]]]:
    """(the records the split file lists, why each other one is left out), by dataset.

    An image whose labels cannot be used is never trained or evaluated on, so the split file does not list it and
    the split sizes do not count it; `data split` and `data prepare` leave out the same images."""
    used: dict[str, list[ImageRecord]] = {}
    left_out: dict[str, list[str]] = {}
    for ds, recs in records.items():
        reasons = [(r, label_skip_reason(r)) for r in recs]
        used[ds] = [r for r, reason in reasons if reason is None]
        left_out[ds] = [reason for _, reason in reasons if reason is not None]
    return used, left_out


def listed_records(records: dict[str, list[ImageRecord]],
                   skipped: list[ImageRecord]) -> dict[str, list[ImageRecord]]:
    """`split_records`' first part, from a prepare run: of the images it skipped, those whose labels cannot be used
    are left out (an unreadable photo with usable labels stays listed: `data split` cannot tell it apart); every
    cached image has usable labels. So the labels are read again only for the skipped images."""
    unlisted = {r for r in skipped if label_skip_reason(r) is not None}
    return {ds: [r for r in recs if r not in unlisted] for ds, recs in records.items()}


def image_sizes(split: dict[str, dict[str, str]], records: dict[str, list[ImageRecord]]) -> dict[str, dict[str, int]]:
    """Split sizes counted in images, not split entries: two photos of one name in two splits of a dataset
    (train/images/IMG_1.jpg, valid/images/IMG_1.jpg) share one entry, and one side, but both are used."""
    return {ds: side_sizes((r.file, split[ds][r.file]) for r in recs) for ds, recs in records.items()}


def build_split(setup: DataSetup, records: dict[str, list[ImageRecord]]) -> dict[str, dict[str, str]]:
    """The grouped split of `records` (give `split_records`' first part: the images with usable labels)."""
    split = {
        ds: grouped_split(ds, [r.file for r in recs], setup.val_fraction, setup.seed)
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
            h.update(f"{ds}/{r.file}:{r.image_path.stat().st_size}".encode())
            if r.label_path.is_file() and r.label_path not in seen_labels:
                seen_labels.add(r.label_path)
                h.update(r.label_path.read_bytes())
    return h.hexdigest()[:16]


def _listed(title: str, items: list, max_listed: int) -> list[str]:
    lines = [f"  {title}: {len(items)}", *(f"    {i}" for i in items[:max_listed])]
    if len(items) > max_listed:
        lines.append(f"    ... and {len(items) - max_listed} more")
    return lines


@dataclass
class PrepareSummary:
    images: Counter = field(default_factory=Counter)  # dataset -> images kept
    objects: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # dataset -> kind -> n
    coverage: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # class -> per-image
    skipped: list[str] = field(default_factory=list)
    issues: list[LabelIssue] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # label files with no image
    split: dict[str, dict[str, int]] = field(default_factory=dict)  # dataset -> sizes of the cached images
    caches: dict[int, str] = field(default_factory=dict)
    split_file: str = ""
    fingerprint: str = ""
    config: str = ""  # the data config, named in the split warnings

    def as_dict(self) -> dict:
        return {
            "images": dict(self.images),
            "objects": {ds: dict(c) for ds, c in self.objects.items()},
            "mask_coverage": {c: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v)),
                                  "empty_images": int(sum(x == 0 for x in v))}
                              for c, v in self.coverage.items() if v},
            "skipped": self.skipped,
            "label_issues": [str(i) for i in self.issues],
            "orphan_labels": self.orphans,
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
        lines += [f"  {w}" for w in split_warnings(d["split"], "prepare", self.config)]
        lines.append(f"  split file: {self.split_file}")
        for size, path in d["caches"].items():
            lines.append(f"  cache {size}: {path}")
        lines.append(f"  data fingerprint: {self.fingerprint}")
        lines += _listed("skipped files", self.skipped, max_listed)
        lines += _listed("label issues (line skipped)", [str(i) for i in self.issues], max_listed)
        lines += _listed("label files without an image (ignored)", self.orphans, max_listed)
        return "\n".join(lines)


def collect_records(setup: DataSetup) -> dict[str, list[ImageRecord]]:
    out: dict[str, list[ImageRecord]] = {}
    for spec in setup.specs:
        try:
            out[spec.name] = records_for(spec)
        except MissingSplitError as exc:  # the message says what to set
            raise DataConfigError(f"{setup.config_path}: dataset {spec.name!r}: {exc}") from exc
        except OSError as exc:
            raise DataConfigError(f"{setup.config_path}: dataset {spec.name!r}: {exc}; check its 'root' and "
                                  f"'splits'") from exc
    return out


def image_folders(spec: DatasetSpec) -> list[Path]:
    """The folders `records_for` reads a dataset's images from."""
    if spec.format == "coco":
        return [coco.coco_image_dir(spec.root / split) for split in spec.splits]
    return [yolo_dirs(spec, split)[0] for split in spec.splits]


def require_images(setup: DataSetup, records: dict[str, list[ImageRecord]]) -> None:
    """Every configured dataset must have at least one image: an empty one is a wrong path, not a dataset."""
    for spec in setup.specs:
        if not records[spec.name]:
            folders = ", ".join(str(f) for f in image_folders(spec))
            raise DataConfigError(f"{setup.config_path}: dataset {spec.name!r} has no images in {folders} "
                                  f"(looked for {' '.join(READ_SUFFIXES)}); put its images there or "
                                  f"fix 'root'/'splits'")


def require_label_folders(setup: DataSetup) -> None:
    """A YOLO dataset without its labels/ folder would turn every image into a skip: stop before any work."""
    for spec in setup.specs:
        for split in spec.splits if spec.format == "yolo" else ():
            image_dir, label_dir = yolo_dirs(spec, split)
            if not label_dir.is_dir():
                raise DataConfigError(f"{setup.config_path}: dataset {spec.name!r}: no label folder {label_dir} "
                                      f"(the labels of {image_dir}/<name>.jpg go in {label_dir}/<name>.txt)")


def unassigned_images(split: dict[str, dict[str, str]], records: dict[str, list[ImageRecord]]) -> int:
    """How many images on disk with usable labels the split file does not list (on neither side); one without is
    never listed (`split_records`), so running `data split` again would not assign it."""
    return sum(r.file not in split.get(ds, {}) and label_skip_reason(r) is None
               for ds, recs in records.items() for r in recs)


def warn_unassigned(count: int, split_file: Path) -> None:
    if count:
        print(f"drywallqa: warning: {count} images are not in {split_file} and are left out of both sides; run "
              f"`drywallqa data split` to assign them", file=sys.stderr)


def split_warnings(sizes: dict[str, dict[str, int]], command: str, config: str | Path = "") -> list[str]:
    """Warnings about a side of the split with no image of a dataset (`command`: the `drywallqa data` command to run
    again after a fix; `config`: the data config, named in the advice)."""
    where = f"under `split:` in {config or 'the data config'}"
    again = f"then run `drywallqa data {command}` again"
    single = [ds for ds, s in sizes.items() if s["train_bases"] + s["val_bases"] == 1]
    warnings = []
    no_val = [ds for ds, s in sizes.items() if s["val"] == 0 and ds not in single]
    if no_val:  # common with a handful of one's own photos
        warnings.append(f"warning: no validation images in {', '.join(map(repr, no_val))}: training and `drywallqa "
                        f"eval` cannot measure their class; raise `val_fraction` {where} (or add photos), {again}")
    no_train = [ds for ds, s in sizes.items() if s["train"] == 0 and ds not in single]
    if no_train:  # a few base photos can all land in validation: training would never see them
        warnings.append(f"warning: no training images in {', '.join(map(repr, no_train))}: every photo is on the "
                        f"validation side, so training never sees them; change `seed` or lower `val_fraction` "
                        f"{where} (or add photos), {again}")
    for ds in single:  # its variants are one group: no split setting puts it on both sides
        side, images = ("validation" if sizes[ds]["val"] == 0 else "training"), sizes[ds]["train"] + sizes[ds]["val"]
        warnings.append(f"warning: no {side} images in {ds!r}: {ds!r} has 1 base photo ({images} images), and the "
                        f"variants of one photo stay on one side of the split; add photos of other places, {again}")
    return warnings


def require_labelled(setup: DataSetup, records: dict[str, list[ImageRecord]], left_out: dict[str, list[str]]) -> None:
    """`data split`'s form of `require_kept`: a dataset none of whose images has usable labels is an error (its split
    would be empty, and the empty-side warnings would give the wrong advice)."""
    for spec in setup.specs:
        if left_out[spec.name] and len(left_out[spec.name]) == len(records[spec.name]):
            raise DataError(f"dataset {spec.name!r}: none of its {len(records[spec.name])} images could be used "
                            f"(first: {left_out[spec.name][0]}); fix its labels or remove it from "
                            f"{setup.config_path}. Nothing was written")


def warn_left_out(left_out: dict[str, list[str]]) -> None:
    for ds, reasons in left_out.items():
        if reasons:
            print(f"drywallqa: warning: {len(reasons)} images of {ds!r} are not in the split, their labels cannot be "
                  f"used (first: {reasons[0]}); `drywallqa data prepare` lists them all", file=sys.stderr)


def write_split_file(setup: DataSetup, split_file: Path | None = None) -> tuple[Path, dict[str, dict[str, int]]]:
    """`drywallqa data split`: (re)write the grouped split file only; the sizes are of the images it assigns."""
    target = check_split_target(split_file or setup.split_file)
    records = collect_records(setup)
    require_images(setup, records)
    used, left_out = split_records(records)
    require_labelled(setup, records, left_out)
    split = build_split(setup, used)
    write_split(target, split, setup.seed, setup.val_fraction)
    warn_left_out(left_out)
    return target, image_sizes(split, used)


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


def check_sizes(sizes: list[int]) -> None:
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= MAX_CACHE_SIZE for s in sizes):
        raise DataConfigError(f"--sizes must be whole numbers from 1 to {MAX_CACHE_SIZE} pixels, got {sizes}")


def coco_file_issues(setup: DataSetup, records: dict[str, list[ImageRecord]]) -> list[LabelIssue]:
    """Reads every COCO file once up front (DataError for one that is not COCO JSON) and returns the problems
    not tied to one image (e.g. an annotation of an unknown image_id)."""
    issues: list[LabelIssue] = []
    for spec in setup.specs:
        if spec.format == "coco":
            for ann_file in sorted({r.label_path for r in records[spec.name]}):
                issues += coco.load_coco_cached(ann_file).issues
    return issues


def require_kept(setup: DataSetup, records: dict[str, list[ImageRecord]], summary: PrepareSummary,
                 first_skip: dict[str, str]) -> None:
    """A dataset whose every image was skipped is an error, even when the others are fine: training on it
    would silently drop its class. The caches are not touched (the caller aborts them)."""
    for spec in setup.specs:
        if summary.images[spec.name] == 0:
            raise DataError(f"dataset {spec.name!r}: none of its {len(records[spec.name])} images could be used "
                            f"(first: {first_skip.get(spec.name, 'no reason recorded')}); fix its labels/images or "
                            f"remove it from {setup.config_path}. Nothing was written")


def _add_example(ex: Example, summary: PrepareSummary, first_skip: dict[str, str]) -> bool:
    """Count one example in the summary; True when it goes into the caches."""
    rec = ex.record
    summary.issues += [i for i in ex.labels.issues if not i.fatal]
    if ex.skipped is not None:
        summary.skipped.append(ex.skipped)
        # require_kept's one-line error is all the user sees (no summary): name a rejected line's reason there.
        rejected = [i for i in ex.labels.issues if not i.fatal]
        first_skip.setdefault(rec.dataset, f"{ex.skipped}; first rejected line: {rejected[0]}" if rejected
                              else ex.skipped)
        return False
    assert ex.image is not None and ex.mask is not None
    summary.images[rec.dataset] += 1
    for obj in ex.labels.objects:
        summary.objects[rec.dataset][obj.kind] += 1
    summary.coverage[rec.class_name].append(float(np.count_nonzero(ex.mask)) / ex.mask.size)
    return True


def _write_caches(setup: DataSetup, records: dict[str, list[ImageRecord]], split: dict[str, dict[str, str]],
                  sizes: list[int], out_dir: Path, summary: PrepareSummary, workers: int,
                  progress: bool) -> dict[str, dict[str, str]]:
    """Decode, rasterise and cache every image; returns the split to write (`listed_records`: decided before any
    cache is published, so no failure in between leaves a new cache beside the old split file). On any failure
    every work folder is removed, old caches kept."""
    vocab = load_vocabulary()
    fmt_of = {s.name: s.format for s in setup.specs}
    items = [(r, fmt_of[ds]) for ds in records for r in records[ds]]
    writers: dict[int, CacheWriter] = {}
    meta: list[dict] = []
    first_skip: dict[str, str] = {}
    skipped: list[ImageRecord] = []
    try:
        for size in sorted(set(sizes)):
            writers[size] = CacheWriter(out_dir, size, len(items))
        bar = progress_bar(len(items), "prepare", progress)
        for ex in _iter_examples(items, setup.box_strategy, workers):
            bar.update(1)
            if not _add_example(ex, summary, first_skip):
                skipped.append(ex.record)
                continue
            assert ex.image is not None and ex.mask is not None
            for size, writer in writers.items():
                writer.put(*resize_pair(ex.image, ex.mask, size))
            rec = ex.record
            meta.append({"id": rec.image_id, "dataset": rec.dataset, "class": vocab.class_index(rec.class_name),
                         "class_name": rec.class_name, "split": split[rec.dataset][rec.file], "file": rec.file})
        bar.close()
        require_kept(setup, records, summary, first_skip)
        # The sizes (and their warnings) of what training and eval get: a skipped photo is on neither side, so a
        # side whose every photo was skipped (no label files, say) reads 0, not the split file's count.
        summary.split = {s.name: side_sizes((m["file"], m["split"]) for m in meta if m["dataset"] == s.name)
                         for s in setup.specs}
        info = {"classes": list(vocab.classes), "box_strategy": setup.box_strategy, "mask_values": [0, 1],
                "fingerprint": summary.fingerprint, "split_file": summary.split_file}
        listed = build_split(setup, listed_records(records, skipped))
        for writer in writers.values():  # every size complete before any old cache is replaced
            writer.seal(meta, info)
        for size, writer in writers.items():
            summary.caches[size] = str(writer.publish())
        return listed
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def prepare(
    setup: DataSetup,
    sizes: list[int],
    out_dir: str | Path,
    split_file: Path | None = None,
    workers: int = 2,
    progress: bool = True,
) -> PrepareSummary:
    """Rasterise, split and cache every configured dataset; returns the summary (also written as JSON).

    Everything that can be checked is checked before any writing (data folders, COCO files, output folder,
    split file, free space); the split file is written only after every cache was published."""
    check_sizes(sizes)
    out_dir = ensure_writable_dir(out_dir)
    target = check_split_target(split_file or setup.split_file)
    records = collect_records(setup)
    require_images(setup, records)
    require_label_folders(setup)
    split = build_split(setup, records)  # the side of every image, for the caches (a side depends on its name alone)
    summary = PrepareSummary(split=split_sizes(split), split_file=str(target),
                             fingerprint=fingerprint(records, setup.box_strategy), config=str(setup.config_path))
    summary.issues += coco_file_issues(setup, records)
    summary.orphans = [str(p) for spec in setup.specs if spec.format == "yolo" for p in orphan_labels(spec)]
    check_free_space(out_dir, sum(map(len, records.values())), sizes)
    # SIGTERM ends the run as Ctrl-C does: through the cleanup that removes the half-written work folders (their
    # disk space reserved up front: gigabytes at --sizes 512).
    with sigterm_as_interrupt():
        listed = _write_caches(setup, records, split, sizes, out_dir, summary, workers, progress)
    write_split(target, listed, setup.seed, setup.val_fraction)
    (out_dir / "prepare_summary.json").write_text(json.dumps(summary.as_dict(), indent=1) + "\n", encoding="utf-8")
    return summary


def records_in_split(setup: DataSetup, side: str, skip_missing: bool = False) -> dict[str, list[ImageRecord]]:
    """Each dataset's records on one side ('train' or 'val') of the split file (computed if it is absent).

    The one way every consumer (training pack, INT8 calibration, evaluation scripts) picks a split side.
    Images the split file does not list are on neither side; their count is reported on stderr.
    """
    specs = [s for s in setup.specs if s.root.is_dir()] if skip_missing else setup.specs
    records = collect_records(DataSetup(specs, setup.box_strategy, setup.split_file, setup.val_fraction,
                                        setup.seed, setup.config_path))
    split = (read_split(setup.split_file) if setup.split_file.is_file()
             else build_split(setup, split_records(records)[0]))
    warn_unassigned(unassigned_images(split, records), setup.split_file)
    return {ds: [r for r in recs if split.get(ds, {}).get(r.file) == side] for ds, recs in records.items()}
