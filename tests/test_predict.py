"""`drywallqa predict`: the output mask contract for odd sizes and image modes, and clear failures."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from _foundation_fixtures import random_onnx, write_jpeg
from PIL import Image

from drywallqa.cli import main
from drywallqa.findings import measure
from drywallqa.masks import MaskContractError, check_mask, mask_filename, write_mask
from drywallqa.predict import ModelNotFoundError, collect_inputs, resolve_model

PROMPTS = ["segment crack", "Segment  Joint/Tape"]


def _inputs(d):
    """name -> expected (W, H) of the displayed image, for many sizes and modes."""
    d.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    write_jpeg(d / "rgb_odd.jpg", 37, 53)
    expected["rgb_odd"] = (53, 37)
    Image.fromarray(rng.integers(0, 256, (20, 31), dtype=np.uint8), "L").save(d / "gray.png")
    expected["gray"] = (31, 20)
    Image.fromarray(rng.integers(0, 256, (19, 7, 4), dtype=np.uint8), "RGBA").save(d / "rgba.png")
    expected["rgba"] = (7, 19)
    cv2.imwrite(str(d / "gray16.png"), rng.integers(0, 65536, (23, 41), dtype=np.uint16))
    expected["gray16"] = (41, 23)
    cv2.imwrite(str(d / "rgb16.png"), rng.integers(0, 65536, (17, 29, 3), dtype=np.uint16))
    expected["rgb16"] = (29, 17)
    Image.fromarray(rng.integers(0, 256, (9, 13), dtype=np.uint8), "L").convert("P").save(d / "palette.png")
    expected["palette"] = (13, 9)
    Image.fromarray(rng.integers(0, 256, (3, 2, 3), dtype=np.uint8)).save(d / "tiny.png")
    expected["tiny"] = (2, 3)
    Image.fromarray(rng.integers(0, 256, (700, 90, 3), dtype=np.uint8)).save(d / "tall.bmp")
    expected["tall"] = (90, 700)
    # Stored 50 wide x 30 high with EXIF orientation 6 (rotate 90 deg): displayed 30 wide x 50 high.
    im = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(d / "exif_rot.jpg", exif=exif)
    expected["exif_rot"] = (30, 50)
    return expected


def test_output_contract_for_odd_sizes_and_modes(tmp_path, capsys):
    model = random_onnx()
    expected = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(model), "--out", str(out), "--quiet", "--batch-size", "3",
                 *sum((["--prompt", p] for p in PROMPTS), []), str(tmp_path / "in")])
    assert code == 0, capsys.readouterr()
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(f"{stem}__{part}.png" for stem in expected
                           for part in ("segment_crack", "segment_joint_tape"))
    for stem, (w, h) in expected.items():
        for part in ("segment_crack", "segment_joint_tape"):
            with Image.open(out / f"{stem}__{part}.png") as im:
                assert im.mode == "L" and im.size == (w, h), (stem, im.mode, im.size)
                values = set(np.unique(np.asarray(im)).tolist())
            assert values <= {0, 255}, (stem, values)
    assert "9 image(s) segmented, 18 mask(s) written" in capsys.readouterr().out


def test_batch_size_does_not_change_masks(tmp_path):
    model = random_onnx()
    for i in range(3):
        write_jpeg(tmp_path / "in" / f"im{i}.jpg", 40 + i, 30 + 2 * i, seed=i)
    for bs in (1, 3):
        assert main(["predict", "--model", str(model), "--prompt", "crack", "--out", str(tmp_path / f"o{bs}"),
                     "--batch-size", str(bs), "--quiet", "--backend", "onnxruntime", str(tmp_path / "in")]) == 0
    for i in range(3):
        a = cv2.imread(str(tmp_path / "o1" / f"im{i}__crack.png"), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "o3" / f"im{i}__crack.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(a, b)


def test_tta_writes_masks_of_the_flip_averaged_probabilities(tmp_path):
    from drywallqa.edge.backends import load_backend
    from drywallqa.edge.inference import PromptSegmenter
    from drywallqa.imageio import read_image_rgb

    model = random_onnx()
    write_jpeg(tmp_path / "in" / "im.jpg", 48, 40, seed=3)
    assert main(["predict", "--model", str(model), "--prompt", "crack", "--out", str(tmp_path / "o"), "--tta",
                 "--quiet", "--backend", "onnxruntime", str(tmp_path / "in")]) == 0
    got = cv2.imread(str(tmp_path / "o" / "im__crack.png"), cv2.IMREAD_UNCHANGED)
    image = read_image_rgb(tmp_path / "in" / "im.jpg")
    seg = PromptSegmenter(load_backend(model, "onnxruntime"), flip_tta=True)
    np.testing.assert_array_equal(got, seg.masks(image, ["crack"])["crack"])
    seg.flip_tta = False
    assert not np.array_equal(got, seg.masks(image, ["crack"])["crack"])  # so the flag did change the masks


def test_corrupt_and_missing_inputs_are_named_counted_and_skipped(tmp_path, capsys):
    model = random_onnx()
    write_jpeg(tmp_path / "good.jpg", 21, 34)
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    full = cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))[1].tobytes()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    code = main(["predict", "--model", str(model), "--prompt", "crack", "--out", str(tmp_path / "out"), "--quiet",
                 str(tmp_path / "garbage.jpg"), str(tmp_path / "good.jpg"), str(tmp_path / "truncated.jpg"),
                 str(tmp_path / "nothere.jpg")])
    assert code == 1
    text = capsys.readouterr().out
    assert "1 image(s) segmented" in text and "3 failed" in text
    assert "garbage.jpg" in text and "truncated.jpg" in text and "nothere.jpg: no such file" in text
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good__crack.png"]


def test_unknown_prompt_stops_before_any_work(tmp_path, capsys):
    model = random_onnx()
    write_jpeg(tmp_path / "a.jpg", 20, 20)
    code = main(["predict", "--model", str(model), "--prompt", "crack", "--prompt", "find mould",
                 "--out", str(tmp_path / "out"), "--quiet", str(tmp_path / "a.jpg")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown prompt 'find mould'" in err and "'segment taping area'" in err  # lists the known prompts
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_profile_model_tells_to_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("drywallqa.predict.profile_onnx", lambda profile: tmp_path / f"{profile}.onnx")
    with pytest.raises(ModelNotFoundError, match="drywallqa export --profile lite"):
        resolve_model("lite")
    assert main(["predict", "--prompt", "crack", "--out", str(tmp_path / "o"), str(tmp_path)]) == 2
    assert "drywallqa export --profile hrnet" in capsys.readouterr().err  # hrnet is the default profile
    with pytest.raises(ModelNotFoundError, match="model not found"):
        resolve_model(tmp_path / "nope.onnx")


def test_misspelt_profile_name_suggests_the_profile(tmp_path, monkeypatch, capsys):
    # 'hrnnet' is a typo, not a model to export: the error names the profile and does not send the user to export
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="did you mean the profile 'hrnet'") as excinfo:
        resolve_model("hrnnet")
    assert "drywallqa export" not in str(excinfo.value)
    assert main(["predict", "--model", "lit", "--prompt", "crack", "--out", str(tmp_path / "o"), str(tmp_path)]) == 2
    assert "did you mean the profile 'lite'" in capsys.readouterr().err
    # a path or a model file name is not second-guessed, nor is a name like no profile
    for name in ("nope.onnx", "models/hrnnet", "student", "lite.pt", "hrnet_fp16"):
        with pytest.raises(ModelNotFoundError, match="make one with `drywallqa export`"):
            resolve_model(name)


def test_foreign_model_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "foreign.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    write_jpeg(tmp_path / "a.jpg", 20, 20)
    assert main(["predict", "--model", str(bad), "--prompt", "crack", "--out", str(tmp_path / "o"),
                 str(tmp_path / "a.jpg")]) == 2
    assert "foreign.onnx" in capsys.readouterr().err


def test_same_image_id_twice_is_reported_not_overwritten(tmp_path, capsys):
    model = random_onnx()
    write_jpeg(tmp_path / "a" / "x.jpg", 20, 20)
    write_jpeg(tmp_path / "b" / "x.png", 20, 20)
    code = main(["predict", "--model", str(model), "--prompt", "crack", "--out", str(tmp_path / "o"), "--quiet",
                 str(tmp_path / "a"), str(tmp_path / "b")])
    assert code == 1
    assert "same image id 'x'" in capsys.readouterr().out


def test_collect_inputs_files_folders_globs(tmp_path):
    for name in ("a.jpg", "b.PNG", "notes.txt", "sub/c.jpeg"):
        p = tmp_path / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
    found, problems = collect_inputs([tmp_path, str(tmp_path / "**" / "*.jpeg"), tmp_path / "a.jpg",
                                      str(tmp_path / "*.gif"), tmp_path / "missing.jpg"])
    assert [p.name for p in found] == ["a.jpg", "b.PNG", "c.jpeg"]  # folder is not recursive; duplicates dropped
    assert [why for _, why in problems] == ["pattern matches no images", "no such file or folder"]


def test_mask_contract_helpers(tmp_path):
    assert mask_filename("IMG_01", " Segment  Joint/Tape ") == "IMG_01__segment_joint_tape.png"
    good = np.zeros((5, 7), np.uint8)
    good[1, 2] = 255
    write_mask(tmp_path / "m.png", good)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED), good)
    for bad in (good.astype(np.float32), np.stack([good] * 3, -1), np.where(good > 0, 1, 0).astype(np.uint8)):
        with pytest.raises(MaskContractError):
            write_mask(tmp_path / "bad.png", bad)
    with pytest.raises(MaskContractError, match="differs from the source"):
        check_mask(good, (7, 5))
    assert not (tmp_path / "bad.png").exists()


def test_image_normalisation_copies_only_when_it_must(tmp_path):
    from drywallqa.imageio import read_image_rgb, to_rgb_uint8

    frame = np.zeros((8, 10, 3), np.uint8)
    assert to_rgb_uint8(frame) is frame  # a live frame goes to the resize as it is
    assert to_rgb_uint8(np.full((2, 2), 65535, np.uint16)).tolist() == [[[255] * 3] * 2] * 2
    assert to_rgb_uint8(np.full((2, 2, 4), 0.5, np.float32))[0, 0].tolist() == [128, 128, 128]
    path = tmp_path / "a.png"
    Image.fromarray(np.full((4, 6, 3), 7, np.uint8)).save(path)
    img = read_image_rgb(path)
    img[0, 0] = 255  # what a caller reads from a file is its own, writable array
    assert img.shape == (4, 6, 3) and img[1, 1].tolist() == [7, 7, 7]


def test_findings_measure_share_regions_and_confidence():
    mask = np.zeros((10, 20), np.uint8)
    mask[1:3, 1:3] = 255  # 4 px
    mask[5:9, 10:12] = 255  # 8 px, a second region
    mask[9, 12] = 255  # touches the second region diagonally: 8-connected, so the same region
    probs = np.full((10, 20), 0.1, np.float32)
    probs[mask > 0] = 0.75
    probs[0, 19] = 0.4  # the image's maximum outside the mask does not change the mean inside it
    probs[1, 1] = 0.95
    share, regions, peak, mean_in, _ = measure(mask, probs)
    assert share == pytest.approx(13 / 200)
    assert regions == 2
    assert peak == pytest.approx(0.95)
    assert mean_in == pytest.approx((12 * 0.75 + 0.95) / 13)
    empty = (0.0, 0, pytest.approx(0.3), 0.0, 0.0)
    assert measure(np.zeros((4, 4), np.uint8), np.full((4, 4), 0.3, np.float32)) == empty
    dots = np.zeros((600, 600), np.uint8)
    dots[::2, ::2] = 255  # 90000 isolated pixels: more regions than 16-bit labels can count
    assert measure(dots, np.ones((600, 600), np.float32))[1] == 90000


def test_findings_measure_a_crack_length_for_pixel_masks_only():
    """The findings' length_px is the skeleton length in source pixels, as the edge's skeleton_length_px: a
    one-pixel-wide horizontal line of 101 pixels is 100 long, a 5-pixel-wide one of the same extent about the same,
    a diagonal one of 51 pixels 50 * sqrt 2; a box-shaped class (taping) gets no length."""
    probs = np.full((60, 160), 0.9, np.float32)
    line = np.zeros((60, 160), np.uint8)
    line[10, 20:121] = 255
    assert measure(line, probs)[4] == pytest.approx(100.0)
    thick = np.zeros((60, 160), np.uint8)
    thick[8:13, 20:121] = 255
    assert measure(thick, probs)[4] == pytest.approx(100.0, abs=6)
    diagonal = np.zeros((60, 160), np.uint8)
    diagonal[np.arange(5, 56), np.arange(5, 56)] = 255
    assert measure(diagonal, probs)[4] == pytest.approx(50 * 2 ** 0.5, rel=1e-6)
    assert measure(line, probs, length=False)[4] is None


def test_report_describes_every_written_mask(tmp_path, capsys):
    model = random_onnx()
    src = tmp_path / "in"
    src.mkdir()
    for i, (h, w) in enumerate([(37, 53), (64, 64), (90, 30)]):
        write_jpeg(src / f"im{i}.jpg", h, w, seed=i)
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    out, report = tmp_path / "out", tmp_path / "reports" / "findings.csv"
    code = main(["predict", "--model", str(model), "--out", str(out), "--quiet", "--report", str(report),
                 *sum((["--prompt", p] for p in PROMPTS), []), str(src)])
    printed = capsys.readouterr().out
    assert code == 1 and "broken.jpg" in printed  # the corrupt file is named; the others still get rows
    with report.open(newline="") as f:
        every_row = list(csv.DictReader(f))
    failed = [r for r in every_row if r["error"]]  # the corrupt photo is in the report too, with why
    assert [(Path(r["image"]).name, r["prompt"]) for r in failed] == [("broken.jpg", p) for p in PROMPTS]
    assert all(r["mask_file"] == r["mask_share"] == r["regions"] == "" for r in failed)
    assert "cannot read image" in failed[0]["error"]
    rows = [r for r in every_row if not r["error"]]
    assert len(rows) == 3 * len(PROMPTS)
    from drywallqa.edge.backends import read_metadata

    shape = {c: read_metadata(model).mask_shape(c) for c in ("crack", "taping")}
    assert {r["class_name"] for r in rows} == {"crack", "taping"}
    found = dict.fromkeys(PROMPTS, 0)
    for r in rows:
        mask = cv2.imread(str(out / r["mask_file"]), cv2.IMREAD_UNCHANGED) > 0
        assert r["mask_file"] == mask_filename(Path(r["image"]).stem, r["prompt"])
        assert float(r["mask_share"]) == pytest.approx(mask.mean(), abs=1e-6)
        assert int(r["regions"]) == cv2.connectedComponents(mask.view(np.uint8), connectivity=8)[0] - 1
        if shape[r["class_name"]] == "pixels":  # its skeleton length (0.0 for an empty mask)
            assert float(r["length_px"]) == pytest.approx(measure(mask.view(np.uint8), np.ones(mask.shape))[4], abs=0.05)
        else:  # a box-shaped class: no length
            assert r["length_px"] == ""
        assert 0.0 <= float(r["mean_probability_in_mask"]) <= float(r["max_probability"]) <= 1.0
        found[r["prompt"]] += bool(mask.any())
    for prompt, n in found.items():
        assert f"{prompt!r}: something found in {n} of 3 image(s)" in printed
    assert f"findings per image and prompt: {report}" in printed


def test_report_that_cannot_be_written_stops_before_any_work(tmp_path, capsys):
    write_jpeg(tmp_path / "a.jpg", 20, 20)
    code = main(["predict", "--model", str(random_onnx()), "--out", str(tmp_path / "out"), "--quiet",
                 "--prompt", "crack", "--report", str(tmp_path), str(tmp_path / "a.jpg")])
    assert code == 2
    assert f"cannot write the findings report {tmp_path}" in capsys.readouterr().err
    assert not any((tmp_path / "out").glob("*.png"))


def test_image_too_large_to_decode_is_one_failure_not_the_end_of_the_run(tmp_path, monkeypatch, capsys):
    # PIL refuses a "decompression bomb" (over 2x MAX_IMAGE_PIXELS, ~179 MP by default). Lowered here so a
    # small file plays the part: 64x64 = 4096 px > 2 x 1000 is refused; 40x40 = 1600 px only warns and is read.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    write_jpeg(tmp_path / "in" / "a_small.jpg", 20, 20)
    write_jpeg(tmp_path / "in" / "b_huge.jpg", 64, 64)
    write_jpeg(tmp_path / "in" / "c_large.jpg", 40, 40)
    code = main(["predict", "--model", str(random_onnx()), "--prompt", "crack", "--out", str(tmp_path / "out"),
                 "--quiet", "--batch-size", "1", str(tmp_path / "in")])
    assert code == 1
    text = capsys.readouterr().out
    assert "2 image(s) segmented" in text and "b_huge.jpg: cannot read image" in text
    assert "too large to decode safely" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_small__crack.png", "c_large__crack.png"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to play a full disk")
def test_findings_report_on_a_full_disk_is_reported_and_the_masks_go_on(tmp_path, capsys):
    for i in range(3):
        write_jpeg(tmp_path / "in" / f"im{i}.jpg", 24, 20, seed=i)
    code = main(["predict", "--model", str(random_onnx()), "--prompt", "crack", "--out", str(tmp_path / "out"),
                 "--quiet", "--batch-size", "1", "--report", "/dev/full", str(tmp_path / "in")])
    assert code == 1  # the report is incomplete, so the run is not clean
    text = capsys.readouterr().out
    assert "3 image(s) segmented, 3 mask(s) written" in text
    assert "FAILED findings report (incomplete from here on): cannot write /dev/full" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"im{i}__crack.png" for i in range(3)]


def test_a_mask_that_cannot_be_written_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "m.png"
    target.mkdir()  # a folder where the mask should go: the final rename fails
    (target / "keep").write_text("x")
    with pytest.raises(OSError, match=f"cannot write {target}"):
        write_mask(target, np.zeros((4, 4), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]  # no m.png.tmp left behind


def test_unusable_output_folder_stops_before_any_work(tmp_path, capsys):
    write_jpeg(tmp_path / "a.jpg", 20, 20)
    (tmp_path / "afile").write_text("not a folder")
    for out, why in ((tmp_path / "afile", "a file of that name exists"),
                     (tmp_path / "afile" / "sub", "part of that path is a file")):
        code = main(["predict", "--model", str(random_onnx()), "--prompt", "crack", "--out", str(out), "--quiet",
                     str(tmp_path / "a.jpg")])
        assert code == 2
        assert "drywallqa: error: cannot " in (err := capsys.readouterr().err) and why in err, err
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_folder_that_takes_no_files_stops_before_any_work(tmp_path, capsys):
    import os

    if os.geteuid() != 0:
        target = tmp_path / "ro"
        target.mkdir(mode=0o555)
    elif Path("/sys/kernel").is_dir():
        target = Path("/sys/kernel")  # sysfs refuses new files even to root
    else:
        pytest.skip("running as root without sysfs: no folder here refuses a new file")
    write_jpeg(tmp_path / "a.jpg", 20, 20)
    code = main(["predict", "--model", str(random_onnx()), "--prompt", "crack", "--out", str(target), "--quiet",
                 str(tmp_path / "a.jpg")])
    assert code == 2 and f"cannot write to the output folder {target}" in capsys.readouterr().err


def test_rerun_into_the_photo_folder_does_not_segment_its_own_masks(tmp_path, capsys):
    folder = tmp_path / "photos"
    write_jpeg(folder / "wall.jpg", 30, 40)
    write_jpeg(folder / "my__notes.png", 30, 40)  # a photo whose name merely has the separator in it
    args = ["predict", "--model", str(random_onnx()), "--prompt", "crack", "--prompt", "taping area",
            "--out", str(folder), "--quiet", str(folder)]
    assert main(args) == 0
    assert "2 image(s) segmented, 4 mask(s) written" in capsys.readouterr().out
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "2 image(s) segmented, 4 mask(s) written" in text and "skipped 4 mask file(s) of an earlier run" in text
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "wall.jpg", "my__notes.png", "wall__crack.png", "wall__taping_area.png",
        "my__notes__crack.png", "my__notes__taping_area.png"])


@pytest.mark.parametrize(("option", "value"), [("--threads", "0"), ("--threads", "-1"), ("--batch-size", "0"),
                                               ("--batch-size", "two")])
def test_nonsense_numbers_are_refused_by_the_parser(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", "lite", "--prompt", "crack", "--out", str(tmp_path / "o"), option, value,
              str(tmp_path)])
    assert exc.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_profile_names_ignore_case(tmp_path, monkeypatch):
    monkeypatch.setattr("drywallqa.predict.profile_onnx", lambda profile: tmp_path / f"{profile}.onnx")
    (tmp_path / "lite.onnx").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("LITE") == resolve_model("lite") == tmp_path / "lite.onnx"


def test_float_tiff_in_zero_to_one_is_scaled_not_clipped(tmp_path):
    from drywallqa.imageio import read_image_rgb

    values = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    got = read_image_rgb(tmp_path / "f.tif")
    assert got.shape == (3, 4, 3)
    np.testing.assert_array_equal(got[..., 0], np.round(values * 255).astype(np.uint8))


def test_folders_yield_every_image_kind_pil_reads(tmp_path):
    for name in ("a.gif", "b.jfif", "c.jpe", "d.txt"):
        (tmp_path / name).write_bytes(b"x")
    found, problems = collect_inputs([tmp_path])
    assert [p.name for p in found] == ["a.gif", "b.jfif", "c.jpe"] and not problems
