"""`drywallqa data prepare` on the messy YOLO exports of one's own site photos (README "Fine-tune on your own
photos"): real files on disk, the real command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from _foundation_fixtures import (
    make_coco_dataset,
    make_yolo_dataset,
    small_project,
    write_data_config,
    write_jpeg,
)
from PIL import Image

from drywallqa.cli import main
from drywallqa.masks import MASK_SUFFIX, SEPARATOR, mask_filename
from drywallqa.paths import PROJECT_ROOT
from drywallqa.train.data.cache import open_cache
from drywallqa.train.data.split import leaked_bases, read_split

HEIC = PROJECT_ROOT / "tests" / "data" / "synthetic_rotated.heic"


def _prepare(cfg: Path, out: Path, *extra: str) -> int:
    return main(["data", "prepare", "--config", str(cfg), "--sizes", "16", "--out", str(out), "--quiet", *extra])


def _one_dataset(tmp_path: Path, names: list[str], **entry) -> Path:
    make_yolo_dataset(tmp_path / "site", names)
    return write_data_config(tmp_path / "own.yaml", [{"name": "site", "root": str(tmp_path / "site"),
                                                      "format": "yolo", "class": "crack", **entry}], None)


@pytest.mark.parametrize("where,key,value,suggestion", [
    ("top", "box_stratgy", "centre_band", "box_strategy"),  # was ignored: filled boxes instead of bands
    ("dataset", "clas_ids", [1], "class_ids"),  # was ignored: every class-1 line rejected
    ("dataset", "splitz", ["valid"], "splits"),  # was ignored: train/ read instead
    ("split", "val_fracton", 0.5, "val_fraction"),  # was ignored: 0.15 used
])
def test_a_misspelt_data_config_key_is_refused_with_the_right_one(tmp_path, capsys, where, key, value, suggestion):
    cfg_path = _one_dataset(tmp_path, ["a", "b"])
    cfg = yaml.safe_load(cfg_path.read_text())
    {"top": cfg, "dataset": cfg["datasets"][0], "split": cfg["split"]}[where][key] = value
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert _prepare(cfg_path, tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert err.startswith("drywallqa: error: ") and err.count("\n") == 1, err
    assert f"unknown key {key!r}" in err and f"did you mean {suggestion!r}?" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "own.split.json").exists()


def test_a_block_of_yaml_anchors_under_an_x_key_is_the_users_own(tmp_path, capsys):
    """`x-site: &site {...}` then `<<: *site` in each dataset: the user's own key, not a misspelt one."""
    make_yolo_dataset(tmp_path / "site", ["a", "b"])
    cfg = tmp_path / "own.yaml"
    cfg.write_text(f"x-site: &site {{root: {tmp_path / 'site'}, format: yolo}}\n"
                   f"datasets:\n  - {{<<: *site, name: site, class: crack}}\n")
    assert _prepare(cfg, tmp_path / "cache") == 0, capsys.readouterr().err


def test_the_shipped_data_configs_have_only_known_keys():
    from drywallqa.train.data.prepare import load_setup

    for name in ("data.yaml", "own_data.yaml"):
        assert load_setup(PROJECT_ROOT / "configs" / name).specs


