"""`drywallqa data prepare` end to end on tiny synthetic datasets (YOLO and COCO, with broken files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _foundation_fixtures import make_coco_dataset, make_yolo_dataset, small_project, write_data_config

from drywallqa.cli import main
from drywallqa.train.data.cache import open_cache
from drywallqa.train.data.prepare import DataConfigError, load_setup, prepare
from drywallqa.train.data.split import leaked_bases, read_split


def _mixed_project(tmp_path):
    names = [f"p{i}_jpg.rf.{i:08x}" for i in range(5)]
    make_yolo_dataset(tmp_path / "y", names, lines={names[1]: ["0 0.5 0.5 0.5 0.25", "0 oops 1 2 3"]})
    (tmp_path / "y" / "train" / "images" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "y" / "train" / "labels" / "broken.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "y" / "train" / "labels" / f"{names[4]}.txt").unlink()  # label file missing
    make_coco_dataset(tmp_path / "c", {"q0.jpg": [{"segmentation": [[2, 2, 30, 2, 30, 20, 2, 20]]}],
                                       "q1.jpg": [{"bbox": [1, 1, 10, 10]}]})
    return write_data_config(tmp_path / "data.yaml", [
        {"name": "y", "root": str(tmp_path / "y"), "format": "yolo", "class": "taping"},
        {"name": "c", "root": str(tmp_path / "c"), "format": "coco", "class": "crack"},
    ], tmp_path / "split.json")


def test_prepare_writes_split_and_caches_and_reports_bad_files(tmp_path, capsys):
    cfg = _mixed_project(tmp_path)
    code = main(["data", "prepare", "--config", str(cfg), "--sizes", "32", "24", "--out", str(tmp_path / "cache"),
                 "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "broken.jpg" in out and "cannot read image" in out
    assert "label file missing" in out
    assert ":2: malformed label line" in out  # file and line of the bad label line
    assert "images kept: 6" in out

    split = read_split(tmp_path / "split.json")
    assert set(split) == {"y", "c"} and len(split["y"]) == 6 and leaked_bases(split) == {}
    for size in (32, 24):
        images, masks, meta, info = open_cache(tmp_path / "cache", size)
        assert images.shape == (6, size, size, 3) and images.dtype == np.uint8
        assert masks.shape == (6, size, size) and masks.dtype == np.uint8
        assert set(np.unique(masks)) <= {0, 1}
        assert [m["class"] for m in meta] == [1, 1, 1, 1, 0, 0]  # taping is class 1, crack class 0
        assert {m["split"] for m in meta} <= {"train", "val"}
        assert all(m["split"] == split[m["dataset"]][m["file"]] for m in meta)
        assert {"id", "dataset", "class", "split"} <= set(meta[0])
        assert info["count"] == 6 and info["classes"] == ["crack", "taping"]
        # the COCO box image: box (1,1)-(11,11) on 48x40 occupies a known share of the mask
        box = masks[[m["file"] for m in meta].index("q1.jpg")]
        assert abs(box.mean() - 100 / (48 * 40)) < 0.02
    assert not list((tmp_path / "cache").glob(".*partial"))
    summary = json.loads((tmp_path / "cache" / "prepare_summary.json").read_text())
    assert len(summary["skipped"]) == 2 and len(summary["label_issues"]) == 1


def test_cache_rows_match_native_masks(tmp_path):
    cfg = small_project(tmp_path, n_crack=3, n_wall=2)
    summary = prepare(load_setup(cfg), [48], tmp_path / "cache", progress=False)
    images, masks, meta, _ = open_cache(tmp_path / "cache", 48)
    assert summary.images == {"cracks": 3, "walls": 2}
    # crack polygon spans x 0.1..0.9, y 0.1..0.3 of a 48x40 image -> resized to 48x48
    m = masks[0]
    assert m[5:13, 6:42].all() and not m[20:].any()
    assert images.shape == (5, 48, 48, 3)


@pytest.mark.parametrize("field,value,message", [
    ("box_strategy", "blob", "box_strategy 'blob' is not one of"),
    ("format", "voc", "format 'voc' is not one of"),
    ("class", "mould", "class 'mould' is not in the vocabulary"),
])
def test_bad_config_values_give_clear_errors(tmp_path, field, value, message, capsys):
    ds = {"name": "y", "root": str(tmp_path), "format": "yolo", "class": "crack"}
    strategy = "filled_box"
    if field == "box_strategy":
        strategy = value
    else:
        ds[field] = value
    cfg = write_data_config(tmp_path / "d.yaml", [ds], tmp_path / "s.json", box_strategy=strategy)
    with pytest.raises(DataConfigError, match=message):
        load_setup(cfg)
    assert main(["data", "split", "--config", str(cfg)]) == 2
    assert message.split("'")[0] in capsys.readouterr().err


def test_missing_dataset_folder_is_a_clear_error(tmp_path, capsys):
    cfg = write_data_config(tmp_path / "d.yaml", [{"name": "gone", "root": str(tmp_path / "nope"),
                                                   "class": "crack"}], tmp_path / "s.json")
    assert main(["data", "split", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "dataset 'gone'" in err and "no image folder" in err


def test_data_split_command_prints_sizes(tmp_path, capsys):
    cfg = small_project(tmp_path)
    assert main(["data", "split", "--config", str(cfg), "--split-file", str(tmp_path / "other.json")]) == 0
    out = capsys.readouterr().out
    assert "cracks: train" in out and "walls: train" in out
    assert read_split(tmp_path / "other.json").keys() == {"cracks", "walls"}
