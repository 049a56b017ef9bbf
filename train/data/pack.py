"""Pack one side of the split (training by default) into compact JPEG/PNG blobs (< 64 MiB per part) for a lent GPU machine."""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from drywallqa.train.data.cache import resize_pair
from drywallqa.train.data.prepare import load_labelled, load_setup, records_in_split
from drywallqa.vocab import load_vocabulary


def encode(record, fmt: str, size: int, quality: int, box_strategy: str):
    ex = load_labelled(record, fmt, box_strategy)
    if ex.image is None:
        raise ValueError(ex.skipped)
    image, mask01 = resize_pair(ex.image, ex.mask, size)  # the same resize as the `data prepare` caches
    jpg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
    png = cv2.imencode(".png", mask01 * 255, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1]
    return jpg.tobytes(), png.tobytes()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".gpu")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--quality", type=int, default=72)
    ap.add_argument("--parts", type=int, default=3)
    ap.add_argument("--split", choices=["train", "val"], default="train")
    args = ap.parse_args()
    setup = load_setup(None)
    classes = list(load_vocabulary().classes)
    formats = {spec.name: spec.format for spec in setup.specs}
    records = [r for recs in records_in_split(setup, args.split).values() for r in recs]
    with ThreadPoolExecutor(4) as pool:
        blobs = list(pool.map(lambda r: encode(r, formats[r.dataset], args.size, args.quality, setup.box_strategy),
                              records))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for part in range(args.parts):
        idx = list(range(part, len(records), args.parts))
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


if __name__ == "__main__":
    main()
