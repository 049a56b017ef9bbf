"""Offline review: pair a folder of images with a folder of predicted masks and draw the masks on them.

Mask files follow the contract in drywallqa/masks.py: `<imageID>__<prompt_with_underscores>.png`.
Only folders under the configured review roots may be opened (the page takes folder paths as parameters).
"""

from __future__ import annotations

import csv
import functools
import glob
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from drywallqa.edge.render import shrink_to
from drywallqa.findings import KEY_FIELDS as REPORT_KEY_FIELDS
from drywallqa.imageio import (
    READ_SUFFIXES,
    ImageReadError,
    read_image_rgb,
    tiff_size,
    without_heif_copies,
)
from drywallqa.masks import MASK_SUFFIX, SEPARATOR, read_mask
from drywallqa.vocab import load_vocabulary

# Those a browser shows as they are; any other (HEIC, TIFF) is shown as a JPEG the dashboard renders.
BROWSER_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".gif"})

CLASS_COLORS_RGB = {"crack": (255, 40, 40), "taping": (40, 140, 255)}
OTHER_COLOR_RGB = (255, 200, 0)


class ReviewError(ValueError):
    """A review request that cannot be served (folder missing, outside the allowed roots, bad file)."""


@dataclass
class MaskFile:
    prompt_part: str
    class_name: str | None
    path: Path


@dataclass
class ReviewItem:
    image_id: str
    image: Path
    masks: list[MaskFile] = field(default_factory=list)


@dataclass
class ReviewListing:
    items: list[ReviewItem]
    orphan_masks: list[Path]  # masks whose image ID matches no image
    unnamed: list[Path] = field(default_factory=list)  # names that are not UTF-8: a page or a URL cannot carry them


def _utf8_name(path: Path) -> bool:
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:  # a byte file name Python holds as surrogates
        return False
    return True


def resolve_under(path: str, roots: list[Path], want_dir: bool) -> Path:
    """Resolve `path` (absolute, or relative to the first root) and require it to lie under a root."""
    if not path:
        raise ReviewError("no path given")
    if not roots:
        raise ReviewError("review is disabled: start the dashboard with --review-root DIR")
    try:
        candidate = Path(path).expanduser()
        if not candidate.is_absolute():
            candidate = roots[0] / candidate
        candidate = candidate.resolve()
    except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, '~nosuchuser', a symlink loop
        raise ReviewError(f"{path!r} is not a usable path: {exc}") from exc
    if not any(candidate == r or r in candidate.parents for r in roots):
        raise ReviewError(f"{path} is outside the review roots ({', '.join(str(r) for r in roots)})")
    if want_dir and not candidate.is_dir():
        raise ReviewError(f"{path} is not a folder")
    if not want_dir and not candidate.is_file():
        raise ReviewError(f"{path} is not a file")
    return candidate


def _class_by_part() -> dict[str, str]:
    """Mask file name part -> class, for the packaged prompts and the class names (`--prompt taping`). A mask named
    after a site's alias is classified by the findings report beside it (`_reported_classes`), else unclassified."""
    return load_vocabulary().class_by_filename_part


def _reported_classes(masks_dir: Path) -> dict[str, str]:
    """Mask file name -> class, from the findings CSVs (`predict --report`) in the masks folder. A report records
    the class of every prompt it ran, a site's aliases (`predict --alias`) included, which a file name cannot tell."""
    stamped = []
    for report in masks_dir.glob("*.csv"):
        try:
            st = report.stat()
        except OSError:
            continue
        stamped.append((st.st_mtime_ns, report.name, report, st.st_size))
    found: dict[str, str] = {}
    for mtime_ns, _, report, size in sorted(stamped):  # the newest report has the last word on a mask
        found.update(_read_report(report, mtime_ns, size))
    return found


@functools.lru_cache(maxsize=16)  # read again only when the file changes (the overlay asks once per image)
def _read_report(path: Path, mtime_ns: int, size: int) -> dict[str, str]:
    classes = set(load_vocabulary().classes)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not set(reader.fieldnames or ()) >= REPORT_KEY_FIELDS:
                return {}  # some other CSV
            return {row["mask_file"]: row["class_name"] for row in reader
                    if row["mask_file"] and row["class_name"] in classes}
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}  # unreadable: its masks are still shown, unclassified


def list_review(images_dir: Path, masks_dir: Path | None) -> ReviewListing:
    found = without_heif_copies(
        sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in READ_SUFFIXES))
    unnamed: list[Path] = []
    items: dict[str, ReviewItem] = {}
    for p in found:
        if not _utf8_name(p):
            unnamed.append(p)
        else:
            items.setdefault(p.stem, ReviewItem(p.stem, p))  # 'a.jpg' before 'a.png', as find_item picks
    orphans: list[Path] = []
    if masks_dir is not None:
        classes, reported = _class_by_part(), _reported_classes(masks_dir)
        for mask in sorted(masks_dir.glob(f"*{SEPARATOR}*{MASK_SUFFIX}")):
            if not _utf8_name(mask):
                unnamed.append(mask)
                continue
            image_id, part = mask.name[: -len(MASK_SUFFIX)].rsplit(SEPARATOR, 1)
            item = items.get(image_id)
            if item is None:
                orphans.append(mask)
            else:
                item.masks.append(MaskFile(part, reported.get(mask.name) or classes.get(part), mask))
    return ReviewListing(list(items.values()), orphans, unnamed)


