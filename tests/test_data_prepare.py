"""`drywallqa data prepare` end to end on tiny synthetic datasets (YOLO and COCO, with broken files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from _foundation_fixtures import make_coco_dataset, make_yolo_dataset, small_project, write_data_config

from drywallqa.cli import main
from drywallqa.paths import PROJECT_ROOT
from drywallqa.train.data import pack
from drywallqa.train.data.cache import CacheWriter, check_free_space, open_cache, row_bytes
from drywallqa.train.data.errors import DataError
from drywallqa.train.data.prepare import DataConfigError, load_setup, prepare, records_in_split
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
    # the photo without a label file is not listed; the undecodable one is (only decoding could tell)
    assert set(split) == {"y", "c"} and len(split["y"]) == 5 and leaked_bases(split) == {}
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
        for name, array in (("images", images), ("masks", masks)):  # cut to the 6 kept rows, not 8
            assert (tmp_path / "cache" / str(size) / f"{name}.npy").stat().st_size == array.offset + array.nbytes
    assert not list((tmp_path / "cache").glob(".*"))
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
    assert err.count("dataset 'gone'") == 1  # said once, not 'dataset X: dataset X:'


def test_data_split_command_prints_sizes(tmp_path, capsys):
    cfg = small_project(tmp_path)
    assert main(["data", "split", "--config", str(cfg), "--split-file", str(tmp_path / "other.json")]) == 0
    out = capsys.readouterr().out
    assert "cracks: train" in out and "walls: train" in out
    assert read_split(tmp_path / "other.json").keys() == {"cracks", "walls"}


# --- failures: one clear line, exit 2, nothing half-written, the old cache kept ------------------------------


def _prepare(cfg: Path, out: Path, *extra: str) -> int:
    return main(["data", "prepare", "--config", str(cfg), "--sizes", "16", "--out", str(out), "--quiet", *extra])


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden work folders included) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    assert err.startswith("drywallqa: error: ") and err.count("\n") == 1, err  # no traceback
    return err


@pytest.mark.parametrize("damage,message", [
    ("rename_labels", "no label folder"),
    ("empty_images", "has no images in"),
    ("delete_label_files", "none of its 3 images could be used"),
])
def test_unusable_dataset_is_an_error_and_keeps_the_old_cache(tmp_path, capsys, damage, message):
    cfg = small_project(tmp_path, n_crack=3, n_wall=3)
    assert _prepare(cfg, tmp_path / "cache") == 0
    before = _files(tmp_path / "cache")
    (tmp_path / "split.json").unlink()  # a failed run must not write the split either
    walls = tmp_path / "walls" / "train"
    if damage == "rename_labels":
        (walls / "labels").rename(walls / "labels_old")
    else:
        for f in (walls / ("images" if damage == "empty_images" else "labels")).iterdir():
            f.unlink()
    capsys.readouterr()
    assert _prepare(cfg, tmp_path / "cache") == 2
    err = _one_error_line(capsys.readouterr().err)
    assert message in err and "'walls'" in err and str(walls) in err  # names the dataset and its folder
    assert _files(tmp_path / "cache") == before
    assert not (tmp_path / "split.json").exists()


def test_default_split_file_is_beside_the_config_not_the_projects(tmp_path, capsys):
    project_split = PROJECT_ROOT / "configs" / "split.json"
    committed = project_split.read_bytes() if project_split.is_file() else None
    cfg = yaml.safe_load(small_project(tmp_path, n_crack=2, n_wall=2).read_text())
    del cfg["split"]["file"]
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(cfg))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.yaml").write_text(yaml.safe_dump(cfg))
    assert load_setup(other).split_file == (tmp_path / "other.split.json").resolve()
    assert load_setup(tmp_path / "sub" / "data.yaml").split_file == (tmp_path / "sub" / "split.json").resolve()
    assert load_setup(None).split_file == project_split
    assert _prepare(other, tmp_path / "cache") == 0
    assert read_split(tmp_path / "other.split.json").keys() == {"cracks", "walls"}
    assert (project_split.read_bytes() if project_split.is_file() else None) == committed


def test_caches_that_cannot_fit_are_refused_before_writing(tmp_path):
    rows = shutil.disk_usage(tmp_path).free // row_bytes(4096) + 1
    with pytest.raises(DataError, match="not enough free space"):
        check_free_space(tmp_path, rows, [4096])
    check_free_space(tmp_path, 1, [16])
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 20 MiB file system (tmpfs): a disk that fills up. Needs root to mount."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_full_disk_is_a_clear_error_and_keeps_the_old_cache(tmp_path, tiny_disk):
    cfg = small_project(tmp_path, n_crack=3, n_wall=3)
    out = tiny_disk / "cache"
    assert _prepare(cfg, out) == 0
    before = _files(out)
    # 6 images at 1024 px need 24 MiB: more than the disk holds. A subprocess, since the old code died of SIGBUS.
    run = subprocess.run([sys.executable, "-m", "drywallqa.cli", "data", "prepare", "--config", str(cfg), "--sizes",
                          "16", "1024", "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert run.returncode == 2
    assert "not enough free space" in _one_error_line(run.stderr)
    assert _files(out) == before


def test_cache_space_is_reserved_up_front_so_a_full_disk_is_an_error_not_sigbus(tiny_disk):
    with pytest.raises(DataError, match="cannot write the 1024px cache"):
        CacheWriter(tiny_disk, 1024, 10)  # 40 MiB on a 20 MiB disk: refused at once, not on the 6th row
    assert list(tiny_disk.iterdir()) == []


def test_duplicate_dataset_names_are_a_config_error(tmp_path, capsys):
    cfg = yaml.safe_load(small_project(tmp_path, n_crack=2, n_wall=2).read_text())
    cfg["datasets"][1]["name"] = "cracks"
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "split", "--config", str(tmp_path / "data.yaml")]) == 2
    assert "dataset name 'cracks' is used more than once" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "split.json").exists()


def _edit_config(cfg: Path, change: str) -> None:
    data = yaml.safe_load(cfg.read_text())
    if change == "broken_yaml":
        cfg.write_text("datasets: [\n")
        return
    if change == "coco_truncated":
        make_coco_dataset(cfg.parent / "c", {"q0.jpg": [{"bbox": [1, 1, 10, 10]}]})
        ann = cfg.parent / "c" / "train" / "_annotations.coco.json"
        ann.write_text(ann.read_text()[:40])
        data["datasets"].append({"name": "c", "root": str(cfg.parent / "c"), "format": "coco", "class": "crack"})
    elif change == "no_root":
        del data["datasets"][0]["root"]
    else:
        key, value = change.split("=")
        data["split"] = yaml.safe_load(value) if key == "split" else {**data["split"], key: yaml.safe_load(value)}
    cfg.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize("change,extra,message", [
    ("broken_yaml", [], "is not valid YAML"),
    ("file=null", [], "split.file must be a path"),
    ("split=0.15", [], "'split' must be a mapping"),
    ("seed=1.7", [], "split.seed must be a whole number, got 1.7"),
    ("no_root", [], "every dataset needs 'name', 'root' and 'class'"),
    ("coco_truncated", [], "cannot read COCO annotations"),
    ("", ["--out", "{tmp}/a_file"], "a file of that name exists"),
    ("", ["--out", "{tmp}/a_file/cache"], "part of that path is a file"),
    ("", ["--split-file", "{tmp}"], "is a folder"),
])
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, capsys, change, extra, message):
    cfg = small_project(tmp_path, n_crack=2, n_wall=2)
    (tmp_path / "a_file").write_text("not a folder")
    if change:
        _edit_config(cfg, change)
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert _prepare(cfg, tmp_path / "cache", *extra) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "split.json").exists()
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_one_line_error(tmp_path, capsys):
    cfg = small_project(tmp_path, n_crack=2, n_wall=2)
    (tmp_path / "ro").mkdir(mode=0o555)
    assert _prepare(cfg, tmp_path / "ro") == 2
    assert "cannot write to the output folder" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("args", [["--workers", "-3"], ["--list", "-1"], ["--sizes", "100000"], ["--sizes", "0"]])
def test_out_of_range_arguments_are_refused(tmp_path, args, capsys):
    cfg = small_project(tmp_path, n_crack=1, n_wall=1)
    with pytest.raises(SystemExit) as exc:
        main(["data", "prepare", "--config", str(cfg), "--out", str(tmp_path / "cache"), "--quiet", *args])
    assert exc.value.code == 2 and args[0] in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


# --- what is read and what is reported ----------------------------------------------------------------------


def test_every_image_type_is_read_and_orphan_labels_are_reported(tmp_path, capsys):
    cfg = small_project(tmp_path, n_crack=2, n_wall=2)
    walls = tmp_path / "walls" / "train"
    jpg = next((walls / "images").glob("*.jpg"))
    cv2.imwrite(str(walls / "images" / "scan_tif.rf.0a.tif"), cv2.imread(str(jpg)))
    shutil.copy(jpg, walls / "images" / "phone_jfif.rf.0b.jfif")
    for stem in ("scan_tif.rf.0a", "phone_jfif.rf.0b", "lost_jpg.rf.0c"):  # the last one has no image
        (walls / "labels" / f"{stem}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    assert _prepare(cfg, tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert "images kept: 6 {'cracks': 2, 'walls': 4}" in out
    assert "label files without an image (ignored): 1" in out and "lost_jpg.rf.0c.txt" in out
    summary = json.loads((tmp_path / "cache" / "prepare_summary.json").read_text())
    assert summary["orphan_labels"] == [str(walls / "labels" / "lost_jpg.rf.0c.txt")]


def test_images_missing_from_the_split_file_are_reported(tmp_path, capsys):
    cfg = small_project(tmp_path, n_crack=2, n_wall=2)
    assert main(["data", "split", "--config", str(cfg)]) == 0
    make_yolo_dataset(tmp_path / "walls", ["late_jpg.rf.0d"])  # arrives after the split was written
    capsys.readouterr()
    sides = [records_in_split(load_setup(cfg), side) for side in ("train", "val")]
    assert sum(len(recs) for s in sides for recs in s.values()) == 4  # the split file decides, as before
    err = capsys.readouterr().err
    assert f"1 images are not in {tmp_path / 'split.json'}" in err and "drywallqa data split" in err
    assert main(["data", "split", "--config", str(cfg)]) == 0
    records_in_split(load_setup(cfg), "train")
    assert "not in" not in capsys.readouterr().err


def test_pack_skips_unreadable_images_like_prepare(tmp_path, capsys):
    cfg = small_project(tmp_path, n_crack=3, n_wall=3)
    broken = sorted((tmp_path / "walls" / "train" / "images").glob("*.jpg"))[0]
    broken.write_bytes(b"not a jpeg at all")
    assert main(["data", "split", "--config", str(cfg)]) == 0
    side = read_split(tmp_path / "split.json")["walls"][broken.name]
    on_side = [r for recs in records_in_split(load_setup(cfg), side).values() for r in recs]
    capsys.readouterr()
    assert pack.main(["--config", str(cfg), "--out", str(tmp_path / "pack"), "--size", "16", "--parts", "1",
                      "--split", side]) == 0
    meta = json.loads((tmp_path / "pack" / "part0" / "meta.json").read_text())
    assert [m["id"] for m in meta] == [r.image_id for r in on_side if r.image_path != broken]
    assert "cannot read image" in capsys.readouterr().err


def test_a_publish_killed_between_its_renames_leaves_a_readable_cache(tmp_path):
    """The old cache is moved aside before the new one is renamed in; a kill in between must not lose both."""

    cfg = small_project(tmp_path, n_crack=2, n_wall=2)
    out = tmp_path / "cache"
    assert _prepare(cfg, out) == 0
    images = open_cache(out, 16)[0].copy()
    (out / "16").rename(out / ".16.old")  # the state right after publish's first rename
    np.testing.assert_array_equal(open_cache(out, 16)[0], images)
    assert (out / "16").is_dir() and not (out / ".16.old").exists()


def test_a_reader_waits_for_a_live_publish_instead_of_taking_the_old_cache_back(tmp_path):
    import threading

    from drywallqa.train.data.cache import _publish_lock

    cfg = small_project(tmp_path, n_crack=2, n_wall=2)
    out = tmp_path / "cache"
    assert _prepare(cfg, out) == 0
    shutil.copytree(out / "16", tmp_path / "new16")
    read: list = []
    with _publish_lock(out / "16"):  # a publisher between its two renames
        (out / "16").rename(out / ".16.old")
        reader = threading.Thread(target=lambda: read.append(open_cache(out, 16)[3]))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive()  # waiting for the lock, not renaming .16.old back
        (tmp_path / "new16").rename(out / "16")  # the publisher's second rename
    reader.join(30)
    assert read and (out / ".16.old").is_dir()  # the new cache was read; the old one left for the publisher


def test_default_cache_of_another_config_is_its_own_folder_not_the_projects(tmp_path, monkeypatch, capsys):
    """A customer's data config (site photos) prepared without --out must not replace the caches the shipped
    training configs read (cache/<size>): it gets cache/<config name>/<size>."""
    import drywallqa.paths
    from drywallqa.train.data.prepare import default_cache_dir

    project_cache = tmp_path / "project_cache"  # stands in for the project's cache/
    monkeypatch.setattr(drywallqa.paths, "CACHE_DIR", project_cache)
    cfg = yaml.safe_load(small_project(tmp_path, n_crack=2, n_wall=2).read_text())
    del cfg["split"]["file"]
    own = tmp_path / "own_data.yaml"
    own.write_text(yaml.safe_dump(cfg))
    assert main(["data", "prepare", "--config", str(own), "--sizes", "16", "--quiet"]) == 0
    assert str(project_cache / "own_data" / "16") in capsys.readouterr().out  # the summary says where it went
    assert not (project_cache / "16").exists()
    images, _, meta, _ = open_cache(project_cache / "own_data", 16)
    assert len(meta) == 4 and images.shape[1:] == (16, 16, 3)
    assert (tmp_path / "own_data.split.json").is_file()  # the split beside it, as before
    assert default_cache_dir(load_setup(None).config_path) == project_cache  # the project's own config: cache/


def test_a_dataset_with_no_validation_images_is_warned_about(tmp_path, capsys):
    """A handful of one's own photos often leaves a class with no validation image: training and eval then
    cannot measure it, and the summary says so and how to change it."""
    cfg = yaml.safe_load(small_project(tmp_path, n_crack=3, n_wall=3).read_text())
    cfg["split"]["val_fraction"] = 0.001  # every photo lands in training
    cfg_path = tmp_path / "few.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert _prepare(cfg_path, tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert "warning: no validation images in 'cracks', 'walls'" in out
    assert f"raise `val_fraction` under `split:` in {cfg_path}" in out  # as the key is written in the config
    summary = json.loads((tmp_path / "cache" / "prepare_summary.json").read_text())
    assert summary["split"]["cracks"]["val"] == 0
    cfg["split"]["val_fraction"] = 0.999  # every photo in validation: no warning
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert _prepare(cfg_path, tmp_path / "cache") == 0
    assert "no validation images" not in capsys.readouterr().out
