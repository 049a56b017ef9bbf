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


def test_carry_plan_keeps_each_call_under_the_limit_and_groups_together(gpu_prepare) -> None:
    mib = 2**20
    groups = [["part0", "val0"], ["part1", "val1"], ["part2"], ["text"], ["wheels"], ["lite2"]]
    sizes = {"part0": 27 * mib, "val0": 8 * mib, "part1": 27 * mib, "val1": 8 * mib, "part2": 27 * mib,
             "text": 1, "wheels": 3 * mib, "lite2": 9 * mib}
    calls = gpu_prepare.carry_plan(groups, sizes, tree_bytes=27 * mib)
    assert [p for call in calls for p in call] == [p for g in groups for p in g]  # all of it, in order
    assert calls[0] == ["part0", "val0"] and calls[1] == ["part1", "val1"]
    assert all(27 * mib + sum(sizes[p] for p in call) <= 64 * mib for call in calls)
    assert calls[2] == ["part2", "text", "wheels"] and calls[3] == ["lite2"]  # 27+27+3+9 MiB would not fit


def test_carry_plan_refuses_a_group_too_big_for_any_call(gpu_prepare) -> None:
    with pytest.raises(ValueError, match="does not fit one call"):
        gpu_prepare.carry_plan([["big"]], {"big": 40 * 2**20}, tree_bytes=27 * 2**20)
