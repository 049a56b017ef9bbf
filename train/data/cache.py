"""Decoded, resized training cache: `cache/<size>/` with uint8 .npy memmaps, so no JPEG is decoded twice.

Layout (read by the trainer; keep it exactly):
  cache/<size>/images.npy  N x S x S x 3 uint8 RGB
  cache/<size>/masks.npy   N x S x S uint8 {0, 1}
  cache/<size>/meta.json   list of N {"id", "dataset", "class" (index), "class_name", "split", "file"}
  cache/<size>/info.json   size, count, classes, box strategy, data fingerprint
A cache is written into a hidden temporary folder (its disk space reserved up front) and renamed into place
at the end, so an interrupted or failed run never leaves a half-written cache behind and keeps the old one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from numpy.lib import format as npy_format
from numpy.lib.format import open_memmap

from drywallqa.train.data.errors import DataError


def resize_pair(image: np.ndarray, mask255: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 and {0,255} mask at native size -> size x size image and {0,1} mask (area-averaged)."""
    img = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    m = cv2.resize(mask255, (size, size), interpolation=cv2.INTER_AREA)
    return img, (m >= 128).astype(np.uint8)


MAX_CACHE_SIZE = 4096  # pixels; one 4096 cache row is 64 MiB
SPACE_MARGIN = 16 * 2**20  # bytes kept free beyond the arrays (meta.json, info.json, the summary)


def row_bytes(size: int) -> int:
    """Bytes of one cached example at `size`: the RGB image and the mask."""
    return size * size * 4


