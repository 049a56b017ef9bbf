"""Robust image reading: EXIF orientation, grayscale, RGBA, palette and 16-bit inputs -> RGB uint8."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# File name endings read as images where a folder is scanned (predict, the edge runtime's folder source).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class ImageReadError(ValueError):
    """An image that cannot be decoded; the message names the file."""


class ImageIOError(ImageReadError):
    """An image file that could not be read at all (an OSError with an errno: gone, no permission, a device error):
    unlike an undecodable file, it may read fine later."""


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Any H x W, H x W x 1/3/4 array of uint8/uint16/float -> H x W x 3 uint8 (alpha dropped)."""
    a = np.asarray(array)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and a.flags.writeable:
        return np.ascontiguousarray(a)  # the live-frame case: no scan, no copy
    if a.dtype == np.uint16 or (a.dtype.kind in "iu" and a.max(initial=0) > 255):
        a = (a.astype(np.float32) / 257.0).round().clip(0, 255).astype(np.uint8)
    elif a.dtype.kind == "f":
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        a = (a * scale).round().clip(0, 255).astype(np.uint8)
    else:
        a = a.astype(np.uint8)  # a copy: callers may write to what they get (PIL's arrays are read-only)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(a)


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Decode with EXIF orientation applied; raises ImageReadError naming the file on failure.

    PIL's decompression-bomb limit (about 179 megapixels) stays on: such a file is reported like a
    corrupt one instead of taking gigabytes of memory, and the warning PIL prints from half that size on
    is silenced, since those images are read normally."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    return to_rgb_uint8(np.asarray(im).astype(np.uint32))
                if im.mode == "F":  # 32-bit float (TIFF): 0..1 or 0..255, scaled by to_rgb_uint8
                    return to_rgb_uint8(np.asarray(im))
                if im.mode not in ("RGB", "L", "RGBA"):
                    im = im.convert("RGBA" if "A" in im.getbands() or im.mode == "P" else "RGB")
                return to_rgb_uint8(np.asarray(im))
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"cannot read image {path}: too large to decode safely ({exc})") from exc
    except OSError as exc:
        if exc.errno is not None and not isinstance(exc, UnidentifiedImageError):  # the file system's, not PIL's
            raise ImageIOError(f"cannot read image {path}: {exc}") from exc
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc
    except (SyntaxError, ValueError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc
