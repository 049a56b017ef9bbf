"""Robust image reading: EXIF orientation, grayscale, RGBA, palette, 16-bit and float (TIFF, BigTIFF) inputs -> RGB
uint8."""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
    or out-of-range values are an ImageReadError); a TIFF PIL cannot open (multi-channel float or signed, a BigTIFF
    of them) is decoded by OpenCV instead, after the same size check from its header, and turned by its orientation
    tag as PIL turns the others."""
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
    """A TIFF that PIL cannot open (it reads no multi-channel float or signed TIFF, nor a BigTIFF of them: thermal
    cameras, HDR pipelines), decoded by OpenCV's libtiff as stored (RGB or gray, any depth), then turned as its
    orientation tag says, as a JPEG's EXIF orientation is. None when it is no TIFF (PIL's error stands); an
    ImageReadError naming the file when it is too large (PIL's size limit holds here too) or OpenCV fails too."""
    header = read_tiff_header(path)
    if header is None:
        return None
    pixels = header.width * header.height
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and pixels > 2 * limit:  # where PIL raises DecompressionBombError
        raise ImageReadError(f"cannot read image {path}: too large to decode safely ({pixels} pixels, more than "
                             f"{2 * limit})")
    image = _decode_tiff_as_stored(path, header)
    if image is None:
        raise ImageReadError(f"cannot read image {path}: a {header.width}x{header.height} TIFF of "
                             f"{header.describe_samples()} that neither PIL nor OpenCV could decode (damaged, or a "
                             f"kind of TIFF they do not read): save it as 8- or 16-bit, or as 32-bit float")
    image = apply_orientation(image, header.orientation)
    return image[..., 2::-1] if image.ndim == 3 and image.shape[2] in (3, 4) else image  # BGR(A) -> RGB


def _decode_tiff_as_stored(path: Path, header: TiffHeader) -> np.ndarray | None:
    """The TIFF's pixels as stored, its orientation tag not applied; None when OpenCV cannot decode it.

    OpenCV 5 turns a TIFF with orientation 2-4 itself but fails on 5-8 (an internal assertion), so a file with an
    orientation tag other than 1 is decoded from a copy-on-write mapping with the tag set to 1 (the file itself is
    not written, and only the page patched is copied), and the caller applies the orientation."""
    try:
        if header.orientation_at is None or header.stored_orientation == 1:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # as stored: ANYCOLOR fails on some TIFFs (OpenCV 5)
        else:
            data = np.memmap(path, dtype=np.uint8, mode="c")
            at, fmt = header.orientation_at
            data[at:at + struct.calcsize(fmt)] = np.frombuffer(struct.pack(fmt, 1), np.uint8)
            image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
            del data
    except (cv2.error, OSError, ValueError):
        return None
    return None if image is None or image.size == 0 else image


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """`image` (H x W or H x W x C) turned as a TIFF / EXIF orientation tag (1-8) says, as PIL's exif_transpose turns
    a JPEG; a view, not a copy."""
    if orientation in (5, 6, 7, 8):
        image = image.swapaxes(0, 1)  # 5: transposed
        orientation = {6: 2, 7: 3, 8: 4}.get(orientation, 1)  # then mirrored (6), turned (7) or flipped (8)
    if orientation == 2:
        return image[:, ::-1]
    if orientation == 3:
        return image[::-1, ::-1]
    if orientation == 4:
        return image[::-1]
    return image


def _tiff_to_rgb(image: np.ndarray, path: Path) -> np.ndarray:
    try:
        return to_rgb_uint8(image)
    except ValueError as exc:  # a float image with no usable range
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc


@dataclass(frozen=True)
class TiffHeader:
    """What a TIFF's (classic or BigTIFF) first image directory says, read before anything is decoded."""

    width: int
    height: int
    stored_orientation: int = 1  # the Orientation tag as written (1 when absent)
    orientation_at: tuple[int, str] | None = None  # the tag value's file offset and struct format, to patch it
    samples: int = 1
    bits: int = 8
    sample_format: int = 1  # 1 unsigned integer, 2 signed integer, 3 float

    @property
    def orientation(self) -> int:
        """1-8; a value out of that range counts as 1 (upright), as PIL's exif_transpose takes it."""
        return self.stored_orientation if 1 <= self.stored_orientation <= 8 else 1

    @property
    def shown_size(self) -> tuple[int, int]:
        """(width, height) once turned upright."""
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)

    def describe_samples(self) -> str:
        kind = {1: "unsigned integer", 2: "signed integer", 3: "float"}.get(self.sample_format, "unknown format")
        return f"{self.samples} channel(s) of {self.bits}-bit {kind}"


