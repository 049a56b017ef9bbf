"""`drywallqa bench`: torch eager vs ONNX Runtime vs OpenVINO (FP32, FP16 IR, INT8), side by side, in one run.

Every backend runs in its own subprocess (so peak RSS is per backend, and thread settings cannot leak)
on the same preprocessed images at the same input size. Batch-1 and batch-4 numbers come from graphs
made static for that batch (what a deployed model looks like); the exported files themselves have a
dynamic batch. The network is timed alone; preprocessing (resize to the input), postprocessing
(upsample to the 640x640 source) and thresholding are timed separately. The machine's fp32 matmul
GFLOP/s (the best of a measurement at the start and one next to each model's runs) and the model's FLOPs
(from the ONNX graph) give a compute bound each backend is compared to.

This VM's speed drifts (another tenant, turbo): one backend's whole run can land in a slow minute, which
would skew every ratio it takes part in. So the batch-1 timing runs in `--rounds` rounds, interleaved (round 1
times every backend, then round 2 times every backend again, each in a fresh process), and a row reports its
best round's p50 (the way `timeit` reports the best repeat); every round's p50 is kept in the JSON and the
table, so the spread is visible.

Module-level imports stay light: `drywallqa --help` imports the CLI, not this module's heavy deps.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from drywallqa.argtypes import positive_int
from drywallqa.outdir import OutputDirError, ensure_writable_dir

if TYPE_CHECKING:
    from drywallqa.train.checkpoint import CheckpointInfo
    from drywallqa.train.models.segmenter import Segmenter

    Loaded = tuple[Segmenter, CheckpointInfo]  # what load_weights returns


@dataclass(frozen=True)
class CheckedWeights:
    """A weights file loaded (checked) up front, with its size and mtime then: the export takes the model over
    only while the file is still that one (a training run may rewrite it during minutes of benchmarking)."""

    loaded: Loaded
    stat_key: tuple[int, int]  # (st_size, st_mtime_ns) when it was loaded

SOURCE_HW = (640, 640)  # the cameras' / dataset's frame size; postprocessing upsamples to it
BATCHES = (1, 4)
N_IMAGES = 8
MEASURE_BUDGET_S = 60.0  # per (backend, batch): stop early after this, keeping at least MIN_ITERS
MIN_ITERS = 5
ROUNDS = 3  # interleaved batch-1 rounds per backend; a row reports its best round
WARMUP = 3
WORKER_TIMEOUT_S = 1800
TARGETS = {"fp32_vs_bound": 1.25, "int8_vs_fp32": 1.6, "int8_vs_torch": 3.0, "lite_fps": 20.0}
FP32_COMPUTE = ("torch_eager", "onnxruntime", "openvino_fp32", "openvino_fp16", "openvino_fp16_avx2")  # f32 compute


@dataclass(frozen=True)
class BackendSpec:
    name: str  # row key
    kind: str  # torch | onnxruntime | openvino | tensorrt
    artifact: str  # which file: weights | onnx | fp16 | int8 | engine
    label: str
    precision: str  # what the arithmetic is done in
    device: str = "cpu"
    cpu_isa: str = "native"  # OpenVINO's CPU kernel ISA cap (edge setting model.openvino_cpu_isa)


CPU_BACKENDS = (
    BackendSpec("torch_eager", "torch", "weights", "torch eager", "fp32"),
    BackendSpec("onnxruntime", "onnxruntime", "onnx", "ONNX Runtime CPU", "fp32"),
    BackendSpec("openvino_fp32", "openvino", "onnx", "OpenVINO (ONNX, f32)", "fp32"),
    BackendSpec("openvino_fp16", "openvino", "fp16", "OpenVINO FP16 IR", "fp16 weights, f32 compute"),
    BackendSpec("openvino_int8", "openvino", "int8", "OpenVINO INT8 IR", "int8"),
)
# Only where the CPU has AVX-512, so that the cap changes which kernels run.
AVX2_CAPPED = BackendSpec("openvino_fp16_avx2", "openvino", "fp16", "OpenVINO FP16 IR, AVX2 kernels",
                          "fp16 weights, f32 compute", cpu_isa="avx2")


@functools.cache
def _cpuinfo(field: str) -> str:
    """The first value of a /proc/cpuinfo field ("model name", "flags"), or "" where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def cpu_has_avx512() -> bool:
    return "avx512f" in _cpu_flags()


