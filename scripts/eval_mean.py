"""`drywallqa eval` of the mean of several models' probabilities: what a distillation run's teacher ensemble gives
(train/teacher.py averages its members' probabilities the same way), scored on the full split at native resolution.

    python scripts/eval_mean.py --model models/exported/lite_effnet_lite0.onnx \
        --model <dir>/effnet_lite2_teacher.onnx --threads 2 --tune-thresholds --out runs/<name>

The first model's metadata (classes, prompts, decision rule) is the ensemble's; every model must share its classes,
prompts and input size. With --tune-thresholds the report's sweep gives the ensemble's best rule.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from drywallqa.edge import backends
from drywallqa.edge.backends import InferenceBackend


class MeanBackend(InferenceBackend):
    """The mean of its members' probabilities, behind the one backend interface."""

    name = "mean"

    def __init__(self, members: list[InferenceBackend]) -> None:
        first = members[0]
        for other in members[1:]:
            m, o = first.metadata, other.metadata
            if (m.classes, m.prompts, first.input_hw) != (o.classes, o.prompts, other.input_hw):
                raise SystemExit(f"{other.model_path} does not share the classes, prompts and input size of "
                                 f"{first.model_path}")
        super().__init__(first.model_path, first.metadata)
        self.members = members

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return sum(m.infer(batch) for m in self.members) / np.float32(len(self.members))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="an exported model (repeat: two or more)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tune-thresholds", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if len(args.model) < 2:
        ap.error("give at least two --model")
    members = [backends.load_backend(Path(m), threads=args.threads) for m in args.model]
    original = backends.load_backend
    backends.load_backend = lambda *a, **k: MeanBackend(members)  # run_eval loads its backend through this
    try:
        from drywallqa.evaluate import run_eval

        result = run_eval(args.model[0], out_dir=args.out, tune_thresholds=args.tune_thresholds)
    finally:
        backends.load_backend = original
    print(result.markdown)
    print(f"members: {', '.join(args.model)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
