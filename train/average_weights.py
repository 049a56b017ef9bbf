"""Average two checkpoints of one model, weight by weight (a "model soup" of a run and its continuation).

    python -m drywallqa.train.average_weights A.safetensors B.safetensors --weight-a 0.5 --out OUT.safetensors \
        [--note-a "what A is"] [--note-b "what B is"]

Averaging works when B was trained on from A (the two lie in one basin); it is no use for unrelated runs.
Both files must have the same architecture, classes, prompts and baked prompt embeddings: the embeddings are
the frozen contract, so they are copied, never averaged. The output keeps A's header (decision rule included),
with a recipe that names both parents and the weight.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drywallqa.train.checkpoint import read_checkpoint
from drywallqa.train.safetensors_io import write_safetensors

FROZEN_TENSORS = ("prompt_embeddings", "prompt_class")  # buffers that carry the contract, identical in both parents


def average_weights(path_a: str | Path, path_b: str | Path, out: str | Path, weight_a: float = 0.5,
                    note_a: str = "", note_b: str = "") -> Path:
    """out = weight_a * A + (1 - weight_a) * B for every float tensor, in A's dtype; other tensors from A."""
    if not 0.0 <= weight_a <= 1.0:
        raise ValueError(f"--weight-a must lie in [0, 1], got {weight_a}")
    info_a, tensors_a = read_checkpoint(path_a)
    info_b, tensors_b = read_checkpoint(path_b)
    for field in ("architecture", "classes", "prompts", "prompt_class"):
        if getattr(info_a, field) != getattr(info_b, field):
            raise ValueError(f"cannot average {path_a} and {path_b}: their {field} differ")
    if tensors_a.keys() != tensors_b.keys():
        raise ValueError(f"cannot average {path_a} and {path_b}: different tensors "
                         f"({sorted(tensors_a.keys() ^ tensors_b.keys())[:5]} ...)")
    averaged = {}
    for name, a in tensors_a.items():
        b = tensors_b[name]
        if a.shape != b.shape:
            raise ValueError(f"cannot average {path_a} and {path_b}: {name} is {tuple(a.shape)} against {tuple(b.shape)}")
        if name in FROZEN_TENSORS:
            if not a.float().allclose(b.float(), atol=1e-3):
                raise ValueError(f"cannot average {path_a} and {path_b}: their baked {name} differ "
                                 "(different text encoders or vocabularies)")
            averaged[name] = a
        elif a.is_floating_point():
            averaged[name] = (weight_a * a.float() + (1.0 - weight_a) * b.float()).to(a.dtype)
        else:
            averaged[name] = a  # e.g. BatchNorm's num_batches_tracked
    info_a.recipe = {"kind": "weight_average", "weight_a": weight_a,
                     "a": note_a or str(path_a), "b": note_b or str(path_b),
                     "a_recipe": info_a.recipe, "b_recipe": info_b.recipe}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(averaged, str(out), metadata=info_a.to_header())
    return out


def main(argv: list[str] | None = None) -> int:
    """Exit status 2 with one line (no traceback) for a missing, foreign or mismatched checkpoint."""
    ap = argparse.ArgumentParser(prog="python -m drywallqa.train.average_weights",
                                 description=__doc__.split("\n", 1)[0])
    ap.add_argument("a", help="first checkpoint (its header, decision rule included, is kept)")
    ap.add_argument("b", help="second checkpoint, trained on from the first")
    ap.add_argument("--weight-a", type=float, default=0.5, help="share of A in the average (default 0.5)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--note-a", default="", help="what A is, for the recipe (default: its path)")
    ap.add_argument("--note-b", default="", help="what B is, for the recipe (default: its path)")
    args = ap.parse_args(argv)
    try:
        out = average_weights(args.a, args.b, args.out, args.weight_a, args.note_a, args.note_b)
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError; OSError: missing file, unwritable --out
        print(f"{ap.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
