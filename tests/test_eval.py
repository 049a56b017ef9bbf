"""Metrics and `drywallqa eval`: hand-computed IoU/Dice, false positives, the sweep and the reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _foundation_fixtures import random_onnx, small_project

from drywallqa.cli import main
from drywallqa.contract import TextEncoderInfo, metadata_from_vocabulary
from drywallqa.edge.backends import InferenceBackend
from drywallqa.edge.inference import PromptSegmenter
from drywallqa.evaluate import SWEEP_THRESHOLDS, evaluate
from drywallqa.metrics import (
    FalsePositiveStats,
    SegmentationScores,
    counts,
    dice,
    iou,
    threshold_counts,
)
from drywallqa.report import to_html
from drywallqa.train.data.prepare import Example
from drywallqa.train.data.sources import ImageRecord
from drywallqa.vocab import load_vocabulary


def _mask(cells: list[tuple[int, int]], shape=(4, 4)) -> np.ndarray:
    m = np.zeros(shape, bool)
    for r, c in cells:
        m[r, c] = True
    return m


def test_iou_dice_hand_computed():
    truth = _mask([(0, 0), (0, 1), (1, 0), (1, 1)])
    pred = _mask([(0, 1), (0, 2), (1, 1), (1, 2)])
    assert counts(pred, truth) == (2, 4, 4)
    assert iou(pred, truth) == pytest.approx(2 / 6)
    assert dice(pred, truth) == pytest.approx(4 / 8)
    empty = np.zeros((4, 4), bool)
    assert iou(empty, empty) == 1.0 and dice(empty, empty) == 1.0  # stated convention
    assert iou(pred, empty) == 0.0 and dice(empty, truth) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        iou(pred, np.zeros((3, 4), bool))


def test_mean_vs_pooled_hand_computed():
    s = SegmentationScores()
    s.add(_mask([(0, 1), (0, 2), (1, 1), (1, 2)]), _mask([(0, 0), (0, 1), (1, 0), (1, 1)]))  # IoU 1/3, Dice 1/2
    s.add(np.zeros((4, 4)), np.zeros((4, 4)))  # both empty: 1.0 / 1.0
    s.add(_mask([(3, 3)]), _mask([(3, 3), (3, 2)]))  # IoU 1/2, Dice 2/3
    out = s.summary()
    assert out["iou_mean"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
    assert out["dice_mean"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert out["iou_pooled"] == pytest.approx(3 / 8)  # inter 2+1, union 6+2
    assert out["dice_pooled"] == pytest.approx(2 * 3 / (5 + 6))
    assert out["both_empty_images"] == 1
    fp = FalsePositiveStats()
    fp.add(np.zeros((2, 2)))
    fp.add(_mask([(0, 0)], (2, 2)))
    assert fp.summary() == {"images": 2, "fp_image_rate": 0.5, "mean_pred_area": pytest.approx(0.125)}


def test_threshold_counts_equals_direct_thresholding():
    rng = np.random.default_rng(0)
    prob = rng.random((30, 40)).astype(np.float32)
    prob[0, :5] = [0.2, 0.5, 0.8, 0.35, 0.65]  # values exactly on thresholds count as predicted (>=)
    truth = rng.random((30, 40)) > 0.6
    table = threshold_counts(prob, truth, np.array(SWEEP_THRESHOLDS))
    for k, t in enumerate(SWEEP_THRESHOLDS):
        assert tuple(table[k]) == counts(prob >= np.float32(t), truth)


class _KnownBackend(InferenceBackend):
    """A real backend subclass whose 'network' returns fixed probabilities chosen by the image's fill value."""

    name = "known"

    def __init__(self, probs: list[np.ndarray]) -> None:
        vocab = load_vocabulary()
        meta = metadata_from_vocabulary(vocab, model_name="known", profile="test", architecture="none",
                                        version="0", input_size=(4, 4), thresholds={"crack": 0.5, "taping": 0.5},
                                        text_encoder=TextEncoderInfo(name="none", dim=1))
        super().__init__(Path("known.onnx"), meta)
        self.probs = probs

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return np.stack([self.probs[int(im[0, 0, 0])] for im in batch]).astype(np.float32)


