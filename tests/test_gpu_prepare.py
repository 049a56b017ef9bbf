"""The GPU job must start on the lent GPU machine's image, which has no pydantic (a session-9 failure)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_prepare.py"


@pytest.fixture(scope="module")
def gpu_prepare():
    spec = importlib.util.spec_from_file_location("gpu_prepare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_job_imports_only_what_the_image_has_or_we_carry(gpu_prepare) -> None:
    gpu_prepare.check_job_imports()


def test_the_check_names_a_package_the_image_lacks(gpu_prepare) -> None:
    with pytest.raises(RuntimeError, match="No module named 'pydantic' on the GPU image"):
        gpu_prepare.check_job_imports(carried=())


def test_image_list_is_read_without_comments(gpu_prepare) -> None:
    packages = gpu_prepare.gpu_image_packages()
    assert {"torch", "numpy", "opencv-python-headless", "safetensors", "pyyaml"} <= packages
    assert "pydantic" not in packages and not any(p.startswith("#") for p in packages)
