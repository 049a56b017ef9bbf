"""One training run for a lent GPU machine, from packed data, inside a wall-clock budget.

Inputs travel with the working tree (< 64 MiB a call): the packed training split and, optionally, the packed
validation split (train/data/pack.py), the vocabulary's text embeddings, and either ImageNet encoder weights
(a teacher from scratch) or the weights of an earlier run to continue from (`--init`). scripts/gpu_run.sh
starts one (the student alone) or several side by side (a student plus teacher variants); processes on one
GPU are time-sliced, so side by side saves orchestration, not GPU time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from drywallqa.train.losses import LOSSES
from drywallqa.train.text_encoders import load_embeddings
from drywallqa.train.trainer import TrainConfig, train
from drywallqa.train.training_data import InMemoryData

# role -> (architecture, profile). teacher_lite2 is a wider teacher only, never a shipped profile.
ROLES = {"teacher": ("effnet_lite0_fpn", "lite"), "teacher_lite2": ("effnet_lite2_fpn", "teacher"),
         "student": ("hrnet_w18", "hrnet")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--role", choices=sorted(ROLES), required=True)
    ap.add_argument("--name", required=True, help="run name (checkpoints under --runs-dir/<name>)")
    ap.add_argument("--out", required=True, help="fp16 safetensors written at the end")
    ap.add_argument("--pack", nargs="+", required=True, help="packed training-split parts")
    ap.add_argument("--val-pack", nargs="*", default=[], help="packed validation-split parts (per-epoch IoU)")
    ap.add_argument("--text", required=True, help="text embeddings of the vocabulary (safetensors)")
    ap.add_argument("--encoder-weights", default=None,
                    help="ImageNet encoder weights of the role's architecture (a teacher from scratch)")
    ap.add_argument("--init", default=None, help="continue from these weights (a fresh schedule)")
    ap.add_argument("--teacher", nargs="+", default=None,
                    help="distil from this teacher, or from the average of several (student role)")
    ap.add_argument("--loss", default="bce_dice", choices=LOSSES)
    ap.add_argument("--crop", type=int, default=384)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--budget", type=float, required=True, help="wall-clock seconds for the training loop")
    ap.add_argument("--epochs", type=int, default=1000, help="cap on epochs (the budget usually ends it first)")
    ap.add_argument("--val-every", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke tests)")
    ap.add_argument("--runs-dir", default="/tmp/drywallqa-runs")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"{time.time() - t0:7.1f}s {msg}", flush=True)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log(f"[{args.name}] device {device} torch {torch.__version__} "
        f"{torch.cuda.get_device_name(0) if device.type == 'cuda' else ''}")
    on = device if device.type == "cuda" else None
    data = InMemoryData.from_pack(args.pack, device=on)
    val = InMemoryData.from_pack(args.val_pack, device=on) if args.val_pack else None
    log(f"[{args.name}] {len(data)} training images {tuple(data.images.shape)}, {len(val) if val else 0} validation")
    emb = load_embeddings(args.text)
    architecture, profile = ROLES[args.role]
    cfg = TrainConfig(
        name=args.name, architecture=architecture, profile=profile, output=str(out),
        pretrained_encoder=args.encoder_weights or False, init_weights=args.init, teacher=args.teacher,
        loss=args.loss, cache_size=data.images.shape[1], crop=args.crop, batch_size=args.batch,
        epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup, time_budget_s=args.budget,
        val_every=args.val_every, val_batch=16, max_steps_per_epoch=args.max_steps, runs_dir=args.runs_dir,
        log_every=0)
    train(cfg, data, val, emb.vectors, emb.prompts, emb.encoder, log=log)
    log(f"[{args.name}] done")


if __name__ == "__main__":
    main()
