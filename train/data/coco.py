"""Read COCO JSON annotations (polygons, RLE incl. compressed RLE, boxes) into `LabelObject`s.

Coordinates follow COCO: pixel (0, 0) covers [0, 1) x [0, 1), the same convention `labels.rasterize`
uses for YOLO polygons, so one object labelled in either format gives the identical mask.
RLE is column-major (Fortran order) run lengths starting with a run of zeros; the compressed string
form is the LEB128-like encoding of pycocotools (implemented here; no pycocotools dependency).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drywallqa.train.data.errors import DataError
from drywallqa.train.data.labels import LabelIssue, LabelObject, ParsedLabels, parse_class_id
from drywallqa.train.data.sources import DatasetSpec, ImageRecord, image_files

COCO_ANNOTATION_NAMES = ("_annotations.coco.json", "annotations.json")


def rle_string_to_counts(text: str) -> list[int]:
    """Decode pycocotools' compressed RLE string into run lengths."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                raise ValueError("truncated compressed RLE string")
            c = ord(text[pos]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {text[pos]!r} in compressed RLE")
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and (c & 0x10):
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def counts_to_rle_string(counts: list[int]) -> str:
    """Encode run lengths as pycocotools' compressed RLE string (the inverse of `rle_string_to_counts`)."""
    out = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE ({'size': [h, w], 'counts': list or compressed str}) -> bool mask H x W."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"RLE needs 'size' [h, w] and 'counts': {exc}") from exc
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = rle_string_to_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(r < 0 for r in runs):
        raise ValueError("negative run length in RLE")
    if sum(runs) != h * w:
        raise ValueError(f"RLE run lengths sum to {sum(runs)}, expected h*w = {h * w}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((w, h)).T.copy()  # column-major


def encode_rle(mask: np.ndarray) -> dict:
    """bool/uint8 mask H x W -> uncompressed COCO RLE (used by tests and tools)."""
    flat = np.asarray(mask).astype(bool).T.reshape(-1)
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


@dataclass
class CocoFile:
    """One COCO annotation file: images by file name and their annotations' objects."""

    path: Path
    images: dict[str, dict] = field(default_factory=dict)  # file_name -> image entry
    objects: dict[str, ParsedLabels] = field(default_factory=dict)  # file_name -> parsed objects
    issues: list[LabelIssue] = field(default_factory=list)  # problems not tied to a listed image


def parse_annotation(ann: dict, height: int, width: int) -> list[LabelObject]:
    """One COCO annotation -> objects (a polygon annotation may hold several parts)."""
    class_id = parse_class_id(float(ann.get("category_id", 0)))
    seg = ann.get("segmentation")
    if isinstance(seg, list) and seg:
        objects = []
        for part in seg:
            coords = [float(v) for v in part]
            if len(coords) < 6 or len(coords) % 2:
                raise ValueError(f"polygon needs an even count >= 6 of values, got {len(coords)}")
            if not np.all(np.isfinite(coords)):
                raise ValueError("non-finite polygon coordinate")
            objects.append(LabelObject(class_id, "polygon", np.asarray(coords, np.float64).reshape(-1, 2)))
        return objects
    if isinstance(seg, dict):
        mask = decode_rle(seg)
        if mask.shape != (height, width):
            raise ValueError(f"RLE size {list(mask.shape)} differs from image size {[height, width]}")
        return [LabelObject(class_id, "mask", mask)]
    bbox = ann.get("bbox")
    if bbox is not None:
        x, y, w, h = (float(v) for v in bbox)
        if not np.all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
            raise ValueError(f"bad bbox {bbox}")
        return [LabelObject(class_id, "box", np.array([x, y, x + w, y + h]))]
    raise ValueError("annotation has neither segmentation nor bbox")


def _image_entry(im: dict) -> dict:
    """An 'images' entry with the fields this reader uses; KeyError, TypeError or ValueError otherwise."""
    int(im["height"]) + int(im["width"])
    if not isinstance(im["file_name"], str):
        raise TypeError(f"file_name must be a string, got {im['file_name']!r}")
    return im


def read_coco(path: str | Path) -> CocoFile:
    """Parse a COCO JSON file; bad annotations are reported (file and annotation index) and skipped.

    A file that is not COCO JSON (truncated, no 'images' table, an image without id, file_name, height and
    width) raises DataError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = {int(im["id"]): _image_entry(im) for im in data["images"]}
        annotations = list(data.get("annotations", []))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"cannot read COCO annotations {path}: {type(exc).__name__}: {exc}; fix or re-export "
                        f"the file") from exc
    out = CocoFile(path)
    for im in images.values():
        out.images[im["file_name"]] = im
        out.objects[im["file_name"]] = ParsedLabels()
    for index, ann in enumerate(annotations):
        try:
            im = images[int(ann["image_id"])]
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            out.issues.append(LabelIssue(str(path), index, f"annotation refers to unknown image_id {image_id!r}"))
            continue
        labels = out.objects[im["file_name"]]
        try:
            labels.objects.extend(parse_annotation(ann, int(im["height"]), int(im["width"])))
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            labels.issues.append(LabelIssue(str(path), index, f"malformed annotation id={ann.get('id')}: {exc}"))
    return out


def coco_annotation_file(split_dir: Path) -> Path:
    for name in COCO_ANNOTATION_NAMES:
        if (split_dir / name).is_file():
            return split_dir / name
    raise FileNotFoundError(f"no COCO annotation file ({' or '.join(COCO_ANNOTATION_NAMES)}) in {split_dir}")


def coco_image_dir(split_dir: Path) -> Path:
    """A COCO split keeps its images in `images/` when there is one, else beside the annotation file."""
    return split_dir / "images" if (split_dir / "images").is_dir() else split_dir


def coco_records(spec: DatasetSpec) -> list[ImageRecord]:
    """Images of a COCO dataset (`<root>/<split>/` with `_annotations.coco.json`, Roboflow's layout).

    The record's label_path is the annotation file; `labels_for_record` picks the image's objects. A record is named,
    as a YOLO one is, by its path below the image folder (whose subfolders are read too): its id, split key and COCO
    `file_name`. By file name alone, two photos of one name were one id and one split key, and each took the objects
    of the one listed under that name.
    """
    records = []
    for split in spec.splits:
        split_dir = spec.root / split
        ann = coco_annotation_file(split_dir)
        image_dir = coco_image_dir(split_dir)
        for img in image_files(image_dir):
            records.append(ImageRecord(spec.name, spec.class_name, img, ann, name=img.relative_to(image_dir).as_posix()))
    return records


_CACHE: dict[Path, CocoFile] = {}


def load_coco_cached(annotation_path: str | Path) -> CocoFile:
    path = Path(annotation_path).resolve()
    coco = _CACHE.get(path)
    if coco is None or coco_mtime(path) != _MTIMES.get(path):
        coco = _CACHE[path] = read_coco(path)
        _MTIMES[path] = coco_mtime(path)
    return coco


def coco_mtime(path: Path) -> float:
    return path.stat().st_mtime_ns


_MTIMES: dict[Path, float] = {}


def labels_for_image(annotation_path: str | Path, file_name: str, height: int, width: int) -> ParsedLabels:
    """Objects of one image from a (cached) COCO file; an image absent from the file is an issue.

    The note "annotation index" in issues is the position in the file's `annotations` list.
    """
    path = Path(annotation_path)
    coco = load_coco_cached(path)
    labels = coco.objects.get(file_name)
    if labels is None:
        return ParsedLabels(issues=[LabelIssue(str(path), 0, f"image {file_name!r} is not listed in the file",
                                               fatal=True)])
    entry = coco.images[file_name]
    if (int(entry["height"]), int(entry["width"])) != (height, width):
        return ParsedLabels(issues=[LabelIssue(
            str(path), 0, f"image {file_name!r} is {width}x{height} but the file says "
            f"{entry['width']}x{entry['height']}", fatal=True)])
    return labels
