"""Prepare everything a lent GPU machine needs for train/gpu_job.py, under .gpu/ (git-ignored, < 64 MiB a part).

    python scripts/gpu_prepare.py     # .gpu/data/part{0..3} (training split), .gpu/data_val/part{0..3},
                                      # .gpu/text_minilm.safetensors, .gpu/lite{0,2}_imagenet_fp16.pth, .gpu/run.sh,
                                      # .gpu/wheels (pydantic & co. for the GPU image's Python 3.12)
    python scripts/gpu_prepare.py --calls-only   # only print the device calls (what each one carries)

The committed files (~36 MiB, the Lite2 teacher included) travel with every call, so each call carries one
training part (~20 MiB) and one validation part (~4 MiB). Parts carried by earlier calls stay on the machine while
it is warm (30 s between calls), so the calls are `true` but the last, which trains. The plan printed at the end
groups the carried paths into calls under the limit (MODEL.md). The ImageNet encoder weights are for a teacher
trained from ImageNet (`gpu_job.py --encoder-weights`); neither plan needs them now, so no call carries them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from drywallqa.train.models.effnet_lite import EfficientNetLiteEncoder, imagenet_weights_path
from drywallqa.train.text_encoders import vocabulary_embeddings
from drywallqa.vocab import load_vocabulary

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / ".gpu"
# ~20 + ~4 MiB a call: with the ~36-MiB repository, one training and one validation part fit each call
TRAIN_PARTS = 4
VAL_PARTS = 4
# Imported by the training code, absent from the GPU machine's image (see download_wheels). typing-extensions is
# there, but possibly older than pydantic needs.
GPU_MISSING_PACKAGES = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
GPU_IMAGE_PACKAGES_FILE = ROOT / "scripts" / "gpu_image_packages.txt"

# Run in a fresh interpreter: imports the GPU job with every third-party package blocked whose distribution is not
# in argv[1] (a JSON list), as on the GPU machine. Optional imports that torch guards fail quietly, as there.
_IMPORT_CHECK = """
import importlib.abc, importlib.metadata, json, sys
allowed = set(json.loads(sys.argv[1]))
owners = importlib.metadata.packages_distributions()
norm = lambda name: name.lower().replace("_", "-")
class OnlyTheGpuImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        dists = {norm(d) for d in owners.get(top, [])}
        if top not in sys.stdlib_module_names and dists and not dists & allowed:
            raise ModuleNotFoundError(f"No module named {top!r} on the GPU image", name=top)
