"""Benchmark of the whole edge loop (not a test): video source -> model -> analysis -> alerts/detections -> MQTT.

For each model (a --model file, or random weights per --profiles), in its own subprocess (so peak RSS is
per model): a video (synthetic 640x480 wall with a crack line, or real validation photos with --video site),
either played like a camera (newest frame only, paced at --source-fps) or, with --source-fps 0, lossless
and unpaced, so wall time per frame is the loop's own cost; the real EdgeRunner with OpenVINO, a real
mosquitto on loopback, and a crack alert rule.
Reports loop FPS and ms per frame, capture-to-publish latency p50/p95 (paced mode), CPU use, peak RSS and,
in the same process, the model-only time (the network on one preprocessed frame). The loop's overhead over
the model is measured in the lossless mode only (paced, the loop mostly waits for the source): the loop
runs in short segments alternating with model-only windows, and the overhead is the median segment's (see
alternate_segments); there `seconds` and `cpu_percent` are those of the loop segments alone.

    python scripts/bench_loop.py                       # both architectures, random weights, 512 px
    python scripts/bench_loop.py --source-fps 0 --model int8=models/exported/lite_effnet_lite0_int8.xml \
        --model fp16=models/exported/lite_effnet_lite0_fp16.xml   # only these two files, one row each
    python scripts/bench_loop.py --source-fps 0 --video site --threads 2 \
        --model lite=models/exported/lite_effnet_lite0_int8.xml --model hrnet=models/exported/hrnet_w18_student_int8.xml
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {"hrnet": "hrnet_w18", "lite": "effnet_lite0_fpn"}


def _random_model(arch: str, size: int, cache: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from _export_fixtures import export_random_model  # needs torch; only for models that are not trained yet

    out = cache / f"{arch}_{size}x{size}.onnx"
    if out.is_file():
        return out
    return export_random_model(cache, architecture=arch, size=(size, size))


def _video(path: Path, frames: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from _edge_helpers import make_video

    if not path.is_file():
        make_video(path, frames, size=(480, 640), fps=30.0)
    return path


def first_frame(video: Path) -> np.ndarray:
    """The video's first frame, RGB; ValueError when it cannot be opened or has no frame (the loop would wait
    for a frame forever: the source is looped)."""
    cap = cv2.VideoCapture(str(video))
    try:
        ok, bgr = cap.read() if cap.isOpened() else (False, None)
    finally:
        cap.release()
    if not ok or bgr is None:
        raise ValueError(f"--video: cannot read a frame from {video}")
    return bgr[:, :, ::-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_spec(text: str) -> tuple[str, str]:
    """--model NAME=PATH -> (NAME, PATH)."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. lite=models/exported/lite_effnet_lite0_int8.xml), "
                                         f"got {text!r}")
    return name.strip(), path.strip()


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _site_video(path: Path, per_dataset: int) -> Path:
    """An MJPEG AVI of real validation photos (cracks and drywall seams alternating, 640x640), so the
    analysis cost is that of site imagery rather than of a synthetic line in every frame. Needs ../shared."""
    from drywallqa.imageio import read_image_rgb
    from drywallqa.train.data.prepare import load_setup, records_in_split

    if path.is_file():
        return path
    by_ds = records_in_split(load_setup(None), "val")
    photos = [r.image_path for pair in zip(*(recs[:per_dataset] for recs in by_ds.values()), strict=False)
              for r in pair]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (640, 640))
    for photo in photos:
        rgb = cv2.resize(read_image_rgb(photo), (640, 640), interpolation=cv2.INTER_AREA)
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def alternate_segments(runner, model_only, segments: int,
                       seconds: float) -> tuple[dict, list[float], float, tuple[float, float]]:
    """The loop's overhead over the model alone, robust to this VM's slow phases.

    The VM's speed drifts in phases of ten seconds or more (ONNX Runtime on `lite` flips between ~37 and
    ~53 ms per frame), so a 20-second loop compared with model-only windows taken at its two ends measures
    the phases as much as the loop. Instead: `segments` short loop segments (~seconds / segments each), each
    between two model-only windows of ~0.5 s; a segment's overhead is its ms per frame over the mean of the
    windows on both sides, and the median segment is the figure.

    Returns the overhead fields, every model-only time (ms), the median segment's ms per frame, and the
    segments' own wall and CPU seconds (the model-only windows left out of both).
    """
    probe = model_only(10)
    per_frame = float(np.mean(probe)) / 1000
    loop_frames = max(10, round(seconds / segments / per_frame))
    window = max(5, round(0.5 / per_frame))
    windows = [model_only(window)]
    loop_ms: list[float] = []
    loop_wall = loop_cpu = 0.0
    for _ in range(segments):
        t0, c0 = time.perf_counter(), time.process_time()
        done = runner.run_frames(max_frames=loop_frames)
        wall = time.perf_counter() - t0
        loop_cpu += time.process_time() - c0
        loop_wall += wall
        loop_ms.append(1000 * wall / max(1, done))
        windows.append(model_only(window))
    model_means = [float(np.mean(w)) for w in windows]
    per_segment = [100 * (ms / ((model_means[k] + model_means[k + 1]) / 2) - 1) for k, ms in enumerate(loop_ms)]
    overhead = {
        "loop_overhead_pct": round(float(np.median(per_segment)), 1),
        "loop_overhead_pct_segments": [round(x, 1) for x in per_segment],
        "segments": segments, "frames_per_segment": loop_frames, "model_only_window_frames": window,
    }
    return overhead, [t for w in windows for t in w], float(np.median(loop_ms)), (loop_wall, loop_cpu)


