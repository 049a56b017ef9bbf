"""Deterministic train/validation split grouped by base photo.

Roboflow names every augmented variant of one photo `<base>_jpg.rf.<hash>.jpg`; all variants of a base
land on the same side, so validation measures skill, not memory.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

_RF = re.compile(r"^(?P<base>.+?)_(?:jpg|jpeg|png|bmp|webp)\.rf\.[0-9a-f]+$", re.IGNORECASE)


def base_name(filename: str) -> str:
    """'00002_jpg.rf.4edd53.jpg' -> '00002'; names without the Roboflow suffix are their own base."""
    stem = Path(filename).stem
    match = _RF.match(stem)
    return match.group("base") if match else stem


def _bucket(dataset: str, base: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{dataset}:{base}".encode()).hexdigest()
    return int(digest[:12], 16) / float(1 << 48)


def grouped_split(dataset: str, filenames: Iterable[str], val_fraction: float = 0.15, seed: int = 0) -> dict[str, str]:
    """Map each file name to 'train' or 'val' by hashing its base name (stable under added files)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    return {f: ("val" if _bucket(dataset, base_name(f), seed) < val_fraction else "train") for f in filenames}


def write_split(path: str | Path, split: dict[str, dict[str, str]], seed: int, val_fraction: float) -> None:
    """split: dataset -> {file name -> 'train'|'val'}; written sorted so the file diffs cleanly."""
    payload = {
        "seed": seed,
        "val_fraction": val_fraction,
        "grouping": "roboflow base photo (<base>_jpg.rf.<hash>)",
        "datasets": {ds: dict(sorted(files.items())) for ds, files in sorted(split.items())},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


class SplitFileError(ValueError):
    """A split file that is not one `write_split` wrote; the message names the file."""


def read_split(path: str | Path) -> dict[str, dict[str, str]]:
    """dataset -> {file name -> 'train'|'val'}, from a file `write_split` wrote."""
    try:
        datasets = json.loads(Path(path).read_text(encoding="utf-8"))["datasets"]
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


def split_sizes(split: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:
    """dataset -> {'train': images, 'val': images, 'train_bases': n, 'val_bases': n}."""
    out: dict[str, dict[str, int]] = {}
    for dataset, files in split.items():
        row = {"train": 0, "val": 0, "train_bases": 0, "val_bases": 0}
        bases: dict[str, set[str]] = {"train": set(), "val": set()}
        for name, side in files.items():
            row[side] = row.get(side, 0) + 1
            bases.setdefault(side, set()).add(base_name(name))
        row["train_bases"], row["val_bases"] = len(bases["train"]), len(bases["val"])
        out[dataset] = row
    return out


def files_in_split(split: dict[str, dict[str, str]], dataset: str, side: str) -> list[str]:
    """Sorted file names of one dataset on one side ('train' or 'val')."""
    if dataset not in split:
        raise KeyError(f"dataset {dataset!r} is not in the split file (known: {sorted(split)}); "
                       f"run `drywallqa data split`")
    return sorted(f for f, s in split[dataset].items() if s == side)
