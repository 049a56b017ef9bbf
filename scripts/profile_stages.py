"""Where a live frame's time goes (a profile, not a test): per-stage costs of the edge loop, run one after the
other on a video, and optionally OpenVINO's per-layer counters for the network.

    python scripts/profile_stages.py models/exported/lite_effnet_lite0_int8.xml --video cache/bench_loop/site_640x640.avi
    python scripts/profile_stages.py models/exported/hrnet_w18_student_fp16.xml --layers   # fp32 compute, per layer

The site video is written by `python scripts/bench_loop.py --video site`.
"""

from __future__ import annotations

import argparse
import collections
import time

import cv2
import numpy as np

from drywallqa.edge.analysis import WatchedClass, analyze_class
from drywallqa.edge.backends import load_backend
from drywallqa.edge.inference import PromptSegmenter


def stages(model: str, video: str, frames: int, threads: int) -> dict[str, float]:
    """(median, mean) ms per stage: decode, preprocess, network, and the analysis of each class on the model's grid."""
    seg = PromptSegmenter(load_backend(model, "openvino", threads))
    cap = cv2.VideoCapture(video)
    times: dict[str, list[float]] = collections.defaultdict(list)

    def timed(name: str, fn):
        t = time.perf_counter()
        out = fn()
        times[name].append((time.perf_counter() - t) * 1000)
        return out

    for _ in range(frames):
        ok, bgr = timed("decode", cap.read)
        if not ok:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        batch = timed("preprocess", lambda rgb=rgb: seg.preprocess(rgb)[None])
        probs = timed("network", lambda batch=batch: seg.network(batch)[0])
        for k, name in enumerate(seg.classes):
            w = WatchedClass(name, k, name, float(seg.metadata.thresholds[name]), seg.metadata.mask_shape(name))
            timed(f"analysis {name}", lambda p=probs[k], w=w, hw=rgb.shape[:2]: analyze_class(
                p, w, with_skeleton=w.class_name == "crack", source_hw=hw))
    return {k: (float(np.median(v[3:])), float(np.mean(v[3:]))) for k, v in times.items()}


def layers(model: str, threads: int, top: int = 12) -> None:
    """OpenVINO CPU per-layer counters at f32 precision, by layer type and the slowest layers."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model), "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).integers(0, 255, tuple(compiled.input(0).shape), dtype=np.uint8)
    for _ in range(5):
        request.infer({0: x})
    by_type: collections.Counter = collections.Counter()
    rows = []
    for info in request.profiling_info:
        us = info.real_time.total_seconds() * 1e6
        by_type[(info.node_type, info.exec_type)] += us
        rows.append((us, info.node_type, info.node_name))
    total = sum(by_type.values())
    print(f"per-layer total {total / 1000:.1f} ms")
    for (kind, impl), us in by_type.most_common(top):
        print(f"{us / 1000:8.1f} ms {100 * us / total:5.1f} %  {kind} ({impl})")
    for us, kind, name in sorted(rows, reverse=True)[:top]:
        print(f"{us / 1000:8.2f} ms  {kind:12s} {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an exported .xml/.onnx model")
    ap.add_argument("--video", default="cache/bench_loop/site_640x640.avi")
    ap.add_argument("--frames", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", action="store_true", help="OpenVINO per-layer counters instead of the stages")
    args = ap.parse_args()
    if args.layers:
        layers(args.model, args.threads)
        return
    for name, (median, mean) in stages(args.model, args.video, args.frames, args.threads).items():
        print(f"{name:18s} median {median:7.2f} ms   mean {mean:7.2f} ms")


if __name__ == "__main__":
    main()
