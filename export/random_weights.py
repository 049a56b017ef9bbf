"""Randomly initialised checkpoints for the real vocabulary: tests and benchmarks before trained weights exist."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from drywallqa.train.checkpoint import CheckpointInfo, save_weights
from drywallqa.train.models.segmenter import Segmenter, build_segmenter
from drywallqa.vocab import load_vocabulary

ARCH_PROFILE = {"hrnet_w18": "hrnet", "effnet_lite0_fpn": "lite"}
RANDOM_EMBED_DIM = 384  # the MiniLM dimension the shipped models use


def random_model(
    architecture: str = "effnet_lite0_fpn",
    input_size: tuple[int, int] = (512, 512),
    seed: int = 0,
    embed_dim: int = RANDOM_EMBED_DIM,
) -> tuple[Segmenter, CheckpointInfo]:
    """A random Segmenter (eval mode) with random L2-normalised prompt embeddings, plus its CheckpointInfo.

    The FiLM head's last layer starts at zero (by design); it is re-drawn here so the classes differ.
    """
    vocab = load_vocabulary()
    prompts = vocab.all_prompts
    prompt_class = [vocab.class_index(vocab.prompt_to_class[p]) for p in prompts]
    gen = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(len(prompts), embed_dim, generator=gen), dim=1)
    torch.manual_seed(seed)
    model = build_segmenter(architecture, emb, torch.tensor(prompt_class), len(vocab.classes))
    with torch.no_grad():
        last = model.head.film[-1]
        last.weight.normal_(0.0, 0.05, generator=gen)
        last.bias.normal_(0.0, 0.05, generator=gen)
    _calibrate_batchnorm(model, input_size, gen)
    with torch.no_grad():
        _spread_logits(model, input_size, gen)
    info = CheckpointInfo(
        architecture=architecture,
        profile=ARCH_PROFILE.get(architecture, architecture),
        classes=list(vocab.classes),
        prompts=prompts,
        prompt_class=prompt_class,
        text_encoder="random:unit-normal",
        thresholds={c: 0.5 for c in vocab.classes},
        input_size=tuple(input_size),
        data_fingerprint="random",
        version="0.0.0+random",
    )
    return model.eval(), info


def _probe(model: Segmenter, input_size: tuple[int, int], gen: torch.Generator, n: int) -> torch.Tensor:
    from drywallqa.export.onnx_export import probe_images

    h, w = (min(int(input_size[0]), 128), min(int(input_size[1]), 128))
    x = torch.from_numpy(probe_images((h, w), n, seed=int(torch.randint(0, 2**31, (1,), generator=gen))))
    return model.input_from_uint8(x)


@torch.no_grad()
def _calibrate_batchnorm(model: Segmenter, input_size: tuple[int, int], gen: torch.Generator) -> None:
    """Set BN running statistics from image-like inputs, so a random deep net neither explodes nor goes flat."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration passes
    model.train()
    for _ in range(2):
        model(_probe(model, input_size, gen, 4))
    model.eval()
    for m in bns:
        m.momentum = 0.1


def _spread_logits(model: Segmenter, input_size: tuple[int, int], gen: torch.Generator,
                   target_std: float = 4.0) -> None:
    """Rescale the head's last (linear) layers so random logits have std ~4 around 0.

    A raw random net outputs logits near 0 (probabilities ~0.5 everywhere), which would make every mask
    comparison a coin flip; decisive probabilities make parity checks meaningful.
    """
    logits = model(_probe(model, input_size, gen, 4))
    k = target_std / float(logits.std().clamp(min=1e-6))
    centre = float(logits.mean())
    head = model.head
    head.out.weight.mul_(k)
    head.out.bias.mul_(k).sub_(k * centre)
    head.bias_from_text.weight.mul_(k)
    head.bias_from_text.bias.mul_(k)


def write_random_weights(path: str | Path, architecture: str = "effnet_lite0_fpn",
                         input_size: tuple[int, int] = (512, 512), seed: int = 0) -> Path:
    """Save a random checkpoint in the shipped format (fp16 safetensors + header)."""
    model, info = random_model(architecture, input_size, seed)
    return save_weights(model, info, path)
