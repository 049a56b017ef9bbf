"""Per-synonym quality of a torch checkpoint on the validation split, at native resolution.

The exported graph answers per class (the centroid of its synonyms' embeddings); this evaluates every
prompt's own baked embedding too, from one backbone pass per image, so the card can report the spread
across wordings, under the checkpoint's decision rule (threshold and mask shape per class). Also sweeps
the class output's threshold under its mask shape.

    python -m drywallqa.train.synonym_eval --weights models/hrnet_w18_student.safetensors --out runs/syn_hrnet.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from drywallqa.edge.inference import resize_interpolation
from drywallqa.edge.mask_shapes import class_mask
from drywallqa.evaluate import SWEEP_THRESHOLDS, sweep_counts
from drywallqa.metrics import counts, dice_from_counts, iou_from_counts
from drywallqa.train.checkpoint import load_weights
from drywallqa.train.data.prepare import load_labelled, load_setup, records_in_split


@torch.no_grad()
def evaluate(weights: str, size: int | None = None, limit: int | None = None, threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    model, info = load_weights(weights)
    size = size or info.input_size[0]
    setup = load_setup(None)
    records = records_in_split(setup, "val")
    formats = {spec.name: spec.format for spec in setup.specs}
    prompts = info.prompts
    rows: dict[str, list[tuple[int, int, int]]] = {}
    for ds, recs in records.items():
        for rec in recs[:limit]:
            ex = load_labelled(rec, formats[ds], setup.box_strategy)
            if ex.image is None:
                continue
            c = info.classes.index(rec.class_name)
            own = [i for i, k in enumerate(info.prompt_class) if k == c]
            h, w = ex.image.shape[:2]
            x = torch.from_numpy(cv2.resize(ex.image, (size, size), interpolation=resize_interpolation((h, w), (size, size))))
            x = model.input_from_uint8(x[None])
            feat = model.features(x)
            emb = torch.cat([model.class_embeddings[c:c + 1], model.prompt_embeddings[own]])
            logits = model.head(feat, emb)
            probs = torch.sigmoid(F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False))[0].numpy()
            truth = ex.mask > 0
            shape = info.mask_shapes.get(rec.class_name, "pixels")
            for t, row in zip(SWEEP_THRESHOLDS, sweep_counts(probs[0], truth, shape), strict=True):
                rows.setdefault(f"class:{rec.class_name}@{t}", []).append(tuple(int(v) for v in row))
            thr = info.thresholds[rec.class_name]
            for j, p in enumerate(own):
                rows.setdefault(f"prompt:{prompts[p]}", []).append(counts(class_mask(probs[1 + j], thr, shape), truth))
    summary = {}
    for key, cs in rows.items():
        arr = np.array(cs)
        summary[key] = {
            "images": len(cs),
            "iou_mean": float(np.mean([iou_from_counts(*c) for c in cs])),
            "dice_mean": float(np.mean([dice_from_counts(*c) for c in cs])),
            "iou_pooled": iou_from_counts(*arr.sum(0)),
            "dice_pooled": dice_from_counts(*arr.sum(0)),
        }
    best = {}
    for cname in info.classes:
        cands = [(summary[f"class:{cname}@{t}"]["iou_mean"], -abs(t - 0.5), t) for t in SWEEP_THRESHOLDS
                 if f"class:{cname}@{t}" in summary]
        if cands:
            best[cname] = max(cands)[2]
    spread = {}
    for cname in info.classes:
        vals = [v["iou_mean"] for k, v in summary.items()
                if k.startswith("prompt:") and info.prompt_class[prompts.index(k[7:])] == info.classes.index(cname)]
        if vals:
            spread[cname] = {"min": min(vals), "max": max(vals), "spread_points": 100 * (max(vals) - min(vals))}
    return {"weights": str(weights), "input_size": size, "thresholds_used": info.thresholds,
            "best_threshold": best, "synonym_spread": spread, "metrics": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="at most N val images per dataset")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    res = evaluate(args.weights, args.size, args.limit, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({"best_threshold": res["best_threshold"], "synonym_spread": res["synonym_spread"]}, indent=1))
    for k, v in res["metrics"].items():
        if k.startswith("class:") and k.endswith(tuple(f"@{t}" for t in (0.1, 0.2, 0.3, 0.5))):
            print(k, round(v["iou_mean"], 4), round(v["dice_mean"], 4))


if __name__ == "__main__":
    main()
