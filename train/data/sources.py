"""Enumerate the labelled images of every configured dataset, with their masks' class and split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from drywallqa.imageio import (  # one list of endings for all
    IMAGE_SUFFIXES,
    READ_SUFFIXES,
    without_heif_copies,
)
from drywallqa.paths import PROJECT_ROOT

__all__ = ["IMAGE_SUFFIXES", "READ_SUFFIXES", "DEFAULT_YOLO_CLASS_IDS", "DatasetSpec", "ImageRecord",
           "load_data_config", "dataset_specs", "image_files", "images_in_subfolders", "yolo_dirs", "yolo_records",
           "orphan_labels"]


# A YOLO export of one class numbers it 0; a dataset's `class_ids` in the data config overrides this.
DEFAULT_YOLO_CLASS_IDS = (0,)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: Path
    splits: tuple[str, ...]
    format: str
    class_name: str
    class_ids: tuple[int, ...] | None = None  # label class ids that mean `class_name`; None: the format's default


@dataclass(frozen=True)
class ImageRecord:
    dataset: str
    class_name: str
    image_path: Path
    label_path: Path
    class_ids: tuple[int, ...] | None = None  # accepted label class ids; None: any

    @property
    def image_id(self) -> str:
        return self.image_path.stem


def load_data_config(path: str | Path | None = None) -> dict:
    path = Path(path) if path else PROJECT_ROOT / "configs" / "data.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _class_ids(value: object) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"class_ids must be a list of whole numbers >= 0, got {value!r}")
    return tuple(value)


def dataset_specs(config: dict, root: Path | None = None) -> list[DatasetSpec]:
    root = root or PROJECT_ROOT
    specs = []
    for d in config["datasets"]:
        ds_root = Path(d["root"])
        if not ds_root.is_absolute():
            ds_root = (root / ds_root).resolve()
        splits = d.get("splits", ["train"])
        splits = (splits,) if isinstance(splits, str) else tuple(splits)
        specs.append(DatasetSpec(d["name"], ds_root, splits, d.get("format", "yolo"), d["class"],
                                 _class_ids(d.get("class_ids"))))
    return specs


def image_files(folder: Path) -> list[Path]:
    """Sorted image files of a folder (endings as `READ_SUFFIXES`, HEIC/HEIF photos included, any case)."""
    return without_heif_copies(sorted(p for p in folder.iterdir()
                                      if p.suffix.lower() in READ_SUFFIXES and p.is_file()))


def images_in_subfolders(folder: Path) -> list[Path]:
    """Image files below a folder's subfolders, which `image_files` does not read (ids and the split are by file
    name, which two subfolders may share): listed so that they are reported, not dropped without a word."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.parent != folder and p.suffix.lower() in READ_SUFFIXES
                  and not _hidden_below(p, folder) and p.is_file())


def _hidden_below(path: Path, folder: Path) -> bool:
    """Whether a part of `path` below `folder` is hidden or macOS's resource-fork folder (`.cache`, `._IMG.jpg`,
    `__MACOSX`): not photos anyone meant to train on."""
    return any(part.startswith(".") or part == "__MACOSX" for part in path.relative_to(folder).parts)


def yolo_dirs(spec: DatasetSpec, split: str) -> tuple[Path, Path]:
    """A YOLO split's image and label folders: `<root>/<split>/images` and `<root>/<split>/labels`."""
    return spec.root / split / "images", spec.root / split / "labels"


def yolo_records(spec: DatasetSpec) -> list[ImageRecord]:
    """One record per image of `<root>/<split>/images/`; its label is `<root>/<split>/labels/<stem>.txt`."""
    records = []
    class_ids = spec.class_ids or DEFAULT_YOLO_CLASS_IDS
    for split in spec.splits:
        image_dir, label_dir = yolo_dirs(spec, split)
        if not image_dir.is_dir():
            raise FileNotFoundError(f"no image folder {image_dir}")
        for img in image_files(image_dir):
            records.append(ImageRecord(spec.name, spec.class_name, img, label_dir / f"{img.stem}.txt", class_ids))
    return records


def orphan_labels(spec: DatasetSpec) -> list[Path]:
    """YOLO label files with no image of the same stem (a renamed or deleted image, a wrong suffix)."""
    orphans = []
    for split in spec.splits:
        image_dir, label_dir = yolo_dirs(spec, split)
        if not (image_dir.is_dir() and label_dir.is_dir()):
            continue
        stems = {p.stem for p in image_files(image_dir)}
        orphans += sorted(p for p in label_dir.glob("*.txt") if p.stem not in stems)
    return orphans