def run_one(name: str, model: Path, seconds: float, source_fps: float, backend: str, threads: int | None,
            video: Path, segments: int = 16) -> dict:
    """source_fps > 0: played like a camera (newest frame only); 0: lossless and unpaced, every frame
    processed as fast as the loop goes, so wall time per frame is the loop's own cost per frame."""
    import psutil

    from drywallqa.edge.broker import EmbeddedBroker
    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import EdgeSettings
    from drywallqa.export.bench import _peak_rss_mib

    first = first_frame(video)  # before anything starts: a video without a frame would make the loop wait forever
    tmp = tempfile.TemporaryDirectory(prefix="bench-loop-")
    port = _free_port()
    broker = EmbeddedBroker(port).start()
    runner = None
    try:
        settings = EdgeSettings.model_validate({
            "source": {"uri": str(video), "realtime": source_fps > 0, "loop": True, "fps": source_fps or None},
            "model": {"path": str(model), "backend": backend, "threads": threads},
            "mqtt": {"port": port, "device_id": f"bench-{name}", "embedded_broker": "never"},
            "spool": {"path": str(Path(tmp.name) / "spool.sqlite")},
            "alerts": [{"prompt": "segment crack", "metric": "area_fraction", "min": 0.0, "persistence_frames": 1,
                        "cooldown_s": 1.0}],
        })
        runner = EdgeRunner(settings, duration_s=seconds if source_fps > 0 else None).setup()
        proc = psutil.Process()
        time.sleep(1.0)  # let the first frames arrive
        seg = runner.segmenter
        batch = seg.preprocess(first)[None]

        def model_only(n: int) -> list[float]:
            """The network alone on a real frame, in this same process: windows on both sides of the loop
            (paced mode) or of each loop segment (lossless mode), so the machine's drift shows up on both."""
            for _ in range(3):
                seg.network(batch)
            out = []
            for _ in range(n):
                t = time.perf_counter()
                seg.network(batch)
                out.append((time.perf_counter() - t) * 1000)
            return out

        if source_fps > 0:  # camera-like: one run, for FPS and capture-to-publish latency
            model_ms = model_only(30)
            cpu0, t0 = time.process_time(), time.monotonic()
            stats = runner.run()
            wall = time.monotonic() - t0
            cpu = time.process_time() - cpu0
            model_ms += model_only(30)
            loop_ms = 1000 * wall / max(1, stats.processed)
            # Paced by the source, the loop waits for frames: its ms per frame is the source's period, not a cost,
            # so there is no overhead figure here (the lossless mode, --source-fps 0, is the overhead test).
            overhead = {"loop_overhead_pct": None}
        else:  # lossless: short loop segments alternating with model-only windows, see alternate_segments
            overhead, model_ms, loop_ms, (wall, cpu) = alternate_segments(runner, model_only, segments, seconds)
            runner.shutdown()
            stats = runner.stats
        cpu_pct = 100 * cpu / wall
        # Capture-to-publish latency means something only when played like a camera: in the lossless mode a
        # frame also waits in the capture slot through each model-only window.
        warm = stats.latencies_ms[3:] if source_fps > 0 else []  # skip start-up frames
        return {
            "profile": name, "model": model.name, "backend": seg.backend.name, "input": list(seg.input_hw),
            # seconds and cpu_percent: the loop's own time (lossless mode: its segments, without the model-only
            # windows between them)
            "frames": stats.processed, "seconds": round(wall, 2), "loop_fps": round(1000 / loop_ms, 2),
            "loop_ms_per_frame": round(loop_ms, 2),
            "dropped": runner.capture.stats.dropped if runner.capture else None,
            "latency_p50_ms": round(_pct(warm, 50), 1) if warm else None,
            "latency_p95_ms": round(_pct(warm, 95), 1) if warm else None,
            "inloop_inference_p50_ms": round(_pct(stats.inference_ms[3:], 50), 1),
            "model_only_p50_ms": round(_pct(model_ms, 50), 1), "model_only_p95_ms": round(_pct(model_ms, 95), 1),
            "model_only_mean_ms": round(float(np.mean(model_ms)), 2),
            **overhead,
            "cpu_percent": round(cpu_pct, 1),
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so this process would report the peak of
            # the parent that started it (which imports torch to export random models)
            "peak_rss_mb": round(_peak_rss_mib(), 1),
            "end_rss_mb": round(proc.memory_info().rss / 2**20, 1),
            "alerts": stats.alerts, "detections": stats.detections,
        }
    finally:
        if runner is not None and runner.link is not None:  # not shut down yet: an error on the way
            runner.shutdown()
        broker.stop()
        tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    from drywallqa.argtypes import positive_float, positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", nargs="+", default=None, choices=list(ARCHS),
                   help="random-weight models of these architectures (default: both, or none when --model is given)")
    p.add_argument("--model", action="append", default=[], type=model_spec, metavar="NAME=PATH",
                   help="time this exported model, in a row named NAME (repeatable); a NAME that is also in "
                        "--profiles replaces that profile's random model")
    p.add_argument("--size", type=positive_int, default=512, help="input size of random models")
    p.add_argument("--seconds", type=positive_float, default=20.0)
    p.add_argument("--segments", type=positive_int, default=16,
                   help="lossless mode: loop segments alternating with model-only windows (default 16)")
    p.add_argument("--source-fps", type=non_negative_float, default=30.0,
                   help="camera-like pacing of the video source; 0 = lossless and unpaced (the overhead test)")
    p.add_argument("--backend", default="openvino", choices=("auto", "openvino", "onnxruntime", "tensorrt"))
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--json", type=Path, default=ROOT / "runs" / "bench_loop.json")
    p.add_argument("--video", default="synthetic",
                   help="synthetic: a 640x480 wall with a crack line in every frame (worst case for the crack "
                        "analysis); site: 80 real validation photos, cracks and seams alternating (needs "
                        "../shared); or a video file")
    p.add_argument("--one", nargs=2, metavar=("PROFILE", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:  # the parent checked the model and the video
        print(json.dumps(run_one(args.one[0], Path(args.one[1]), args.seconds, args.source_fps, args.backend,
                                 args.threads, Path(args.video), args.segments)))
        return 0

    from drywallqa.edge.runner import resolve_model_path
    from drywallqa.edge.settings import ConfigError

    given: dict[str, Path] = {}
    for name, spec in args.model:
        if name in given:
            p.error(f"--model {name}=...: the name {name!r} is given twice")
        try:
            given[name] = resolve_model_path(spec, args.backend)  # the edge runtime's own lookup and message
        except ConfigError as exc:
            p.error(f"--model {name}={spec}: {exc}")
    profiles = args.profiles if args.profiles is not None else ([] if given else list(ARCHS))
    runs = [*dict.fromkeys(profiles), *(name for name in given if name not in profiles)]

    cache = ROOT / "cache" / "bench_loop"
    cache.mkdir(parents=True, exist_ok=True)
    if args.video == "site":
        args.video = _site_video(cache / "site_640x640.avi", 40)
    elif args.video == "synthetic":
        args.video = _video(cache / "wall_640x480.avi", 300)
    else:
        args.video = Path(args.video)
    try:
        first_frame(args.video)
    except ValueError as exc:
        p.error(str(exc))

    rows = []
    for name in runs:
        model = given[name] if name in given else _random_model(ARCHS[name], args.size, cache)
        cmd = [sys.executable, __file__, "--one", name, str(model), "--seconds", str(args.seconds),
               "--source-fps", str(args.source_fps), "--backend", args.backend, "--video", str(args.video),
               "--segments", str(args.segments)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cols = ["profile", "backend", "input", "loop_fps", "loop_ms_per_frame", "model_only_mean_ms", "loop_overhead_pct",
            "latency_p50_ms", "latency_p95_ms", "model_only_p50_ms",
            "inloop_inference_p50_ms", "cpu_percent", "peak_rss_mb", "end_rss_mb", "frames", "dropped"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