def find_item(images_dir: Path, masks_dir: Path | None, image_id: str) -> ReviewItem:
    """One image and its masks, without listing the whole folders (called once per overlay request)."""
    if not image_id or "/" in image_id or image_id.startswith("."):
        raise ReviewError(f"bad image ID {image_id!r}")
    candidates = without_heif_copies(sorted(
        p
        for p in images_dir.glob(glob.escape(image_id) + ".*")
        # 'a.*' also matches 'a.b.jpg', the image with ID 'a.b': keep only this ID's own files
        if p.stem == image_id and p.is_file() and p.suffix.lower() in READ_SUFFIXES
    ))
    if not candidates:
        raise ReviewError(f"no image with ID {image_id!r} in {images_dir}")
    item = ReviewItem(image_id, candidates[0])
    if masks_dir is not None:
        classes, reported = _class_by_part(), _reported_classes(masks_dir)
        for mask in sorted(masks_dir.glob(glob.escape(image_id + SEPARATOR) + "*" + MASK_SUFFIX)):
            part = mask.name[len(image_id) + len(SEPARATOR) : -len(MASK_SUFFIX)]
            if SEPARATOR not in part:  # 'a__b__c.png' belongs to image 'a__b', not 'a'
                item.masks.append(MaskFile(part, reported.get(mask.name) or classes.get(part), mask))
    return item


def _header_size_bands(path: Path, oriented: bool) -> tuple[tuple[int, int], int]:
    """(width, height) and channel count from the file's header alone (no pixel decoding)."""
    with warnings.catch_warnings(), Image.open(path) as im:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        (w, h), bands = im.size, 3 if im.mode == "P" else len(im.getbands())  # OpenCV expands a palette
        if oriented and im.getexif().get(0x0112) in (5, 6, 7, 8):  # read_image_rgb turns these by 90 degrees
            w, h = h, w
    return (w, h), bands


def _shape_problems(name: str, bands: int, mask_wh: tuple[int, int], image_wh: tuple[int, int]) -> list[str]:
    """How a mask's channels and size break the contract, in the words both the page and the overlay use."""
    problems = [f"{name}: has {bands} channels, expected 1"] if bands != 1 else []
    if mask_wh != image_wh:
        problems.append(f"{name}: size {mask_wh[0]}x{mask_wh[1]} differs from image {image_wh[0]}x{image_wh[1]}")
    return problems


def mask_problems(item: ReviewItem) -> list[str]:
    """What render_overlay would report (unreadable, not single-channel, wrong size), from the file headers only:
    cheap enough for every image of a listing page, where the overlay's own report (a response header) is not
    seen."""
    if not item.masks:
        return []
    try:
        (w, h), _ = _header_size_bands(item.image, oriented=True)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        size = tiff_size(item.image) if isinstance(exc, UnidentifiedImageError) else None
        if size is None:  # read_image_rgb decodes the TIFFs PIL cannot open (float, signed) with OpenCV
            return [f"{item.image.name}: cannot read image"]
        w, h = size
    problems: list[str] = []
    for mask_file in item.masks:
        name = mask_file.path.name
        try:
            (mw, mh), bands = _header_size_bands(mask_file.path, oriented=False)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            problems.append(f"{name}: cannot read mask")
            continue
        problems += _shape_problems(name, bands, (mw, mh), (w, h))
    return problems


def render_overlay(item: ReviewItem, max_side: int = 1024, alpha: float = 0.45,
                   plain: bool = False) -> tuple[bytes, list[str]]:
    """JPEG of the image with every mask tinted by class and outlined (`plain`: the image alone, for a format a
    browser cannot show); also a list of per-mask problems."""
    try:
        image = read_image_rgb(item.image)
    except ImageReadError as exc:
        raise ReviewError(str(exc)) from exc
    h, w = image.shape[:2]
    out = image.astype(np.float32)
    outlines: list[tuple[np.ndarray, tuple[int, int, int]]] = []
    problems: list[str] = []
    for mask_file in [] if plain else item.masks:
        try:
            mask = read_mask(mask_file.path)
        except OSError:
            problems.append(f"{mask_file.path.name}: cannot read mask")  # the name only, not where it lies
            continue
        problems += _shape_problems(mask_file.path.name, mask.shape[2] if mask.ndim == 3 else 1,
                                    (mask.shape[1], mask.shape[0]), (w, h))
        if mask.ndim == 3:
            mask = mask[..., 0]
        if mask.shape != (h, w):
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        on = mask > 127
        color = CLASS_COLORS_RGB.get(mask_file.class_name or "", OTHER_COLOR_RGB)
        out[on] = out[on] * (1 - alpha) + np.array(color, np.float32) * alpha
        outlines.append((on.astype(np.uint8), color))
    result = out.round().clip(0, 255).astype(np.uint8)
    for on, color in outlines:
        contours, _ = cv2.findContours(on, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(result, contours, -1, color, max(1, round(max(h, w) / 400)))
    result = shrink_to(result, max_side)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(result, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ReviewError(f"cannot encode overlay for {item.image.name}")
    return buf.tobytes(), problems
