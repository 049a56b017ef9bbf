"""Build the ModelMetadata that travels inside every exported file, from a checkpoint's header."""

from __future__ import annotations

from drywallqa.contract import ModelMetadata, TextEncoderInfo, metadata_from_vocabulary
from drywallqa.paths import PROFILES
from drywallqa.train.checkpoint import CheckpointInfo
from drywallqa.vocab import Vocabulary


def checkpoint_vocabulary(info: CheckpointInfo) -> Vocabulary:
    """Classes in the checkpoint's order, each with the prompts its embedding rows were baked for."""
    by_class = {c: [p for p, k in zip(info.prompts, info.prompt_class, strict=True) if k == i]
                for i, c in enumerate(info.classes)}
    return Vocabulary.from_mapping(by_class)


def build_metadata(
    info: CheckpointInfo,
    *,
    embed_dim: int,
    input_size: tuple[int, int],
    precision: str = "fp32",
    dynamic_batch: bool = False,
    model_name: str | None = None,
) -> ModelMetadata:
    thresholds = {c: float(info.thresholds.get(c, 0.5)) for c in info.classes}
    meta = metadata_from_vocabulary(
        checkpoint_vocabulary(info),
        model_name=model_name or PROFILES.get(info.profile, f"{info.profile}_{info.architecture}"),
        profile=info.profile,
        architecture=info.architecture,
        version=info.version,
        input_size=(int(input_size[0]), int(input_size[1])),
        thresholds=thresholds,
        text_encoder=TextEncoderInfo(name=info.text_encoder, dim=int(embed_dim)),
        data_fingerprint=info.data_fingerprint,
        mask_shapes=info.mask_shapes,
    )
    meta.input.dynamic_batch = dynamic_batch
    meta.precision = precision
    return meta


def with_precision(meta: ModelMetadata, precision: str) -> ModelMetadata:
    return meta.model_copy(update={"precision": precision}, deep=True)
