"""Real-world inputs an inspector feeds `predict` and `eval`: phone photos this install cannot decode, empty
files, and split files naming photos that are gone. Each case writes real files; nothing is mocked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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

