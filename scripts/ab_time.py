"""Time exported model files against each other, interleaved in one process: an A/B for a graph change.

    python scripts/ab_time.py old/lite_effnet_lite0.onnx new/lite_effnet_lite0.onnx --rounds 6 --iters 20

Every round times each file once (median of `--iters` frames), so the VM's slow and fast phases fall on all files
alike; each file's best round is its figure, as in `drywallqa bench`. `.onnx` runs in ONNX Runtime, `.xml` in
OpenVINO (f32 compute for float IRs). Inputs are real training photos when ../shared/data is there, else probes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from drywallqa.edge.backends import load_backend


def photos(hw: tuple[int, int], n: int = 4) -> list[np.ndarray]:
    from drywallqa.export.calibration import calibration_set

    return [b[None] for b in calibration_set(n, hw)[0]]


def runner(path: Path, threads: int) -> tuple[Callable[[np.ndarray], np.ndarray], tuple[int, int]]:
    backend = load_backend(path, "onnxruntime" if path.suffix == ".onnx" else "openvino", threads=threads)
    return backend.infer, backend.input_hw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    runs = {f: runner(f, args.threads) for f in args.files}
    images = photos(next(iter(runs.values()))[1])
    first = {f: run(images[0]) for f, (run, _) in runs.items()}
    reference = first[args.files[0]]
    for f, out in first.items():
        print(f"{f}: max abs difference from {args.files[0].name}: {float(np.abs(out - reference).max()):.2e}")
    rounds: dict[Path, list[float]] = {f: [] for f in runs}
    for _ in range(args.rounds):
        for f, (run, _) in runs.items():
            times = []
            for i in range(args.iters):
                t0 = time.perf_counter()
                run(images[i % len(images)])
                times.append(time.perf_counter() - t0)
            rounds[f].append(1000 * float(np.median(times)))
    for f, ms in rounds.items():
        print(f"{f}: best {min(ms):.2f} ms; rounds " + " / ".join(f"{x:.1f}" for x in ms))


if __name__ == "__main__":
    main()
