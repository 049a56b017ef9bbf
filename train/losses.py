"""Segmentation losses: BCE + soft Dice, optional clDice (thin structures) or Lovász (IoU) terms, and distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Dice over each (class) channel pooled across the batch, so empty images do not explode the loss."""
    p = torch.sigmoid(logits)
    dims = (0, 2, 3)
    inter = (p * target).sum(dims)
    union = p.sum(dims) + target.sum(dims)
    return (1 - (2 * inter + eps) / (union + eps)).mean()


def soft_skeleton(x: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """Differentiable morphological skeleton (Shit et al., clDice, CVPR 2021)."""
    def erode(t: torch.Tensor) -> torch.Tensor:
        return torch.min(-F.max_pool2d(-t, (3, 1), 1, (1, 0)), -F.max_pool2d(-t, (1, 3), 1, (0, 1)))

    def dilate(t: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(t, 3, 1, 1)

    skel = F.relu(x - dilate(erode(x)))
    for _ in range(iterations):
        x = erode(x)
        delta = F.relu(x - dilate(erode(x)))
        skel = skel + F.relu(delta - skel * delta)
    return skel


def cldice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits)
    sp, st = soft_skeleton(p), soft_skeleton(target)
    tprec = ((sp * target).sum() + eps) / (sp.sum() + eps)
    tsens = ((st * p).sum() + eps) / (st.sum() + eps)
    return 1 - 2 * tprec * tsens / (tprec + tsens)


def lovasz_hinge_per_image(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovász hinge (Berman et al., CVPR 2018), a convex surrogate of 1 - IoU, per image and channel.

    The validation metric is IoU averaged over images, so each (image, class) mask is its own IoU term
    rather than one pooled over the batch. Soft targets (bilinear augmentation) are binarised at 0.5.
    """
    logits = logits.flatten(2).flatten(0, 1).float()  # (B*K) x N
    labels = (target.flatten(2).flatten(0, 1) >= 0.5).float()
    errors = 1.0 - logits * (2.0 * labels - 1.0)
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    gt_sorted = torch.gather(labels, 1, order)
    gts = gt_sorted.sum(1, keepdim=True)
    intersection = gts - gt_sorted.cumsum(1)
    union = gts + (1.0 - gt_sorted).cumsum(1)
    jaccard = 1.0 - intersection / union
    grad = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return (F.relu(errors_sorted) * grad).sum(1).mean()


LOSSES = ("bce_dice", "bce_dice_cldice", "bce_dice_lovasz")


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce_dice",
                      extra_channels: list[int] | None = None) -> torch.Tensor:
    """logits/target: B x K x H x W. BCE + soft Dice on every channel; `extra_channels` (the crack channel;
    default all) also get the loss's extra term: clDice, or the per-image Lovász hinge. Taping's box-shaped
    labels are served by soft blobs that the box rule turns into boxes, which a sharpening IoU term spoils."""
    loss = F.binary_cross_entropy_with_logits(logits, target) + soft_dice_loss(logits, target)
    ch = extra_channels if extra_channels is not None else list(range(logits.shape[1]))
    if kind == "bce_dice":
        return loss
    if kind == "bce_dice_cldice":
        return loss + 0.5 * cldice_loss(logits[:, ch], target[:, ch])
    if kind == "bce_dice_lovasz":
        return loss + lovasz_hinge_per_image(logits[:, ch], target[:, ch])
    raise ValueError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """BCE of the student against the teacher's soft masks, plus soft Dice to the same targets."""
    return F.binary_cross_entropy_with_logits(student_logits, teacher_probs) + soft_dice_loss(
        student_logits, teacher_probs)
