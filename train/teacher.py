"""The frozen teacher of a distillation run: one trained model, or several whose probabilities are averaged.

Why several: on the validation split the average of the session-5 `lite` and the session-12 Lite2 teacher scores
+0.9 crack and +0.9 taping IoU over `lite` alone (MODEL.md), a stronger target for the student for the price of
one more forward pass per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from drywallqa.train.checkpoint import load_weights
from drywallqa.train.models.segmenter import Segmenter


class TeacherEnsemble(nn.Module):
    """Frozen members sharing one prompt vocabulary; forward gives the mean of their probabilities."""

    def __init__(self, members: Sequence[Segmenter]) -> None:
        super().__init__()
        if not members:
            raise ValueError("a teacher needs at least one model")
        self.members = nn.ModuleList(members)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TeacherEnsemble:
        return super().train(False)  # a teacher never leaves eval mode (BatchNorm statistics, no dropout)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised N x 3 x H x W -> probabilities N x K x H x W (K: every class, or the given prompts)."""
        total = sum(torch.sigmoid(m(x, prompt_ids).float()) for m in self.members)
        return total / len(self.members)


def teacher_paths(spec: str | Sequence[str] | None) -> list[str]:
    """A config's `teacher:` value (one path, a list of paths, or nothing) as a list."""
    if not spec:
        return []
    return [str(spec)] if isinstance(spec, str | Path) else [str(p) for p in spec]


def load_teacher(spec: str | Sequence[str] | None, prompts: Sequence[str],
                 device: torch.device | str = "cpu") -> TeacherEnsemble | None:
    """Load the teacher model(s) named by `spec`, or None when there is none.

    Every member must know exactly the trainee's prompts, in its order: the training loop hands the teacher the
    trainee's prompt indices, and a teacher with another vocabulary would answer for other prompts.
    """
    members = []
    for path in teacher_paths(spec):
        model, info = load_weights(path)
        if list(info.prompts) != list(prompts):
            raise ValueError(f"teacher {path} was trained with other prompts than the model it teaches; "
                             f"retrain it on the current vocabulary")
        members.append(model)
    return TeacherEnsemble(members).to(device) if members else None
