"""Deterministic train/validation split grouped by base photo.

Roboflow names every augmented variant of one photo `<base>_<ext>.rf.<hash>.<ext>` (`_jpg`, `_png`, `_HEIC`,
`_tif`, ...; a re-exported variant gets a second `_<ext>.rf.<hash>`); all variants of a base land on the same
side, so validation measures skill, not memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from drywallqa.train.data.errors import DataError

# `<base>_<ext>.rf.<hex hash>`: the original file's extension (any letters/digits, starting with a letter).
_RF = re.compile(r"^(?P<base>.+)_[a-z][a-z0-9]*\.rf\.[0-9a-f]+$", re.IGNORECASE)


def base_name(filename: str) -> str:
    """'00002_jpg.rf.4edd53.jpg' -> '00002'; names without the Roboflow suffix are their own base.

    The suffix is stripped repeatedly: '00002_jpg.rf.a1_jpg.rf.b2.jpg' (a re-exported variant) -> '00002'. A photo in
    a subfolder ('day2/00002_jpg.rf.c3.jpg') is grouped by its file name alone, so variants (or copies) sorted into
    two subfolders stay on one side."""
    stem = Path(filename).stem
    while (match := _RF.match(stem)) is not None:
        stem = match.group("base")
    return stem


def _bucket(dataset: str, base: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{dataset}:{base}".encode()).hexdigest()
    return int(digest[:12], 16) / float(1 << 48)


def grouped_split(dataset: str, filenames: Iterable[str], val_fraction: float = 0.15, seed: int = 0) -> dict[str, str]:
    """Map each file name to 'train' or 'val' by hashing its base name (stable under added files)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    return {f: ("val" if _bucket(dataset, base_name(f), seed) < val_fraction else "train") for f in filenames}


class SplitFileError(DataError):
    """A split file that cannot be read or written; the message names the file."""


def split_text(split: dict[str, dict[str, str]], seed: int, val_fraction: float) -> str:
    """The split file's content: sorted so the file diffs cleanly."""
    payload = {
        "seed": seed,
        "val_fraction": val_fraction,
        "grouping": "roboflow base photo (<base>_jpg.rf.<hash>)",
        "datasets": {ds: dict(sorted(files.items())) for ds, files in sorted(split.items())},
    }
    return json.dumps(payload, indent=1) + "\n"


def check_split_target(path: str | Path) -> Path:
    """Raise SplitFileError unless a split file can be written at `path` (checked before any work is done)."""
    path = Path(path)
    if path.is_dir():
        raise SplitFileError(f"split file {path} is a folder; give a file path such as {path / 'split.json'}")
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise SplitFileError(f"cannot write the split file {path}: {folder} is not a writable folder; choose "
                             f"another --split-file")
    return path


def write_split(path: str | Path, split: dict[str, dict[str, str]], seed: int, val_fraction: float) -> None:
    """split: dataset -> {file name -> 'train'|'val'}; replaced atomically, never left half-written."""
    path = Path(path)
    staged = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staged.write_text(split_text(split, seed, val_fraction), encoding="utf-8")
        os.replace(staged, path)
    except OSError as exc:
        if staged.parent.is_dir():
            staged.unlink(missing_ok=True)
        raise SplitFileError(f"cannot write the split file {path}: {exc.strerror or exc}; choose another "
                             f"--split-file or make its folder writable") from exc


def read_split(path: str | Path) -> dict[str, dict[str, str]]:
    """dataset -> {file name -> 'train'|'val'}, from a file `write_split` wrote."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SplitFileError(f"cannot read the split file {path}: {exc.strerror or exc}; run `drywallqa data "
                             f"split` to write it") from exc
    try:
        datasets = json.loads(raw.decode("utf-8"))["datasets"]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as exc:
        raise SplitFileError(f"{path} is not a split file (JSON with a 'datasets' table, as `drywallqa data "
                             f"split` writes): {type(exc).__name__}: {exc}") from exc
    if not isinstance(datasets, dict) or not all(isinstance(v, dict) for v in datasets.values()):
        raise SplitFileError(f"{path}: 'datasets' must map each dataset to {{file name: 'train'|'val'}}")
    return datasets


def leaked_bases(split: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """dataset -> base photos that appear on more than one side (must be empty)."""
    leaks: dict[str, list[str]] = {}
    for dataset, files in split.items():
        sides: dict[str, set[str]] = {}
        for name, side in files.items():
            sides.setdefault(base_name(name), set()).add(side)
        bad = sorted(b for b, s in sides.items() if len(s) > 1)
        if bad:
            leaks[dataset] = bad
    return leaks


def side_sizes(files: Iterable[tuple[str, str]]) -> dict[str, int]:
    """{'train': images, 'val': images, 'train_bases': n, 'val_bases': n} of (file name, side) pairs, one pair per
    image: two photos of one name (in two splits of a dataset) share one entry of the split file but are two images."""
    row = {"train": 0, "val": 0, "train_bases": 0, "val_bases": 0}
    bases: dict[str, set[str]] = {"train": set(), "val": set()}
    for name, side in files:
        row[side] = row.get(side, 0) + 1
        bases.setdefault(side, set()).add(base_name(name))
    row["train_bases"], row["val_bases"] = len(bases["train"]), len(bases["val"])
    return row


def split_sizes(split: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:
    """dataset -> {'train': images, 'val': images, 'train_bases': n, 'val_bases': n}, one image per entry."""
    return {dataset: side_sizes(files.items()) for dataset, files in split.items()}


def files_in_split(split: dict[str, dict[str, str]], dataset: str, side: str) -> list[str]:
    """Sorted file names of one dataset on one side ('train' or 'val')."""
    if dataset not in split:
        raise KeyError(f"dataset {dataset!r} is not in the split file (known: {sorted(split)}); "
                       f"run `drywallqa data split`")
    return sorted(f for f, s in split[dataset].items() if s == side)