def test_a_heic_phone_photo_in_a_dataset_is_read_upright_not_dropped(tmp_path, capsys):
    cfg = _one_dataset(tmp_path, ["a", "b"])
    shutil.copy(HEIC, tmp_path / "site" / "train" / "images" / "IMG_0001.HEIC")
    (tmp_path / "site" / "train" / "labels" / "IMG_0001.txt").write_text("0 0.5 0.25 1 0.5\n")  # top half
    assert _prepare(cfg, tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert "images kept: 3" in out and "label files without an image (ignored): 0" in out
    _, masks, meta, _ = open_cache(tmp_path / "cache", 16)
    row = [m["file"] for m in meta].index("IMG_0001.HEIC")
    assert masks[row][:8].all() and not masks[row][8:].any()


def test_a_heic_beside_its_jpeg_copy_is_one_photo_not_two(tmp_path, capsys):
    """IMG_0001.HEIC and IMG_0001.jpg (a converted copy) share one label file and one image id: the copy is read and
    the HEIC left aside, so the photo is not trained on twice."""
    cfg = _one_dataset(tmp_path, ["a", "IMG_0001"])
    shutil.copy(HEIC, tmp_path / "site" / "train" / "images" / "IMG_0001.HEIC")
    assert _prepare(cfg, tmp_path / "cache") == 0
    assert "images kept: 2" in capsys.readouterr().out
    _, _, meta, _ = open_cache(tmp_path / "cache", 16)
    assert sorted(m["file"] for m in meta) == ["IMG_0001.jpg", "a.jpg"]


def _label(root: Path, rel: str, line: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(line + "\n")


def _image(root: Path, rel: str, seed: int = 0) -> None:
    write_jpeg(root / rel, 40, 48, seed=seed)


TOP, BOTTOM = "0 0.5 0.25 1 0.5", "0 0.5 0.75 1 0.5"  # boxes over the top / bottom half


def test_images_in_subfolders_are_read_with_the_label_at_the_same_relative_path(tmp_path, capsys):
    """Photos sorted into one folder a day: read, each with the label file at the same path below labels/. Phone names
    restart every day, so the id and the split key include the subfolder (ids stay usable in mask file names)."""
    cfg = _one_dataset(tmp_path, ["a"])
    images, labels = tmp_path / "site" / "train" / "images", tmp_path / "site" / "train" / "labels"
    for day, line in (("day1", TOP), ("day2", BOTTOM)):
        _image(images, f"{day}/IMG_0001.jpg")
        _label(labels, f"{day}/IMG_0001.txt", line)
    _label(labels, "day2/lost.txt", TOP)  # no image: an orphan, named with its subfolder
    assert _prepare(cfg, tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert "images kept: 3" in out and "in its subfolders" not in out and "label file missing" not in out
    assert "label files without an image (ignored): 1" in out and str(labels / "day2" / "lost.txt") in out
    _, masks, meta, _ = open_cache(tmp_path / "cache", 16)
    rows = {m["id"]: i for i, m in enumerate(meta)}
    assert set(rows) == {"a", "day1~IMG_0001", "day2~IMG_0001"}
    assert masks[rows["day1~IMG_0001"]][:8].all() and not masks[rows["day1~IMG_0001"]][8:].any()
    assert masks[rows["day2~IMG_0001"]][8:].all() and not masks[rows["day2~IMG_0001"]][:8].any()
    for image_id in rows:  # the mask file name contract: <imageID>__<prompt>.png, the id read back whole
        name = mask_filename(image_id, "segment crack")
        assert "/" not in name and name[: -len(MASK_SUFFIX)].rsplit(SEPARATOR, 1)[0] == image_id
    sides = json.loads((tmp_path / "own.split.json").read_text())["datasets"]["site"]
    assert sorted(sides) == ["a.jpg", "day1/IMG_0001.jpg", "day2/IMG_0001.jpg"]
    assert sorted(m["file"] for m in meta) == sorted(sides)


def test_roboflow_variants_in_different_subfolders_stay_on_one_side(tmp_path, capsys):
    """Variants of one base photo sorted into two subfolders are one group in the grouped split."""
    names = [f"p{i}_jpg.rf.{i:04x}" for i in range(12)]
    cfg = _one_dataset(tmp_path, names)
    images, labels = tmp_path / "site" / "train" / "images", tmp_path / "site" / "train" / "labels"
    for i, name in enumerate(names):  # a second variant of each base photo, in a subfolder
        _image(images, f"more/{name.replace('.rf.', '.rf.ff')}.jpg", seed=i)
        _label(labels, f"more/{name.replace('.rf.', '.rf.ff')}.txt", TOP)
    assert _prepare(cfg, tmp_path / "cache") == 0
    assert "images kept: 24" in capsys.readouterr().out
    split = read_split(tmp_path / "own.split.json")
    assert len(split["site"]) == 24 and set(split["site"].values()) == {"train", "val"}
    for name in names:
        assert split["site"][f"{name}.jpg"] == split["site"][f"more/{name.replace('.rf.', '.rf.ff')}.jpg"], name
    assert leaked_bases(split) == {}


@pytest.mark.parametrize("splits", [["train", "val"], ["images/train", "images/val"]])
def test_an_ultralytics_layout_is_read(tmp_path, capsys, splits):
    """Ultralytics keeps images/<split>/ and labels/<split>/ under one root; its data.yaml says `train: images/train`,
    which is read as a split too."""
    root = tmp_path / "ultra"
    for split, names in (("train", ["a", "b", "c"]), ("val", ["d"])):
        for i, name in enumerate(names):
            _image(root, f"images/{split}/{name}.jpg", seed=i)
            _label(root, f"labels/{split}/{name}.txt", TOP)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: crack}\n")
    cfg = write_data_config(tmp_path / "own.yaml", [{"name": "site", "root": str(root), "splits": splits,
                                                     "format": "yolo", "class": "crack"}], None)
    assert _prepare(cfg, tmp_path / "cache") == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "images kept: 4" in out and "label file missing" not in out
    assert "label files without an image (ignored): 0" in out


@pytest.mark.parametrize("layout", ["ultralytics", "roboflow"])
def test_a_split_that_is_not_there_names_the_splits_the_root_has(tmp_path, capsys, layout):
    root = tmp_path / "ds"
    for split in ("train", "val"):
        folder = f"images/{split}" if layout == "ultralytics" else f"{split}/images"
        _image(root, f"{folder}/a.jpg")
    cfg = write_data_config(tmp_path / "own.yaml", [{"name": "site", "root": str(root), "splits": ["valid"],
                                                     "format": "yolo", "class": "crack"}], None)
    assert _prepare(cfg, tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{root / 'valid' / 'images'}" in err and f"{root / 'images' / 'valid'}" in err
    assert "splits [train, val] are there: set 'splits' to some of them" in err


def test_a_root_pointing_at_one_split_folder_says_which_root_and_split_to_set(tmp_path, capsys):
    make_yolo_dataset(tmp_path / "site", ["a"])
    cfg = write_data_config(tmp_path / "own.yaml", [{"name": "site", "root": str(tmp_path / "site" / "train"),
                                                     "format": "yolo", "class": "crack"}], None)
    assert _prepare(cfg, tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert f"set 'root' to {tmp_path / 'site'} and 'splits' to [train]" in err, err


def test_a_root_pointing_at_a_data_yaml_says_to_use_its_folder(tmp_path, capsys):
    make_yolo_dataset(tmp_path / "site", ["a"])
    (tmp_path / "site" / "data.yaml").write_text("train: ../train/images\n")
    cfg = write_data_config(tmp_path / "own.yaml", [{"name": "site", "root": str(tmp_path / "site" / "data.yaml"),
                                                     "format": "yolo", "class": "crack"}], None)
    assert _prepare(cfg, tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert f"is a file; set 'root' to the dataset's folder ({tmp_path / 'site'}?)" in err, err


def test_coco_photos_in_subfolders_are_keyed_by_their_path_and_get_their_own_labels(tmp_path, capsys):
    """A COCO image folder is read with its subfolders too. Before: a photo there got the id and split key of its file
    name alone, so old/a.jpg was a second 'a' and silently took a.jpg's objects. Now, as for YOLO, it is keyed by its
    path below the folder, looked up in the COCO file by that path (its file_name), and skipped if not listed."""
    top, bottom = {"bbox": [0, 0, 48, 20]}, {"bbox": [0, 20, 48, 20]}
    root = make_coco_dataset(tmp_path / "coco", {"a.jpg": [top], "b.jpg": [top], "day2/a.jpg": [bottom]})
    _image(root / "train", "old/a.jpg", seed=7)  # in no COCO file
    cfg = write_data_config(tmp_path / "own.yaml", [{"name": "site", "root": str(root), "format": "coco",
                                                     "class": "crack"}], None)
    assert _prepare(cfg, tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert "images kept: 3" in out and "image 'old/a.jpg' is not listed in the file" in out, out
    _, masks, meta, _ = open_cache(tmp_path / "cache", 16)
    rows = {m["id"]: i for i, m in enumerate(meta)}
    assert sorted(rows) == ["a", "b", "day2~a"] and sorted(m["file"] for m in meta) == ["a.jpg", "b.jpg", "day2/a.jpg"]
    assert masks[rows["a"]][:8].all() and not masks[rows["a"]][8:].any()
    assert masks[rows["day2~a"]][8:].all() and not masks[rows["day2~a"]][:8].any()
    sides = json.loads((tmp_path / "own.split.json").read_text())["datasets"]["site"]
    assert sorted(sides) == ["a.jpg", "b.jpg", "day2/a.jpg"]  # old/a.jpg is in no COCO file: never used


def test_upper_and_mixed_case_label_and_image_endings_are_read(tmp_path, capsys):
    """Exports made on Windows or by a camera: IMG_0001.JPG with IMG_0001.TXT, a .Txt; read like .jpg/.txt."""
    cfg = _one_dataset(tmp_path, ["a"])
    images, labels = tmp_path / "site" / "train" / "images", tmp_path / "site" / "train" / "labels"
    _image(images, "IMG_0001.JPG")
    _label(labels, "IMG_0001.TXT", TOP)
    _image(images, "IMG_0002.jpeg")
    _label(labels, "IMG_0002.Txt", BOTTOM)
    _label(labels, "LOST.TXT", TOP)  # no image: reported as an orphan, whatever its case
    assert _prepare(cfg, tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert "images kept: 3" in out and "label file missing" not in out, out
    assert "label files without an image (ignored): 1" in out and "LOST.TXT" in out
    _, masks, meta, _ = open_cache(tmp_path / "cache", 16)
    rows = {m["id"]: i for i, m in enumerate(meta)}
    assert masks[rows["IMG_0001"]][:8].all() and masks[rows["IMG_0002"]][8:].all()


def test_hidden_and_macos_folders_below_the_images_are_not_read(tmp_path, capsys):
    """A zip made on a Mac carries __MACOSX/._IMG.jpg resource forks, and tools leave .cache/ folders: not photos
    anyone meant to train on, so not read."""
    cfg = _one_dataset(tmp_path, ["a", "b"])
    folder = tmp_path / "site" / "train" / "images"
    for junk in ("__MACOSX/._a.jpg", ".cache/thumb.jpg"):
        (folder / junk).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "a.jpg", folder / junk)
    assert _prepare(cfg, tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert "images kept: 2" in out and "in its subfolders" not in out
    _, _, meta, _ = open_cache(tmp_path / "cache", 16)
    assert sorted(m["file"] for m in meta) == ["a.jpg", "b.jpg"]


def test_a_dataset_whose_every_photo_is_in_validation_is_warned_about(tmp_path, capsys):
    """A few base photos can all land in validation: training would never see them. The advice names the key as it
    is written in the data config (`val_fraction` under `split:`) and the config file."""
    cfg_path = _one_dataset(tmp_path, ["IMG_0001_jpg.rf.aa", "IMG_0001_jpg.rf.bb", "IMG_0002", "IMG_0003"])
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["split"]["val_fraction"] = 0.999
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert _prepare(cfg_path, tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert "split site: train 0 images / 0 base photos, val 4 images / 3 base photos" in out
    assert "warning: no training images in 'site'" in out
    assert f"change `seed` or lower `val_fraction` under `split:` in {cfg_path}" in out
    assert "run `drywallqa data prepare` again" in out
    assert main(["data", "split", "--config", str(cfg_path), "--split-file", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out  # `data split` alone says it too
    assert "warning: no training images in 'site'" in out and "run `drywallqa data split` again" in out
    assert f"under `split:` in {cfg_path}" in out  # names the config it read, as prepare does


@pytest.mark.parametrize("fraction,side", [(0.999, "training"), (0.001, "validation")])
def test_one_base_photo_is_told_to_add_photos_not_to_change_the_split(tmp_path, capsys, fraction, side):
    """Variants of one photo are one group: no seed or fraction puts it on both sides, so that advice would only move
    the warning to the other side."""
    cfg_path = _one_dataset(tmp_path, ["IMG_0001_jpg.rf.aa", "IMG_0001_jpg.rf.bb"])
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["split"]["val_fraction"] = fraction
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert _prepare(cfg_path, tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert f"warning: no {side} images in 'site'" in out, out
    assert "'site' has 1 base photo" in out and "add photos" in out
    assert "val_fraction" not in out and "seed" not in out


@pytest.mark.parametrize("side,warning", [("val", "no validation images in 'site'"),
                                          ("train", "no training images in 'site'")])
def test_a_side_emptied_by_skipped_photos_is_warned_about(tmp_path, capsys, side, warning):
    """The split sizes and warnings are of the photos that reach the cache: photos whose labels are missing are on
    neither side, so when they were all of one side, training (or validation) never sees the class."""
    cfg = _one_dataset(tmp_path, [f"p{i}" for i in range(8)])
    assert main(["data", "split", "--config", str(cfg)]) == 0
    sides = json.loads((tmp_path / "own.split.json").read_text())["datasets"]["site"]
    assert set(sides.values()) == {"train", "val"}
    for name, s in sides.items():
        if s == side:
            (tmp_path / "site" / "train" / "labels" / f"{Path(name).stem}.txt").unlink()
    capsys.readouterr()
    assert _prepare(cfg, tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert warning in out, out
    kept = 8 - list(sides.values()).count(side)
    other = "train" if side == "val" else "val"
    assert f"{side} 0 images / 0 base photos" in out and f"{other} {kept} images / {kept} base photos" in out
    summary = json.loads((tmp_path / "cache" / "prepare_summary.json").read_text())
    assert summary["split"]["site"][side] == 0
    _, _, meta, _ = open_cache(tmp_path / "cache", 16)
    assert {m["split"] for m in meta} == {other}  # what the summary says is what training gets


def test_a_missing_label_file_says_how_to_mark_a_photo_with_nothing_to_find(tmp_path, capsys):
    cfg = _one_dataset(tmp_path, ["a", "b"])
    (tmp_path / "site" / "train" / "labels" / "b.txt").unlink()
    assert _prepare(cfg, tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert "b.jpg: label file missing; an empty label file marks an image with nothing to find" in out


def test_a_dataset_with_no_usable_label_names_the_reason_in_its_one_line_error(tmp_path, capsys):
    """A two-class export numbers the class 1: the error is all the user sees, so it names why lines failed."""
    cfg = _one_dataset(tmp_path, ["a", "b"])
    for name in ("a", "b"):
        (tmp_path / "site" / "train" / "labels" / f"{name}.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    assert _prepare(cfg, tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of its 2 images could be used" in err
    assert "class id 1 is not one of this dataset's class ids [0] (set class_ids" in err


def test_exif_rotated_photo_and_its_labels_are_both_upright(tmp_path, capsys):
    """YOLO tools label the photo as shown (EXIF orientation applied); the mask must match the decoded image."""
    cfg = _one_dataset(tmp_path, ["a"])
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:, :32] = 255  # left half white as stored; orientation 6 shows it as the top half of a 48 x 64 photo
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "site" / "train" / "images" / "turned.jpg", exif=exif, quality=95)
    (tmp_path / "site" / "train" / "labels" / "turned.txt").write_text("0 0.5 0.25 1 0.5\r\n\r\n")  # top half
    assert _prepare(cfg, tmp_path / "cache") == 0
    images, masks, meta, _ = open_cache(tmp_path / "cache", 16)
    row = [m["file"] for m in meta].index("turned.jpg")
    assert masks[row][:8].all() and not masks[row][8:].any()
    assert images[row][:7].min() > 200 and images[row][9:].max() < 50


def test_sigterm_mid_prepare_keeps_the_old_cache_and_leaves_no_work_folder(tmp_path):
    """kill / a service stop during prepare ends it like Ctrl-C: the hidden work folder (its space reserved up
    front, gigabytes at --sizes 512) is removed and the old cache and split are kept."""
    cfg = small_project(tmp_path, n_crack=2, n_wall=2)
    out = tmp_path / "cache"
    assert _prepare(cfg, out) == 0
    before = {p: p.read_bytes() for p in [*sorted((out / "16").iterdir()), tmp_path / "split.json"]}
    make_yolo_dataset(tmp_path / "walls", ["zz_late"])
    label = tmp_path / "walls" / "train" / "labels" / "zz_late.txt"
    label.unlink()
    os.mkfifo(label)  # reading this label blocks: prepare is held mid-run, its work folder open
    proc = subprocess.Popen([sys.executable, "-m", "drywallqa.cli", "data", "prepare", "--config", str(cfg),
                             "--sizes", "16", "--out", str(out), "--quiet", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (out / ".16.partial").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / ".16.partial").exists(), proc.communicate(timeout=5)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "drywallqa: error: interrupted" in err, (proc.returncode, err)
    assert sorted(p.name for p in out.iterdir()) == ["16", "prepare_summary.json"]
    assert {p: p.read_bytes() for p in before} == before
