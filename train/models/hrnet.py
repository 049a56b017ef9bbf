"""HRNetV2-W18: four parallel branches (18/36/72/144 channels) with repeated multi-scale fusion.

Follows Wang et al., "Deep High-Resolution Representation Learning" (HRNetV2 segmentation variant):
stem to stride 4, one bottleneck stage, then stages of 1, 4 and 3 modules with 2, 3 and 4 branches,
four BasicBlocks per branch. The HRNetV2 representation upsamples every branch to stride 4 and
concatenates them (270 channels), so the head sees all resolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.1


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout, momentum=BN_MOMENTUM),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, planes, 3, stride)
        self.conv2 = conv_bn(planes, planes, 3, 1, relu=False)
        self.downsample = downsample
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, planes, 1)
        self.conv2 = conv_bn(planes, planes, 3, stride)
        self.conv3 = conv_bn(planes, planes * 4, 1, relu=False)
        self.downsample = downsample
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


def make_layer(block: type[BasicBlock] | type[Bottleneck], cin: int, planes: int, blocks: int) -> nn.Sequential:
    downsample = None
    if cin != planes * block.expansion:
        downsample = conv_bn(cin, planes * block.expansion, 1, relu=False)
    layers = [block(cin, planes, 1, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """Parallel branches followed by a fusion that gives every branch every other branch's output."""

    def __init__(self, widths: list[int], blocks_per_branch: int = 4) -> None:
        super().__init__()
        self.branches = nn.ModuleList(make_layer(BasicBlock, w, w, blocks_per_branch) for w in widths)
        n = len(widths)
        self.fuse = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:  # lower resolution -> 1x1 conv, upsampled in forward
                    row.append(conv_bn(widths[j], widths[i], 1, relu=False))
                elif j == i:
                    row.append(nn.Identity())
                else:  # higher resolution -> strided 3x3 convs
                    steps: list[nn.Module] = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        cout = widths[i] if last else widths[j]
                        steps.append(conv_bn(widths[j], cout, 3, 2, relu=not last))
                    row.append(nn.Sequential(*steps))
            self.fuse.append(row)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        out = []
        for i, row in enumerate(self.fuse):
            size = xs[i].shape[-2:]
            y = xs[i]
            for j, op in enumerate(row):
                if j == i:
                    continue
                z = op(xs[j])
                if j > i:
                    z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
                y = y + z
            out.append(self.relu(y))
        return out


class HRNetW18(nn.Module):
    """HRNetV2-W18 backbone; forward returns the 270-channel stride-4 HRNetV2 representation."""

    widths = (18, 36, 72, 144)
    out_channels = sum(widths)

    def __init__(self) -> None:
        super().__init__()
        w = list(self.widths)
        self.stem = nn.Sequential(conv_bn(3, 64, 3, 2), conv_bn(64, 64, 3, 2))
        self.layer1 = make_layer(Bottleneck, 64, 64, 4)  # -> 256 channels
        self.transition1 = nn.ModuleList([conv_bn(256, w[0]), conv_bn(256, w[1], 3, 2)])
        self.stage2 = nn.Sequential(HighResolutionModule(w[:2]))
        self.transition2 = conv_bn(w[1], w[2], 3, 2)
        self.stage3 = nn.Sequential(*[HighResolutionModule(w[:3]) for _ in range(4)])
        self.transition3 = conv_bn(w[2], w[3], 3, 2)
        self.stage4 = nn.Sequential(*[HighResolutionModule(w) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(x))
        xs = [t(x) for t in self.transition1]
        xs = self.stage2(xs)
        xs = self.stage3(xs + [self.transition2(xs[-1])])
        xs = self.stage4(xs + [self.transition3(xs[-1])])
        size = xs[0].shape[-2:]
        ups = [xs[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in xs[1:]]
        return torch.cat(ups, dim=1)
