"""Dockerfile.jetson, checked as far as it can be without docker or an arm64 machine: what it copies exists,
its entry point is a command the package installs, and the running container does not sit in a source tree
(whose `drywallqa/` folder would hide the installed package: pyproject maps edge/ into drywallqa.edge)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile.jetson").read_text()


def _instructions(name: str) -> list[str]:
    text = DOCKERFILE.replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith(name + " ")]


def test_everything_it_copies_exists_and_is_not_ignored() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for copy in _instructions("COPY"):
        *sources, _dest = copy.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert src.rstrip("/") not in ignored, f"COPY {src}: excluded by .dockerignore"


def test_build_context_leaves_out_everything_git_ignores() -> None:
    """What git ignores (environments, build output, caches, wheels) is not product source: sending it to the Docker
    daemon only slows every build, by gigabytes with a .venv."""
    ignored = {line.strip().strip("/").removeprefix("**/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for line in (ROOT / ".gitignore").read_text().splitlines():
        entry = line.strip().strip("/")
        if not entry or entry.startswith("#"):
            continue
        covered = entry in ignored or entry.split("/")[0] in ignored
        assert covered, f".gitignore ignores {line.strip()!r} but .dockerignore sends it to the build"


def test_entry_point_is_an_installed_command_and_runs_outside_the_sources() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (entry,) = _instructions("ENTRYPOINT")
    assert json.loads(entry)[0] in scripts
    final_workdir = _instructions("WORKDIR")[-1]
    assert final_workdir != "/src" and "rm -rf /src" in DOCKERFILE
    assert re.search(r"install -D -m 0755 export/build_engine.sh /usr/local/bin/drywallqa-build-engine", DOCKERFILE)
    # The engine name the build step writes is the one the image's default model path opens.
    assert "DRYWALLQA_MODEL__PATH=/app/models/exported/hrnet_w18_student.engine" in DOCKERFILE


def test_base_image_is_jetpack_6_whose_python_the_project_supports() -> None:
    (base,) = _instructions("FROM")
    assert re.fullmatch(r"nvcr\.io/nvidia/l4t-jetpack:r36\.\d+\.\d+", base.strip())
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.10"  # JetPack 6 ships Python 3.10; revisit the base image if this changes


def _header_commands() -> list[str]:
    """The `docker ...` command lines documented in the header comment, continuation lines joined."""
    header = "\n".join(line[1:].strip() for line in DOCKERFILE.split("\nFROM ", 1)[0].splitlines()
                       if line.startswith("#"))
    return [cmd for cmd in header.replace("\\\n", " ").splitlines() if cmd.startswith("docker ")]


def test_the_build_does_not_import_tensorrt() -> None:
    """`import tensorrt` loads libnvinfer, which needs libraries of the host's driver (libnvdla_compiler.so) that
    only `docker run --runtime nvidia` mounts: in `docker build` (qemu on x86, or a Jetson whose docker default
    runtime is not nvidia) the import fails and so would the build."""
    for run in _instructions("RUN"):
        assert not re.search(r"\bimport\s+([\w.]+(\s+as\s+\w+)?\s*,\s*)*tensorrt\b|\bfrom\s+tensorrt\b", run), run


def test_documented_gpu_runs_under_another_user_join_the_video_group() -> None:
    """On a Jetson the GPU nodes (/dev/nvmap, /dev/nvhost-*) are root:video 0660; `--user UID:GID` has no
    supplementary groups in the image, so a GPU run with it needs `--group-add video`."""
    gpu_runs = [cmd for cmd in _header_commands() if cmd.startswith("docker run") and "--runtime nvidia" in cmd]
    assert len(gpu_runs) >= 2  # the engine build and the runtime
    for cmd in gpu_runs:
        if "--user" in cmd:
            assert "--group-add video" in cmd, cmd


def test_documented_sources_are_ones_the_runtime_opens() -> None:
    """The header's advice on cameras names only sources `edge run` can open: its OpenCV (pip, no GStreamer) takes
    no GStreamer pipeline, which source.uri would take for a video file path."""
    from drywallqa.edge.sources import classify_uri

    for cmd in _header_commands():
        for uri in re.findall(r"DRYWALLQA_SOURCE__URI=(\S+)", cmd):
            assert classify_uri(uri) in ("camera", "stream"), uri
    assert classify_uri("nvarguscamerasrc ! video/x-raw(memory:NVMM) ! nvvidconv ! appsink") == "file"
    assert not re.search(r"GStreamer (URI|pipeline) instead|argus_socket", DOCKERFILE)
