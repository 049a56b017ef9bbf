"""Enumerate the labelled images of every configured dataset, with their masks' class and split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from drywallqa.paths import PROJECT_ROOT

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: Path
    splits: tuple[str, ...]
    format: str
    class_name: str


@dataclass(frozen=True)
class ImageRecord:
    dataset: str
    class_name: str
    image_path: Path
    label_path: Path

    @property
    def image_id(self) -> str:
        return self.image_path.stem


def load_data_config(path: str | Path | None = None) -> dict:
    path = Path(path) if path else PROJECT_ROOT / "configs" / "data.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dataset_specs(config: dict, root: Path | None = None) -> list[DatasetSpec]:
    root = root or PROJECT_ROOT
    specs = []
    for d in config["datasets"]:
        ds_root = Path(d["root"])
        if not ds_root.is_absolute():
            ds_root = (root / ds_root).resolve()
        specs.append(DatasetSpec(d["name"], ds_root, tuple(d.get("splits", ["train"])), d.get("format", "yolo"),
                                 d["class"]))
    return specs


def yolo_records(spec: DatasetSpec) -> list[ImageRecord]:
    records = []
    for split in spec.splits:
        image_dir = spec.root / split / "images"
        label_dir = spec.root / split / "labels"
        if not image_dir.is_dir():
            raise FileNotFoundError(f"dataset {spec.name!r}: no image folder {image_dir}")
        for img in sorted(image_dir.iterdir()):
            if img.suffix.lower() in IMAGE_SUFFIXES:
                records.append(ImageRecord(spec.name, spec.class_name, img, label_dir / f"{img.stem}.txt"))
    return records