def cpu_has_vnni() -> bool:
    """INT8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX). Without them OpenVINO's INT8 convolutions sum
    u8 x s8 products in saturating 16-bit pairs, so INT8 drifts further from float (MODEL.md, session 12)."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def gpu_backends(engine: Path | None) -> list[BackendSpec]:
    """CUDA / TensorRT rows, only for what this machine can actually run."""
    specs: list[BackendSpec] = []
    try:
        import torch

        if torch.cuda.is_available():
            specs.append(BackendSpec("torch_cuda", "torch", "weights", "torch eager CUDA", "fp32", "cuda"))
    except ImportError:
        pass
    try:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if "CUDAExecutionProvider" in available:
            specs.append(BackendSpec("onnxruntime_cuda", "onnxruntime", "onnx", "ONNX Runtime CUDA", "fp32", "cuda"))
        if "TensorrtExecutionProvider" in available:
            specs.append(BackendSpec("onnxruntime_trt", "onnxruntime", "onnx", "ONNX Runtime TensorRT", "fp16",
                                     "tensorrt"))
    except ImportError:
        pass
    if engine is not None and engine.is_file():
        from drywallqa.edge.backends import tensorrt_unavailable_reason

        if tensorrt_unavailable_reason() is None:
            specs.append(BackendSpec("tensorrt", "tensorrt", "engine", "TensorRT engine", "fp16", "cuda"))
    return specs


# --------------------------------------------------------------------------------------------------- arguments

def register_arguments(p: argparse.ArgumentParser) -> None:
    """The bench options (export/cli.py can adopt these; `python -m drywallqa.export.bench` uses them now)."""
    from drywallqa.paths import PROFILES

    g = p.add_mutually_exclusive_group()
    g.add_argument("--weights", nargs="+", help="checkpoint(s) (.safetensors); default: the --profile weights")
    g.add_argument("--random-arch", nargs="+", choices=("hrnet_w18", "effnet_lite0_fpn"),
                   help="randomly initialised model(s) of these architectures (no trained weights needed)")
    p.add_argument("--profile", nargs="+", choices=sorted(PROFILES), default=["hrnet", "lite"],
                   help="shipped profile(s) to benchmark (default: hrnet lite)")
    p.add_argument("--size", type=positive_int, nargs=2, metavar=("H", "W"), default=(512, 512),
                   help="input size (512 512)")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads per backend (default 2)")
    p.add_argument("--iters", type=positive_int, default=30,
                   help="timed batch-1 iterations (batch 4: half; default 30)")
    p.add_argument("--rounds", type=positive_int, default=ROUNDS,
                   help=f"interleaved batch-1 rounds over all backends; rows report the best (default {ROUNDS})")
    p.add_argument("--calib", type=positive_int, default=32, help="INT8 calibration images (default 32)")
    p.add_argument("--out", "--json", dest="out", default="bench.json", help="JSON results (default bench.json)")
    p.add_argument("--workdir", help="keep the exported models here and reuse them (default: a temporary folder)")
    p.add_argument("--engine", help="a TensorRT engine to add as a row (needs tensorrt + CUDA)")
    p.add_argument("--backends", nargs="+", help="only these rows (e.g. onnxruntime openvino_int8)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="drywallqa bench", description=__doc__.split("\n\n")[0])
    register_arguments(p)
    return main_from_args(p.parse_args(argv))


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def main_from_args(args: argparse.Namespace) -> int:
    """Works with the namespace of export/cli.py (single --profile/--weights, --json) and of register_arguments."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(getattr(args, "out", None) or getattr(args, "json", None) or "bench.json")
    ensure_writable_dir(out.parent)  # checked before the benchmark, so its results are not lost at the end
    if out.is_dir():
        raise OutputDirError(f"--out {out} is a folder; give the JSON file's path")
    engine = Path(args.engine) if getattr(args, "engine", None) else None
    if engine is not None and not engine.is_file():
        raise FileNotFoundError(f"no TensorRT engine at {engine} (--engine)")
    if getattr(args, "workdir", None):
        ensure_writable_dir(args.workdir)
    only = getattr(args, "backends", None)
    if only:
        select_backends(only, engine)  # an unknown name stops here, not after the first measurements
    with tempfile.TemporaryDirectory(prefix="drywallqa-bench-") as tmp:
        workdir = Path(args.workdir) if getattr(args, "workdir", None) else Path(tmp)
        weights = _resolve_weights(args, workdir)
        loaded = load_checked(weights)  # a file that is not a checkpoint stops here, not after the machine's matmul
        report = run_bench(weights, size=tuple(args.size), threads=args.threads, iters=args.iters,
                           rounds=getattr(args, "rounds", ROUNDS), calib=args.calib, workdir=workdir,
                           engine=engine, only=only, log=print, loaded=loaded)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(markdown(report))
    print(f"\nJSON written to {out}")
    failed = [r["name"] for m in report["models"] for r in m["backends"] if r.get("error")]
    return 1 if failed else 0


