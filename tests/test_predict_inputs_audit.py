"""Real-world inputs an inspector feeds `predict` and `eval`: phone photos this install cannot decode, empty
files, and split files naming photos that are gone. Each case writes real files; nothing is mocked."""

from __future__ import annotations

import json
import os

import numpy as np
from _foundation_fixtures import random_onnx, small_project, write_jpeg
from PIL import Image

from drywallqa.cli import main


def _heif_bytes(brand: bytes = b"heic") -> bytes:
    """The start of a HEIF still image (an ISO-BMFF 'ftyp' box with a HEIF brand), then data PIL can't decode."""
    return b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00mif1heic" + os.urandom(2000)


def test_heic_phone_photos_in_a_folder_are_named_as_failed_with_how_to_convert(tmp_path, capsys):
    """A folder of phone photos with HEIC among the JPEGs: the HEIC ones must not be silently left out with
    exit status 0; each is named, says it is HEIC/HEIF and how to convert it, and the others still get masks."""
    photos = tmp_path / "photos"
    write_jpeg(photos / "wall.jpg", 40, 60)
    (photos / "IMG_0001.HEIC").write_bytes(_heif_bytes())
    (photos / "IMG_0002.heif").write_bytes(_heif_bytes(b"mif1"))
    (photos / "IMG_0003.jpg").write_bytes(_heif_bytes())  # a HEIC under a .jpg name (some transfer apps do this)
    out = tmp_path / "out"
    code = main(["predict", "--model", str(random_onnx()), "--prompt", "segment crack", "--out", str(out),
                 "--quiet", "--backend", "onnxruntime", str(photos)])
    printed = capsys.readouterr().out
    assert code == 1, printed
    assert sorted(p.name for p in out.iterdir()) == ["wall__segment_crack.png"]
    assert "1 image(s) segmented" in printed and "3 failed" in printed, printed
    for name in ("IMG_0001.HEIC", "IMG_0002.heif", "IMG_0003.jpg"):
        line = next(x for x in printed.splitlines() if f"FAILED {photos / name}:" in x)
        assert "HEIC/HEIF" in line and "convert it to JPEG" in line, line


def test_heic_only_glob_is_not_reported_as_matching_no_images(tmp_path, capsys):
    (tmp_path / "IMG_0001.heic").write_bytes(_heif_bytes())
    code = main(["predict", "--model", str(random_onnx()), "--prompt", "crack", "--out", str(tmp_path / "out"),
                 "--quiet", "--backend", "onnxruntime", str(tmp_path / "*.heic")])
    printed = capsys.readouterr().out
    assert code == 1 and "pattern matches no images" not in printed and "HEIC/HEIF" in printed, printed


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
    assert "1 images on the 'val' side" in captured.err and gone in captured.err, captured.err
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


def test_huge_photos_in_one_run_each_get_their_full_size_masks(tmp_path):
    """Three 53-megapixel photos through the real CLI at --batch-size 4: every mask at its photo's full size."""
    import cv2

    model = random_onnx()
    gradient = np.linspace(0, 255, 8000, dtype=np.float32)
    big = np.repeat(cv2.resize(np.tile(gradient, (64, 1)), (8000, 6600))[..., None], 3, axis=2).astype(np.uint8)
    photos = []
    for i in range(3):
        photos.append(tmp_path / f"big{i}.jpg")
        cv2.imwrite(str(photos[-1]), big)
    assert main(["predict", "--model", str(model), "--prompt", "crack", "--out", str(tmp_path / "o3"), "--quiet",
                 "--backend", "onnxruntime", "--batch-size", "4", *map(str, photos)]) == 0
    for i in range(3):
        with Image.open(tmp_path / "o3" / f"big{i}__crack.png") as im:
            assert im.mode == "L" and im.size == (8000, 6600)
