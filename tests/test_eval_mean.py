"""scripts/eval_mean.py: the mean of several models' probabilities, as a distillation run's teacher ensemble gives
it, behind the one backend interface. Real ONNX Runtime sessions of two random models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from _export_fixtures import export_random_model

from drywallqa.edge.backends import load_backend

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_mean.py"


def _script():
    spec = importlib.util.spec_from_file_location("eval_mean", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_mean_backend_averages_its_members_and_refuses_a_mismatch(tmp_path):
    script = _script()
    a = load_backend(export_random_model(tmp_path, size=(64, 64), seed=1), backend="onnxruntime")
    b = load_backend(export_random_model(tmp_path / "b", size=(64, 64), seed=2), backend="onnxruntime")
    x = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    pa, pb = a.infer(x), b.infer(x)
    assert np.abs(pa - pb).max() > 1e-3  # two different models, so the mean is not either of them
    np.testing.assert_allclose(script.MeanBackend([a, b]).infer(x), (pa + pb) / 2, atol=1e-6)
    other = load_backend(export_random_model(tmp_path / "c", size=(96, 96), seed=3), backend="onnxruntime")
    with pytest.raises(SystemExit, match="does not share"):
        script.MeanBackend([a, other])