def _resolve_weights(args: argparse.Namespace, workdir: Path) -> list[Path]:
    """The weights files to time, each once."""
    from drywallqa.paths import profile_weights

    if _as_list(getattr(args, "random_arch", None)):
        from drywallqa.export.random_weights import write_random_weights

        return [write_random_weights(workdir / f"random_{a}.safetensors", a, tuple(args.size))
                for a in dict.fromkeys(_as_list(args.random_arch))]
    paths = [Path(w) for w in _as_list(getattr(args, "weights", None))]
    paths = paths or [profile_weights(p) for p in _as_list(args.profile)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no weights at {', '.join(missing)}. Pass --weights FILE.safetensors, or "
                                f"--random-arch ARCH for a dry run.")
    unique: dict[Path, Path] = {}
    for path in paths:  # a file named twice (--profile lite lite) is timed once
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def load_checked(weights_list: list[Path]) -> dict[Path, CheckedWeights]:
    """{file: load_weights(file)}: each file checked by loading it, before anything is measured. The export takes
    the loaded model over (run_bench's `loaded`), so no file is read and rebuilt twice."""
    from drywallqa.export.cli import load_checked_weights

    checked = {}
    for path in weights_list:
        stat = path.stat()
        checked[path] = CheckedWeights(load_checked_weights(path), (stat.st_size, stat.st_mtime_ns))
    return checked


def model_names(weights_list: list[Path]) -> list[str]:
    """One name per model, unique within a run: the file's stem, numbered where two files share one
    (runs/a/lite.safetensors and runs/b/lite.safetensors must not share their exported files in --workdir)."""
    names: list[str] = []
    for w in weights_list:
        name, n = w.stem, 1
        while name in names:
            n += 1
            name = f"{w.stem}_{n}"
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------------- preparation

def _fresh(paths: list[Path], than: Path) -> bool:
    return all(p.is_file() and p.stat().st_mtime >= than.stat().st_mtime for p in paths)


def prepare_artifacts(weights: Path, size: tuple[int, int], calib: int, workdir: Path,
                      name: str | None = None, loaded: CheckedWeights | None = None) -> dict[str, Path]:
    """Dynamic-batch ONNX + FP16 IR + INT8 IR at `size`, in workdir/<name>_<h>x<w>/. Reused from there only when
    they were made from this very weights file (path, size and mtime) with this many calibration images.
    `loaded`: the file loaded already (load_checked), taken over by the export unless the file changed since."""
    from drywallqa.edge.backends import read_metadata
    from drywallqa.export.pipeline import run_export

    calib = max(1, calib)
    out_dir = workdir / f"{name or weights.stem}_{size[0]}x{size[1]}"
    stem = weights.stem
    files = {"onnx": out_dir / f"{stem}.onnx", "fp16": out_dir / f"{stem}_fp16.xml",
             "int8": out_dir / f"{stem}_int8.xml"}
    made_from = out_dir / "made_from.json"
    stat = weights.stat()
    source = {"weights": str(weights.resolve()), "weights_bytes": stat.st_size, "weights_mtime_ns": stat.st_mtime_ns,
              "size": list(size), "calib": calib}
    try:
        same_source = json.loads(made_from.read_text(encoding="utf-8")) == source
    except (OSError, ValueError):
        same_source = False
    if same_source and _fresh(list(files.values()), weights):
        meta = read_metadata(files["onnx"])
        if (meta.input.height, meta.input.width) == tuple(size) and meta.input.dynamic_batch:
            return files
    made_from.unlink(missing_ok=True)
    unchanged = loaded is not None and loaded.stat_key == (stat.st_size, stat.st_mtime_ns)
    model = loaded.loaded if unchanged else None  # changed since it was loaded: exported as it is now
    made = run_export(weights, "openvino", out_dir, size=size, dynamic_batch=True, calib=calib, loaded=model)
    made_from.write_text(json.dumps(source), encoding="utf-8")
    return {"onnx": made["onnx"], "fp16": made["openvino_fp16"], "int8": made["openvino_int8"]}


def static_onnx(src: Path, batch: int, dst: Path) -> Path:
    """Copy of a dynamic-batch ONNX with the batch fixed (lets ONNX Runtime plan for a static shape)."""
    import onnx

    model = onnx.load(str(src))
    for vi in list(model.graph.input) + list(model.graph.output):
        dim = vi.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    del model.graph.value_info[:]  # stale symbolic shapes; ONNX Runtime re-infers them
    onnx.save(model, str(dst))
    return dst


