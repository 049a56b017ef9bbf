"""Backends and PromptSegmenter on a real exported (random-weight) model: ONNX Runtime and OpenVINO sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from _edge_helpers import FakeCudart, FakeTensorRT
from _export_fixtures import export_random_model
from onnx import TensorProto, helper

from drywallqa.contract import METADATA_KEY, InvalidModelError, TextEncoderInfo, metadata_from_vocabulary
from drywallqa.edge.backends import (
    BackendUnavailableError,
    InferenceBackend,
    auto_backend_name,
    load_backend,
    read_metadata,
    tensorrt_unavailable_reason,
)
from drywallqa.edge.inference import PromptSegmenter
from drywallqa.export.bench import cpu_has_avx512
from drywallqa.vocab import UnknownPromptError, load_vocabulary

SIZE = (96, 128)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return export_random_model(tmp_path_factory.mktemp("m"), "effnet_lite0_fpn", SIZE)


@pytest.fixture(scope="module")
def dynamic_model_path(tmp_path_factory) -> Path:
    return export_random_model(tmp_path_factory.mktemp("d"), "effnet_lite0_fpn", SIZE, dynamic_batch=True)


def _images(n: int, hw=SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *hw, 3), dtype=np.uint8)


def test_metadata_round_trip(model_path):
    meta = read_metadata(model_path)
    vocab = load_vocabulary()
    assert meta.classes == list(vocab.classes)
    assert meta.prompts == vocab.prompt_to_class
    assert (meta.input.height, meta.input.width) == SIZE
    assert set(meta.thresholds) == set(meta.classes)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_backend_contract(model_path, backend):
    be = load_backend(model_path, backend, threads=2)
    assert be.name == backend
    assert be.input_hw == SIZE
    out = be.infer(_images(3))  # static batch-1 graph: the backend loops
    assert out.dtype == np.float32
    assert out.shape == (3, len(be.metadata.classes), *SIZE)
    assert out.min() >= 0.0 and out.max() <= 1.0
    one = be.infer(_images(3)[1:2])
    np.testing.assert_allclose(out[1:2], one, atol=1e-6)


def test_backends_agree(model_path):
    x = _images(2, seed=3)
    a = load_backend(model_path, "onnxruntime").infer(x)
    b = load_backend(model_path, "openvino").infer(x)
    assert np.abs(a - b).max() < 1e-3


def test_dynamic_batch(dynamic_model_path):
    for backend in ("onnxruntime", "openvino"):
        be = load_backend(dynamic_model_path, backend)
        assert be.fixed_batch is None and be.metadata.input.dynamic_batch
        assert be.infer(_images(4)).shape[0] == 4


def test_wrong_input_is_rejected(model_path):
    be = load_backend(model_path, "onnxruntime")
    with pytest.raises(ValueError, match="expected uint8"):
        be.infer(_images(1, hw=(64, 64)))
    with pytest.raises(ValueError, match="expected uint8"):
        be.infer(_images(1).astype(np.float32))


def test_auto_backend(model_path):
    assert auto_backend_name("m.xml") == "openvino"
    assert auto_backend_name("m.engine") == "tensorrt"
    assert load_backend(model_path).name in ("openvino", "onnxruntime")
    with pytest.raises(ValueError, match="unknown backend"):
        load_backend(model_path, "tflite")


def _foreign_onnx(path: Path, metadata: str | None = None, input_name: str = "x") -> Path:
    inp = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Relu", [input_name], ["y"])], "foreign", [inp], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if metadata is not None:
        helper.set_model_props(model, {METADATA_KEY: metadata})
    onnx.save(model, str(path))
    return path


def test_foreign_onnx_names_missing_metadata(tmp_path):
    path = _foreign_onnx(tmp_path / "foreign.onnx")
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(InvalidModelError, match=f"no '{METADATA_KEY}' metadata"):
            load_backend(path, backend)


def test_incomplete_metadata_names_missing_fields(tmp_path):
    path = _foreign_onnx(tmp_path / "partial.onnx", metadata='{"model_name": "x", "classes": ["crack"]}')
    with pytest.raises(InvalidModelError) as err:
        read_metadata(path)
    for field in ("profile", "thresholds", "input", "text_encoder"):
        assert field in str(err.value)


def test_valid_metadata_but_wrong_tensors(tmp_path, model_path):
    meta = read_metadata(model_path).to_json()
    path = _foreign_onnx(tmp_path / "wrong_io.onnx", metadata=meta)
    with pytest.raises(InvalidModelError, match="no input named 'image'"):
        load_backend(path, "onnxruntime")
    with pytest.raises(InvalidModelError, match="no output named 'probs'"):
        load_backend(path, "openvino")


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x00\x01 this is not protobuf \xff" * 10)
    with pytest.raises(InvalidModelError, match="not a readable ONNX"):
        read_metadata(bad)
    with pytest.raises(FileNotFoundError, match="drywallqa export"):
        load_backend(tmp_path / "absent.onnx")
    odd = tmp_path / "model.tflite"
    odd.write_bytes(b"x")
    with pytest.raises(InvalidModelError, match="unknown model file type"):
        read_metadata(odd)


def test_tensorrt_backend_unavailable_is_clear(model_path, tmp_path):
    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("tensorrt is importable here; covered on the device")
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        load_backend(model_path, "tensorrt")
    assert "tensorrt" in reason


def test_engine_without_metadata_is_clear(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    with pytest.raises(InvalidModelError, match="model.json"):
        read_metadata(engine)


def test_prompt_segmenter_masks(model_path):
    seg = PromptSegmenter(load_backend(model_path, "onnxruntime"))
    image = _images(1, hw=(201, 333), seed=5)[0]
    probs = seg.probabilities(image)
    assert probs.shape == (len(seg.classes), 201, 333)
    masks = seg.masks(image, ["segment crack", "Wall  Crack", "taping area"])
    assert set(masks) == {"segment crack", "Wall  Crack", "taping area"}
    for m in masks.values():
        assert m.shape == (201, 333) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
    np.testing.assert_array_equal(masks["segment crack"], masks["Wall  Crack"])  # synonyms, one class
    crack = seg.classes.index("crack")
    expected = np.where(probs[crack] >= seg.metadata.thresholds["crack"], 255, 0)
    np.testing.assert_array_equal(masks["segment crack"], expected)


def test_prompt_segmenter_unknown_prompt_lists_known(model_path):
    seg = PromptSegmenter(load_backend(model_path, "onnxruntime"))
    with pytest.raises(UnknownPromptError, match="segment taping area"):
        seg.masks(_images(1)[0], ["segment crack", "segment mould"])


def test_prompt_segmenter_batch_and_odd_inputs(model_path):
    seg = PromptSegmenter(load_backend(model_path, "openvino"))
    gray = _images(1, hw=(50, 70))[0][..., 0]
    rgba = np.dstack([_images(1, hw=(300, 200))[0], np.full((300, 200), 255, np.uint8)])
    out = seg.masks_batch([gray, rgba], ["crack"])
    assert out[0]["crack"].shape == (50, 70)
    assert out[1]["crack"].shape == (300, 200)
    assert seg.probabilities_batch([]) == []



class _ColourBackend(InferenceBackend):
    """A backend subclass whose 'network' is per pixel (crack = red / 255, taping = blue / 255): mirroring its input
    mirrors its output, so correct flip averaging must give back exactly the plain output."""

    name = "colour"

    def __init__(self, hw: tuple[int, int]) -> None:
        meta = metadata_from_vocabulary(load_vocabulary(), model_name="colour", profile="test", architecture="none",
                                        version="0", input_size=hw, thresholds={"crack": 0.5, "taping": 0.5},
                                        text_encoder=TextEncoderInfo(name="none", dim=1))
        super().__init__(Path("colour.onnx"), meta)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return (batch[..., [0, 2]].transpose(0, 3, 1, 2) / np.float32(255)).astype(np.float32)


def test_flip_tta_puts_each_mirror_images_output_back_in_place():
    images = _images(2, seed=7)
    plain = PromptSegmenter(_ColourBackend(SIZE)).network(images)
    averaged = PromptSegmenter(_ColourBackend(SIZE), flip_tta=True).network(images)
    assert averaged.shape == plain.shape == (2, 2, *SIZE)
    np.testing.assert_allclose(averaged, plain, atol=1e-6)


def test_flip_tta_on_a_real_model_is_the_mean_over_three_views(model_path):
    backend = load_backend(model_path, "onnxruntime")
    images = _images(2, seed=8)
    views = [backend.infer(images), backend.infer(images[:, :, ::-1])[..., ::-1],
             backend.infer(images[:, ::-1])[:, :, ::-1]]
    seg = PromptSegmenter(backend, flip_tta=True)
    averaged = seg.network(images)
    np.testing.assert_allclose(averaged, np.mean(views, axis=0), atol=1e-6)
    assert np.abs(averaged - views[0]).max() > 1e-3  # a random net is not mirror-symmetric: the views differ
    masks = seg.masks(images[0], ["segment crack"])
    assert masks["segment crack"].shape == SIZE and set(np.unique(masks["segment crack"])) <= {0, 255}


def test_edge_model_settings_turn_flip_tta_on_for_the_live_loop(model_path):
    from drywallqa.edge.runner import load_segmenter
    from drywallqa.edge.settings import ModelSettings

    path, seg = load_segmenter(ModelSettings(path=str(model_path), backend="onnxruntime", flip_tta=True))
    assert path == model_path and seg.flip_tta
    frame = _images(1, seed=9)[0]
    plain = PromptSegmenter(load_backend(model_path, "onnxruntime")).model_probabilities(frame)
    assert np.abs(seg.model_probabilities(frame) - plain).max() > 1e-3  # the live loop's call averages the mirrors
    assert not load_segmenter(ModelSettings(path=str(model_path), backend="onnxruntime"))[1].flip_tta

_ISA_PROBE = r"""
import json, sys
import numpy as np
from drywallqa.edge.backends import BackendUnavailableError, load_backend

