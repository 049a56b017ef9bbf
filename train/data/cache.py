"""Decoded, resized training cache: `cache/<size>/` with uint8 .npy memmaps, so no JPEG is decoded twice.

Layout (read by the trainer; keep it exactly):
  cache/<size>/images.npy  N x S x S x 3 uint8 RGB
  cache/<size>/masks.npy   N x S x S uint8 {0, 1}
  cache/<size>/meta.json   list of N {"id", "dataset", "class" (index), "class_name", "split", "file"}
  cache/<size>/info.json   size, count, classes, box strategy, data fingerprint
A cache is written into a hidden temporary folder and renamed into place at the end, so an
interrupted run never leaves a half-written cache behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
from numpy.lib.format import open_memmap


def resize_pair(image: np.ndarray, mask255: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 and {0,255} mask at native size -> size x size image and {0,1} mask (area-averaged)."""
    img = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    m = cv2.resize(mask255, (size, size), interpolation=cv2.INTER_AREA)
    return img, (m >= 128).astype(np.uint8)


class CacheWriter:
    """Writes one size's cache; rows are appended in order with `put`, then `finish` publishes it."""

    def __init__(self, out_dir: str | Path, size: int, capacity: int) -> None:
        self.size = int(size)
        self.final = Path(out_dir) / str(self.size)
        self.tmp = Path(out_dir) / f".{self.size}.partial"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        cap = max(int(capacity), 1)
        self.images = open_memmap(self.tmp / "images.npy", "w+", np.uint8, (cap, self.size, self.size, 3))
        self.masks = open_memmap(self.tmp / "masks.npy", "w+", np.uint8, (cap, self.size, self.size))
        self.count = 0

    def put(self, image: np.ndarray, mask01: np.ndarray) -> int:
        if image.shape != (self.size, self.size, 3) or mask01.shape != (self.size, self.size):
            raise ValueError(f"cache {self.size}: got image {image.shape} and mask {mask01.shape}")
        self.images[self.count] = image
        self.masks[self.count] = mask01
        self.count += 1
        return self.count - 1

    def _shrink(self, name: str, array: np.memmap) -> None:
        """Rows beyond `count` (skipped inputs) are dropped by copying into an exact-size file."""
        path = self.tmp / f"{name}.npy"
        exact = open_memmap(self.tmp / f"{name}.exact.npy", "w+", np.uint8, (self.count, *array.shape[1:]))
        step = 256
        for start in range(0, self.count, step):
            end = min(start + step, self.count)
            exact[start:end] = array[start:end]
        exact.flush()
        del exact
        (self.tmp / f"{name}.exact.npy").replace(path)

    def finish(self, meta: list[dict], info: dict) -> Path:
        if len(meta) != self.count:
            raise ValueError(f"meta has {len(meta)} rows but {self.count} images were cached")
        self.images.flush()
        self.masks.flush()
        if self.count != self.images.shape[0]:
            self._shrink("images", self.images)
            self._shrink("masks", self.masks)
        del self.images, self.masks
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=0) + "\n", encoding="utf-8")
        (self.tmp / "info.json").write_text(json.dumps({**info, "size": self.size, "count": self.count}, indent=1)
                                            + "\n", encoding="utf-8")
        if self.final.exists():
            shutil.rmtree(self.final)
        self.tmp.rename(self.final)
        return self.final

    def abort(self) -> None:
        del self.images, self.masks
        shutil.rmtree(self.tmp, ignore_errors=True)


def open_cache(cache_dir: str | Path, size: int) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
    """(images N x S x S x 3, masks N x S x S, meta, info), arrays memory-mapped read-only."""
    d = Path(cache_dir) / str(size)
    if not (d / "meta.json").is_file():
        raise FileNotFoundError(f"no cache at {d}; run `drywallqa data prepare --sizes {size}`")
    images = np.load(d / "images.npy", mmap_mode="r")
    masks = np.load(d / "masks.npy", mmap_mode="r")
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    info = json.loads((d / "info.json").read_text(encoding="utf-8"))
    return images, masks, meta, info
