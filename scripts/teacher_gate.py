"""The `lite2` plan's teacher gate, on this machine: `trainer.validate` on the packed validation split (.gpu/data_val,
written by scripts/gpu_prepare.py) at threshold 0.5, for one weights file. scripts/gpu_run.sh keeps a GPU
continuation of the Lite2 teacher only if its crack + taping IoU here beats the committed teacher's (1.178).

    python scripts/teacher_gate.py models/teachers/effnet_lite2_teacher.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from drywallqa.train.checkpoint import load_weights
from drywallqa.train.trainer import validate
from drywallqa.train.training_data import InMemoryData

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--val-pack", type=Path, default=ROOT / ".gpu" / "data_val")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    parts = sorted(str(q) for q in args.val_pack.glob("part*"))
    if not parts:
        print(f"error: no packed validation parts in {args.val_pack}; run `python scripts/gpu_prepare.py` first",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    data = InMemoryData.from_pack(parts)
    model, info = load_weights(args.weights)
    scores = validate(model, data, torch.device("cpu"), 8, len(info.classes))
    print(f"{args.weights}: {len(data)} images, crack {scores['iou_0']:.4f} + taping {scores['iou_1']:.4f} = "
          f"{scores['iou_0'] + scores['iou_1']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
