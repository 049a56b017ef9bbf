"""`drywallqa edge bench`: how fast an exported model runs on this device, through the live loop's own backend and
model settings, without torch.

`drywallqa bench` exports the weights and compares every backend against torch, so it needs the training extra; a
Jetson or NUC with the edge install has only the exported file. This times that file as `edge run` would load it:
per frame, the pre-processing (a camera frame of `frame_size` resized to the model's input), the network, and the
decision rule (each class's mask on the model grid). Each model runs `iters` frames a round, the models taking turns
round by round so that they are measured side by side; a model's row is its best round by total p50, as `timeit`
reports its best repeat, since a round that lands in a slow phase of a shared machine measures the machine.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from drywallqa.edge.inference import PromptSegmenter
from drywallqa.edge.settings import ModelSettings

WARMUP_FRAMES = 3
STAGES = ("preprocess", "network", "decision")


@dataclass
class BenchRow:
    """One model's result; times in ms per frame (p50 of its best round)."""

    model: str
    backend: str
    input_hw: tuple[int, int]
    frame_hw: tuple[int, int]
    flip_tta: bool
    preprocess_ms: float = 0.0
    network_ms: float = 0.0
    decision_ms: float = 0.0
    total_ms: float = 0.0
    fps: float = 0.0
    rounds_total_ms: list[float] = field(default_factory=list)  # every round's total p50, in order


def site_like_frame(frame_hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A camera-sized RGB frame: a noisy grey wall with a dark diagonal line (a crack-like stroke), so that the
    decision rule has something to threshold; content does not change a network's time."""
    h, w = frame_hw
    rng = np.random.default_rng(seed)
    frame = rng.normal(170, 12, (h, w, 3)).clip(0, 255).astype(np.uint8)
    rows = np.linspace(0.2 * h, 0.8 * h, num=max(h, w)).astype(int)
    cols = np.linspace(0.1 * w, 0.9 * w, num=max(h, w)).astype(int)
    for dy in (-1, 0, 1):
        frame[np.clip(rows + dy, 0, h - 1), cols] = 60
    return frame


def _time_frame(segmenter: PromptSegmenter, frame: np.ndarray) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    batch = segmenter.preprocess(frame)[None]
    t1 = time.perf_counter()
    probs = segmenter.network(batch)[0]
    t2 = time.perf_counter()
    for name in segmenter.classes:
        segmenter.class_mask(probs, name)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def _p50_ms(values: Sequence[float]) -> float:
    return round(statistics.median(values) * 1000.0, 2)


def run_bench(models: Sequence[tuple[str, PromptSegmenter]], *, frame_hw: tuple[int, int] = (480, 640),
              iters: int = 30, rounds: int = 3) -> list[BenchRow]:
    """Time each (label, segmenter) side by side; one row each, in the given order."""
    frame = site_like_frame(frame_hw)
    for _, segmenter in models:
        for _ in range(WARMUP_FRAMES):
            _time_frame(segmenter, frame)
    per_round: dict[int, list[tuple[float, float, float, float]]] = {i: [] for i in range(len(models))}
    for _ in range(rounds):
        for i, (_, segmenter) in enumerate(models):
            times = [_time_frame(segmenter, frame) for _ in range(iters)]
            stages = [_p50_ms([t[k] for t in times]) for k in range(len(STAGES))]
            per_round[i].append((*stages, _p50_ms([sum(t) for t in times])))
    rows = []
    for i, (label, segmenter) in enumerate(models):
        best = min(per_round[i], key=lambda r: r[3])
        rows.append(BenchRow(
            model=label, backend=segmenter.backend.name, input_hw=tuple(segmenter.input_hw), frame_hw=frame_hw,
            flip_tta=segmenter.flip_tta, preprocess_ms=best[0], network_ms=best[1], decision_ms=best[2],
            total_ms=best[3], fps=round(1000.0 / best[3], 1) if best[3] > 0 else 0.0,
            rounds_total_ms=[r[3] for r in per_round[i]]))
    return rows


def format_rows(rows: Sequence[BenchRow], threads: int | None) -> str:
    """A plain table for the terminal, with each model's time relative to the first row's."""
    head = (f"{'model':<44} {'backend':<12} {'input':>9} {'pre ms':>7} {'net ms':>8} {'rule ms':>8} {'total':>8} "
            f"{'FPS':>6} {'vs 1st':>6}  rounds (total p50, ms)")
    lines = [f"frame {rows[0].frame_hw[1]}x{rows[0].frame_hw[0]}, threads {threads or 'backend default'}", head]
    for row in rows:
        ratio = row.total_ms / rows[0].total_ms if rows[0].total_ms else 0.0
        lines.append(
            f"{row.model[-44:]:<44} {row.backend:<12} {row.input_hw[1]:>4}x{row.input_hw[0]:<4} "
            f"{row.preprocess_ms:>7.2f} {row.network_ms:>8.2f} {row.decision_ms:>8.2f} {row.total_ms:>8.2f} "
            f"{row.fps:>6.1f} {ratio:>5.2f}x  {' / '.join(f'{t:.1f}' for t in row.rounds_total_ms)}"
            + ("  (flip_tta: 3 passes)" if row.flip_tta else ""))
    return "\n".join(lines)


def write_json(rows: Sequence[BenchRow], path: Path, settings: ModelSettings) -> None:
    path.write_text(json.dumps({"model_settings": settings.model_dump(mode="json"),
                                "rows": [asdict(r) for r in rows]}, indent=2))
