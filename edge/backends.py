"""Inference backends for exported models: ONNX Runtime, OpenVINO and TensorRT behind one interface.

Every backend takes uint8 N x H x W x 3 RGB at the model's input size and returns float32 N x C x H x W
probabilities (the graph does the normalisation). Metadata (classes, prompts, thresholds, input size)
is read from the model file itself: ONNX `metadata_props`, OpenVINO IR `rt_info`, and for a TensorRT
engine (which cannot carry it) a `<engine>.json` sidecar or the `<engine>.onnx` it was built from.
No torch here: this module ships to devices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from drywallqa.contract import INPUT_NAME, METADATA_KEY, OUTPUT_NAME, InvalidModelError, ModelMetadata
from drywallqa.paths import training_weights_hint

BACKENDS = ("auto", "openvino", "onnxruntime", "tensorrt")
ONNX_SUFFIXES = (".onnx",)
OPENVINO_SUFFIXES = (".xml",)
TENSORRT_SUFFIXES = (".engine", ".plan")
OPENVINO_CPU_ISAS = ("native", "avx2", "avx512_core")

log = logging.getLogger(__name__)


class BackendUnavailableError(RuntimeError):
    """The requested runtime is not installed or cannot run on this machine."""


def _existing(model_path: str | Path) -> Path:
    path = Path(model_path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder, not a model file (give the .onnx/.xml/.engine file)")
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path} (export one with `drywallqa export`)")
    return path


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """A runtime's error as one line: OpenVINO's are several, each cause behind a line naming its C++ source
    ('Exception from src/...', "Check '...' failed at src/..."), which says nothing to a user."""
    text = re.sub(r"(Exception from|Check '[^\n]*?' failed at) \S+:\d+:", " ", str(exc))
    text = " ".join(text.split()) or " ".join(str(exc).split())
    return text if len(text) <= limit else "..." + text[-limit:]


def _onnx_metadata_text(path: Path) -> str | None:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise InvalidModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    if not proto.graph.node:
        raise InvalidModelError(f"{path}: not a readable ONNX model (the file holds no graph)")
    _check_external_data(path, proto)
    props = {p.key: p.value for p in proto.metadata_props}
    return props.get(METADATA_KEY)


def _check_external_data(path: Path, proto) -> None:
    """A graph whose weights live in separate files (ONNX external data) needs them beside it; without them the
    runtimes fail with an error that names no file."""
    from onnx import TensorProto

    wanted = {entry.value for tensor in proto.graph.initializer if tensor.data_location == TensorProto.EXTERNAL
              for entry in tensor.external_data if entry.key == "location"}
    missing = sorted(name for name in wanted if not (path.parent / name).is_file())
    if missing:
        raise InvalidModelError(f"{path}: its weights are stored in {', '.join(missing)}, which is not beside it "
                                f"(copy it along with the .onnx)")


def _openvino_metadata_text(path: Path) -> str | None:
    import openvino as ov

    try:
        with path.open("rb") as fh:
            head = fh.read(1 << 16)
    except OSError as exc:
        raise InvalidModelError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    if b"<net" not in head:  # else OpenVINO tries every frontend on it (TensorFlow's logs its own errors)
        raise InvalidModelError(f"{path}: not an OpenVINO IR (an IR .xml starts with a <net> element)")
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as exc:
        weights = path.with_suffix(".bin")
        if not weights.is_file():
            why = f"its weights file {weights.name} is missing (an IR is the .xml and the .bin beside it)"
        else:
            why = f"{_one_line(exc)} (is the .xml whole, and {weights.name} the weights saved with it?)"
        raise InvalidModelError(f"{path}: not a readable OpenVINO IR: {why}") from exc
    if not model.has_rt_info([METADATA_KEY]):
        return None
    return str(model.get_rt_info([METADATA_KEY]).astype(str))


ENGINE_HASH_KEY = "engine_sha256"  # written into the sidecar's `extra` by export/build_engine.sh


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (engines and weights files run to hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensorrt_metadata_text(path: Path) -> tuple[str | None, Path]:
    """(the metadata text, the file it came from)."""
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            text = sidecar.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidModelError(f"{sidecar}: cannot read the metadata of {path.name} from it: {exc}") from exc
        _check_sidecar_is_for(path, sidecar, text)
        return text, sidecar
    onnx_path = path.with_suffix(".onnx")
    if onnx_path.is_file():
        return _onnx_metadata_text(onnx_path), onnx_path
    raise InvalidModelError(
        f"{path}: a TensorRT engine carries no metadata; put the '{METADATA_KEY}' JSON next to it as "
        f"{sidecar.name} (export/build_engine.sh does this) or keep the source ONNX as {onnx_path.name}"
    )


def _check_sidecar_is_for(engine: Path, sidecar: Path, text: str) -> None:
    """An engine file holds no metadata, so a sidecar left over from another build (or another profile) would
    silently give the wrong classes or thresholds. build_engine.sh binds the sidecar to its engine by hash."""
    try:
        expected = (json.loads(text).get("extra") or {}).get(ENGINE_HASH_KEY)
    except (ValueError, AttributeError):
        return  # not JSON / not an object: ModelMetadata.from_json reports it
    if not expected:
        log.warning("%s: carries no %s, so it cannot be checked against %s; rebuild with export/build_engine.sh "
                    "to bind them", sidecar, ENGINE_HASH_KEY, engine.name)
        return
    if file_sha256(engine) != expected:
        raise InvalidModelError(
            f"{sidecar}: this metadata was written for another engine (its {ENGINE_HASH_KEY} does not match "
            f"{engine.name}); rebuild with export/build_engine.sh, which writes the engine and its metadata together"
        )


def read_metadata(model_path: str | Path) -> ModelMetadata:
    """The DrywallQA metadata stored in an exported model (.onnx, .xml, .engine/.plan)."""
    path = source = _existing(model_path)
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        text = _onnx_metadata_text(path)
    elif suffix in OPENVINO_SUFFIXES:
        text = _openvino_metadata_text(path)
    elif suffix in TENSORRT_SUFFIXES:
        text, source = _tensorrt_metadata_text(path)
    else:
        raise InvalidModelError(
            f"{path}: unknown model file type {suffix!r}; expected one of "
            f"{ONNX_SUFFIXES + OPENVINO_SUFFIXES + TENSORRT_SUFFIXES}{training_weights_hint(path)}"
        )
    return ModelMetadata.from_json(text, source=str(source))


def _check_io(
    path: Path,
    inputs: dict[str, tuple[str, list]],
    outputs: dict[str, tuple[str, list]],
    metadata: ModelMetadata | None = None,
) -> None:
    """inputs/outputs: name -> (element type name, shape with None/-1/str for dynamic dims). With `metadata`,
    also that the output has one channel per class it names (a sidecar or metadata from another model would
    otherwise pair thresholds and classes with the wrong channels)."""
    problems = []
    if INPUT_NAME not in inputs:
        problems.append(f"no input named {INPUT_NAME!r} (has {sorted(inputs)})")
    else:
        dtype, shape = inputs[INPUT_NAME]
        if "uint8" not in dtype and "u8" not in dtype:
            problems.append(f"input {INPUT_NAME!r} is {dtype}, expected uint8")
        if len(shape) != 4 or shape[-1] != 3:
            problems.append(f"input {INPUT_NAME!r} has shape {shape}, expected N x H x W x 3")
        elif metadata is not None and all(isinstance(d, int) and d > 0 for d in shape[1:3]) and \
                tuple(shape[1:3]) != (metadata.input.height, metadata.input.width):
            problems.append(f"input {INPUT_NAME!r} is {shape[1]} x {shape[2]} but the metadata says "
                            f"{metadata.input.height} x {metadata.input.width}")
    if OUTPUT_NAME not in outputs:
        problems.append(f"no output named {OUTPUT_NAME!r} (has {sorted(outputs)})")
    elif metadata is not None:
        out_shape = outputs[OUTPUT_NAME][1]
        channels = out_shape[1] if len(out_shape) == 4 else None
        if isinstance(channels, int) and channels > 0 and channels != len(metadata.classes):
            problems.append(f"output {OUTPUT_NAME!r} has {channels} channels but the metadata names "
                            f"{len(metadata.classes)} classes {metadata.classes}")
    if problems:
        raise InvalidModelError(f"{path}: does not follow the DrywallQA model contract: " + "; ".join(problems))


class InferenceBackend(ABC):
    """A loaded model. `infer` takes uint8 N x H x W x 3 RGB at `input_hw`, returns float32 N x C x H x W."""

    name: str = "base"

    def __init__(self, model_path: Path, metadata: ModelMetadata) -> None:
        self.model_path = model_path
        self.metadata = metadata
        self.input_hw: tuple[int, int] = (metadata.input.height, metadata.input.width)
        self.fixed_batch: int | None = None  # set by backends whose graph has a static batch dimension

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = self._validate(batch)
        if self.fixed_batch is None or batch.shape[0] == self.fixed_batch:
            return self._run(batch)
        # Static-batch graph: run item by item (fixed_batch is 1 for every export we make).
        step = self.fixed_batch
        if batch.shape[0] % step:
            raise ValueError(f"batch of {batch.shape[0]} is not a multiple of the model's fixed batch {step}")
        return np.concatenate([self._run(batch[i:i + step]) for i in range(0, batch.shape[0], step)])

    def _validate(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        h, w = self.input_hw
        if batch.ndim == 3:
            batch = batch[None]
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (h, w, 3):
            raise ValueError(
                f"{self.name}: expected uint8 N x {h} x {w} x 3 RGB, got {batch.dtype} {tuple(batch.shape)} "
                f"(PromptSegmenter.preprocess resizes any image)"
            )
        return np.ascontiguousarray(batch)

    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """batch: validated uint8 N x H x W x 3 -> float32 N x C x H x W."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_path.name}, input_hw={self.input_hw})"