def static_ir(src: Path, batch: int, dst: Path, compress_to_fp16: bool) -> Path:
    """OpenVINO model (IR or ONNX) reshaped to a static batch and saved as IR; rt_info (metadata) is kept."""
    import openvino as ov

    from drywallqa.contract import INPUT_NAME

    model = ov.Core().read_model(str(src))
    shape = list(model.input(INPUT_NAME).get_partial_shape())
    model.reshape({INPUT_NAME: ov.PartialShape([batch] + [d.get_length() for d in shape[1:]])})
    if src.suffix == ".onnx":  # ONNX has no rt_info: carry the metadata over so read_metadata works on the IR
        from drywallqa.contract import METADATA_KEY
        from drywallqa.edge.backends import read_metadata

        model.set_rt_info(read_metadata(src).to_json(), [METADATA_KEY])
    ov.save_model(model, str(dst), compress_to_fp16=compress_to_fp16)
    return dst


def batch_files(spec: BackendSpec, files: dict[str, Path], weights: Path, engine: Path | None,
                workdir: Path) -> dict[int, str]:
    """{batch: file the worker loads} for one backend row."""
    if spec.artifact == "weights":
        return {b: str(weights) for b in BATCHES}
    if spec.artifact == "engine":
        return {b: str(engine) for b in BATCHES}
    src = files[spec.artifact]
    out = {}
    for b in BATCHES:
        if spec.kind == "onnxruntime":
            dst = src.with_name(f"{src.stem}_b{b}.onnx")
            out[b] = str(dst if _fresh([dst], src) else static_onnx(src, b, dst))
        else:
            dst = src.with_name(f"{src.stem}_ov_b{b}.xml")
            fp16 = spec.artifact == "fp16"
            out[b] = str(dst if _fresh([dst], src) else static_ir(src, b, dst, fp16))
    return out


def load_sources(n: int = N_IMAGES) -> tuple[list, str]:
    """n RGB frames at SOURCE_HW: training-split images when the dataset is present, else synthetic ones."""
    import cv2

    from drywallqa.export.calibration import pick_evenly, training_images
    from drywallqa.imageio import ImageReadError, read_image_rgb

    try:
        paths = pick_evenly(training_images(), n)
    except (FileNotFoundError, KeyError, ValueError):
        paths = []
    images = []
    for path in paths:
        try:
            img = read_image_rgb(path)
        except ImageReadError:
            continue
        if img.shape[:2] != SOURCE_HW:
            img = cv2.resize(img, SOURCE_HW[::-1], interpolation=cv2.INTER_AREA)
        images.append(img)
    if len(images) == n:
        return images, f"{n} dataset images ({SOURCE_HW[0]}x{SOURCE_HW[1]})"
    from drywallqa.export.onnx_export import probe_images

    return list(probe_images(SOURCE_HW, n, seed=7)), f"{n} synthetic images ({SOURCE_HW[0]}x{SOURCE_HW[1]})"


def file_size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_suffix(".bin")) if p.is_file())


# --------------------------------------------------------------------------------------------------- subprocesses

def _worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def run_worker(job: dict, workdir: Path, threads: int) -> dict:
    """Run `worker(job)` in a fresh interpreter; returns its JSON result or {"error": ...}."""
    job_file = workdir / f"job_{job['job']}_{job.get('name', '')}.json"
    result_file = job_file.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    job = {**job, "result": str(result_file)}
    job_file.write_text(json.dumps(job), encoding="utf-8")
    cmd = [sys.executable, "-c", "import sys; from drywallqa.export.bench import worker; worker(sys.argv[1])",
           str(job_file)]
    try:
        proc = subprocess.run(cmd, env=_worker_env(threads), capture_output=True, text=True,
                              timeout=WORKER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    if proc.returncode != 0 or not result_file.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"worker exited {proc.returncode}: " + " | ".join(tail)}
    return json.loads(result_file.read_text(encoding="utf-8"))


def worker(job_file: str) -> None:
    """Entry point of a benchmark subprocess: reads the job JSON, writes the result JSON."""
    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    handler = {"matmul": _job_matmul, "prepost": _job_prepost, "backend": _job_backend}[job["job"]]
    result = handler(job)
    result["peak_rss_mib"] = _peak_rss_mib()
    Path(job["result"]).write_text(json.dumps(result), encoding="utf-8")


