"""An edge-only install (`pip install .`: no torch, transformers or the rest of the `train` extra), as README
promises: predict and the edge runtime work; the commands that need the extra say what to install, no traceback.

The extra's modules are made unimportable for the child process (a sitecustomize on PYTHONPATH that raises
ModuleNotFoundError for them, as Python does when a package is not installed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from drywallqa.cli import TRAIN_EXTRA_MODULES
from drywallqa.paths import PROJECT_ROOT

BLOCKER = f'''
import sys

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(TRAIN_EXTRA_MODULES)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
'''


@pytest.fixture()
def edge_only(tmp_path: Path):
    """Runs `drywallqa ARGS` as on an edge-only install; returns the completed process."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRYWALLQA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "drywallqa.cli", *args], env=env, cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=300)

    return run


@pytest.mark.parametrize("args, module", [
    (["export", "--profile", "lite", "--target", "onnx", "--out", "{tmp}/exported"], "torch"),
    (["train", "--config", "configs/finetune_lite_lovasz.yaml"], "torch"),
    (["bench", "--profile", "lite", "--iters", "1", "--json", "{tmp}/bench.json"], "torch"),
])
def test_commands_that_need_the_training_extra_say_what_to_install(edge_only, tmp_path, args, module):
    """Before: a traceback ending in "No module named 'torch'"."""
    proc = edge_only(*(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"`drywallqa {args[0]}` needs {module}" in proc.stderr
    assert "pip install 'drywallqa[train]'" in proc.stderr


def test_predict_and_the_edge_runtime_work_without_the_training_extra(edge_only, tmp_path):
    exported = PROJECT_ROOT / "models" / "exported" / "lite_effnet_lite0.onnx"
    if not exported.is_file():
        pytest.skip(f"{exported} is made by scripts/setup.sh (drywallqa export)")
    photos = tmp_path / "photos"
    photos.mkdir()
    wall = np.full((96, 128, 3), 200, np.uint8)
    cv2.line(wall, (10, 10), (118, 86), (40, 40, 40), 3)
    cv2.imwrite(str(photos / "wall.jpg"), wall)
    proc = edge_only("predict", "--model", "lite", "--prompt", "segment crack", "--quiet", "--out",
                     str(tmp_path / "masks"), str(photos))
    assert proc.returncode == 0, proc.stderr[-2000:]
    mask = cv2.imread(str(tmp_path / "masks" / "wall__segment_crack.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (96, 128) and set(np.unique(mask)) <= {0, 255}
    proc = edge_only("edge", "run", "--source", "demo", "--model", "lite", "--max-frames", "2", "--config",
                     str(_offline_config(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"frames_processed": 2' in proc.stdout + proc.stderr
    proc = edge_only("edge", "bench", "--model", "lite", "--iters", "1", "--rounds", "1", "--config",
                     str(_offline_config(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lite_effnet_lite0.onnx" in proc.stdout and "FPS" in proc.stdout


def _offline_config(tmp_path: Path) -> Path:
    """No broker reachable (port 1, no embedded one): the runtime runs, spooling alerts."""
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"mqtt: {{port: 1, embedded_broker: never}}\nspool: {{path: {tmp_path / 'spool.sqlite'}}}\n")
    return cfg
