"""Pack one side of the split (training by default) into compact JPEG/PNG blobs (< 64 MiB per part) for a lent GPU machine.

Unreadable images and images without usable labels are skipped and listed on stderr, as `data prepare` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from drywallqa.argtypes import positive_int
from drywallqa.train.data.cache import MAX_CACHE_SIZE, resize_pair
from drywallqa.train.data.errors import DataError
from drywallqa.train.data.prepare import load_labelled, load_setup, records_in_split
from drywallqa.train.data.sources import ImageRecord
from drywallqa.vocab import load_vocabulary


class SkippedImage(ValueError):
    """An image `load_labelled` skipped; the message is its reason."""


def encode(record: ImageRecord, fmt: str, size: int, quality: int, box_strategy: str) -> tuple[bytes, bytes]:
    """(JPEG of the image, PNG of the {0, 255} mask) at size x size; SkippedImage when it cannot be used."""
    ex = load_labelled(record, fmt, box_strategy)
    if ex.image is None or ex.mask is None:
        raise SkippedImage(ex.skipped)
    image, mask01 = resize_pair(ex.image, ex.mask, size)  # the same resize as the `data prepare` caches
    jpg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
    png = cv2.imencode(".png", mask01 * 255, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1]
    return jpg.tobytes(), png.tobytes()


def try_encode(record: ImageRecord, fmt: str, size: int, quality: int, box_strategy: str) -> tuple[bytes, bytes] | str:
    """The blobs, or the reason the image was skipped."""
    try:
        return encode(record, fmt, size, quality, box_strategy)
    except SkippedImage as exc:
        return str(exc)


def encode_all(records: list[ImageRecord], formats: dict[str, str], size: int, quality: int,
               box_strategy: str) -> tuple[list[ImageRecord], list[tuple[bytes, bytes]], list[str]]:
    """(records kept, their blobs, skip reasons), in the records' order."""
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: try_encode(r, formats[r.dataset], size, quality, box_strategy), records))
    kept = [(r, b) for r, b in zip(records, results, strict=True) if not isinstance(b, str)]
    skipped = [b for b in results if isinstance(b, str)]
    return [r for r, _ in kept], [b for _, b in kept], skipped


def write_parts(out: Path, records: list[ImageRecord], blobs: list[tuple[bytes, bytes]], parts: int) -> None:
    classes = list(load_vocabulary().classes)
    out.mkdir(parents=True, exist_ok=True)
    for part in range(parts):
        idx = list(range(part, len(records), parts))
        jpg = [blobs[i][0] for i in idx]
        png = [blobs[i][1] for i in idx]
        d = out / f"part{part}"
        d.mkdir(exist_ok=True)
        np.save(d / "jpg.npy", np.frombuffer(b"".join(jpg), np.uint8))
        np.save(d / "jpg_len.npy", np.array([len(b) for b in jpg], np.int64))
        np.save(d / "png.npy", np.frombuffer(b"".join(png), np.uint8))
        np.save(d / "png_len.npy", np.array([len(b) for b in png], np.int64))
        meta = [{"id": records[i].image_id, "dataset": records[i].dataset,
                 "class": classes.index(records[i].class_name)} for i in idx]
        (d / "meta.json").write_text(json.dumps(meta))
        print(part, len(idx), sum(map(len, jpg)) / 2**20, "MiB jpg", sum(map(len, png)) / 2**20, "MiB png")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m drywallqa.train.data.pack")
    ap.add_argument("--out", default=".gpu")
    ap.add_argument("--size", type=positive_int, default=512)
    ap.add_argument("--quality", type=positive_int, default=72)
    ap.add_argument("--parts", type=positive_int, default=3)
    ap.add_argument("--split", choices=["train", "val"], default="train")
    ap.add_argument("--config", default=None, help="data config (default: configs/data.yaml)")
    args = ap.parse_args(argv)
    if args.size > MAX_CACHE_SIZE:
        ap.error(f"--size must be at most {MAX_CACHE_SIZE}")
    try:
        setup = load_setup(args.config)
        formats = {spec.name: spec.format for spec in setup.specs}
        records = [r for recs in records_in_split(setup, args.split).values() for r in recs]
    except DataError as exc:
        print(f"pack: error: {exc}", file=sys.stderr)
        return 2
    kept, blobs, skipped = encode_all(records, formats, args.size, args.quality, setup.box_strategy)
    for reason in skipped:
        print(f"pack: skipped {reason}", file=sys.stderr)
    print(f"packed {len(kept)} images, skipped {len(skipped)}", file=sys.stderr)
    write_parts(Path(args.out), kept, blobs, args.parts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