def _peak_rss_mib() -> float:
    """This process's RSS high-water mark. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a
    worker would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2**20


def _stats(times_s: list[float], frames_per_call: int) -> dict:
    import numpy as np

    ms = np.asarray(times_s) * 1e3
    mean = float(ms.mean())
    return {"iters": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": mean, "min_ms": float(ms.min()), "fps": frames_per_call * 1e3 / mean,
            "per_frame_p50_ms": float(np.percentile(ms, 50)) / frames_per_call}


def _time_calls(fn, inputs: list, iters: int, budget_s: float = MEASURE_BUDGET_S, warmup: int = WARMUP) -> list[float]:
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times: list[float] = []
    start = time.perf_counter()
    for i in range(max(1, iters)):
        t0 = time.perf_counter()
        fn(inputs[i % len(inputs)])
        times.append(time.perf_counter() - t0)
        if len(times) >= MIN_ITERS and time.perf_counter() - start > budget_s:
            break
    return times


def _job_matmul(job: dict) -> dict:
    """Best-of-N fp32 GEMM throughput with torch and numpy at the given thread count."""
    import numpy as np

    n, reps = int(job.get("n", 2048)), int(job.get("reps", 8))
    flops = 2.0 * n**3
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    result: dict = {"n": n, "reps": reps}
    np.matmul(a, b)
    result["numpy_gflops"] = flops / min(_timed(lambda: np.matmul(a, b)) for _ in range(reps)) / 1e9
    try:
        import torch

        torch.set_num_threads(int(job["threads"]))
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        torch.mm(ta, tb)
        result["torch_gflops"] = flops / min(_timed(lambda: torch.mm(ta, tb)) for _ in range(reps)) / 1e9
    except ImportError:
        pass
    result["gflops"] = max(v for k, v in result.items() if k.endswith("_gflops"))
    return result


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _job_prepost(job: dict) -> dict:
    """Times preprocess / postprocess / threshold with the real PromptSegmenter; saves the network inputs."""
    import cv2
    import numpy as np

    from drywallqa.edge.backends import OnnxRuntimeBackend, read_metadata
    from drywallqa.edge.inference import PromptSegmenter

    cv2.setNumThreads(int(job["threads"]))
    model = Path(job["model"])
    seg = PromptSegmenter(OnnxRuntimeBackend(model, read_metadata(model), threads=int(job["threads"]),
                                             providers=["CPUExecutionProvider"]))
    sources = list(np.load(job["sources"]))
    inputs = np.stack([seg.preprocess(im) for im in sources])
    np.save(job["inputs"], inputs)
    probs = [seg.network(x[None])[0] for x in inputs[:2]]
    prompts = [seg.vocabulary.canonical_prompt(c) for c in seg.classes]  # one mask per class
    upsampled = seg.postprocess(probs[0], SOURCE_HW)
    iters = int(job["iters"])
    timings = {
        "preprocess": _time_calls(seg.preprocess, sources, iters),
        "postprocess": _time_calls(lambda p: seg.postprocess(p, SOURCE_HW), probs, iters),
        "threshold": _time_calls(lambda _: seg.masks_from_probabilities(upsampled, prompts), [0], iters),
    }
    out = {k: _stats(v, 1) for k, v in timings.items()}
    out["prompts"] = prompts
    out["input_shape"] = list(inputs.shape)
    return out


def _load_runner(job: dict, path: str):
    """(callable uint8 batch -> probs, extra info) for one backend row and one static-batch file."""
    import numpy as np

    kind, device, threads = job["kind"], job["device"], int(job["threads"])
    if kind == "torch":
        import torch

        from drywallqa.train.checkpoint import load_weights
        from drywallqa.train.models.segmenter import ExportWrapper

        torch.set_num_threads(threads)
        model, _ = load_weights(path)
        wrapper = ExportWrapper(model).eval().to(device)

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return wrapper(torch.from_numpy(x).to(device)).float().cpu().numpy()

        return run, {"torch": torch.__version__, "threads": torch.get_num_threads()}
    from drywallqa.edge.backends import OnnxRuntimeBackend, OpenVINOBackend, load_backend, read_metadata

    p = Path(path)
    if kind == "onnxruntime":
        providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                     "tensorrt": [("TensorrtExecutionProvider", {"trt_fp16_enable": True}),
                                  "CUDAExecutionProvider", "CPUExecutionProvider"]}[device]
        backend = OnnxRuntimeBackend(p, read_metadata(p), threads=threads, providers=providers)
        opts = backend.session.get_session_options()
        info = {"providers": backend.providers, "intra_op_num_threads": opts.intra_op_num_threads,
                "graph_optimization_level": str(opts.graph_optimization_level)}
    elif kind == "openvino":
        backend = OpenVINOBackend(p, read_metadata(p), threads=threads, cpu_isa=job.get("cpu_isa", "native"))
        info = {k: str(backend.compiled.get_property(k)) for k in
                ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "NUM_STREAMS")}
        info["ONEDNN_MAX_CPU_ISA"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    else:
        backend = load_backend(p, "tensorrt")
        info = {}
    return backend.infer, info


def _job_backend(job: dict) -> dict:
    import numpy as np

    inputs = np.load(job["inputs"])
    result: dict = {"batches": {}}
    for b_key, path in job["files"].items():
        b = int(b_key)
        t0 = time.perf_counter()
        run, info = _load_runner(job, path)
        result.setdefault("load_s", time.perf_counter() - t0)
        result["settings"] = info
        batches = [inputs[(i * b + np.arange(b)) % len(inputs)] for i in range(len(inputs))]
        out = run(batches[0])
        if b == 1:
            np.save(job["probs"], out[0])
        result["output"] = {"shape": list(out.shape), "finite": bool(np.isfinite(out).all()),
                            "min": float(out.min()), "max": float(out.max())}
        iters = int(job["iters"]) if b == 1 else max(MIN_ITERS, int(job["iters"]) // 2)
        result["batches"][str(b)] = _stats(_time_calls(run, batches, iters), b)
        del run
    return result


# --------------------------------------------------------------------------------------------------- the bench

def select_backends(only: list[str] | None, engine: Path | None) -> list[BackendSpec]:
    """The rows this machine can run, or only those named (BackendUnavailableError for a name it cannot)."""
    specs = list(CPU_BACKENDS) + ([AVX2_CAPPED] if cpu_has_avx512() else []) + gpu_backends(engine)
    if not only:
        return specs
    unknown = set(only) - {s.name for s in specs}
    if unknown:
        from drywallqa.edge.backends import BackendUnavailableError

        raise BackendUnavailableError(f"unknown or unavailable --backends {sorted(unknown)}; this machine has "
                                      f"{[s.name for s in specs]}")
    return [s for s in specs if s.name in only]


def run_bench(weights_list: list[Path], *, size: tuple[int, int] = (512, 512), threads: int = 2, iters: int = 30,
              rounds: int = ROUNDS, calib: int = 32, workdir: Path, engine: Path | None = None, only: list[str] | None = None,
              log=print, loaded: dict[Path, CheckedWeights] | None = None) -> dict:
    """`loaded`: {weights file: load_checked's entry} for files already loaded (checked), handed to their export."""
    import numpy as np

    rounds = max(1, rounds)
    report: dict = {
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
                    "avx512": cpu_has_avx512(), "vnni": cpu_has_vnni(),
                    "load_avg_start": _loadavg()},
        "settings": {"size": list(size), "threads": threads, "iters": iters, "rounds": rounds,
                     "batches": list(BATCHES),
                     "source_hw": list(SOURCE_HW), "measure_budget_s": MEASURE_BUDGET_S},
        "models": [],
    }
    log(f"measuring fp32 matmul GFLOP/s with {threads} threads ...")
    report["machine"]["matmul"] = run_worker({"job": "matmul", "threads": threads}, workdir, threads)
    gflops_machine = report["machine"]["matmul"].get("gflops")
    sources, source_desc = load_sources()
    sources_file = workdir / "sources.npy"
    np.save(sources_file, np.stack(sources))
    report["settings"]["images"] = source_desc
    specs = select_backends(only, engine)
    for weights, name in zip(weights_list, model_names(weights_list), strict=True):
        report["models"].append(_bench_model(weights, name, specs, size, threads, iters, rounds, calib,
                                             workdir, engine, sources_file, gflops_machine, log,
                                             (loaded or {}).get(weights)))
    report["machine"]["load_avg_end"] = _loadavg()
    return report


