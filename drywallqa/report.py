"""Evaluation report writers: Markdown tables and a self-contained HTML page with overlay images.

Overlays are small base64 JPEGs (truth outline green, prediction filled red) so the page is one file.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable

import cv2
import numpy as np

THUMB_SIDE = 256


def _f(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if pct else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def tables(data: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Section title -> (header, rows); shared by the Markdown and HTML writers."""
    out: dict[str, tuple[list[str], list[list[str]]]] = {}
    out["Per class"] = (
        ["class", "images", "IoU mean", "IoU pooled", "Dice mean", "Dice pooled", "both empty", "threshold", "mask shape"],
        [[c, str(s["images"]), _f(s["iou_mean"]), _f(s["iou_pooled"]), _f(s["dice_mean"]), _f(s["dice_pooled"]),
          str(s["both_empty_images"]), f"{s['threshold']:.2f}", s.get("mask_shape", "pixels")] for c, s in data["per_class"].items()],
    )
    out["Per prompt"] = (
        ["prompt", "class", "IoU mean", "IoU pooled", "Dice mean", "Dice pooled", "FP image rate"],
        [[f"`{p}`", s["class"], _f(s["iou_mean"]), _f(s["iou_pooled"]), _f(s["dice_mean"]), _f(s["dice_pooled"]),
          _f(data["false_positives_per_prompt"][p]["fp_image_rate"], pct=True)]
         for p, s in data["per_prompt"].items()],
    )
    out["False positives on other datasets"] = (
        ["class", "images of dataset", "images", "images with any predicted pixel", "mean predicted area"],
        [[c, ds, str(s["images"]), _f(s["fp_image_rate"], pct=True), _f(s["mean_pred_area"], pct=True)]
         for c, by_ds in data["false_positives"].items() for ds, s in by_ds.items()],
    )
    m, lat = data.get("model", {}), data.get("latency_ms", {})
    out["Speed and size"] = (
        ["backend", "input", "latency total ms/img", "pre ms", "network ms", "post ms", "model file MB"],
        [[str(m.get("backend")), "x".join(str(v) for v in m.get("input", [])),
          *(f"{lat.get(k, float('nan')):.1f}" for k in ("total", "pre", "network", "post")),
          f"{m.get('file_bytes', 0) / 2**20:.2f}"]],
    )
    for c, sweep in data.get("threshold_sweep", {}).items():
        best = (f"best {sweep['best_shape']} at {sweep['best_threshold']}" if sweep.get("best_shape") is not None
                else "no image of this class to tune on")
        out[f"Decision sweep: {c} ({best})"] = (
            ["mask shape", "threshold", "IoU mean", "IoU pooled", "FP image rate"],
            [[r["shape"], f"{r['threshold']:.2f}" + (" *" if r == sweep["best"] else ""),
              _f(r["iou_mean"]), _f(r["iou_pooled"]), _f(r["fp_image_rate"], pct=True)] for r in sweep["rows"]],
        )
    return out


def _title(data: dict) -> str:
    m = data.get("model", {})
    return f"DrywallQA evaluation: {m.get('name', '?')} ({m.get('architecture', '?')}, {m.get('precision', '?')})"


def _preamble(data: dict) -> list[str]:
    m, s = data.get("model", {}), data.get("split", {})
    images = ", ".join(f"{ds} {n}" for ds, n in data["images"].items())
    return [
        f"Model file: `{m.get('path', '?')}`. Split: `{s.get('name', '?')}` of `{s.get('file', '?')}` "
        f"({images} images at native resolution; box labels rasterised with `{s.get('box_strategy', '?')}`)."
        + (" Test-time flips: each image's probabilities are the mean over it and its two mirror images."
           if m.get("flip_tta") else ""),
        "",
        f"Convention: {data['convention']}",
        "",
        f"Skipped images: {len(data['skipped'])}" + "".join(f"\n- {x}" for x in data["skipped"][:20]),
    ]


def to_markdown(data: dict) -> str:
    lines = [f"# {_title(data)}", "", *_preamble(data)]
    for title, (header, rows) in tables(data).items():
        lines += ["", f"## {title}", "", *_table(header, rows)]
    return "\n".join(lines)


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    """RGB thumbnail: prediction filled red (semi-transparent), truth outlined green."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    p = cv2.resize(pred.astype(np.uint8) * 255, size, interpolation=cv2.INTER_NEAREST) > 0
    t = cv2.resize(truth.astype(np.uint8) * 255, size, interpolation=cv2.INTER_NEAREST)
    img[p] = 0.5 * img[p] + 0.5 * np.array([255, 0, 0], np.float32)
    out = img.clip(0, 255).astype(np.uint8)
    contours, _ = cv2.findContours((t > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 255, 0), 1)
    return out


def jpeg_data_uri(rgb: np.ndarray, quality: int = 75) -> str:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("cannot encode overlay")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def gallery(segmenter, ranked: dict[str, list[tuple[float, object]]], load: Callable[[object], object],
            per_class: int) -> dict[str, list[dict]]:
    """Best and worst images per class (by IoU), re-run through the model and drawn as overlays."""
    shots: dict[str, list[dict]] = {}
    for cls, items in ranked.items():
        order = sorted(items, key=lambda it: it[0])
        picks = [("worst", it) for it in order[:per_class]]
        picks += [("best", it) for it in order[::-1][:per_class] if all(it is not q for _, q in picks)]
        shots[cls] = []
        for kind, (score, rec) in picks:
            ex = load(rec)
            if ex.skipped is not None:
                continue
            pred = segmenter.class_mask(segmenter.probabilities(ex.image), cls)
            shots[cls].append({"kind": kind, "iou": score, "id": rec.image_id, "dataset": rec.dataset,
                               "uri": jpeg_data_uri(overlay(ex.image, ex.mask > 0, pred))})
    return shots


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}figure{display:inline-block;margin:4px;font-size:12px}
figure img{display:block}.legend{font-size:13px;color:#555}"""


def _html_paragraph(text: str) -> str:
    """One preamble paragraph of the Markdown report as HTML: `code` spans, and "- " lines as a list."""

    def inline(line: str) -> str:
        pieces = html.escape(line).split("`")
        if len(pieces) % 2 == 0:  # an unpaired backtick: leave the text as it is
            return html.escape(line)
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))

    head, *items = text.split("\n- ")
    listed = "<ul>" + "".join(f"<li>{inline(item)}</li>" for item in items) + "</ul>" if items else ""
    return f"<p>{inline(head)}</p>{listed}"


def to_html(data: dict, shots: dict[str, list[dict]]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(_title(data))}</title>"
             f"<style>{_CSS}</style></head><body><h1>{e(_title(data))}</h1>"]
    parts += [_html_paragraph(line) for line in _preamble(data) if line]
    for title, (header, rows) in tables(data).items():
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c.strip('`'))}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    parts.append("<h2>Best and worst images</h2><p class='legend'>red fill: prediction; green outline: truth</p>")
    for cls, items in shots.items():
        parts.append(f"<h3>{e(cls)}</h3>")
        parts += [f"<figure><img src='{s['uri']}' alt='{e(s['id'])}'><figcaption>{e(s['kind'])} IoU "
                  f"{s['iou']:.3f}<br>{e(s['id'][:40])}</figcaption></figure>" for s in items]
    parts.append("</body></html>")
    return "\n".join(parts)
