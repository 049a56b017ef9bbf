"""Prepare everything a lent GPU machine needs for train/gpu_job.py, under .gpu/ (git-ignored, < 64 MiB a part).

    python scripts/gpu_prepare.py     # .gpu/data/part{0,1,2} (training split), .gpu/data_val/part{0,1},
                                      # .gpu/text_minilm.safetensors, .gpu/lite{0,2}_imagenet_fp16.pth, .gpu/run.sh
The committed files (~26 MiB) travel with every call, so each call carries one part (~27 MiB), the
validation parts riding with part0 and part1: `true` for the first two calls, then the training call.
Parts carried by earlier calls stay on the machine while it is warm (30 s between calls). The next plan
(MODEL.md): carry .gpu/data/part2, .gpu/text_minilm.safetensors, .gpu/run.sh and .gpu/lite2_imagenet_fp16.pth
(~36 MiB) and run `bash .gpu/run.sh final 220 290 lite2`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

from drywallqa.train.models.effnet_lite import EfficientNetLiteEncoder, imagenet_weights_path
from drywallqa.train.text_encoders import vocabulary_embeddings
from drywallqa.vocab import load_vocabulary

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / ".gpu"


def main() -> None:
    GPU.mkdir(exist_ok=True)
    shutil.rmtree(GPU / "data", ignore_errors=True)
    shutil.rmtree(GPU / "data_val", ignore_errors=True)
    pack = [sys.executable, "-m", "drywallqa.train.data.pack"]
    subprocess.run([*pack, "--out", str(GPU / "data"), "--parts", "3"], check=True)
    subprocess.run([*pack, "--out", str(GPU / "data_val"), "--parts", "2", "--split", "val"], check=True)
    vocab = load_vocabulary()
    vocabulary_embeddings(vocab.all_prompts, "minilm", cache=GPU / "text_minilm.safetensors")
    for variant in ("lite0", "lite2"):  # the GPU machine has no network: the encoders' ImageNet weights ride along
        own = EfficientNetLiteEncoder(variant).state_dict()
        state = torch.load(imagenet_weights_path(variant), map_location="cpu", weights_only=True)
        torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in state.items() if k in own},
                   GPU / f"{variant}_imagenet_fp16.pth")
    shutil.copy(ROOT / "scripts" / "gpu_run.sh", GPU / "run.sh")
    print(f"ready under {GPU}")


if __name__ == "__main__":
    main()