def _bench_model(weights: Path, name: str, specs: list[BackendSpec], size, threads, iters, rounds, calib, workdir, engine,
                 sources_file: Path, gflops_machine: float | None, log,
                 loaded: CheckedWeights | None = None) -> dict:

    from drywallqa.edge.backends import read_metadata
    from drywallqa.export.flops import count_macs

    log(f"[{name}] exporting ONNX / OpenVINO FP16 / INT8 at {size[0]}x{size[1]} ...")
    files = prepare_artifacts(weights, size, calib, workdir, name, loaded)
    meta = read_metadata(files["onnx"])
    flop = count_macs(files["onnx"])
    # This VM's matmul rate drifts by ~10 % within minutes. Measure it again next to this model's runs and
    # take the best rate seen: the tightest bound, so drift can only make a target harder to meet.
    again = run_worker({"job": "matmul", "threads": threads}, workdir, threads).get("gflops")
    rates = [g for g in (gflops_machine, again) if g]
    best_rate = max(rates) if rates else None
    bound_ms = flop.gflops / best_rate * 1e3 if best_rate else None
    model: dict = {"name": name, "weights": str(weights), "profile": meta.profile,
                   "architecture": meta.architecture, "classes": list(meta.classes),
                   "macs": flop.macs, "gflops": flop.gflops, "flops_uncounted_nodes": flop.uncounted,
                   "matmul_gflops_seen": rates, "compute_bound_ms": bound_ms}
    inputs_file = workdir / f"{name}_inputs.npy"
    log(f"[{name}] pre/post-processing ...")
    model["prepost"] = run_worker({"job": "prepost", "name": name, "model": str(files["onnx"]),
                                   "sources": str(sources_file), "inputs": str(inputs_file), "threads": threads,
                                   "iters": iters}, workdir, threads)
    if "error" in model["prepost"]:
        raise RuntimeError(f"pre/post-processing worker failed: {model['prepost']['error']}")
    results: dict[str, dict] = {}
    prepared: dict[str, dict[int, str]] = {}
    probs_files = {spec.name: workdir / f"{name}_{spec.name}_probs.npy" for spec in specs}
    for spec in specs:
        try:
            prepared[spec.name] = batch_files(spec, files, weights, engine, workdir)
        except Exception as exc:  # a failed conversion is reported in the row, not fatal to the others
            results[spec.name] = {"error": f"preparing the model failed: {exc}"}
    for rnd in range(rounds):
        for spec in specs:
            if spec.name not in prepared or "error" in results.get(spec.name, {}):
                continue
            log(f"[{name}] {spec.label} (round {rnd + 1}/{rounds}) ...")
            bfiles = prepared[spec.name] if rnd == 0 else {1: prepared[spec.name][1]}  # later rounds: batch 1
            res = run_worker({"job": "backend", "name": f"{name}_{spec.name}", "kind": spec.kind,
                              "device": spec.device, "cpu_isa": spec.cpu_isa, "files": bfiles, "inputs": str(inputs_file),
                              "probs": str(probs_files[spec.name]),
                              "threads": threads, "iters": iters}, workdir, threads)
            results[spec.name] = res if rnd == 0 else merge_round(results[spec.name], res)
    rows = []
    for spec in specs:
        res = results[spec.name]
        artifact = weights if spec.artifact == "weights" else engine if spec.artifact == "engine" \
            else files[spec.artifact]
        row = {"name": spec.name, "label": spec.label, "precision": spec.precision, "device": spec.device,
               "file": str(artifact), "file_mib": file_size(Path(artifact)) / 2**20, **res}
        if "error" not in res:
            row["probs_file"] = str(probs_files[spec.name])
            row.setdefault("rounds_p50_ms", [res["batches"]["1"]["p50_ms"]])
        rows.append(row)
    _compare(rows, bound_ms)
    model["backends"] = rows
    model["targets"] = _targets(model, rows, size)
    for row in rows:
        row.pop("probs_file", None)
    return model


