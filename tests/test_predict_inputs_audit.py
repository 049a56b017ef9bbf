"""Real-world inputs an inspector feeds `predict` and `eval`: phone photos this install cannot decode, empty
files, and split files naming photos that are gone. Each case writes real files; nothing is mocked."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _foundation_fixtures import random_onnx, small_project, write_jpeg
from PIL import Image

from drywallqa.cli import main

HEIC = Path(__file__).parent / "data" / "synthetic_rotated.heic"
# A synthetic 64x48 photo (left half red, right half blue, a green band on top), saved by pillow-heif as an iPhone
# does: EXIF orientation 6, stored as a rotation box. Shown upright it is 48 wide and 64 tall, red on top.


def test_heic_phone_photos_are_segmented_upright_at_their_shown_size(tmp_path, capsys):
    """iPhones save HEIC by default. Before, a folder of them was silently left out (exit 0, no masks); now each is
    decoded (pi-heif), turned upright as the phone shows it, and gets its masks, in a folder, a glob or by name;
    a HEIC under a .jpg name (some transfer apps do this) too."""
    from drywallqa.imageio import read_image_rgb

    rgb = read_image_rgb(HEIC)
    assert rgb.shape == (64, 48, 3)
    top, bottom, right = rgb[20, 10].astype(int), rgb[-10, 10].astype(int), rgb[32, -2].astype(int)
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0] and right[1] > 150 > right[0], (top, bottom, right)
    photos = tmp_path / "photos"
    write_jpeg(photos / "wall.jpg", 40, 60)
    shutil.copy(HEIC, photos / "IMG_0001.HEIC")
    shutil.copy(HEIC, photos / "IMG_0002.jpg")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(random_onnx()), "--prompt", "segment crack", "--out", str(out),
                 "--quiet", "--backend", "onnxruntime", str(photos), str(tmp_path / "photos" / "*.HEIC")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert sorted(p.name for p in out.iterdir()) == [
        "IMG_0001__segment_crack.png", "IMG_0002__segment_crack.png", "wall__segment_crack.png"]
    for name in ("IMG_0001", "IMG_0002"):
        with Image.open(out / f"{name}__segment_crack.png") as im:
            assert im.mode == "L" and im.size == (48, 64)


def test_a_heic_beside_its_jpeg_copy_gives_way_to_it(tmp_path, capsys):
    """IMG_0001.HEIC with IMG_0001.JPG beside it (the phone's 'Most Compatible' export, or a converted copy) is one
    photo under one image id: the JPEG is segmented, the HEIC left aside, and nothing fails. Before, the HEIC came
    first and the JPEG failed as a duplicate."""
    from drywallqa.imageio import without_heif_copies

    photos = tmp_path / "photos"
    write_jpeg(photos / "IMG_0001.JPG", 40, 60)
    shutil.copy(HEIC, photos / "IMG_0001.HEIC")
    shutil.copy(HEIC, photos / "IMG_0002.heic")  # no copy beside it: read itself
    out = tmp_path / "out"
    code = main(["predict", "--model", str(random_onnx()), "--prompt", "crack", "--out", str(out), "--quiet",
                 "--backend", "onnxruntime", str(photos)])
    printed = capsys.readouterr().out
    assert code == 0 and "2 image(s) segmented" in printed and "0 failed" in printed, printed
    with Image.open(out / "IMG_0001__crack.png") as im:
        assert im.size == (60, 40)  # the JPEG's size, not the HEIC's
    assert (out / "IMG_0002__crack.png").exists()
    names = [p.name for p in without_heif_copies(sorted(photos.iterdir()))]
    assert names == ["IMG_0001.JPG", "IMG_0002.heic"]


def test_an_unreadable_image_does_not_block_another_of_its_id(tmp_path, capsys):
    """Two inputs with one image id write the same masks, so the second is refused; but one that cannot be read
    writes none, so the other is segmented. Before, a corrupt a.jpg made a good b/a.png fail as a duplicate."""
    write_jpeg(tmp_path / "b" / "a.png", 30, 20)
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(random_onnx()), "--prompt", "crack", "--out", str(out), "--quiet",
                 "--backend", "onnxruntime", str(tmp_path / "a.jpg"), str(tmp_path / "b" / "a.png")])
    printed = capsys.readouterr().out
    assert code == 1 and "1 failed" in printed and "same image id" not in printed, printed
    with Image.open(out / "a__crack.png") as im:
        assert im.size == (20, 30)


def test_a_damaged_heic_is_named_as_failed_and_the_run_goes_on(tmp_path, capsys):
    photos = tmp_path / "photos"
    write_jpeg(photos / "wall.jpg", 40, 60)
    (photos / "IMG_0003.heic").write_bytes(HEIC.read_bytes()[:400])  # a copy cut short
    code = main(["predict", "--model", str(random_onnx()), "--prompt", "crack", "--out", str(tmp_path / "out"),
                 "--quiet", "--backend", "onnxruntime", str(photos)])
    printed = capsys.readouterr().out
    assert code == 1 and "1 failed" in printed, printed
    line = next(x for x in printed.splitlines() if f"FAILED {photos / 'IMG_0003.heic'}:" in x)
    assert "HEIC/HEIF photo that could not be decoded" in line, line
    assert (tmp_path / "out" / "wall__crack.png").exists()


def test_without_the_heic_decoder_a_heic_photo_says_how_to_get_one(tmp_path):
    """An install without pi-heif (e.g. a platform without its wheel): the photo is named as failed with what to
    install or how to convert it, not 'cannot identify image file'."""
    code = ("import sys\nsys.modules['pi_heif'] = None  # as if not installed\n"
            "from drywallqa.imageio import HEIF_DECODER, ImageReadError, read_image_rgb\n"
            "assert not HEIF_DECODER\n"
            "try:\n    read_image_rgb(sys.argv[1])\nexcept ImageReadError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code, str(HEIC)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "this install cannot decode (pi-heif is missing" in done.stdout and "convert it to JPEG" in done.stdout


def test_zero_byte_photo_says_the_file_is_empty(tmp_path, capsys):
    """An interrupted copy leaves 0-byte files: say that, not 'cannot identify image file'; the run goes on."""
    photos = tmp_path / "photos"
    write_jpeg(photos / "ok.jpg", 30, 20)
    (photos / "cut.jpg").write_bytes(b"")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(random_onnx()), "--prompt", "crack", "--out", str(out), "--quiet",
                 "--backend", "onnxruntime", str(photos)])
    printed = capsys.readouterr().out
    assert code == 1
    assert f"FAILED {photos / 'cut.jpg'}: cannot read image {photos / 'cut.jpg'}: the file is empty (0 bytes)" \
        in printed, printed
    with Image.open(out / "ok__crack.png") as im:
        assert im.mode == "L" and im.size == (20, 30)
        assert set(np.unique(np.asarray(im)).tolist()) <= {0, 255}


def _val_images(tmp_path):
    split = json.loads((tmp_path / "split.json").read_text())["datasets"]
    return [(ds, name) for ds, files in split.items() for name, side in files.items() if side == "val"]


def test_eval_names_val_images_missing_from_disk(tmp_path, capsys):
    """Photos the split file puts on the evaluated side but that are gone from disk must not be dropped
    silently (a report over fewer images with 'Skipped images: 0'): they are named, on stderr and in the report."""
    cfg = small_project(tmp_path, n_crack=6, n_wall=6)
    assert main(["data", "split", "--config", str(cfg)]) == 0
    val = _val_images(tmp_path)
    assert len(val) >= 2
    gone_ds, gone = val[0]
    (tmp_path / gone_ds / "train" / "images" / gone).unlink()
    capsys.readouterr()
    assert main(["eval", "--model", str(random_onnx()), "--config", str(cfg), "--out", str(tmp_path / "rep"),
                 "--quiet", "--backend", "onnxruntime"]) == 0
    captured = capsys.readouterr()
    assert "1 image(s) on the 'val' side" in captured.err and gone in captured.err, captured.err
    data = json.loads((tmp_path / "rep" / "eval.json").read_text())
    assert sum(data["images"].values()) == len(val) - 1
    assert any(gone in s and "not found" in s for s in data["skipped"]), data["skipped"]
    assert gone in (tmp_path / "rep" / "eval.md").read_text()


def test_eval_with_every_val_image_missing_says_they_are_missing(tmp_path, capsys):
    cfg = small_project(tmp_path, n_crack=4, n_wall=4)
    assert main(["data", "split", "--config", str(cfg)]) == 0
    val = _val_images(tmp_path)
    for ds, name in val:
        (tmp_path / ds / "train" / "images" / name).unlink()
    capsys.readouterr()
    assert main(["eval", "--model", str(random_onnx()), "--config", str(cfg), "--quiet",
                 "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert f"all {len(val)} it lists are missing" in err and "not found in" in err, err


def test_a_batch_is_cut_at_a_pixel_budget_as_well_as_at_its_size():
    """Each image of a batch is held decoded and as full-size probabilities until the batch is written. Before, four
    100-megapixel photos at --batch-size 4 were held at once (5.7 GB peak against 2.2 GB for one, measured); a batch
    now also ends once it holds MAX_BATCH_PIXELS, while four 12-megapixel phone photos still share one batch."""
    from drywallqa.predict import MAX_BATCH_PIXELS, batch_is_full

    phone = (3000, 4000)
    assert [batch_is_full([phone] * n, 4) for n in (1, 2, 3, 4)] == [False, False, False, True]
    assert batch_is_full([(12000, 9000)], 4)  # one huge photo is a batch of its own
    side = int(MAX_BATCH_PIXELS ** 0.5)
    assert not batch_is_full([(side - 1, side - 1)], 4) and batch_is_full([(side - 1, side - 1)] * 2, 4)


def test_predict_runs_batches_of_at_most_the_pixel_budget(tmp_path, monkeypatch):
    """predict() cuts its batches by the pixel budget too (here lowered to 5000 pixels: two 60 x 60 photos), each
    photo still getting its masks; the real model runs every batch, and the wrapper only counts them."""
    from drywallqa.edge.backends import load_backend
    from drywallqa.edge.inference import PromptSegmenter
    from drywallqa.predict import predict

    class CountingSegmenter:
        def __init__(self, inner: PromptSegmenter) -> None:
            self.inner, self.batches = inner, []

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

        def probabilities_batch(self, images):
            self.batches.append(len(images))
            return self.inner.probabilities_batch(images)

    monkeypatch.setattr("drywallqa.predict.MAX_BATCH_PIXELS", 5000)
    for i in range(5):
        write_jpeg(tmp_path / "in" / f"p{i}.jpg", 60, 60, seed=i)
    segmenter = CountingSegmenter(PromptSegmenter(load_backend(random_onnx(), backend="onnxruntime")))
    summary = predict(segmenter, ["crack"], [str(tmp_path / "in")], tmp_path / "out", batch_size=4, progress=False)
    assert segmenter.batches == [2, 2, 1] and summary.images == 5
    assert len(list((tmp_path / "out").glob("*__crack.png"))) == 5



# -- TIFFs that PIL cannot open: BigTIFF, orientation, sample kinds no decoder reads --------------------------------


def _write_tiff(path: Path, pixels: np.ndarray, *, big: bool = False, orientation: int | None = None,
                order: str = "<", size: tuple[int, int] | None = None) -> Path:
    """An uncompressed one-strip TIFF (classic or BigTIFF) of `pixels` as stored, written by hand: neither OpenCV nor
    PIL writes a BigTIFF of float RGB, nor an orientation tag on a float TIFF. `size` (width, height) overrides what
    the header announces (a header bigger than its pixels)."""
    a = np.ascontiguousarray(pixels, pixels.dtype.newbyteorder(order))
    w, h = size or (a.shape[1], a.shape[0])
    spp = 1 if a.ndim == 2 else a.shape[2]
    tags = {256: (4, [w]), 257: (4, [h]), 258: (3, [a.itemsize * 8] * spp), 259: (3, [1]),
            262: (3, [2 if spp >= 3 else 1]), 273: (4, [0]), 277: (3, [spp]), 278: (4, [h]), 279: (4, [a.nbytes]),
            339: (3, [{"u": 1, "i": 2, "f": 3}[a.dtype.kind]] * spp)}
    if orientation is not None:
        tags[274] = (3, [orientation])
    slot, count_fmt, entry_fmt = (8, "Q", "HHQ") if big else (4, "H", "HHI")
    head = (b"II" if order == "<" else b"MM") + (
        struct.pack(order + "HHHQ", 43, 8, 0, 16) if big else struct.pack(order + "HI", 42, 8))
    packed = {tag: struct.pack(order + ("H" if kind == 3 else "I") * len(v), *v) for tag, (kind, v) in tags.items()}
    extra_at = len(head) + struct.calcsize(order + count_fmt) + len(tags) * (
        struct.calcsize(order + entry_fmt) + slot) + slot
    packed[273] = struct.pack(order + "I", extra_at + sum(len(d) for d in packed.values() if len(d) > slot))
    entries, extra = b"", b""
    for tag in sorted(tags):  # a value longer than its slot goes after the directory, before the pixels
        data = packed[tag]
        if len(data) > slot:
            value, extra = struct.pack(order + ("Q" if big else "I"), extra_at + len(extra)), extra + data
        else:
            value = data.ljust(slot, b"\0")
        entries += struct.pack(order + entry_fmt, tag, tags[tag][0], len(tags[tag][1])) + value
    path.write_bytes(head + struct.pack(order + count_fmt, len(tags)) + entries + b"\0" * slot + extra + a.tobytes())
    return path


def _float_rgb() -> np.ndarray:
    """16 x 24, mid gray, with a pure red 8 x 8 block in the top left corner (a JPEG keeps it exactly: one block)."""
    rgb = np.full((16, 24, 3), 0.5, np.float32)
    rgb[:8, :8] = (1.0, 0.0, 0.0)
    return rgb


def _red_box(rgb: np.ndarray) -> tuple[tuple[int, int], list[int]]:
    """The image's (height, width) and the bounding box (top, left, bottom, right) of its red block."""
    rows, cols = np.nonzero((rgb[..., 0] > 200) & (rgb[..., 1] < 60))
    return rgb.shape[:2], [int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())]


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("pixels, expected", [
    (_float_rgb(), [255, 0, 0]),  # float RGB: thermal / HDR pipelines
    ((_float_rgb() * 200).astype(np.int16), [200, 0, 0]),  # signed RGB, as OpenCV writes it
    (_float_rgb()[..., 0].astype(np.float64), [255, 255, 255]),  # 64-bit float gray
])
def test_a_bigtiff_pil_cannot_open_is_read_as_rgb_uint8(tmp_path, pixels, expected, order):
    """Before: 'cannot identify image file' for a BigTIFF (files over 4 GB, and what some scanners and GIS tools
    write) of float or signed RGB: PIL opens none, and the OpenCV fallback only knew classic TIFF headers. Float
    values are scaled as in a classic TIFF (0..1 by 255)."""
    from drywallqa.imageio import read_image_rgb

    path = _write_tiff(tmp_path / "scan.tif", pixels, big=True, order=order)
    image = read_image_rgb(path)
    assert image.dtype == np.uint8 and image.shape == (16, 24, 3)
    assert image[0, 0].tolist() == expected and image[-1, -1].tolist() in ([128] * 3, [100] * 3, [0] * 3)


