"""Prepare everything a lent GPU machine needs for train/gpu_job.py, under .gpu/ (git-ignored, < 64 MiB a part).

    python scripts/gpu_prepare.py            # .gpu/data/part{0,1}, .gpu/text_minilm.safetensors,
                                             # .gpu/lite0_imagenet_fp16.pth, .gpu/run.sh
Then on the GPU machine, from the repository root: `bash .gpu/run.sh final --teacher-budget 110 --student-budget 410`
(parts that travel in separate calls are picked up as long as the machine stays warm).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

from drywallqa.train.models.effnet_lite import EfficientNetLite0Encoder, imagenet_weights_path
from drywallqa.train.text_encoders import vocabulary_embeddings
from drywallqa.vocab import load_vocabulary

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / ".gpu"


def main() -> None:
    GPU.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "drywallqa.train.data.pack", "--out", str(GPU / "data")], check=True)
    vocab = load_vocabulary()
    vocabulary_embeddings(vocab.all_prompts, "minilm", cache=GPU / "text_minilm.safetensors")
    own = EfficientNetLite0Encoder().state_dict()
    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in state.items() if k in own},
               GPU / "lite0_imagenet_fp16.pth")
    shutil.copy(ROOT / "scripts" / "gpu_run.sh", GPU / "run.sh")
    print(f"ready under {GPU}")


if __name__ == "__main__":
    main()
