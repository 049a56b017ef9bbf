"""Labels -> pixel masks: YOLO polygons and boxes, COCO polygons/RLE/boxes, malformed input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _foundation_fixtures import make_coco_dataset, make_yolo_dataset, write_data_config

from drywallqa.train.data import coco
from drywallqa.train.data.labels import BOX_MASK_STRATEGIES, parse_yolo_line, rasterize, read_yolo_labels
from drywallqa.train.data.prepare import collect_records, labels_for, load_labelled, load_setup
from drywallqa.train.data.sources import DatasetSpec, yolo_records

H, W = 8, 10
EXPECTED_RECT = np.zeros((H, W), np.uint8)
EXPECTED_RECT[1:4, 2:6] = 255  # pixel centres x in 2.5..5.5, y in 1.5..3.5


def test_polygon_rasterises_to_pixel_centres_inside():
    obj = parse_yolo_line([0, 0.2, 0.125, 0.6, 0.125, 0.6, 0.5, 0.2, 0.5], W, H)  # (2,1)-(6,4) in pixels
    assert obj.kind == "polygon"
    np.testing.assert_array_equal(rasterize([obj], H, W), EXPECTED_RECT)


def test_triangle_polygon_pixels():
    # Right triangle (0,0),(8,0),(0,8) on an 8x8 grid: pixel (r, c) is inside iff its centre satisfies
    # (c + .5) + (r + .5) < 8, i.e. r + c <= 6 (centres exactly on the hypotenuse would be r + c == 7).
    obj = parse_yolo_line([0, 0, 0, 1, 0, 0, 1], 8, 8)
    mask = rasterize([obj], 8, 8)
    r, c = np.indices((8, 8))
    assert np.array_equal(mask[r + c <= 6], np.full(np.count_nonzero(r + c <= 6), 255, np.uint8))
    assert not mask[r + c >= 8].any()


def test_box_filled_and_centre_band():
    obj = parse_yolo_line([0, 0.4, 0.3125, 0.4, 0.375], W, H)  # box (2,1)-(6,4)
    assert obj.kind == "box"
    np.testing.assert_array_equal(rasterize([obj], H, W, "filled_box"), EXPECTED_RECT)
    band = rasterize([obj], H, W, "centre_band")  # horizontal box: a band half its height, centred
    assert band.any() and (band <= EXPECTED_RECT).all() and np.count_nonzero(band) < np.count_nonzero(EXPECTED_RECT)
    with pytest.raises(ValueError, match="unknown box strategy"):
        rasterize([obj], H, W, "nope")
    assert "filled_box" in BOX_MASK_STRATEGIES


def test_yolo_malformed_lines_reported_by_file_and_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("0 0.4 0.3125 0.4 0.375\n0 0.5 abc 0.1 0.1\n\n0 0.1 0.2\n0 0.5 0.5 0 0.1\n")
    parsed = read_yolo_labels(path, W, H)
    assert len(parsed.objects) == 1
    assert [i.line for i in parsed.issues] == [2, 4, 5]
    assert all(str(i).startswith(f"{path}:") for i in parsed.issues)
    assert "malformed label line" in str(parsed.issues[0])
    missing = read_yolo_labels(tmp_path / "none.txt", W, H)
    assert missing.issues and "label file missing" in missing.issues[0].reason


def _load_one(tmp_path, lines: list[str]):
    """The one image of a fresh single-class YOLO dataset with these label lines, through `load_labelled`."""
    make_yolo_dataset(tmp_path / "y", ["img"], h=H, w=W, lines={"img": lines})
    return load_labelled(yolo_records(DatasetSpec("y", tmp_path / "y", ("train",), "yolo", "crack"))[0], "yolo",
                         "filled_box")


@pytest.mark.parametrize("line,reason", [
    ("0 320 240 64 32", "outside [0, 1]"),  # pixels, not normalised
    ("0 0.5 0.5 1e300 1e300", "outside [0, 1]"),  # was a 100 % mask
    ("0 0.1 0.1 1.5 0.1 0.9 0.9", "outside [0, 1]"),
    ("7 0.5 0.5 0.2 0.2", "class id 7 is not one of this dataset's class ids [0]"),
    ("-3 0.5 0.5 0.2 0.2", "class id -3.0 is not a whole number >= 0"),
    ("0.9 0.5 0.5 0.2 0.2", "class id 0.9 is not a whole number >= 0"),
    ("inf 0.5 0.5 0.2 0.2", "class id inf is not a whole number >= 0"),  # was an OverflowError
    ("nan 0.5 0.5 0.2 0.2", "class id nan is not a whole number >= 0"),
])
def test_bad_label_line_is_rejected_and_its_image_skipped_not_kept_as_negative(tmp_path, line, reason):
    ex = _load_one(tmp_path, [line])
    assert ex.skipped is not None and "no usable label (1 rejected" in ex.skipped and ex.mask is None
    assert len(ex.labels.issues) == 1 and reason in ex.labels.issues[0].reason
    assert ex.labels.issues[0].line == 1 and not ex.labels.objects


def test_coordinates_just_outside_the_image_are_clipped(tmp_path):
    ex = _load_one(tmp_path, ["0 0.5 0.5 1.0004 0.375", "0 -0.0005 0.5 1.0005 0.5 1 1 0 1"])
    assert ex.skipped is None and not ex.labels.issues
    expected = np.zeros((H, W), np.uint8)
    expected[2:, :] = 255  # the box: rows 2..4 (y 2.5..5.5 px); the polygon: rows 4..7 (y 4..8 px)
    np.testing.assert_array_equal(ex.mask, expected)


def test_empty_label_file_is_a_negative_and_a_bom_does_not_spoil_line_one(tmp_path):
    ex = _load_one(tmp_path / "a", [""])
    assert ex.skipped is None and not ex.labels.issues and not ex.mask.any()
    make_yolo_dataset(tmp_path / "b", ["img"], h=H, w=W)
    (tmp_path / "b" / "train" / "labels" / "img.txt").write_text("\ufeff0 0.4 0.3125 0.4 0.375\n", encoding="utf-8")
    rec = yolo_records(DatasetSpec("b", tmp_path / "b", ("train",), "yolo", "crack"))[0]
    ex = load_labelled(rec, "yolo", "filled_box")
    assert not ex.labels.issues
    np.testing.assert_array_equal(ex.mask, EXPECTED_RECT)


def test_class_ids_from_the_data_config(tmp_path):
    make_yolo_dataset(tmp_path / "y", ["a", "b"], h=H, w=W,
                      lines={"a": ["3 0.4 0.3125 0.4 0.375"], "b": ["0 0.4 0.3125 0.4 0.375"]})
    cfg = write_data_config(tmp_path / "d.yaml", [{"name": "y", "root": str(tmp_path / "y"), "class": "crack",
                                                   "class_ids": [3]}], tmp_path / "s.json")
    a, b = (load_labelled(r, "yolo", "filled_box") for r in collect_records(load_setup(cfg))["y"])
    np.testing.assert_array_equal(a.mask, EXPECTED_RECT)
    assert b.skipped is not None and "class id 0 is not one of this dataset's class ids [3]" in b.labels.issues[0].reason


def test_coco_first_annotation_malformed_keeps_the_image(tmp_path):
    make_coco_dataset(tmp_path, {"a.jpg": [{"segmentation": [[1, 2, 3]]}, {"bbox": [1, 1, 5, 5]},
                                           {"bbox": [1, 1, 5, 5], "category_id": 0.9}]})
    ex = load_labelled(coco.coco_records(DatasetSpec("c", tmp_path, ("train",), "coco", "crack"))[0], "coco",
                       "filled_box")
    assert ex.skipped is None and len(ex.labels.objects) == 1  # annotation index 0 is not 'file missing'
    assert [i.line for i in ex.labels.issues] == [0, 2] and "class id 0.9" in ex.labels.issues[1].reason


# --- COCO ----------------------------------------------------------------------------------------------

# Produced by pycocotools 2.0.11 (mask.encode) for the 6x9 mask below; a fixed external reference.
PYCOCO_MASK = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 0, 0],
                        [0, 0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0]], bool)
PYCOCO_COUNTS = "5172L00000005NM"


def test_compressed_rle_matches_pycocotools_reference():
    np.testing.assert_array_equal(coco.decode_rle({"size": [6, 9], "counts": PYCOCO_COUNTS}), PYCOCO_MASK)
    np.testing.assert_array_equal(coco.decode_rle({"size": [6, 9], "counts": PYCOCO_COUNTS.encode()}), PYCOCO_MASK)
    assert coco.counts_to_rle_string(coco.encode_rle(PYCOCO_MASK)["counts"]) == PYCOCO_COUNTS


def test_uncompressed_rle_is_column_major():
    # 2x3 mask, column-major order: (0,0) (1,0) (0,1) (1,1) (0,2) (1,2) -> runs 0:1, 1:2, 0:3
    mask = coco.decode_rle({"size": [2, 3], "counts": [1, 2, 3]})
    np.testing.assert_array_equal(mask, np.array([[0, 1, 0], [1, 0, 0]], bool))


def test_rle_roundtrip_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(30):
        h, w = rng.integers(1, 30, 2)
        m = rng.random((h, w)) > rng.random()
        rle = coco.encode_rle(m)
        np.testing.assert_array_equal(coco.decode_rle(rle), m)
        s = coco.counts_to_rle_string(rle["counts"])
        np.testing.assert_array_equal(coco.decode_rle({"size": rle["size"], "counts": s}), m)


@pytest.mark.parametrize("bad", [{"size": [2, 3], "counts": [1, 2]}, {"size": [2, 3], "counts": "5"},
                                 {"counts": [6]}, {"size": [2, 3], "counts": "\x7f"}])
def test_bad_rle_raises_clear_error(bad):
    with pytest.raises(ValueError):
        coco.decode_rle(bad)


def _yolo_and_coco_masks(tmp_path, yolo_line: str, coco_obj: dict, h: int = 40, w: int = 48):
    make_yolo_dataset(tmp_path / "y", ["img"], h=h, w=w, lines={"img": [yolo_line]})
    make_coco_dataset(tmp_path / "c", {"img.jpg": [coco_obj]}, h=h, w=w)
    y_rec = yolo_records(DatasetSpec("y", tmp_path / "y", ("train",), "yolo", "crack"))[0]
    c_rec = coco.coco_records(DatasetSpec("c", tmp_path / "c", ("train",), "coco", "crack"))[0]
    y = load_labelled(y_rec, "yolo", "filled_box")
    c = load_labelled(c_rec, "coco", "filled_box")
    assert y.skipped is None and c.skipped is None
    return y.mask, c.mask


def test_coco_polygon_and_yolo_polygon_give_identical_masks(tmp_path):
    h, w = 40, 48
    rng = np.random.default_rng(3)
    pts = rng.random((9, 2)) * [w, h]
    yolo = "0 " + " ".join(f"{v:.10f}" for v in (pts / [w, h]).ravel())
    y, c = _yolo_and_coco_masks(tmp_path, yolo, {"segmentation": [pts.ravel().tolist()]}, h, w)
    assert y.any()
    np.testing.assert_array_equal(y, c)


def test_coco_bbox_and_yolo_box_give_identical_masks(tmp_path):
    x0, y0, bw, bh = 7.3, 5.6, 20.2, 11.9
    yolo = f"0 {(x0 + bw / 2) / 48:.10f} {(y0 + bh / 2) / 40:.10f} {bw / 48:.10f} {bh / 40:.10f}"
    y, c = _yolo_and_coco_masks(tmp_path, yolo, {"bbox": [x0, y0, bw, bh]})
    assert y.any()
    np.testing.assert_array_equal(y, c)


def test_coco_rle_of_yolo_mask_gives_identical_mask(tmp_path):
    poly = "0 0.1 0.1 0.8 0.2 0.6 0.9 0.2 0.7"
    ref, _ = _yolo_and_coco_masks(tmp_path / "a", poly, {"bbox": [1, 1, 2, 2]})
    rle = coco.encode_rle(ref > 0)
    compressed = {"size": rle["size"], "counts": coco.counts_to_rle_string(rle["counts"])}
    _, c = _yolo_and_coco_masks(tmp_path / "b", poly, {"segmentation": compressed})
    np.testing.assert_array_equal(ref, c)


def test_coco_malformed_annotation_reported_and_skipped(tmp_path):
    make_coco_dataset(tmp_path, {"a.jpg": [{"bbox": [1, 1, 5, 5]}, {"segmentation": [[1, 2, 3]]},
                                           {"segmentation": {"size": [9, 9], "counts": [81]}}]})
    ann = tmp_path / "train" / "_annotations.coco.json"
    doc = json.loads(ann.read_text())
    doc["annotations"].append({"id": 99, "image_id": 12345, "bbox": [0, 0, 1, 1]})
    ann.write_text(json.dumps(doc))
    parsed = labels_for(coco.coco_records(DatasetSpec("c", tmp_path, ("train",), "coco", "crack"))[0], "coco", 40, 48)
    assert len(parsed.objects) == 1
    assert len(parsed.issues) == 2
    assert "polygon needs" in parsed.issues[0].reason and "RLE size" in parsed.issues[1].reason
    assert all(i.path == str(ann) for i in parsed.issues)
    file_issues = coco.read_coco(ann).issues
    assert len(file_issues) == 1 and "unknown image_id 12345" in file_issues[0].reason


def test_coco_broken_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read COCO annotations"):
        coco.read_coco(bad)


def _winding_reference(pts: np.ndarray, h: int, w: int) -> np.ndarray:
    """Brute-force non-zero winding number at every pixel centre (slow, obviously correct)."""
    out = np.zeros((h, w), bool)
    n = len(pts)
    for r in range(h):
        for c in range(w):
            px, py = c + 0.5, r + 0.5
            wn = 0
            for i in range(n):
                (xa, ya), (xb, yb) = pts[i], pts[(i + 1) % n]
                cross = (xb - xa) * (py - ya) - (px - xa) * (yb - ya)
                if ya <= py < yb and cross > 0:
                    wn += 1
                elif yb <= py < ya and cross < 0:
                    wn -= 1
            out[r, c] = wn != 0
    return out


def test_polygon_matches_brute_force_winding_rule():
    from drywallqa.train.data.labels import polygon_coverage

    rng = np.random.default_rng(7)
    for k in (3, 5, 8, 12):  # random, often self-intersecting polygons, partly outside the image
        pts = rng.random((k, 2)) * [26, 22] - 2
        np.testing.assert_array_equal(polygon_coverage(pts, 18, 22), _winding_reference(pts, 18, 22))
