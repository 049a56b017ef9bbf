"""Shared helpers for the edge tests: a random exported model, synthetic videos, configs, the edge process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml


def make_video(path: Path, frames: int, size: tuple[int, int] = (120, 160), fps: float = 10.0) -> Path:
    """A small MJPEG AVI of a wall with a moving dark crack line (frame i is distinct from frame j)."""
    h, w = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), "cv2.VideoWriter cannot write MJPG here"
    for i in range(frames):
        frame = np.full((h, w, 3), 205, np.uint8)
        cv2.line(frame, (5, 5 + i % (h - 10)), (w - 5, h - 5), (40, 40, 40), 3)
        writer.write(frame)
    writer.release()
    return path


def write_config(path: Path, *, uri: str, model: Path, port: int, spool: Path, device_id: str = "dev1",
                 rules: list[dict] | None = None, **sections: dict) -> Path:
    cfg: dict = {
        "source": {"uri": uri, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "model": {"path": str(model), "backend": "onnxruntime", "threads": 1},
        "analysis": {"prompts": ["segment crack", "segment taping area"], "min_region_area_px": 0},
        "alerts": rules if rules is not None else [
            {"prompt": "segment crack", "metric": "area_fraction", "min": 0.0, "persistence_frames": 1,
             "cooldown_s": 0.0},
        ],
        "mqtt": {"host": "127.0.0.1", "port": port, "device_id": device_id, "embedded_broker": "never",
                 "detections_max_hz": 5.0, "reconnect_max_s": 2, "status_interval_s": 1.0},
        "spool": {"path": str(spool), "flush_timeout_s": 3.0},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(cfg))
    return path


def edge_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "drywallqa.edge", "run", "--config", str(config), *extra]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRYWALLQA_") and k != "NOTIFY_SOCKET"}
    env.update(extra)
    return env


def start_edge(config: Path, *extra: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen(edge_cmd(config, *extra), stdout=out, stderr=subprocess.STDOUT,
                            env=env or clean_env())


@contextlib.contextmanager
def small_disk(path: Path, size: str = "1m") -> Iterator[Path]:
    """A real file system of `size` at `path` (tmpfs; needs root)."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    return filler


def run_as_nobody(fn: Callable[[], object]) -> object:
    """fn() in a forked child that is user and group 'nobody' (65534), for a real EACCES where the tests run as root;
    returns its JSON-able result. A fork, not a new interpreter: this Python may live under /root, which 'nobody'
    cannot execute. Import what fn needs before calling this: the child only runs it, then _exits."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest teardown in it
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, json.dumps(fn()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child running as 'nobody' failed"
    return json.loads(data)


class FakeTensorRT:
    """TensorRT does not run on this machine: the few TensorRT 10 / 8.6 calls TensorRTBackend makes, on an engine
    with uint8 `image` in, float `probs` out; `context` is what create_execution_context gives (None: TensorRT could
    not make one). Nothing is inferred with it."""

    class Logger:
        WARNING = 2

        def __init__(self, _severity) -> None:
            pass

    class TensorIOMode:
        INPUT, OUTPUT = "TensorIOMode.INPUT", "TensorIOMode.OUTPUT"

    def __init__(self, hw: tuple[int, int], channels: int, context: object) -> None:
        fake = self
        self.shapes = {"image": (1, *hw, 3), "probs": (1, channels, *hw)}

        class Engine:
            num_io_tensors = 2

            def get_tensor_name(self, i: int) -> str:
                return ["image", "probs"][i]

            def get_tensor_mode(self, name: str) -> str:
                return fake.TensorIOMode.INPUT if name == "image" else fake.TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name: str) -> str:
                return "DataType.UINT8" if name == "image" else "DataType.FLOAT"

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                return fake.shapes[name]

            def create_execution_context(self):
                return context

        class Runtime:
            def __init__(self, _logger) -> None:
                pass

            def deserialize_cuda_engine(self, _data: bytes) -> Engine:
                return Engine()

        self.Runtime = Runtime


class FakeCudart:
    @staticmethod
    def cudaStreamCreate():
        return 0, "stream"
