"""Where the project keeps its files (shipped weights, exported models, configs)."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    """$DRYWALLQA_HOME as the environment says now, else the folder above the package. `edge --env-file` sets it after
    this module was imported (as the service's EnvironmentFile= does before start), so the edge reads this, not
    PROJECT_ROOT."""
    return Path(os.environ.get("DRYWALLQA_HOME", PACKAGE_DIR.parent))


PROJECT_ROOT = project_root()
CONFIGS_DIR = PROJECT_ROOT / "configs"
MODELS_DIR = PROJECT_ROOT / "models"
EXPORTED_DIR = MODELS_DIR / "exported"
SHARED_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
CACHE_DIR = PROJECT_ROOT / "cache"

# Shipped model profiles: weights (fp16 safetensors, committed) -> exported ONNX (made by `drywallqa export`).
PROFILES = {
    "hrnet": "hrnet_w18_student",
    "lite": "lite_effnet_lite0",
}
DEFAULT_PROFILE = "hrnet"


def exported_dir() -> Path:
    """EXPORTED_DIR under project_root() as it is now: where the edge looks for a profile's exported file."""
    return project_root() / "models" / "exported"


def profile_weights(profile: str) -> Path:
    return MODELS_DIR / f"{PROFILES[profile]}.safetensors"


def profile_onnx(profile: str) -> Path:
    return EXPORTED_DIR / f"{PROFILES[profile]}.onnx"


TRAINING_WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth")


def training_weights_hint(path: Path) -> str:
    """For a model path that names training weights (what `drywallqa train` writes): how to make the exported file
    that predict, eval and the edge runtime read. Empty for any other path."""
    suffix = path.suffix.lower()
    if suffix not in TRAINING_WEIGHTS_SUFFIXES:
        return ""
    if suffix != ".safetensors":  # a run's resume checkpoint (runs/<name>/last.pt): export cannot read it
        return (f"; {path.name} is a training checkpoint, which export does not read: export the .safetensors "
                f"file the run wrote (its config's `output`) with `drywallqa export --weights FILE.safetensors "
                f"--target onnx --out <folder>` and give the .onnx file it writes")
    return (f"; {path.name} holds training weights: export them first (`drywallqa export --weights {path} "
            f"--target onnx --out <folder>`) and give the .onnx file it writes")
