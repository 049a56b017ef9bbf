"""One-call training job for a lent GPU machine: teacher, then distilled student, within a time budget.

Inputs travel with the working tree (< 64 MiB): the packed training split (train/data/pack.py), the
vocabulary's text embeddings and the EfficientNet-Lite0 ImageNet weights. Outputs go to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from drywallqa.train.text_encoders import load_embeddings
from drywallqa.train.trainer import TrainConfig, train
from drywallqa.train.training_data import InMemoryData


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pack", nargs="+", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--encoder-weights", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--teacher-budget", type=float, default=120)
    ap.add_argument("--student-budget", type=float, default=300)
    ap.add_argument("--teacher-epochs", type=int, default=60)
    ap.add_argument("--student-epochs", type=int, default=80)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--crop", type=int, default=384)
    ap.add_argument("--max-steps", type=int, default=None)
    args = ap.parse_args()
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logfile = open(out / "train.log", "a", encoding="utf-8")  # noqa: SIM115 - open for the whole job

    def log(msg: str) -> None:
        line = f"{time.time() - t0:7.1f}s {msg}"
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log(f"device {device} torch {torch.__version__} "
        f"{torch.cuda.get_device_name(0) if device.type == 'cuda' else ''}")
    data = InMemoryData.from_pack(args.pack, device=device if device.type == "cuda" else None)
    log(f"loaded {len(data)} training images {tuple(data.images.shape)}")
    emb = load_embeddings(args.text)
    common = dict(cache_size=data.images.shape[1], crop=args.crop, batch_size=args.batch,
                  runs_dir="/tmp/drywallqa-runs", max_steps_per_epoch=args.max_steps, val_every=1000)
    teacher_cfg = TrainConfig(name="teacher_lite0", architecture="effnet_lite0_fpn", profile="lite",
                              output=str(out / "lite_effnet_lite0.safetensors"),
                              pretrained_encoder=args.encoder_weights, epochs=args.teacher_epochs, lr=1e-3,
                              warmup_steps=100, time_budget_s=args.teacher_budget, **common)
    teacher_path = train(teacher_cfg, data, None, emb.vectors, emb.prompts, emb.encoder, log=log)
    student_cfg = TrainConfig(name="student_hrnet_w18", architecture="hrnet_w18", profile="hrnet",
                              output=str(out / "hrnet_w18_student.safetensors"), teacher=str(teacher_path),
                              distill_weight=1.0, epochs=args.student_epochs, lr=1.5e-3, warmup_steps=200,
                              time_budget_s=args.student_budget, **common)
    train(student_cfg, data, None, emb.vectors, emb.prompts, emb.encoder, log=log)
    log("done")


if __name__ == "__main__":
    main()