# First four bytes -> (struct byte order, BigTIFF)
_TIFF_MAGIC = {b"II*\x00": ("<", False), b"MM\x00*": (">", False), b"II+\x00": ("<", True), b"MM\x00+": (">", True)}
_TIFF_TYPES = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8 (BigTIFF): the tags read here are of these types
_TIFF_MAX_TAGS = 4096  # a real directory has a few dozen; more is a damaged header, not a reason to read megabytes
_WIDTH, _LENGTH, _BITS, _ORIENTATION, _SAMPLES, _SAMPLE_FORMAT = 256, 257, 258, 274, 277, 339


def read_tiff_header(path: Path) -> TiffHeader | None:
    """The header of a TIFF or BigTIFF's first image: its size (checked against the size limit before anything is
    decoded), orientation and sample kind. None when it is no TIFF, or its directory is damaged."""
    try:
        with path.open("rb") as f:
            return _parse_tiff_header(f)
    except (OSError, struct.error, ValueError, OverflowError):
        return None


def _parse_tiff_header(f: BinaryIO) -> TiffHeader | None:
    head = f.read(16)
    layout = _TIFF_MAGIC.get(head[:4])
    if layout is None:
        return None
    order, big = layout
    count_fmt, entry_fmt, slot = ("Q", "HHQ", 8) if big else ("H", "HHI", 4)
    ifd_at = struct.unpack(order + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
    f.seek(ifd_at)
    (count,) = struct.unpack(order + count_fmt, f.read(struct.calcsize(order + count_fmt)))
    if count > _TIFF_MAX_TAGS:
        return None
    entry = struct.calcsize(order + entry_fmt) + slot
    first = ifd_at + struct.calcsize(order + count_fmt)
    entries = f.read(entry * count)
    values: dict[int, tuple[int, int, str]] = {}  # tag -> (first value, its file offset, struct format)
    for i in range(0, len(entries) - entry + 1, entry):
        tag, kind, n = struct.unpack(order + entry_fmt, entries[i:i + entry - slot])
        fmt = _TIFF_TYPES.get(kind)
        if tag not in (_WIDTH, _LENGTH, _BITS, _ORIENTATION, _SAMPLES, _SAMPLE_FORMAT) or fmt is None or n < 1:
            continue
        at = first + i + entry - slot  # the value itself, or where it is when it does not fit the slot
        if n * struct.calcsize(fmt) > slot:
            (at,) = struct.unpack(order + ("Q" if big else "I"), entries[i + entry - slot:i + entry])
            f.seek(at)
            raw = f.read(struct.calcsize(fmt))
        else:
            raw = entries[i + entry - slot:i + entry - slot + struct.calcsize(fmt)]
        values[tag] = (struct.unpack(order + fmt, raw)[0], at, order + fmt)
    if _WIDTH not in values or _LENGTH not in values or not values[_WIDTH][0] or not values[_LENGTH][0]:
        return None
    orientation = values.get(_ORIENTATION)
    return TiffHeader(values[_WIDTH][0], values[_LENGTH][0],
                      stored_orientation=orientation[0] if orientation else 1,
                      orientation_at=(orientation[1], orientation[2]) if orientation else None,
                      samples=values.get(_SAMPLES, (1,))[0], bits=values.get(_BITS, (1,))[0],
                      sample_format=values.get(_SAMPLE_FORMAT, (1,))[0])


def tiff_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of a TIFF or BigTIFF's first image as read_image_rgb gives it (its orientation applied), from
    its header, for TIFFs PIL cannot open. None when it is no such TIFF."""
    header = read_tiff_header(path)
    return None if header is None else header.shown_size


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
