"""Which images the split file lists, and how they are counted: an image whose labels cannot be used is on neither
side (an empty label file is a negative and stays); two photos of one name in two splits of a dataset share one entry
but are two images, each with its own labels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _foundation_fixtures import write_data_config, write_jpeg

from drywallqa.cli import main
from drywallqa.train.data.cache import open_cache
from drywallqa.train.data.prepare import load_labelled, load_setup, records_in_split
from drywallqa.train.data.split import read_split, split_sizes

TOP, BOTTOM = "0 0.5 0.25 1 0.5", "0 0.5 0.75 1 0.5"  # boxes over the top / bottom half of a 40 x 48 photo
SIZES = re.compile(r"(\S+): train (\d+) images / \d+ base photos, val (\d+) images")


def _photo(root: Path, split: str, name: str, label: str | None, seed: int) -> None:
    """<root>/<split>/images/<name>.jpg and, unless `label` is None, its label file ('' writes an empty one)."""
    write_jpeg(root / split / "images" / f"{name}.jpg", 40, 48, seed=seed)
    (root / split / "labels").mkdir(parents=True, exist_ok=True)
    if label is not None:
        (root / split / "labels" / f"{name}.txt").write_text(label + "\n" if label else "")


def _config(tmp_path: Path, root: Path, splits: list[str], fmt: str = "yolo") -> Path:
    return write_data_config(tmp_path / "own.yaml", [{"name": "site", "root": str(root), "splits": splits,
                                                      "format": fmt, "class": "crack"}], None)


def _printed_sizes(out: str) -> dict[str, tuple[int, int]]:
    return {ds: (int(train), int(val)) for ds, train, val in SIZES.findall(out)}


def _prepare(cfg: Path, out: Path) -> int:
    return main(["data", "prepare", "--config", str(cfg), "--sizes", "16", "--out", str(out), "--quiet"])


def test_images_whose_labels_cannot_be_used_are_not_in_the_split_nor_counted(tmp_path, capsys):
    """Before, `data split` and `data prepare` listed a photo without a label file (or whose every line was rejected)
    in the split file and counted it in `data split`'s sizes, though it is never cached, trained or evaluated on."""
    root = tmp_path / "site"
    for i in range(8):
        _photo(root, "train", f"p{i}", TOP, seed=i)
    _photo(root, "train", "negative", "", seed=8)  # an empty label file: a photo with nothing to find, kept
    _photo(root, "train", "unlabelled", None, seed=9)
    _photo(root, "train", "other_class", "1 0.5 0.5 0.2 0.2", seed=10)  # every line rejected
    cfg = _config(tmp_path, root, ["train"])
    used = {f"p{i}.jpg" for i in range(8)} | {"negative.jpg"}

    assert main(["data", "split", "--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    written = (tmp_path / "own.split.json").read_text()
    sides = json.loads(written)["datasets"]["site"]
    assert set(sides) == used
    assert sum(_printed_sizes(out)["site"]) == len(sides) == 9, out
    assert "2 images of 'site' are not in the split" in err and "other_class.jpg: no usable label" in err, err

    assert _prepare(cfg, tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert (tmp_path / "own.split.json").read_text() == written  # prepare leaves out the same images
    _, _, meta, _ = open_cache(tmp_path / "cache", 16)
    assert {m["file"] for m in meta} == used
    row = split_sizes({"site": sides})["site"]
    assert _printed_sizes(out)["site"] == (row["train"], row["val"]), out

    assert sum(len(r) for side in ("train", "val") for r in records_in_split(load_setup(cfg), side).values()) == 9
    assert "not in" not in capsys.readouterr().err  # a photo without labels is not 'unassigned': no re-split advice


def test_data_split_refuses_a_dataset_none_of_whose_images_has_usable_labels(tmp_path, capsys):
    root = tmp_path / "site"
    for i in range(3):
        _photo(root, "train", f"p{i}", None, seed=i)
    cfg = _config(tmp_path, root, ["train"])
    assert main(["data", "split", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset 'site': none of its 3 images could be used" in err, err
    assert "label file missing" in err and not (tmp_path / "own.split.json").exists()


def _coco_split(root: Path, split: str, name: str, bbox: list[int], seed: int) -> None:
    write_jpeg(root / split / f"{name}.jpg", 40, 48, seed=seed)
    doc = {"images": [{"id": 1, "file_name": f"{name}.jpg", "height": 40, "width": 48}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": bbox}],
           "categories": [{"id": 1, "name": "crack"}]}
    (root / split / "_annotations.coco.json").write_text(json.dumps(doc))


def _same_name_in_two_splits(root: Path, fmt: str, layout: str) -> list[str]:
    """IMG_0001 in train (label: top half) and valid (bottom half), two different photos; returns the splits."""
    if fmt == "coco":
        _coco_split(root, "train", "IMG_0001", [0, 0, 48, 20], seed=1)
        _coco_split(root, "valid", "IMG_0001", [0, 20, 48, 20], seed=2)
        return ["train", "valid"]
    splits = ["train", "valid"] if layout == "roboflow" else ["images/train", "images/val"]
    for split, line, seed in zip(splits, (TOP, BOTTOM), (1, 2), strict=True):
        if layout == "roboflow":
            _photo(root, split, "IMG_0001", line, seed)
        else:
            write_jpeg(root / split / "IMG_0001.jpg", 40, 48, seed=seed)
            label = root / split.replace("images", "labels") / "IMG_0001.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(line + "\n")
    return splits


@pytest.mark.parametrize("fmt,layout", [("yolo", "roboflow"), ("yolo", "ultralytics"), ("coco", "roboflow")])
def test_two_photos_of_one_name_in_two_splits_are_both_used_each_with_its_labels(tmp_path, capsys, fmt, layout):
    """The split file is keyed by the path below the image folder, so train/IMG_0001.jpg and valid/IMG_0001.jpg share
    one entry and one side (as copies of one photo must). Both are cached and evaluated, each with its own labels;
    before, the printed split sizes counted the entry once, so they said 1 image where 2 are trained on."""
    root = tmp_path / "site"
    cfg = _config(tmp_path, root, _same_name_in_two_splits(root, fmt, layout), fmt)
    assert main(["data", "split", "--config", str(cfg)]) == 0
    assert sum(_printed_sizes(capsys.readouterr().out)["site"]) == 2
    assert list(read_split(tmp_path / "own.split.json")["site"]) == ["IMG_0001.jpg"]

    assert _prepare(cfg, tmp_path / "cache") == 0
    assert sum(_printed_sizes(capsys.readouterr().out)["site"]) == 2
    _, masks, meta, _ = open_cache(tmp_path / "cache", 16)
    assert [m["file"] for m in meta] == ["IMG_0001.jpg"] * 2
    halves = sorted((bool(m[:8].all() and not m[8:].any()), bool(m[8:].all() and not m[:8].any())) for m in masks)
    assert halves == [(False, True), (True, False)]  # one photo's top, the other's bottom: neither took over

    side = json.loads((tmp_path / "own.split.json").read_text())["datasets"]["site"]["IMG_0001.jpg"]
    records = records_in_split(load_setup(cfg), side)["site"]  # what eval, the GPU pack and calibration read
    assert len({r.image_path for r in records}) == 2
    for record in records:
        mask = load_labelled(record, fmt, "filled_box").mask
        top = "train" in record.image_path.relative_to(root).parts
        assert mask is not None and bool(mask[:20].all() and not mask[20:].any()) == top, record.image_path


def test_a_name_shared_with_an_unlabelled_photo_in_another_split_keeps_its_entry(tmp_path, capsys):
    """valid/IMG_0001.jpg has labels, train/IMG_0001.jpg has none: the entry stays (for the labelled one) and the
    sizes count one image."""
    root = tmp_path / "site"
    _photo(root, "train", "IMG_0001", None, seed=1)
    _photo(root, "train", "p0", TOP, seed=3)
    _photo(root, "valid", "IMG_0001", BOTTOM, seed=2)
    cfg = _config(tmp_path, root, ["train", "valid"])
    assert main(["data", "split", "--config", str(cfg)]) == 0
    assert sum(_printed_sizes(capsys.readouterr().out)["site"]) == 2
    assert sorted(read_split(tmp_path / "own.split.json")["site"]) == ["IMG_0001.jpg", "p0.jpg"]
    assert _prepare(cfg, tmp_path / "cache") == 0
    assert sum(_printed_sizes(capsys.readouterr().out)["site"]) == 2
