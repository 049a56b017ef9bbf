"""Enumerate the labelled images of every configured dataset, with their masks' class and split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from drywallqa.imageio import (  # one list of endings for all
    IMAGE_SUFFIXES,
    READ_SUFFIXES,
    without_heif_copies,
)
from drywallqa.paths import PROJECT_ROOT

__all__ = ["IMAGE_SUFFIXES", "READ_SUFFIXES", "DEFAULT_YOLO_CLASS_IDS", "SUBFOLDER_SEPARATOR", "DatasetSpec",
           "ImageRecord", "MissingSplitError", "load_data_config", "dataset_specs", "image_files", "label_files",
           "yolo_dirs", "yolo_splits", "missing_split", "yolo_records", "orphan_labels"]


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


# A photo in a subfolder of its image folder gets the id `day2~IMG_0001` (day2/IMG_0001.jpg): ids name mask files,
# `<imageID>__<prompt>.png`, so neither `/` nor that name's `__`.
SUBFOLDER_SEPARATOR = "~"


@dataclass(frozen=True)
class ImageRecord:
    dataset: str
    class_name: str
    image_path: Path
    label_path: Path
    class_ids: tuple[int, ...] | None = None  # accepted label class ids; None: any
    name: str = ""  # the path below its image folder, `/`-separated ('day2/IMG_0001.jpg'); '': the file name

    @property
    def file(self) -> str:
        """The image's key in the split file and the cache's meta: its path below the image folder."""
        return self.name or self.image_path.name

    @property
    def label_format(self) -> str:
        """'coco' when the label is its split's COCO annotation file (JSON), else 'yolo' (one .txt per image)."""
        return "coco" if self.label_path.suffix.lower() == ".json" else "yolo"

    @property
    def image_id(self) -> str:
        return PurePosixPath(self.file).with_suffix("").as_posix().replace("/", SUBFOLDER_SEPARATOR)


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


class MissingSplitError(FileNotFoundError):
    """A configured split with no image folder in either YOLO layout; the message says what to set instead."""


def image_files(folder: Path) -> list[Path]:
    """Sorted image files below a folder, its subfolders included (endings as `READ_SUFFIXES`, HEIC/HEIF photos
    included, any case; hidden folders and `__MACOSX` left out)."""
    found = [p for p in folder.rglob("*") if p.suffix.lower() in READ_SUFFIXES and not _hidden_below(p, folder)
             and p.is_file()]
    return without_heif_copies(sorted(found, key=lambda p: p.relative_to(folder).parts))


def _hidden_below(path: Path, folder: Path) -> bool:
    """Whether a part of `path` below `folder` is hidden or macOS's resource-fork folder (`.cache`, `._IMG.jpg`,
    `__MACOSX`): not photos anyone meant to train on."""
    return any(part.startswith(".") or part == "__MACOSX" for part in path.relative_to(folder).parts)


def _stem_below(path: Path, folder: Path) -> str:
    """'day2/IMG_0001' for <folder>/day2/IMG_0001.jpg: how an image and its label file are paired."""
    return path.relative_to(folder).with_suffix("").as_posix()


def label_files(folder: Path) -> dict[str, Path]:
    """YOLO label files below a folder by `_stem_below`, ending `.txt` in any case (`.TXT` from Windows tools); a
    `.txt` wins over another case of the same name."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*"), key=lambda p: (p.suffix != ".txt", p)):
        if p.suffix.lower() == ".txt" and not _hidden_below(p, folder) and p.is_file():
            found.setdefault(_stem_below(p, folder), p)
    return found


def yolo_dirs(spec: DatasetSpec, split: str) -> tuple[Path, Path]:
    """A YOLO split's image and label folders: `<root>/<split>/images` and `<root>/<split>/labels` (Roboflow's export),
    else Ultralytics' `<root>/images/<split>` and `<root>/labels/<split>`, or a split written as a data.yaml writes it
    (`images/train`: its label folder is the path with the last `images` made `labels`, as Ultralytics reads it)."""
    roboflow = spec.root / split / "images", spec.root / split / "labels"
    if roboflow[0].is_dir():
        return roboflow
    parts = PurePosixPath(split).parts
    if "images" in parts and (spec.root / split).is_dir():
        i = len(parts) - 1 - parts[::-1].index("images")
        return spec.root / split, spec.root.joinpath(*parts[:i], "labels", *parts[i + 1:])
    ultralytics = spec.root / "images" / split, spec.root / "labels" / split
    return ultralytics if ultralytics[0].is_dir() else roboflow


def yolo_splits(root: Path) -> list[str]:
    """The split names a YOLO dataset root holds, in either layout of `yolo_dirs`."""
    if not root.is_dir():
        return []
    names = {p.name for p in root.iterdir() if (p / "images").is_dir()}
    if (root / "images").is_dir():
        names |= {p.name for p in (root / "images").iterdir() if p.is_dir()}
    return sorted(n for n in names if not n.startswith(".") and n != "__MACOSX")


def missing_split(spec: DatasetSpec, split: str) -> str:
    """Why a split has no image folder, and what to set in the data config instead."""
    tried = f"no image folder {spec.root / split / 'images'} or {spec.root / 'images' / split}"
    if not spec.root.exists():
        return f"{tried} ({spec.root} is not there); check its 'root'"
    if not spec.root.is_dir():  # an Ultralytics or Roboflow data.yaml, say
        return f"{tried}: 'root' {spec.root} is a file; set 'root' to the dataset's folder ({spec.root.parent}?)"
    images = spec.root / "images"
    if images.is_dir() and any(p.suffix.lower() in READ_SUFFIXES for p in images.iterdir()):
        return (f"{tried}: {spec.root} is one split folder (images/ and labels/); set 'root' to {spec.root.parent} "
                f"and 'splits' to [{spec.root.name}]")
    there = yolo_splits(spec.root)
    if there:
        return f"{tried}: splits [{', '.join(there)}] are there: set 'splits' to some of them"
    return (f"{tried}; a YOLO dataset holds <root>/<split>/images/ and <root>/<split>/labels/ (Roboflow), or "
            f"<root>/images/<split>/ and <root>/labels/<split>/ (Ultralytics); check its 'root' and 'splits'")


def yolo_records(spec: DatasetSpec) -> list[ImageRecord]:
    """One record per image below a split's image folder (`yolo_dirs`); its label is the `.txt` at the same path
    below the label folder (`day2/IMG_0001.jpg` -> `day2/IMG_0001.txt`)."""
    records = []
    class_ids = spec.class_ids or DEFAULT_YOLO_CLASS_IDS
    for split in spec.splits:
        image_dir, label_dir = yolo_dirs(spec, split)
        if not image_dir.is_dir():
            raise MissingSplitError(missing_split(spec, split))
        labels = label_files(label_dir)
        for img in image_files(image_dir):
            stem = _stem_below(img, image_dir)
            records.append(ImageRecord(spec.name, spec.class_name, img, labels.get(stem, label_dir / f"{stem}.txt"),
                                       class_ids, img.relative_to(image_dir).as_posix()))
    return records


def orphan_labels(spec: DatasetSpec) -> list[Path]:
    """YOLO label files with no image at the same path (a renamed or deleted image, a wrong suffix)."""
    orphans = []
    for split in spec.splits:
        image_dir, label_dir = yolo_dirs(spec, split)
        if not (image_dir.is_dir() and label_dir.is_dir()):
            continue
        stems = {_stem_below(p, image_dir) for p in image_files(image_dir)}
        orphans += sorted(p for stem, p in label_files(label_dir).items() if stem not in stems)
    return orphans