sys.meta_path.insert(0, OnlyTheGpuImage())
import drywallqa.train.gpu_job
"""


def _distribution_key(name: str) -> str:
    return name.strip().lower().replace("_", "-")  # as _IMPORT_CHECK compares them


def gpu_image_packages() -> set[str]:
    lines = GPU_IMAGE_PACKAGES_FILE.read_text().splitlines()
    return {_distribution_key(line) for line in lines if line.strip() and not line.startswith("#")}


def check_job_imports(carried: tuple[str, ...] = GPU_MISSING_PACKAGES) -> None:
    """Fail here, not on the GPU machine, when the training job imports a package neither its image nor we carry.

    (Session 9 lost a call to this: the job reached pydantic through the shared contract.)
    """
    allowed = gpu_image_packages() | {_distribution_key(name) for name in carried} | {"drywallqa"}
    run = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, json.dumps(sorted(allowed))],
                         capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit status {run.returncode}"
        raise RuntimeError(f"the GPU job would not start on the GPU image: {last}; carry that package as a wheel "
                           f"(GPU_MISSING_PACKAGES in {Path(__file__).name})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--calls-only", action="store_true", help="print the device calls for what .gpu/ holds now")
    if ap.parse_args().calls_only:
        print_calls()
        return
    check_job_imports()
    GPU.mkdir(exist_ok=True)
    shutil.rmtree(GPU / "data", ignore_errors=True)
    shutil.rmtree(GPU / "data_val", ignore_errors=True)
    pack = [sys.executable, "-m", "drywallqa.train.data.pack"]
    subprocess.run([*pack, "--out", str(GPU / "data"), "--parts", str(TRAIN_PARTS)], check=True)
    subprocess.run([*pack, "--out", str(GPU / "data_val"), "--parts", str(VAL_PARTS), "--split", "val"], check=True)
    vocab = load_vocabulary()
    vocabulary_embeddings(vocab.all_prompts, "minilm", cache=GPU / "text_minilm.safetensors")
    for variant in ("lite0", "lite2"):  # the GPU machine has no network: the encoders' ImageNet weights ride along
        own = EfficientNetLiteEncoder(variant).state_dict()
        state = torch.load(imagenet_weights_path(variant), map_location="cpu", weights_only=True)
        torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in state.items() if k in own},
                   GPU / f"{variant}_imagenet_fp16.pth")
    download_wheels(GPU / "wheels")
    shutil.copy(ROOT / "scripts" / "gpu_run.sh", GPU / "run.sh")
    print(f"ready under {GPU}")
    print_calls()


CARRY_LIMIT_BYTES = 64 * 2**20  # what one device call may carry, the repository's tracked files included
CARRY_MAX_PATHS = 8


def path_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def tracked_bytes() -> int:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def carry_plan(groups: list[list[str]], sizes: dict[str, int], tree_bytes: int,
               limit: int = CARRY_LIMIT_BYTES) -> list[list[str]]:
    """Split the paths to carry into device calls, in order, keeping each group in one call.

    Every call sends the repository too, so a call holds what fits beside it. Paths carried by earlier calls
    stay on the machine while it is warm, so the last call (the one that trains) needs only its own share.
    """
    calls: list[list[str]] = [[]]
    used = tree_bytes
    for group in groups:
        size = sum(sizes[p] for p in group)
        if tree_bytes + size > limit:
            raise ValueError(f"{group} ({size / 2**20:.1f} MiB) does not fit one call beside the repository "
                             f"({tree_bytes / 2**20:.1f} MiB)")
        if used + size > limit or len(calls[-1]) + len(group) > CARRY_MAX_PATHS:
            calls.append([])
            used = tree_bytes
        calls[-1].extend(group)
        used += size
    return calls


def print_calls() -> None:
    """The device calls, from the parts and sizes of what .gpu/ holds now; both plans carry the same."""
    train_parts = sorted(p.relative_to(ROOT).as_posix() for p in (GPU / "data").glob("part*"))
    val_parts = sorted(p.relative_to(ROOT).as_posix() for p in (GPU / "data_val").glob("part*"))
    # validation part i rides with training part i
    base = [[part, *val_parts[i:i + 1]] for i, part in enumerate(train_parts)] + [[p] for p in val_parts[len(train_parts):]]
    base += [[".gpu/text_minilm.safetensors"], [".gpu/run.sh"], [".gpu/wheels"]]
    tree = tracked_bytes()
    sizes = {p: path_bytes(ROOT / p) for g in base for p in g}
    calls = carry_plan(base, sizes, tree)  # the lite2 plan's teacher is committed: it travels with the repository
    print(f"{len(calls)} device calls, `true` but the last, which runs a plan: `bash .gpu/run.sh final 0 530` (the "
          f"student alone) or `bash .gpu/run.sh final 240 270 lite2` (the Lite2 teacher, then the student from both)")
    for i, carry in enumerate(calls, 1):
        print(f"  {i}. carry {json.dumps(carry)} "
              f"({(tree + sum(sizes[p] for p in carry)) / 2**20:.1f} of 64 MiB with the repository)")


def download_wheels(folder: Path) -> None:
    """Wheels of the packages the training code imports that the GPU image lacks (cp312, as its python3).

    The GPU machine has torch, numpy, OpenCV, PyYAML and safetensors but no pydantic, which the training code
    reaches through the shared contract (drywallqa/contract.py); it cannot download anything itself.
    The versions are the ones installed here, so both machines validate the same way.
    """
    shutil.rmtree(folder, ignore_errors=True)
    pins = [f"{name}=={metadata.version(name)}" for name in GPU_MISSING_PACKAGES]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    *(f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                                  "manylinux2014_x86_64")),
                    "-d", str(folder), *pins], check=True)


if __name__ == "__main__":
    main()
