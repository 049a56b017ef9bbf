"""The committed models: contract, size, parity of their exports, and a quality floor on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from drywallqa.paths import PROFILES, SHARED_DATA_DIR, profile_weights
from drywallqa.vocab import load_vocabulary

torch = pytest.importorskip("torch")

from drywallqa.edge.backends import load_backend  # noqa: E402
from drywallqa.edge.inference import PromptSegmenter  # noqa: E402
from drywallqa.export.pipeline import run_export  # noqa: E402
from drywallqa.train.checkpoint import load_weights  # noqa: E402

needs_data = pytest.mark.skipif(not SHARED_DATA_DIR.is_dir(),
                                reason=f"real photos not found at {SHARED_DATA_DIR} (CI has ../shared/data)")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_shipped_weights_carry_the_contract(profile):
    path = profile_weights(profile)
    assert path.stat().st_size < 30 * 2**20, "each shipped model stays under 30 MB"
    model, info = load_weights(path)
    vocab = load_vocabulary()
    assert info.prompts == vocab.all_prompts, "baked prompt embeddings must cover exactly configs/prompts.yaml"
    assert info.classes == list(vocab.classes)
    assert info.text_encoder.startswith("minilm:")
    assert set(info.thresholds) == set(vocab.classes) and all(0 < t < 1 for t in info.thresholds.values())
    assert model.prompt_embeddings.shape == (len(vocab.all_prompts), 384)


def _val_images(dataset: str, n: int):
    from drywallqa.train.data.prepare import load_labelled, load_setup, records_in_split

    setup = load_setup(None)
    recs = records_in_split(setup, "val")[dataset]
    picked = recs[:: max(1, len(recs) // n)][:n]
    return [load_labelled(r, "yolo", setup.box_strategy) for r in picked]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    return {p: run_export(profile_weights(p), "onnx", out)["onnx"] for p in sorted(PROFILES)}


@needs_data
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_onnx_export_matches_torch_on_real_photos(exported, profile):
    model, info = load_weights(profile_weights(profile))
    seg = PromptSegmenter(load_backend(exported[profile], "onnxruntime", threads=2))
    for ex in _val_images("cracks", 2) + _val_images("drywall-join-detect", 2):
        batch = seg.preprocess(ex.image)[None]
        with torch.no_grad():
            ref = model.probabilities(torch.from_numpy(batch)).numpy()
        got = seg.network(batch)
        assert np.abs(got - ref).max() < 2e-3
        for c, name in enumerate(info.classes):
            a, b = ref[0, c] >= info.thresholds[name], got[0, c] >= info.thresholds[name]
            union = (a | b).sum()
            assert union == 0 or (a & b).sum() / union >= 0.99


@needs_data
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_quality_floor_and_no_cracks_on_drywall_photos(exported, profile):
    """A regression guard on 16 validation photos per class (full numbers: `drywallqa eval`, MODEL.md)."""
    seg = PromptSegmenter(load_backend(exported[profile], "onnxruntime", threads=2))
    ious = {"segment crack": [], "segment taping area": []}
    crack_area_on_drywall = []
    for dataset, prompt in (("cracks", "segment crack"), ("drywall-join-detect", "segment taping area")):
        for ex in _val_images(dataset, 16):
            masks = seg.masks(ex.image, ["segment crack", "segment taping area"])
            pred, truth = masks[prompt] > 0, ex.mask > 0
            assert masks[prompt].shape == ex.mask.shape and set(np.unique(masks[prompt])) <= {0, 255}
            ious[prompt].append((pred & truth).sum() / max(1, (pred | truth).sum()))
            if dataset == "drywall-join-detect":
                crack_area_on_drywall.append((masks["segment crack"] > 0).mean())
    assert np.mean(ious["segment crack"]) > 0.30
    assert np.mean(ious["segment taping area"]) > 0.50
    assert np.mean(crack_area_on_drywall) < 0.01, "the crack prompt must stay (near) empty on drywall photos"


@needs_data
def test_openvino_fp16_and_int8_of_the_shipped_lite_model_agree_with_torch(tmp_path):
    """FP16 IR: masks as torch's (IoU >= 0.99). INT8 (NNCF, 16 calibration photos here): IoU >= 0.9."""
    paths = run_export(profile_weights("lite"), "openvino", tmp_path, calib=16)
    model, info = load_weights(profile_weights("lite"))
    photos = _val_images("cracks", 3) + _val_images("drywall-join-detect", 3)
    for key, bound in (("openvino_fp16", 0.99), ("openvino_int8", 0.90)):
        seg = PromptSegmenter(load_backend(paths[key], "openvino", threads=2))
        inter = union = 0
        for ex in photos:
            batch = seg.preprocess(ex.image)[None]
            with torch.no_grad():
                ref = model.probabilities(torch.from_numpy(batch)).numpy()
            got = seg.network(batch)
            for c, name in enumerate(info.classes):
                a, b = ref[0, c] >= info.thresholds[name], got[0, c] >= info.thresholds[name]
                inter += int((a & b).sum())
                union += int((a | b).sum())
        assert union > 0 and inter / union >= bound, f"{key}: mask IoU vs torch {inter / union:.3f} < {bound}"


@needs_data
def test_predict_report_points_at_the_photos_with_cracks(exported, tmp_path):
    """The findings CSV of `predict --report`, with the shipped `lite` on 4 crack and 4 drywall photos: the crack
    prompt finds cracks in the crack photos and nothing in the drywall photos, and the reverse for taping."""
    import csv

    import cv2

    from drywallqa.cli import main

    src = tmp_path / "photos"
    src.mkdir()
    kind = {}
    for dataset in ("cracks", "drywall-join-detect"):
        for i, ex in enumerate(_val_images(dataset, 4)):
            name = f"{dataset}_{i}"
            cv2.imwrite(str(src / f"{name}.png"), cv2.cvtColor(ex.image, cv2.COLOR_RGB2BGR))
            kind[name] = dataset
    report = tmp_path / "findings.csv"
    code = main(["predict", "--model", str(exported["lite"]), "--out", str(tmp_path / "masks"), "--quiet",
                 "--prompt", "segment crack", "--prompt", "segment taping area", "--report", str(report), str(src)])
    assert code == 0
    with report.open(newline="") as f:
        rows = {(Path(r["image"]).stem, r["class_name"]): r for r in csv.DictReader(f)}
    assert len(rows) == 16
    _, info = load_weights(profile_weights("lite"))
    for (name, cls), r in rows.items():
        own_class = (cls == "crack") == (kind[name] == "cracks")
        if own_class:
            assert float(r["mask_share"]) > 0 and int(r["regions"]) >= 1, r
            assert float(r["max_probability"]) >= info.thresholds[cls], r
        else:
            assert float(r["mask_share"]) == 0 and int(r["regions"]) == 0, r
        if cls == "crack" and own_class:  # pixel masks: every pixel in them is above the threshold
            assert float(r["mean_probability_in_mask"]) >= info.thresholds[cls], r
            assert float(r["length_px"]) > 0, r  # and a crack has a length
        if cls == "taping":  # taping masks are boxes: a length would mean nothing
            assert r["length_px"] == "", r
