"""Robust image reading: EXIF orientation, grayscale, RGBA, palette, 16-bit and float (TIFF) inputs -> RGB uint8."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import cv2
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
    """Any H x W, H x W x 1/3/4 array of uint8/uint16/float -> H x W x 3 uint8 (alpha dropped); floats as
    float_to_uint8 scales them (ValueError when it cannot)."""
    a = np.asarray(array)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and a.flags.writeable:
        return np.ascontiguousarray(a)  # the live-frame case: no scan, no copy
    if a.dtype.kind == "i":  # signed (a TIFF decoded by OpenCV): below 0 is black, as for floats, not wrapped round
        a = np.clip(a, 0, None)
    if a.dtype == np.uint16 or (a.dtype.kind in "iu" and a.max(initial=0) > 255):
        a = (a.astype(np.float32) / 257.0).round().clip(0, 255).astype(np.uint8)
    elif a.dtype.kind == "f":
        a = float_to_uint8(a)
    else:
        a = a.astype(np.uint8)  # a copy: callers may write to what they get (PIL's arrays are read-only)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(a)


def float_to_uint8(a: np.ndarray) -> np.ndarray:
    """A float image (thermal, HDR pipelines) -> uint8, by the range its values fit: 0..1 (x 255), 0..255 (as is) or
    0..65535 (/ 257, as 16-bit images); below 0 is black. ValueError for NaN or infinite values, or values beyond
    65535: no scale fits them, and a guessed one would make a wrong image, not an error."""
    if not np.isfinite(a).all():
        raise ValueError("the float image holds NaN or infinite values (no-data pixels?): replace them with "
                         "numbers, or save it as 8- or 16-bit")
    top = float(a.max(initial=0))
    if top > 65535:
        raise ValueError(f"the float image's values go up to {top:g}, beyond 0..1, 0..255 and 0..65535: scale it "
                         f"into one of those ranges, or save it as 8- or 16-bit")
    scale = 255.0 if top <= 1.0 else 1.0 if top <= 255 else 1 / 257.0
    return (a.astype(np.float32) * scale).round().clip(0, 255).astype(np.uint8)


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Decode with EXIF orientation applied; raises ImageReadError naming the file on failure.

    PIL's decompression-bomb limit (about 179 megapixels) stays on: such a file is reported like a
    corrupt one instead of taking gigabytes of memory, and the warning PIL prints from half that size on
    is silenced, since those images are read normally. Float images are scaled by float_to_uint8 (NaN, infinite
    or out-of-range values are an ImageReadError); a multi-channel float TIFF, which PIL cannot open, is decoded by
    OpenCV instead."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    return to_rgb_uint8(np.asarray(im).astype(np.uint32))
                if im.mode == "F":  # one-channel 32-bit float (TIFF), scaled by float_to_uint8
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
        image = _read_tiff_opencv(path) if isinstance(exc, UnidentifiedImageError) else None
        if image is not None:
            return _tiff_to_rgb(image, path)
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc
    except (SyntaxError, ValueError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc


def _read_tiff_opencv(path: Path) -> np.ndarray | None:
    """A TIFF that PIL cannot open (it reads no multi-channel float TIFF: thermal cameras, HDR pipelines), decoded by
    OpenCV's libtiff, as stored (RGB or gray, any depth; its orientation tag is not applied); None when it is no
    TIFF or OpenCV fails too. PIL's size limit holds here too (ImageReadError)."""
    size = tiff_size(path)
    if size is None:
        return None
    pixels = size[0] * size[1]
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and pixels > 2 * limit:  # where PIL raises DecompressionBombError
        raise ImageReadError(f"cannot read image {path}: too large to decode safely ({pixels} pixels, more than "
                             f"{2 * limit})")
    try:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # as stored: ANYCOLOR fails on some TIFFs (OpenCV 5)
    except cv2.error:
        return None
    if image is None or image.size == 0:
        return None
    return image[..., 2::-1] if image.ndim == 3 and image.shape[2] in (3, 4) else image  # BGR(A) -> RGB


def _tiff_to_rgb(image: np.ndarray, path: Path) -> np.ndarray:
    try:
        return to_rgb_uint8(image)
    except ValueError as exc:  # a float image with no usable range
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc


def tiff_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of a (classic, not Big-) TIFF's first image, from its header, for TIFFs PIL cannot open:
    checked against the size limit before anything is decoded. None when it is no such TIFF."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(head[:4])
            if order is None:
                return None
            f.seek(struct.unpack(order + "I", head[4:8])[0])
            (count,) = struct.unpack(order + "H", f.read(2))
            entries = f.read(12 * count)
    except (OSError, struct.error):
        return None
    size = {}
    for i in range(0, len(entries) - 11, 12):
        tag, kind, n = struct.unpack(order + "HHI", entries[i:i + 8])
        if tag in (256, 257) and n == 1 and kind in (3, 4):  # ImageWidth, ImageLength: SHORT or LONG
            fmt, width = ("H", 2) if kind == 3 else ("I", 4)
            size[tag] = struct.unpack(order + fmt, entries[i + 8:i + 8 + width])[0]
    return (size[256], size[257]) if len(size) == 2 else None


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