def test_a_bigtiff_too_large_to_decode_is_refused_from_its_header(tmp_path):
    """A BigTIFF's header gets the pixel limit a classic TIFF's gets, before anything is decoded. Before, it was not
    read (so not checked) at all: 'cannot identify image file'."""
    from PIL import Image

    from drywallqa.imageio import ImageReadError, read_image_rgb, tiff_size

    path = _write_tiff(tmp_path / "huge.tif", _float_rgb(), big=True, size=(20000, 20000))
    assert tiff_size(path) == (20000, 20000)
    assert 2 * Image.MAX_IMAGE_PIXELS < 20000 * 20000
    with pytest.raises(ImageReadError, match=r"huge\.tif: too large to decode safely \(400000000 pixels"):
        read_image_rgb(path)


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tiff_pil_cannot_open_is_turned_by_its_orientation_tag_as_a_jpeg_is(tmp_path, orientation, big):
    """A float RGB TIFF with an orientation tag comes out turned exactly as a JPEG with the same EXIF orientation.
    Before: with orientation 5-8 (a camera held upright: 6 or 8) it could not be read at all ('cannot identify
    image file': OpenCV 5 fails on them); the dashboard's size from the header is the turned size too."""
    from PIL import Image

    from drywallqa.imageio import read_image_rgb, tiff_size

    rgb = _float_rgb()
    tiff = _write_tiff(tmp_path / "thermal.tif", rgb, big=big, orientation=orientation)
    photo = Image.fromarray((rgb * 255).round().astype(np.uint8))
    exif = photo.getexif()
    exif[0x0112] = orientation
    photo.save(tmp_path / "photo.jpg", exif=exif, quality=100, subsampling=0)
    turned = read_image_rgb(tiff)
    assert _red_box(turned) == _red_box(read_image_rgb(tmp_path / "photo.jpg"))
    assert tiff_size(tiff) == (turned.shape[1], turned.shape[0])
    assert turned[turned.shape[0] // 2, turned.shape[1] // 2].tolist() == [128, 128, 128]  # gray, not red


def test_a_tiff_no_decoder_reads_says_what_it_holds_and_what_to_do(tmp_path):
    """A 16-bit (half) float TIFF: neither PIL nor OpenCV decodes one. Before: 'cannot identify image file', as for a
    file that is no image; now the message says what the TIFF holds and how to save it instead."""
    from drywallqa.imageio import ImageReadError, read_image_rgb

    path = _write_tiff(tmp_path / "half.tif", _float_rgb().astype(np.float16))
    with pytest.raises(ImageReadError, match=r"half\.tif: a 24x16 TIFF of 3 channel\(s\) of 16-bit float that "
                                             r"neither PIL nor OpenCV could decode .*save it as 8- or 16-bit, or as "
                                             r"32-bit float"):
        read_image_rgb(path)