def merge_round(so_far: dict, new: dict) -> dict:
    """Fold a later batch-1 round into a row: keep the round with the lower p50, remember every round's p50."""
    if "error" in new:  # a failed repeat does not undo a good first round; it is recorded
        return {**so_far, "round_errors": so_far.get("round_errors", []) + [new["error"]]}
    rounds = so_far.get("rounds_p50_ms") or [so_far["batches"]["1"]["p50_ms"]]
    merged = dict(so_far)
    merged["rounds_p50_ms"] = rounds + [new["batches"]["1"]["p50_ms"]]
    if new["batches"]["1"]["p50_ms"] < so_far["batches"]["1"]["p50_ms"]:
        merged["batches"] = {**so_far["batches"], "1": new["batches"]["1"]}
    merged["peak_rss_mib"] = max(so_far["peak_rss_mib"], new["peak_rss_mib"])
    return merged


def _compare(rows: list[dict], bound_ms: float | None) -> None:
    """Speed vs torch eager, vs the compute bound, and max |probability difference| vs torch."""
    import numpy as np

    ok = [r for r in rows if "error" not in r]
    torch_row = next((r for r in ok if r["name"] == "torch_eager"), None)
    ref = np.load(torch_row["probs_file"]) if torch_row else None
    for r in ok:
        p50 = r["batches"]["1"]["p50_ms"]
        r["speedup_vs_torch"] = torch_row["batches"]["1"]["p50_ms"] / p50 if torch_row else None
        r["ratio_to_compute_bound"] = p50 / bound_ms if bound_ms else None
        if ref is not None:
            probs = np.load(r["probs_file"])
            r["max_abs_diff_vs_torch"] = float(np.abs(probs - ref).max()) if probs.shape == ref.shape else None
            r["mask_agreement_vs_torch"] = float(((probs >= 0.5) == (ref >= 0.5)).mean()) \
                if probs.shape == ref.shape else None