def test_evaluate_hand_made_predictions():
    crack_truth = [_mask([(0, 0), (0, 1), (1, 0), (1, 1)]), np.zeros((4, 4), bool)]
    wall_truth = _mask([(0, 0), (1, 0), (2, 0), (3, 0)])
    # probabilities per image: [crack, taping]
    probs = [
        np.stack([_mask([(0, 1), (0, 2), (1, 1), (1, 2)]), np.zeros((4, 4))]).astype(np.float32),
        np.stack([np.full((4, 4), 0.2), np.full((4, 4), 0.9)]).astype(np.float32),
        np.stack([_mask([(3, 3)]) * 0.7, (np.indices((4, 4))[1] < 2) * 0.6]).astype(np.float32),
    ]
    seg = PromptSegmenter(_KnownBackend(probs))
    examples = []
    for i, (ds, cls, truth) in enumerate([("cracks", "crack", crack_truth[0]), ("cracks", "crack", crack_truth[1]),
                                          ("walls", "taping", wall_truth)]):
        rec = ImageRecord(ds, cls, Path(f"img{i}.jpg"), Path(f"img{i}.txt"))
        examples.append(Example(rec, np.full((4, 4, 3), i, np.uint8), truth.astype(np.uint8) * 255))
    data, ranked = evaluate(seg, examples, {"cracks": "crack", "walls": "taping"}, tune_thresholds=True,
                            progress=False)
    crack, taping = data["per_class"]["crack"], data["per_class"]["taping"]
    assert crack["images"] == 2 and crack["iou_mean"] == pytest.approx((1 / 3 + 1) / 2)
    assert crack["iou_pooled"] == pytest.approx(1 / 3) and crack["dice_mean"] == pytest.approx(0.75)
    assert crack["dice_pooled"] == pytest.approx(0.5) and crack["both_empty_images"] == 1
    assert taping["iou_mean"] == pytest.approx(0.5) and taping["dice_mean"] == pytest.approx(2 / 3)
    # every synonym goes through the model's own prompt resolution: same numbers as its class
    for prompt, row in data["per_prompt"].items():
        ref = data["per_class"][row["class"]]
        assert row["iou_mean"] == pytest.approx(ref["iou_mean"]), prompt
    assert data["false_positives"]["crack"]["walls"] == {"images": 1, "fp_image_rate": 1.0,
                                                         "mean_pred_area": pytest.approx(1 / 16)}
    assert data["false_positives"]["taping"]["cracks"] == {"images": 2, "fp_image_rate": 0.5,
                                                           "mean_pred_area": pytest.approx(0.5)}
    # sweep: crack image 2 has p=0.2 everywhere -> at t=0.20 it fires (IoU 0), above it it is correctly empty
    rows = {r["threshold"]: r for r in data["threshold_sweep"]["crack"]["rows"] if r["shape"] == "pixels"}
    assert rows[0.2]["iou_mean"] == pytest.approx((1 / 3 + 0) / 2)
    assert rows[0.5]["iou_mean"] == pytest.approx((1 / 3 + 1) / 2)
    assert rows[0.75]["fp_image_rate"] == 0.0 and rows[0.7]["fp_image_rate"] == 1.0
    assert data["threshold_sweep"]["crack"]["best_threshold"] == 0.5  # ties: closest to 0.5
    assert data["threshold_sweep"]["crack"]["best_shape"] == "pixels"  # single pixels: boxes tie, pixels win
    assert [round(s, 3) for s, _ in ranked["crack"]] == [0.333, 1.0]


def test_eval_end_to_end_writes_json_markdown_html(tmp_path, capsys):
    cfg = small_project(tmp_path, n_crack=4, n_wall=4)
    assert main(["data", "split", "--config", str(cfg)]) == 0
    model = random_onnx()
    code = main(["eval", "--model", str(model), "--config", str(cfg), "--out", str(tmp_path / "rep"),
                 "--tune-thresholds", "--quiet", "--backend", "onnxruntime"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "## Per class" in printed and "| `segment joint/tape` | taping |" in printed
    data = json.loads((tmp_path / "rep" / "eval.json").read_text())
    n_val = sum(data["images"].values())
    split = json.loads((tmp_path / "split.json").read_text())["datasets"]
    assert n_val == sum(v == "val" for files in split.values() for v in files.values())
    assert data["model"]["file_bytes"] == model.stat().st_size and data["model"]["backend"] == "onnxruntime"
    assert data["latency_ms"]["total"] > 0
    assert set(data["per_prompt"]) == set(load_vocabulary().all_prompts)
    for cls in ("crack", "taping"):
        sweep = data["threshold_sweep"][cls]
        assert sweep["best_threshold"] is None or sweep["best_threshold"] in SWEEP_THRESHOLDS
        assert {r["shape"] for r in sweep["rows"]} == {"pixels", "boxes"}
    html = (tmp_path / "rep" / "eval.html").read_text()
    assert html.count("src='data:image/jpeg;base64,") >= 1 and "both empty scores 1.0" in html
    assert (tmp_path / "rep" / "eval.md").read_text().startswith("# DrywallQA evaluation")
    # the HTML renders the Markdown preamble: code spans and the list of skipped images, no literal backticks
    preamble = html.split("<h2>")[0]
    assert f"<code>{model}</code>" in preamble and "`" not in preamble

    # a skipped image is a list item; a class without images says so instead of "best None at None"
    data["skipped"] = ["a.jpg: label file missing", "b.jpg: cannot decode `b.jpg`"]
    data["threshold_sweep"]["taping"].update(best_shape=None, best_threshold=None)
    page = to_html(data, {})
    assert "<ul><li>a.jpg: label file missing</li><li>b.jpg: cannot decode <code>b.jpg</code></li></ul>" in page
    assert "Decision sweep: taping (no image of this class to tune on)" in page and "None" not in page


def test_eval_with_tta_says_so_in_its_report(tmp_path, capsys):
    cfg = small_project(tmp_path, n_crack=2, n_wall=2)
    assert main(["data", "split", "--config", str(cfg)]) == 0
    assert main(["eval", "--model", str(random_onnx()), "--config", str(cfg), "--out", str(tmp_path / "rep"),
                 "--tta", "--quiet", "--backend", "onnxruntime"]) == 0
    assert "Test-time flips" in capsys.readouterr().out
    assert json.loads((tmp_path / "rep" / "eval.json").read_text())["model"]["flip_tta"] is True


def test_eval_names_images_the_split_file_does_not_list(tmp_path, capsys):
    """Photos added after the split was made are on neither side: eval says so instead of dropping them quietly."""
    import shutil

    cfg = small_project(tmp_path, n_crack=2, n_wall=2)
    assert main(["data", "split", "--config", str(cfg)]) == 0
    folder = tmp_path / "cracks" / "train"
    for kind, suffix in (("images", ".jpg"), ("labels", ".txt")):
        first = sorted((folder / kind).glob(f"*{suffix}"))[0]
        shutil.copy(first, folder / kind / f"new_photo{suffix}")
    capsys.readouterr()
    assert main(["eval", "--model", str(random_onnx()), "--config", str(cfg), "--out", str(tmp_path / "rep"),
                 "--quiet", "--backend", "onnxruntime", "--split", "train"]) == 0
    assert f"1 images are not in {tmp_path / 'split.json'}" in capsys.readouterr().err


def test_eval_reads_the_photos_in_subfolders_of_an_image_folder(tmp_path, capsys):
    """A dataset sorted into day folders: eval scores every photo of the split, the ones below a subfolder too."""
    cfg = small_project(tmp_path, n_crack=4, n_wall=4)
    for kind, suffix in (("images", ".jpg"), ("labels", ".txt")):
        folder = tmp_path / "cracks" / "train" / kind
        (folder / "day2").mkdir()
        for f in sorted(folder.glob(f"*{suffix}"))[:2]:
            f.rename(folder / "day2" / f.name)
    assert main(["data", "split", "--config", str(cfg)]) == 0
    split = json.loads((tmp_path / "split.json").read_text())["datasets"]
    assert sum(name.startswith("day2/") for name in split["cracks"]) == 2
    capsys.readouterr()
    assert main(["eval", "--model", str(random_onnx()), "--config", str(cfg), "--out", str(tmp_path / "rep"),
                 "--quiet", "--backend", "onnxruntime", "--split", "train"]) == 0
    data = json.loads((tmp_path / "rep" / "eval.json").read_text())
    assert sum(data["images"].values()) == sum(v == "train" for files in split.values() for v in files.values())
    assert "not found" not in capsys.readouterr().err


def test_eval_without_split_file_says_what_to_run(tmp_path, capsys):
    cfg = small_project(tmp_path)
    assert main(["eval", "--model", str(random_onnx()), "--config", str(cfg), "--quiet"]) == 2
    assert "drywallqa data split" in capsys.readouterr().err


def test_eval_refuses_an_unusable_out_folder_before_evaluating(tmp_path, capsys):
    cfg = small_project(tmp_path, n_crack=2, n_wall=2)
    assert main(["data", "split", "--config", str(cfg)]) == 0
    (tmp_path / "afile").write_text("mine")
    assert main(["eval", "--model", str(random_onnx()), "--config", str(cfg), "--out", str(tmp_path / "afile"),
                 "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "cannot use" in captured.err and "a file of that name exists" in captured.err
    assert "## Per class" not in captured.out  # stopped before the evaluation, not after it
    assert (tmp_path / "afile").read_text() == "mine"


def test_eval_names_a_split_file_that_is_not_one(tmp_path, capsys):
    cfg = small_project(tmp_path, n_crack=2, n_wall=2)
    for text in ("not json at all", '{"seed": 1}', '{"datasets": [1, 2]}'):
        (tmp_path / "bad.json").write_text(text)
        assert main(["eval", "--model", str(random_onnx()), "--config", str(cfg), "--split-file",
                     str(tmp_path / "bad.json"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"drywallqa: error: {tmp_path / 'bad.json'}" in err and "split" in err, err


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_eval_limit_must_be_positive(tmp_path, capsys, limit):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", "lite", "--limit", limit])
    assert exc.value.code == 2 and "argument --limit: must be 1 or more" in capsys.readouterr().err


def test_eval_where_every_image_is_skipped_fails_and_says_why(tmp_path, capsys):
    """No scored image must not give exit status 0 and a report of n/a that reads like a pass."""
    cfg = small_project(tmp_path, n_crack=2, n_wall=2)
    assert main(["data", "split", "--config", str(cfg)]) == 0
    for labels in tmp_path.glob("*/train/labels"):
        for f in labels.glob("*.txt"):
            f.unlink()
    capsys.readouterr()
    assert main(["eval", "--model", str(random_onnx()), "--config", str(cfg), "--out", str(tmp_path / "rep"),
                 "--quiet", "--backend", "onnxruntime", "--split", "train"]) == 2
    captured = capsys.readouterr()
    assert "could be scored, every one was skipped" in captured.err and "label file missing" in captured.err
    assert "## Per class" not in captured.out and not (tmp_path / "rep" / "eval.json").exists()
