"""The exported model's contract: tensor names, layout and the metadata that travels inside the file.

Everything downstream of training (predict, eval, the edge runtime, the dashboard) learns classes,
prompts, input size and thresholds from `ModelMetadata` stored in the model file, and from nowhere else.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from drywallqa.vocab import Vocabulary, normalize_prompt

METADATA_KEY = "drywallqa"
INPUT_NAME = "image"  # uint8, N x H x W x 3, RGB; scaling/normalisation live inside the graph
OUTPUT_NAME = "probs"  # float32, N x C x H x W, per-class probabilities at the input resolution
METADATA_SCHEMA_VERSION = 1
MaskShape = Literal["pixels", "boxes"]  # how a class's thresholded pixels become its mask (edge/mask_shapes.py)


class InvalidModelError(ValueError):
    """A model file that is broken or lacks the DrywallQA contract."""


class InputSpec(BaseModel):
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    layout: Literal["NHWC"] = "NHWC"
    dtype: Literal["uint8"] = "uint8"
    color: Literal["RGB"] = "RGB"
    dynamic_batch: bool = False


class TextEncoderInfo(BaseModel):
    name: str
    dim: int = Field(gt=0)


class ModelMetadata(BaseModel):
    schema_version: int = METADATA_SCHEMA_VERSION
    model_name: str
    profile: str
    architecture: str
    version: str
    classes: list[str] = Field(min_length=1)
    prompts: dict[str, str] = Field(description="every known prompt (normalised) -> its class")
    thresholds: dict[str, float] = Field(description="decision threshold on the probability, per class")
    mask_shapes: dict[str, MaskShape] = Field(
        default_factory=dict,
        description="per class: 'pixels' (default) or 'boxes' (each region filled to its bounding box)",
    )
    input: InputSpec
    text_encoder: TextEncoderInfo
    data_fingerprint: str = ""
    precision: str = "fp32"
    extra: dict[str, str | float | int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ModelMetadata:
        unknown = {c for c in self.prompts.values() if c not in self.classes}
        if unknown:
            raise ValueError(f"prompts map to classes not in `classes`: {sorted(unknown)}")
        missing = [c for c in self.classes if c not in self.thresholds]
        if missing:
            raise ValueError(f"no threshold for classes {missing}")
        stray = sorted(set(self.mask_shapes) - set(self.classes))
        if stray:
            raise ValueError(f"mask_shapes for classes not in `classes`: {stray}")
        return self

    def mask_shape(self, class_name: str) -> MaskShape:
        return self.mask_shapes.get(class_name, "pixels")

    def vocabulary(self) -> Vocabulary:
        by_class = {c: [p for p, k in self.prompts.items() if k == c] for c in self.classes}
        return Vocabulary.from_mapping(by_class)

    def resolve_prompt(self, prompt: str) -> str:
        return self.vocabulary().resolve(normalize_prompt(prompt))

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | None, source: str = "model") -> ModelMetadata:
        if not text:
            raise InvalidModelError(
                f"{source}: no '{METADATA_KEY}' metadata entry; this is not a DrywallQA export "
                f"(re-export it with `drywallqa export`)"
            )
        try:
            return cls.model_validate(json.loads(text))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise InvalidModelError(f"{source}: '{METADATA_KEY}' metadata is invalid: {exc}") from exc


def metadata_from_vocabulary(
    vocab: Vocabulary,
    *,
    model_name: str,
    profile: str,
    architecture: str,
    version: str,
    input_size: tuple[int, int],
    thresholds: dict[str, float],
    text_encoder: TextEncoderInfo,
    data_fingerprint: str = "",
    mask_shapes: dict[str, MaskShape] | None = None,
    **extra: str | float | int,
) -> ModelMetadata:
    return ModelMetadata(
        model_name=model_name,
        profile=profile,
        architecture=architecture,
        version=version,
        classes=list(vocab.classes),
        prompts=vocab.prompt_to_class,
        thresholds=thresholds,
        mask_shapes=dict(mask_shapes or {}),
        input=InputSpec(height=input_size[0], width=input_size[1]),
        text_encoder=text_encoder,
        data_fingerprint=data_fingerprint,
        extra=dict(extra),
    )
