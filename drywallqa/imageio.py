"""Robust image reading: EXIF orientation, grayscale, RGBA, palette and 16-bit inputs -> RGB uint8."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# File name endings read as images where a folder is scanned (predict, the edge runtime's folder source).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# HEIC/HEIF phone photos (the iPhone's default). pi-heif decodes them: libheif with libde265 only (LGPL), without
# pillow-heif's x265 encoder (GPL). On an install without it they are still listed, so that each is named as failed
# with what to install instead of being silently left out.
HEIF_SUFFIXES = (".heic", ".heif", ".hif")
try:
    from pi_heif import register_heif_opener
except ImportError:
    HEIF_DECODER = False
else:
    register_heif_opener()  # libheif applies the photo's rotation; its EXIF orientation then reads 1
    HEIF_DECODER = True
# ISO-BMFF brands (bytes 8..12 of the 'ftyp' box) of HEIF still images, also found under a .jpg name
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
# Every ending a folder or glob of photos is read for (predict, eval, data prepare, the edge's folders, the review).
READ_SUFFIXES = (*IMAGE_SUFFIXES, *HEIF_SUFFIXES)


def without_heif_copies(paths: list[Path]) -> list[Path]:
    """`paths` less each HEIC/HEIF photo that has a sibling of the same name in another format (IMG_0001.HEIC beside
    IMG_0001.JPG: the phone's or a converter's copy of one photo). Both would be one image id, and the copy decodes
    everywhere."""
    others = {(p.parent, p.stem) for p in paths if p.suffix.lower() not in HEIF_SUFFIXES}
    return [p for p in paths if p.suffix.lower() not in HEIF_SUFFIXES or (p.parent, p.stem) not in others]


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
        if _file_size(path) == 0:  # an interrupted copy or upload: say so, not 'cannot identify image file'
            raise ImageReadError(f"cannot read image {path}: the file is empty (0 bytes)") from exc
        if _is_heif(path) and HEIF_DECODER:
            raise ImageReadError(f"cannot read image {path}: a HEIC/HEIF photo that could not be decoded "
                                 f"(damaged, or an incomplete copy)") from exc
        if _is_heif(path):
            raise ImageReadError(f"cannot read image {path}: a HEIC/HEIF photo, which this install cannot "
                                 f"decode (pi-heif is missing: pip install pi-heif); or convert it to JPEG or PNG "
                                 f"(or set the phone camera to 'Most Compatible')") from exc
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc
    except (SyntaxError, ValueError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _is_heif(path: Path) -> bool:
    """Whether the file starts like a HEIF still image (an 'ftyp' box with a HEIF brand)."""
    try:
        with path.open("rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS
