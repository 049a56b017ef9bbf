"""Per-class mask shapes: the `boxes` rule, where it is stored (checkpoint header, model metadata) and every
place that turns probabilities into masks (predict masks, eval, the live loop's analysis)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from test_eval import _KnownBackend, _mask

from drywallqa.contract import TextEncoderInfo, metadata_from_vocabulary
from drywallqa.edge.analysis import WatchedClass, analyze_class
from drywallqa.edge.backends import load_backend
from drywallqa.edge.inference import PromptSegmenter
from drywallqa.edge.mask_shapes import class_mask
from drywallqa.evaluate import evaluate
from drywallqa.train.data.prepare import Example
from drywallqa.train.data.sources import ImageRecord
from drywallqa.vocab import load_vocabulary


def _two_regions() -> np.ndarray:
    probs = np.zeros((40, 50), np.float32)
    probs[5:25, 5:8] = 0.9  # an L: vertical bar ...
    probs[22:25, 5:20] = 0.9  # ... and its foot; box rows 5..24, cols 5..19
    probs[30:33, 30:45] = 0.7  # a separate bar, already box-shaped
    probs[0, 49] = 0.3  # below the threshold
    return probs


def test_boxes_fill_each_region_to_its_own_bounding_box():
    probs = _two_regions()
    pixels = class_mask(probs, 0.5, "pixels")
    boxes = class_mask(probs, 0.5, "boxes")
    assert pixels.dtype == bool and boxes.dtype == bool
    np.testing.assert_array_equal(pixels, probs >= 0.5)
    expected = np.zeros_like(boxes)
    expected[5:25, 5:20] = True
    expected[30:33, 30:45] = True
    np.testing.assert_array_equal(boxes, expected)  # two boxes, not one box around both
    assert not class_mask(np.zeros((4, 4), np.float32), 0.5, "boxes").any()
    with pytest.raises(ValueError, match="allowed: pixels, boxes"):
        class_mask(probs, 0.5, "hull")


def test_metadata_mask_shapes_default_and_validation():
    vocab = load_vocabulary()
    common = dict(model_name="m", profile="p", architecture="a", version="0", input_size=(8, 8),
                  thresholds={"crack": 0.5, "taping": 0.5}, text_encoder=TextEncoderInfo(name="none", dim=1))
    meta = metadata_from_vocabulary(vocab, **common, mask_shapes={"taping": "boxes"})
    assert meta.mask_shape("taping") == "boxes" and meta.mask_shape("crack") == "pixels"
    with pytest.raises(ValueError, match="not in `classes`"):
        metadata_from_vocabulary(vocab, **common, mask_shapes={"mould": "boxes"})
    with pytest.raises(ValueError, match="pixels"):
        metadata_from_vocabulary(vocab, **common, mask_shapes={"taping": "hull"})


class _ShapedBackend(_KnownBackend):
    def __init__(self, probs: list[np.ndarray], shapes: dict[str, str]) -> None:
        super().__init__(probs)
        self.metadata = self.metadata.model_copy(update={"mask_shapes": shapes})


def test_prompt_masks_and_eval_follow_the_models_shape():
    taping = _mask([(0, 0), (1, 1)])  # a diagonal pair: one 8-connected region, box = top-left 2 x 2
    probs = [np.stack([np.zeros((4, 4)), taping * 0.9]).astype(np.float32)]
    truth = _mask([(0, 0), (0, 1), (1, 0), (1, 1)])
    rec = ImageRecord("walls", "taping", Path("w.jpg"), Path("w.txt"))
    example = Example(rec, np.zeros((4, 4, 3), np.uint8), truth.astype(np.uint8) * 255)
    by_shape = {}
    for shape in ("pixels", "boxes"):
        seg = PromptSegmenter(_ShapedBackend(probs, {"taping": shape}))
        mask = seg.masks(np.zeros((4, 4, 3), np.uint8), ["segment taping area"])["segment taping area"]
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        data, _ = evaluate(seg, [example], {"walls": "taping", "cracks": "crack"}, tune_thresholds=True,
                           progress=False)
        by_shape[shape] = (mask, data)
    np.testing.assert_array_equal(by_shape["pixels"][0] > 0, taping)
    np.testing.assert_array_equal(by_shape["boxes"][0] > 0, truth)
    assert by_shape["pixels"][1]["per_class"]["taping"]["iou_mean"] == pytest.approx(0.5)
    assert by_shape["boxes"][1]["per_class"]["taping"]["iou_mean"] == pytest.approx(1.0)
    assert by_shape["boxes"][1]["per_class"]["taping"]["mask_shape"] == "boxes"
    sweep = by_shape["pixels"][1]["threshold_sweep"]["taping"]  # the sweep tries both shapes, whatever ships
    assert sweep["best_shape"] == "boxes" and sweep["best"]["iou_mean"] == pytest.approx(1.0)


def test_live_analysis_reports_boxes_for_a_boxes_class():
    probs = _two_regions()
    shaped = WatchedClass("taping", 1, "segment taping area", 0.5, "boxes")
    plain = WatchedClass("taping", 1, "segment taping area", 0.5)
    res_box, mask_box = analyze_class(probs, shaped, min_region_area_px=4, source_hw=(80, 100))
    res_pix, mask_pix = analyze_class(probs, plain, min_region_area_px=4, source_hw=(80, 100))
    np.testing.assert_array_equal(mask_box > 0, class_mask(probs, 0.5, "boxes"))
    assert int(mask_pix.sum()) == 60 + 45 - 9 + 45 and int(mask_box.sum()) == 20 * 15 + 45
    assert res_box.area_fraction == pytest.approx((20 * 15 + 45) / (40 * 50))
    assert [r.bbox for r in res_box.regions] == [r.bbox for r in res_pix.regions]
    assert res_box.regions[0].area_px == 20 * 15 * 4  # in source pixels (2 x 2 per analysed pixel)
    assert res_box.mean_confidence == pytest.approx(res_pix.mean_confidence)  # of the predicted pixels


def test_shape_travels_from_checkpoint_header_to_the_exported_file(tmp_path):
    from drywallqa.export.metadata import build_metadata
    from drywallqa.export.onnx_export import export_onnx
    from drywallqa.export.random_weights import RANDOM_EMBED_DIM, random_model
    from drywallqa.train.checkpoint import load_weights, save_weights, set_thresholds

    model, info = random_model("effnet_lite0_fpn", (64, 64), seed=3)
    weights = save_weights(model, info, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="unknown mask shapes"):
        set_thresholds(weights, {}, {"taping": "hull"})
    with pytest.raises(ValueError, match="unknown classes"):
        set_thresholds(weights, {}, {"mould": "boxes"})
    set_thresholds(weights, {"taping": 0.5}, {"taping": "boxes"})
    model, info = load_weights(weights)
    assert info.mask_shapes == {"taping": "boxes"} and info.thresholds["taping"] == 0.5
    meta = build_metadata(info, embed_dim=RANDOM_EMBED_DIM, input_size=(64, 64))
    path = export_onnx(model, meta, tmp_path / "m.onnx")
    seg = PromptSegmenter(load_backend(path, backend="onnxruntime", threads=1))
    assert seg.metadata.mask_shape("taping") == "boxes" and seg.metadata.mask_shape("crack") == "pixels"
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), np.uint8)
    probs = seg.probabilities(image)
    seg.metadata.thresholds["taping"] = float(np.quantile(probs[1], 0.7))  # make sure some regions exist
    mask = seg.masks(image, ["segment taping area"])["segment taping area"] > 0
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    assert n > 1 and mask.sum() >= (probs[1] >= seg.metadata.thresholds["taping"]).sum()
    for i in range(1, n):  # every region of the output is a filled rectangle
        x, y, w, h, area = stats[i]
        assert area == w * h
