"""The exported model's contract: tensor names, layout and the metadata that travels inside the file.

Everything downstream of training (predict, eval, the edge runtime, the dashboard) learns classes,
prompts, input size and thresholds from `ModelMetadata` stored in the model file, and from nowhere else.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from drywallqa.vocab import Vocabulary, VocabularyError, normalize_prompt

METADATA_KEY = "drywallqa"
INPUT_NAME = "image"  # uint8, N x H x W x 3, RGB; scaling/normalisation live inside the graph
OUTPUT_NAME = "probs"  # float32, N x C x H x W, per-class probabilities at the input resolution
METADATA_SCHEMA_VERSION = 1
# In every exported file's metadata.extra: the sha256 of the weights file it was made from (export/pipeline.py), so
# that files of one model name made from other weights are told apart (an export left them behind).
WEIGHTS_HASH_KEY = "weights_sha256"
MaskShape = Literal["pixels", "boxes"]  # how a class's thresholded pixels become its mask (edge/mask_shapes.py)
Threshold = Annotated[float, Field(ge=0.0, le=1.0)]  # a decision threshold on a class's probability


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
    thresholds: dict[str, Threshold] = Field(
        description="decision threshold on the probability, per class")
    mask_shapes: dict[str, MaskShape] = Field(
        default_factory=dict,
        description="per class: 'pixels' (default) or 'boxes' (each region filled to its bounding box)",
    )
    input: InputSpec
    text_encoder: TextEncoderInfo
    data_fingerprint: str = ""
    precision: str = "fp32"
    extra: dict[str, str | float | int] = Field(default_factory=dict)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value > METADATA_SCHEMA_VERSION:
            raise ValueError(f"{value} is newer than the {METADATA_SCHEMA_VERSION} this DrywallQA reads; upgrade "
                             f"drywallqa, or export the model with this version")
        if value < 1:
            raise ValueError(f"{value} is not a version DrywallQA ever wrote")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelMetadata:
        doubled = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if doubled:
            raise ValueError(f"classes listed twice: {doubled}")
        unknown = {c for c in self.prompts.values() if c not in self.classes}
        if unknown:
            raise ValueError(f"prompts map to classes not in `classes`: {sorted(unknown)}")
        missing = [c for c in self.classes if c not in self.thresholds]
        if missing:
            raise ValueError(f"no threshold for classes {missing}")
        stray = sorted(set(self.thresholds) - set(self.classes))
        if stray:
            raise ValueError(f"thresholds for classes not in `classes`: {stray}")
        stray = sorted(set(self.mask_shapes) - set(self.classes))
        if stray:
            raise ValueError(f"mask_shapes for classes not in `classes`: {stray}")
        try:  # every reader resolves prompts through it: a class without prompts would fail there, unnamed
            self.vocabulary()
        except VocabularyError as exc:
            raise ValueError(f"prompts: {exc}") from exc
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
        except json.JSONDecodeError as exc:
            raise InvalidModelError(f"{source}: '{METADATA_KEY}' metadata is not valid JSON: {exc}") from exc
        except ValidationError as exc:
            raise InvalidModelError(f"{source}: '{METADATA_KEY}' metadata is invalid: "
                                    f"{validation_summary(exc)}") from exc


def validation_summary(exc: ValidationError) -> str:
    """One line naming every bad or missing field ('thresholds: missing; input.height: ... (got 'abc')'), instead
    of pydantic's multi-line report with the whole metadata echoed in it."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing":
            parts.append(f"{where}: missing")
            continue
        if err["type"] == "model_type" and not where:
            parts.append(f"must be a JSON object, got {type(err.get('input')).__name__}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = where and err["type"] != "value_error" and not isinstance(got, dict | list | None)
        got_text = f" (got {repr(got)[:60]})" if shown else ""
        parts.append(f"{where}: {msg}{got_text}" if where else msg)
    return "; ".join(parts)


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