def _static_batch(dim: object) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


class OnnxRuntimeBackend(InferenceBackend):
    name = "onnxruntime"

    def __init__(self, model_path: Path, metadata: ModelMetadata, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        super().__init__(model_path, metadata)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from exc
        if model_path.suffix.lower() not in ONNX_SUFFIXES:
            raise InvalidModelError(f"{model_path}: the onnxruntime backend needs an .onnx file")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider",) if p in available] + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for broken graphs
            raise InvalidModelError(f"{model_path}: ONNX Runtime cannot load it: {_one_line(exc)}") from exc
        self.providers = self.session.get_providers()
        ins = {i.name: (i.type, list(i.shape)) for i in self.session.get_inputs()}
        outs = {o.name: (o.type, list(o.shape)) for o in self.session.get_outputs()}
        _check_io(model_path, ins, outs, metadata)
        shape = ins[INPUT_NAME][1]
        self.fixed_batch = _static_batch(shape[0])
        if isinstance(shape[1], int) and isinstance(shape[2], int):
            self.input_hw = (shape[1], shape[2])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


class OpenVINOBackend(InferenceBackend):
    """OpenVINO on CPU by default, tuned for latency (one stream, `threads` threads).

    `cpu_isa` caps the instruction set of the CPU kernels for float models (see `_apply_cpu_isa`).

    `inference_precision` defaults to f32: on CPUs with bf16/AMX support OpenVINO would otherwise run
    FP32/FP16 IRs in bf16, which moves probabilities by ~1e-2. INT8 IRs run int8 kernels either way.
    """

    name = "openvino"

    def __init__(self, model_path: Path, metadata: ModelMetadata, threads: int | None = None,
                 device: str | None = None, inference_precision: str | None = None, cpu_isa: str = "native") -> None:
        super().__init__(model_path, metadata)
        try:
            import openvino as ov
            import openvino.properties as props
            import openvino.properties.hint as hints
        except ImportError as exc:
            raise BackendUnavailableError("openvino is not installed: pip install openvino") from exc
        device = (device or os.environ.get("DRYWALLQA_OV_DEVICE", "CPU")).strip().upper()  # OpenVINO: CPU, not cpu
        precision = inference_precision or os.environ.get("DRYWALLQA_OV_PRECISION", "f32")
        core = ov.Core()
        _check_openvino_device(core, device)
        try:
            model = core.read_model(str(model_path))
        except RuntimeError as exc:
            raise InvalidModelError(f"{model_path}: OpenVINO cannot read it: {_one_line(exc)}") from exc
        ins = {i.get_any_name(): (i.get_element_type().get_type_name(), _ov_shape(i.get_partial_shape()))
               for i in model.inputs}
        outs = {o.get_any_name(): (o.get_element_type().get_type_name(), _ov_shape(o.get_partial_shape()))
                for o in model.outputs}
        _check_io(model_path, ins, outs, metadata)
        config: dict = {hints.performance_mode: hints.PerformanceMode.LATENCY}
        if device.upper().startswith("CPU"):
            _apply_cpu_isa(cpu_isa, int8=any(op.get_type_name() == "FakeQuantize" for op in model.get_ops()))
            config[hints.inference_precision] = _ov_type(precision)
            config[props.num_streams] = 1
            if threads:
                config[props.inference_num_threads] = int(threads)
        try:
            self.compiled = core.compile_model(model, device, config)
        except RuntimeError as exc:
            raise BackendUnavailableError(f"OpenVINO cannot compile {model_path.name} for device {device}: "
                                          f"{' '.join(str(exc).split())[-300:]}") from exc
        self.request = self.compiled.create_infer_request()
        self.device = device
        shape = ins[INPUT_NAME][1]
        self.fixed_batch = _static_batch(shape[0])
        if isinstance(shape[1], int) and isinstance(shape[2], int):
            self.input_hw = (shape[1], shape[2])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        result = self.request.infer({INPUT_NAME: batch})
        return np.asarray(result[self.compiled.output(OUTPUT_NAME)], dtype=np.float32)


def _check_openvino_device(core, device: str) -> None:
    """A device this machine lacks (an Intel GPU or NPU without its driver) is named with the ones it has,
    instead of OpenVINO's plug-in loading error. AUTO, MULTI and HETERO choose among the devices themselves."""
    name = device.split(":", 1)[0].split(".", 1)[0].upper()
    if name in ("AUTO", "MULTI", "HETERO", "BATCH"):
        return
    available = list(core.available_devices)
    if not any(d == device.upper() or d.split(".", 1)[0] == name for d in available):
        raise BackendUnavailableError(
            f"OpenVINO device {device!r} is not available here (available: {available}); an Intel GPU needs its "
            f"compute runtime (intel-opencl-icd) and an NPU its driver; or set model.openvino_device: CPU or AUTO"
        )


_isa_in_force: str | None = None  # the oneDNN ISA cap this process compiled its first OpenVINO CPU model with


def _apply_cpu_isa(cpu_isa: str, int8: bool) -> None:
    """Cap the instruction set of OpenVINO's CPU kernels for a float model (oneDNN's `ONEDNN_MAX_CPU_ISA`).

    Why: on CPUs that execute AVX-512 as two 256-bit halves (AMD Zen 4), AVX2 kernels do the same work per
    cycle and pad HRNet's 18- and 36-channel tensors to 24 and 40 channels instead of 32 and 48; `drywallqa
    bench` shows what it gains on a machine. INT8 models keep the native ISA: without VNNI their kernels
    are ~1.7x slower. oneDNN reads the cap once per process, at the first compile, so a different cap
    later in the same process is an error rather than a silent no-op.
    """
    global _isa_in_force
    if cpu_isa not in OPENVINO_CPU_ISAS:
        raise ValueError(f"unknown OpenVINO CPU ISA {cpu_isa!r}; choose one of {OPENVINO_CPU_ISAS}")
    wanted = "native" if int8 else cpu_isa
    if _isa_in_force is None:
        if wanted != "native":
            os.environ["ONEDNN_MAX_CPU_ISA"] = wanted.upper()
            log.info("OpenVINO CPU kernels capped at %s for this process (model.openvino_cpu_isa)", wanted)
        _isa_in_force = os.environ.get("ONEDNN_MAX_CPU_ISA", "native").lower()
        return
    if wanted not in ("native", _isa_in_force):
        raise BackendUnavailableError(
            f"OpenVINO's CPU instruction set is fixed once per process and is already {_isa_in_force!r} here; "
            f"load this model with cpu_isa {wanted!r} in a new process")
    if int8 and _isa_in_force in ("avx2", "avx512_core"):
        log.warning("OpenVINO's CPU kernels in this process are capped at %r (an earlier model asked for it): this "
                    "INT8 model runs without VNNI, about 1.7x slower", _isa_in_force)


def _ov_shape(partial_shape) -> list:
    return [d.get_length() if d.is_static else None for d in partial_shape]


def _ov_type(name: str):
    import openvino as ov

    table = {"f32": ov.Type.f32, "fp32": ov.Type.f32, "bf16": ov.Type.bf16, "f16": ov.Type.f16, "fp16": ov.Type.f16}
    if name.lower() not in table:
        raise ValueError(f"unknown OpenVINO inference precision {name!r}; use one of {sorted(table)}")
    return table[name.lower()]


class TensorRTBackend(InferenceBackend):
    """A serialized TensorRT engine (built on the device by export/build_engine.sh); needs tensorrt + cuda-python."""

    name = "tensorrt"

    def __init__(self, model_path: Path, metadata: ModelMetadata) -> None:
        super().__init__(model_path, metadata)
        trt, cudart = _import_tensorrt()
        if model_path.suffix.lower() not in TENSORRT_SUFFIXES:
            raise InvalidModelError(
                f"{model_path}: the tensorrt backend needs a serialized engine ({TENSORRT_SUFFIXES}); build one "
                f"from the jetson ONNX with export/build_engine.sh"
            )
        self._cudart = cudart
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(model_path.read_bytes())
        if engine is None:
            raise InvalidModelError(f"{model_path}: TensorRT could not deserialize the engine (built for another "
                                    f"TensorRT version or GPU?)")
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:  # TensorRT logs why (mostly out of GPU memory: shared with the CPU on a Jetson)
            raise RuntimeError(f"{model_path}: TensorRT could not create an execution context (out of GPU memory? "
                               f"see the TensorRT error above)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        ins = {n: (str(engine.get_tensor_dtype(n)).lower(), list(engine.get_tensor_shape(n))) for n in names
               if is_input[n]}
        outs = {n: (str(engine.get_tensor_dtype(n)).lower(), list(engine.get_tensor_shape(n))) for n in names
                if not is_input[n]}
        _check_io(model_path, ins, outs, metadata)
        shape = ins[INPUT_NAME][1]
        self.fixed_batch = _static_batch(shape[0])
        self.input_hw = (int(shape[1]), int(shape[2]))
        self._out_dtype = np.float16 if "half" in outs[OUTPUT_NAME][0] else np.float32
        self._stream = _cuda_check(cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _device_buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _cuda_check(self._cudart.cudaFree(ptr))
            ptr = _cuda_check(self._cudart.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _run(self, batch: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        self.context.set_input_shape(INPUT_NAME, batch.shape)
        out_shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
        out = np.empty(out_shape, dtype=self._out_dtype)
        d_in = self._device_buffer(INPUT_NAME, batch.nbytes)
        d_out = self._device_buffer(OUTPUT_NAME, out.nbytes)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda_check(cudart.cudaMemcpyAsync(d_in, batch.ctypes.data, batch.nbytes, h2d, self._stream))
        self.context.set_tensor_address(INPUT_NAME, d_in)
        self.context.set_tensor_address(OUTPUT_NAME, d_out)
        if not self.context.execute_async_v3(self._stream):
            raise RuntimeError(f"{self.model_path}: TensorRT execution failed")
        _cuda_check(cudart.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, d2h, self._stream))
        _cuda_check(cudart.cudaStreamSynchronize(self._stream))
        return out.astype(np.float32, copy=False)

    def __del__(self) -> None:  # free device memory; the process may be shutting down, so be defensive
        cudart = getattr(self, "_cudart", None)
        for ptr, _ in getattr(self, "_buffers", {}).values():
            if cudart is not None:
                cudart.cudaFree(ptr)


def tensorrt_unavailable_reason() -> str | None:
    """None when the TensorRT backend can be used here, else why not (for skips and error messages)."""
    try:
        _import_tensorrt()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            "the tensorrt backend needs the `tensorrt` Python package (JetPack / NVIDIA TensorRT), which is not "
            "importable here; on this machine use openvino or onnxruntime (`--backend` of predict/eval, or "
            "model.backend / DRYWALLQA_MODEL__BACKEND of the edge runtime), or auto"
        ) from exc
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python layout
        except ImportError as exc:
            raise BackendUnavailableError(
                "the tensorrt backend needs cuda-python for device buffers: pip install cuda-python"
            ) from exc
    return trt, cudart


def _cuda_check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def auto_backend_name(model_path: str | Path) -> str:
    """.xml -> openvino; .engine/.plan -> tensorrt; .onnx -> openvino on x86 when installed, else onnxruntime."""
    suffix = Path(model_path).suffix.lower()
    if suffix in OPENVINO_SUFFIXES:
        return "openvino"
    if suffix in TENSORRT_SUFFIXES:
        return "tensorrt"
    if platform.machine().lower() in ("x86_64", "amd64"):
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "onnxruntime"
        return "openvino"
    return "onnxruntime"


def load_backend(model_path: str | Path, backend: str = "auto", threads: int | None = None,
                 cpu_isa: str = "native", openvino_device: str | None = None,
                 metadata: ModelMetadata | None = None) -> InferenceBackend:
    """Open an exported model with the chosen runtime; metadata comes from the file (InvalidModelError if absent),
    unless the caller passes what `read_metadata` gave it for this file a moment ago (read once: an engine's
    sidecar warned about once)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    path = _existing(model_path)
    if backend == "auto":
        backend = auto_backend_name(path)
    if backend == "tensorrt":
        _import_tensorrt()  # clear error before touching the file
    if metadata is None:
        metadata = read_metadata(path)
    if backend == "onnxruntime":
        return OnnxRuntimeBackend(path, metadata, threads=threads)
    if backend == "openvino":
        return OpenVINOBackend(path, metadata, threads=threads, device=openvino_device, cpu_isa=cpu_isa)
    return TensorRTBackend(path, metadata)


def metadata_json(model_path: str | Path) -> str:
    """The metadata as pretty JSON (for `drywallqa export` summaries and debugging)."""
    return json.dumps(json.loads(read_metadata(model_path).to_json()), indent=2)