def _human(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_free_space(out_dir: str | Path, rows: int, sizes: list[int]) -> None:
    """Raise DataError before any writing when `out_dir`'s file system cannot hold the caches."""
    need = sum(rows * row_bytes(s) for s in set(sizes)) + SPACE_MARGIN
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise DataError(f"not enough free space in {out_dir}: caches of {rows} images at sizes "
                        f"{sorted(set(sizes))} need about {_human(need)}, {_human(free)} is free; "
                        f"free some space, pass fewer or smaller --sizes, or choose another --out")


def _reserve(path: Path, nbytes: int) -> None:
    """Allocate the file's blocks now, so a disk filling up later cannot kill the run with SIGBUS mid-write."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return  # this file system cannot reserve; the up-front free-space check has to do
            raise


def _cut_rows(path: Path, rows: int) -> bool:
    """Shrink a .npy file to its first `rows` rows in place (header rewritten, file truncated): no copy.

    False when the new header would not have the old one's length (then the caller copies instead)."""
    with open(path, "r+b") as f:
        version = npy_format.read_magic(f)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
        header = io.BytesIO()
        write_header = npy_format.write_array_header_1_0 if version == (1, 0) else npy_format.write_array_header_2_0
        write_header(header, {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": fortran,
                              "shape": (rows, *shape[1:])})
        if fortran or header.tell() != offset:
            return False
        f.seek(0)
        f.write(header.getvalue())
        f.truncate(offset + rows * int(np.prod(shape[1:])) * dtype.itemsize)
    return True


class CacheWriter:
    """Writes one size's cache; rows are appended in order with `put`, then `seal` completes it
    and `publish` swaps it in (`finish` does both).

    The arrays' disk space is reserved up front; any failure (and `abort`) removes the hidden work folder."""

    def __init__(self, out_dir: str | Path, size: int, capacity: int) -> None:
        self.size = int(size)
        self.final = Path(out_dir) / str(self.size)
        self.tmp = Path(out_dir) / f".{self.size}.partial"
        self.count = 0
        try:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
            cap = max(int(capacity), 1)
            self.images = self._array("images", (cap, self.size, self.size, 3))
            self.masks = self._array("masks", (cap, self.size, self.size))
        except OSError as exc:
            self.abort()
            raise DataError(f"cannot write the {self.size}px cache in {out_dir}: {exc.strerror or exc}; free "
                            f"some space or choose another --out") from exc

    def _array(self, name: str, shape: tuple[int, ...]) -> np.memmap:
        path = self.tmp / f"{name}.npy"
        array = open_memmap(path, "w+", np.uint8, shape)
        _reserve(path, array.offset + array.nbytes)
        return array

    def put(self, image: np.ndarray, mask01: np.ndarray) -> int:
        if image.shape != (self.size, self.size, 3) or mask01.shape != (self.size, self.size):
            raise ValueError(f"cache {self.size}: got image {image.shape} and mask {mask01.shape}")
        self.images[self.count] = image
        self.masks[self.count] = mask01
        self.count += 1
        return self.count - 1

    def _shrink(self, name: str) -> None:
        """Rows beyond `count` (skipped inputs) are dropped by copying into an exact-size file."""
        path = self.tmp / f"{name}.npy"
        array = np.load(path, mmap_mode="r")
        exact = open_memmap(self.tmp / f"{name}.exact.npy", "w+", np.uint8, (self.count, *array.shape[1:]))
        step = 256
        for start in range(0, self.count, step):
            end = min(start + step, self.count)
            exact[start:end] = array[start:end]
        exact.flush()
        del exact, array
        (self.tmp / f"{name}.exact.npy").replace(path)

    def _drop_unused_rows(self) -> None:
        """Close the arrays and cut them to `count` rows (in place when possible)."""
        capacity = self.images.shape[0]
        self.images.flush()
        self.masks.flush()
        del self.images, self.masks
        if self.count == capacity:
            return
        for name in ("images", "masks"):
            if not _cut_rows(self.tmp / f"{name}.npy", self.count):
                self._shrink(name)

    def seal(self, meta: list[dict], info: dict) -> None:
        """Complete the work folder (rows cut to `count`, meta.json, info.json) without publishing it, so that
        several sizes can all be completed before any of them replaces its old cache."""
        if len(meta) != self.count:
            raise ValueError(f"meta has {len(meta)} rows but {self.count} images were cached")
        try:
            self._drop_unused_rows()
            (self.tmp / "meta.json").write_text(json.dumps(meta, indent=0) + "\n", encoding="utf-8")
            (self.tmp / "info.json").write_text(json.dumps({**info, "size": self.size, "count": self.count},
                                                           indent=1) + "\n", encoding="utf-8")
        except OSError as exc:
            self.abort()
            raise DataError(f"cannot write the {self.size}px cache in {self.final.parent}: {exc.strerror or exc}; "
                            f"free some space or choose another --out") from exc

    def publish(self) -> Path:
        """Swap the sealed folder in; the old cache is moved aside first and removed only afterwards."""
        old = _aside(self.final)
        try:
            with _publish_lock(self.final):  # a reader in between must not take `old` back (see open_cache)
                if old.exists():
                    shutil.rmtree(old)
                if self.final.exists():
                    self.final.rename(old)
                self.tmp.rename(self.final)
            shutil.rmtree(old, ignore_errors=True)
            return self.final
        except OSError as exc:
            self.abort()
            raise DataError(f"cannot publish the {self.size}px cache in {self.final.parent}: "
                            f"{exc.strerror or exc}") from exc

    def finish(self, meta: list[dict], info: dict) -> Path:
        """seal + publish, for a single size."""
        self.seal(meta, info)
        return self.publish()

    def abort(self) -> None:
        """Remove the work folder (safe to call more than once, and after a failed start)."""
        for name in ("images", "masks"):
            if hasattr(self, name):
                delattr(self, name)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _aside(final: Path) -> Path:
    """Where `publish` keeps the previous cache while it swaps the new one in."""
    return final.with_name(f".{final.name}.old")


@contextlib.contextmanager
def _publish_lock(final: Path) -> Iterator[None]:
    """Held by `publish` across its two renames: a reader that finds no cache waits for a live publisher. The lock
    is on the cache folder itself (flock works on a folder), so no lock file is left beside the caches."""
    fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _recover_interrupted_publish(final: Path) -> None:
    """A publish killed between its two renames leaves the previous cache only at `.<size>.old`: put it back."""
    old = _aside(final)
    if final.exists() or not (old / "meta.json").is_file():
        return
    with contextlib.suppress(OSError), _publish_lock(final):  # read-only folder: open_cache says what to run
        if not final.exists():  # else a live publish just finished
            old.rename(final)


def open_cache(cache_dir: str | Path, size: int) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
    """(images N x S x S x 3, masks N x S x S, meta, info), arrays memory-mapped read-only."""
    d = Path(cache_dir) / str(size)
    _recover_interrupted_publish(d)
    if not (d / "meta.json").is_file():
        from drywallqa import paths

        command = f"drywallqa data prepare --sizes {size}"
        if Path(cache_dir).resolve() != paths.CACHE_DIR.resolve():  # the cache of another data config
            command = f"drywallqa data prepare --config <its data config> --sizes {size} --out {cache_dir}"
        raise FileNotFoundError(f"no cache at {d}; run `{command}`")
    images = np.load(d / "images.npy", mmap_mode="r")
    masks = np.load(d / "masks.npy", mmap_mode="r")
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    info = json.loads((d / "info.json").read_text(encoding="utf-8"))
    return images, masks, meta, info
