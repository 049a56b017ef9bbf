"""A normal install (`pip install '.[train]'`, not the editable one setup.sh makes) gets every module of the source
tree: the wheel is built for real and its contents compared with the folders that hold Python modules."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from drywallqa.paths import PROJECT_ROOT

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

SKIPPED = {".git", ".venv", "build", "runs", "cache", "models", "tests", ".gpu", "scripts", "docs"}


def _source_packages() -> dict[str, Path]:
    """Installed package name -> source folder, for every folder below pyproject's package-dir roots with modules."""
    setuptools = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {}
    for name, folder in setuptools["package-dir"].items():
        root = PROJECT_ROOT / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            if "__pycache__" not in rel.parts:
                found[".".join((name, *rel.parts))] = init.parent
    return found


def test_the_wheel_holds_every_module_and_the_data_the_programs_read(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the project's files")
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip(f"not a git checkout: {tracked.stderr.strip()}")
    src = tmp_path / "src"
    for rel in tracked.stdout.splitlines():
        if rel.split("/")[0] in SKIPPED or not (PROJECT_ROOT / rel).is_file():
            continue
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / rel, src / rel)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("drywallqa-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    for package, folder in _source_packages().items():
        inside = package.replace(".", "/")
        for module in folder.glob("*.py"):
            assert f"{inside}/{module.name}" in names, f"{module} is not installed by a normal install"
    for data in ("drywallqa/configs/prompts.yaml", "drywallqa/configs/edge.yaml", "drywallqa/dashboard/static/app.js"):
        assert data in names