def kernels(backend):
    ops = backend.compiled.get_runtime_model().get_ops()
    return sorted({op.get_rt_info()["primitiveType"].astype(str) for op in ops
                   if op.get_rt_info()["layerType"].astype(str) == "Convolution"})

xml, isa, then = sys.argv[1], sys.argv[2], sys.argv[3]
backend = load_backend(xml, "openvino", threads=2, cpu_isa=isa)
x = np.load(sys.argv[4])
out = {"kernels": kernels(backend), "probs": backend.infer(x).tolist()}
if then != "-":
    try:
        load_backend(xml, "openvino", threads=2, cpu_isa=then)
    except BackendUnavailableError as exc:
        out["error"] = str(exc)
print(json.dumps(out))
"""


def _probe(tmp_path, xml, isa, then, x):
    import json
    import subprocess
    import sys

    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", _ISA_PROBE, str(xml), isa, then, str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


needs_avx512 = pytest.mark.skipif(not cpu_has_avx512(), reason="the ISA cap only changes kernels on a CPU with AVX-512")


@needs_avx512
def test_openvino_cpu_isa_cap_runs_float_models_on_avx2_kernels_with_the_same_output(model_path, tmp_path):
    """Each case in a fresh interpreter: oneDNN reads its ISA cap once per process."""
    from drywallqa.export.openvino_export import export_openvino

    xml = export_openvino(model_path, tmp_path / "m.xml", read_metadata(model_path))
    x = _images(2)
    native = _probe(tmp_path, xml, "native", "-", x)
    capped = _probe(tmp_path, xml, "avx2", "avx512_core", x)
    assert any("avx512" in k for k in native["kernels"]) and not any("avx2" in k for k in native["kernels"])
    assert capped["kernels"] and all("avx2" in k or "avx512" not in k for k in capped["kernels"])
    assert any("avx2" in k for k in capped["kernels"])
    np.testing.assert_allclose(np.array(capped["probs"]), np.array(native["probs"]), atol=1e-4)
    assert "fixed once per process" in capped["error"] and "'avx2'" in capped["error"]  # no silent no-op


@needs_avx512
def test_openvino_cpu_isa_cap_leaves_int8_models_their_vnni_kernels(model_path, tmp_path):
    from drywallqa.export.openvino_export import quantize_int8

    xml = quantize_int8(model_path, tmp_path / "q.xml", read_metadata(model_path), _images(4, seed=3))
    capped = _probe(tmp_path, xml, "avx2", "-", _images(1))
    assert any("avx512" in k for k in capped["kernels"]), capped["kernels"]


def test_unknown_openvino_cpu_isa_is_rejected(model_path):
    with pytest.raises(ValueError, match="unknown OpenVINO CPU ISA 'sse9'"):
        load_backend(model_path, "openvino", cpu_isa="sse9")


def test_an_openvino_device_this_machine_lacks_is_named_with_the_ones_it_has(model_path):
    import openvino as ov

    available = ov.Core().available_devices
    if any(d.startswith("GPU") for d in available):
        pytest.skip("this machine has an OpenVINO GPU device")
    with pytest.raises(BackendUnavailableError, match=r"device 'GPU' is not available here \(available: \['CPU'"):
        load_backend(model_path, "openvino", threads=1, openvino_device="GPU")
    auto = load_backend(model_path, "openvino", threads=1, openvino_device="AUTO")  # OpenVINO picks the CPU
    assert auto.infer(_images(1)).shape[:2] == (1, 2)
    lower = load_backend(model_path, "openvino", threads=1, openvino_device=" cpu")  # OpenVINO itself wants "CPU"
    assert lower.device == "CPU"


def test_edge_check_config_reports_a_missing_openvino_device(model_path, capsys, monkeypatch):
    import openvino as ov

    from drywallqa.edge.cli import main as edge_main

    if any(d.startswith("GPU") for d in ov.Core().available_devices):
        pytest.skip("this machine has an OpenVINO GPU device")
    monkeypatch.setenv("DRYWALLQA_MODEL__OPENVINO_DEVICE", "GPU")
    monkeypatch.setenv("DRYWALLQA_MODEL__BACKEND", "openvino")
    monkeypatch.setenv("DRYWALLQA_MODEL__PATH", str(model_path))
    assert edge_main(["edge", "check-config", "--model-check"]) != 0
    assert "OpenVINO device 'GPU' is not available here" in capsys.readouterr().err


def test_tensorrt_backend_without_an_execution_context_fails_at_load(tmp_path, monkeypatch):
    """create_execution_context returns None when TensorRT cannot make one (out of memory on a Jetson, whose GPU
    shares the RAM): a load error the service restarts on, not a backend whose every frame then fails."""
    from drywallqa.edge import backends

    meta = metadata_from_vocabulary(load_vocabulary(), model_name="fake", profile="test", architecture="none",
                                    version="0", input_size=SIZE, thresholds={"crack": 0.5, "taping": 0.5},
                                    text_encoder=TextEncoderInfo(name="none", dim=1))
    engine = tmp_path / "fake.engine"
    engine.write_bytes(b"engine")
    trt = FakeTensorRT(SIZE, len(meta.classes), context=object())
    monkeypatch.setattr(backends, "_import_tensorrt", lambda: (trt, FakeCudart))
    assert backends.TensorRTBackend(engine, meta).input_hw == SIZE  # the fake is a loadable engine
    monkeypatch.setattr(backends, "_import_tensorrt", lambda: (FakeTensorRT(SIZE, len(meta.classes), None), FakeCudart))
    with pytest.raises(RuntimeError, match="execution context"):
        backends.TensorRTBackend(engine, meta)