def _targets(model: dict, rows: list[dict], size) -> dict:
    ok = {r["name"]: r for r in rows if "error" not in r}
    p50 = {k: r["batches"]["1"]["p50_ms"] for k, r in ok.items()}
    out: dict = {}
    fp32 = {k: v for k, v in p50.items() if k in FP32_COMPUTE}
    best = min(fp32, key=fp32.get) if fp32 else None
    bound = model["compute_bound_ms"]
    if best and bound:
        ratio = fp32[best] / bound
        out["best_fp32_within_1.25x_bound"] = {"backend": best, "ratio": ratio,
                                               "met": ratio <= TARGETS["fp32_vs_bound"]}
    if best and "openvino_int8" in p50:
        x = fp32[best] / p50["openvino_int8"]
        out["int8_1.6x_faster_than_best_fp32"] = {"speedup": x, "met": x >= TARGETS["int8_vs_fp32"]}
    if "torch_eager" in p50 and "openvino_int8" in p50:
        x = p50["torch_eager"] / p50["openvino_int8"]
        out["int8_3x_faster_than_torch"] = {"speedup": x, "met": x >= TARGETS["int8_vs_torch"]}
    if model["profile"] == "lite" and p50 and tuple(size) == (512, 512):
        fastest = min(p50, key=p50.get)
        fps = ok[fastest]["batches"]["1"]["fps"]
        pp = model["prepost"]
        e2e_ms = ok[fastest]["batches"]["1"]["mean_ms"] + sum(pp[k]["mean_ms"] for k in
                                                               ("preprocess", "postprocess", "threshold"))
        out["lite_20fps_at_512"] = {"backend": fastest, "network_fps": fps, "end_to_end_fps": 1e3 / e2e_ms,
                                    "met": fps >= TARGETS["lite_fps"]}
    return out


def _cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor()


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------- output

def _f(value, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    m = report["machine"]
    s = report["settings"]
    mm = m.get("matmul", {})
    isa = ", ".join(f"{name} {'yes' if m.get(key) else 'no'}" for key, name in (("avx512", "AVX-512"), ("vnni", "VNNI"))
                    if key in m)
    lines = [f"Machine: {m['processor']}{f' ({isa})' if isa else ''}, {m['cpu_count']} CPUs, "
             f"{s['threads']} threads per backend; "
             f"load average {m.get('load_avg_start')} -> {m.get('load_avg_end')}",
             f"fp32 matmul: {_f(mm.get('gflops'))} GFLOP/s (torch {_f(mm.get('torch_gflops'))}, "
             f"numpy {_f(mm.get('numpy_gflops'))}); input {s['size'][0]}x{s['size'][1]}; {s.get('images')}"]
    for model in report["models"]:
        pp = model["prepost"]
        lines += ["", f"### {model['name']} ({model['architecture']}, profile {model['profile']})", "",
                  f"{model['gflops']:.2f} GFLOPs/frame (2 x {model['macs'] / 1e9:.2f} GMACs); fp32 matmul seen "
                  f"{', '.join(f'{g:.1f}' for g in model.get('matmul_gflops_seen', []))} GFLOP/s, compute bound "
                  "at the best rate "
                  f"{_f(model['compute_bound_ms'])} ms/frame; pre {pp['preprocess']['p50_ms']:.2f} ms, "
                  f"post (upsample to {SOURCE_HW[0]}x{SOURCE_HW[1]}) {pp['postprocess']['p50_ms']:.2f} ms, "
                  f"threshold {pp['threshold']['p50_ms']:.2f} ms (p50)", "",
                  "| backend | precision | p50 ms (best round; every round) | p95 ms | FPS b1 | FPS b4 | peak RSS MiB | file MiB "
                  "| x torch | x bound | max abs diff |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in model["backends"]:
            if r.get("error"):
                lines.append(f"| {r['label']} | {r['precision']} | error: {r['error'][:120]} |||||||||")
                continue
            b1, b4 = r["batches"]["1"], r["batches"].get("4", {})
            rounds = r.get("rounds_p50_ms", [])
            spread = f" ({' / '.join(f'{x:.1f}' for x in rounds)})" if len(rounds) > 1 else ""
            lines.append(f"| {r['label']} | {r['precision']} | {b1['p50_ms']:.1f}{spread} | {b1['p95_ms']:.1f} "
                         f"| {b1['fps']:.2f} | {_f(b4.get('fps'), '.2f')} | {r['peak_rss_mib']:.0f} "
                         f"| {r['file_mib']:.1f} | {_f(r.get('speedup_vs_torch'), '.2f')} "
                         f"| {_f(r.get('ratio_to_compute_bound'), '.2f')} "
                         f"| {_f(r.get('max_abs_diff_vs_torch'), '.2g')} |")
        lines.append("")
        for name, t in model["targets"].items():
            detail = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in t.items() if k != "met")
            lines.append(f"- {name}: {'MET' if t['met'] else 'NOT met'} ({detail})")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
