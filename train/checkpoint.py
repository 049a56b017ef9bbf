"""Shipped weights: a safetensors file (fp16 by default) whose header metadata rebuilds the model.

Header metadata (all strings): architecture, profile, classes (JSON list), prompts (JSON list, the
order of the baked embedding rows), prompt_class (JSON list of class indices), text_encoder,
thresholds (JSON dict), mask_shapes (JSON dict, class -> 'pixels'|'boxes'), input_size (JSON [h, w]), data_fingerprint, version, recipe (JSON).
The prompt embeddings themselves are tensors in the file (the model's buffers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field, Json, PositiveInt, ValidationError

from drywallqa.contract import MaskShape, Threshold, validation_summary
from drywallqa.edge.mask_shapes import MASK_SHAPES
from drywallqa.train.models.segmenter import Segmenter, build_segmenter
from drywallqa.train.safetensors_io import write_safetensors


class CheckpointError(ValueError):
    """A weights file that is not a readable DrywallQA checkpoint; the message names the file."""


class _StoredHeader(BaseModel):
    """The header as stored (every value a string, the structured ones JSON), checked field by field before use,
    so a file from elsewhere or an older tool is refused with the field named, not a bare KeyError."""

    architecture: str
    profile: str
    classes: Json[list[str]]
    prompts: Json[list[str]]
    prompt_class: Json[list[int]]
    text_encoder: str
    thresholds: Json[dict[str, Threshold]]
    input_size: Json[tuple[PositiveInt, PositiveInt]] = (512, 512)
    data_fingerprint: str = ""
    version: str = "0.1.0"
    recipe: Json[dict] = Field(default_factory=dict)
    mask_shapes: Json[dict[str, MaskShape]] = Field(default_factory=dict)


@dataclass
class CheckpointInfo:
    architecture: str
    profile: str
    classes: list[str]
    prompts: list[str]
    prompt_class: list[int]
    text_encoder: str
    thresholds: dict[str, float]
    input_size: tuple[int, int] = (512, 512)
    data_fingerprint: str = ""
    version: str = "0.1.0"
    recipe: dict = field(default_factory=dict)
    mask_shapes: dict[str, str] = field(default_factory=dict)

    def to_header(self) -> dict[str, str]:
        return {
            "architecture": self.architecture,
            "profile": self.profile,
            "classes": json.dumps(self.classes),
            "prompts": json.dumps(self.prompts),
            "prompt_class": json.dumps(self.prompt_class),
            "text_encoder": self.text_encoder,
            "thresholds": json.dumps(self.thresholds),
            "input_size": json.dumps(list(self.input_size)),
            "data_fingerprint": self.data_fingerprint,
            "version": self.version,
            "recipe": json.dumps(self.recipe),
            "mask_shapes": json.dumps(self.mask_shapes),
        }

    @classmethod
    def from_header(cls, header: dict[str, str], source: str = "weights file") -> CheckpointInfo:
        """CheckpointError (one line: `source`, then every missing or malformed field) for a header that does not
        hold every required field in its stored form."""
        try:
            stored = _StoredHeader.model_validate(header)
        except ValidationError as exc:
            raise CheckpointError(f"{source}: weights header is invalid: {validation_summary(exc)}") from exc
        return cls(**{**stored.model_dump(), "input_size": tuple(stored.input_size)})


def save_weights(model: Segmenter, info: CheckpointInfo, path: str | Path, fp16: bool = True) -> Path:
    """Weights only (no optimizer), fp16 by default; buffers (incl. prompt embeddings) included."""
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if fp16 and v.is_floating_point():
            v = v.half()
        state[k] = v
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, str(path), metadata=info.to_header())
    return path


def read_checkpoint(path: str | Path, device: str = "cpu") -> tuple[CheckpointInfo, dict]:
    """A weights file's checked header and its tensors as stored (dtype kept). A missing file is a
    FileNotFoundError; anything else wrong with it a one-line CheckpointError naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights at {path}")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a weights file (a folder?)")
    try:
        header, stored = read_raw(path, device)
    except Exception as exc:  # safetensors' own error types: truncated, not safetensors at all
        raise CheckpointError(f"{path}: cannot read it as a safetensors weights file: {exc}") from exc
    if not header.keys() & _StoredHeader.model_fields.keys():
        raise CheckpointError(f"{path}: not a DrywallQA checkpoint, its header has none of the DrywallQA fields "
                              f"({', '.join(_StoredHeader.model_fields)})")
    return CheckpointInfo.from_header(header, str(path)), stored


def load_weights(path: str | Path, map_location: str = "cpu") -> tuple[Segmenter, CheckpointInfo]:
    """Rebuild the model from a shipped file; returns it in eval mode, fp32."""
    info, stored = read_checkpoint(path, map_location)
    try:
        state = {k: t.float() if t.is_floating_point() else t for k, t in stored.items()}
        model = build_segmenter(info.architecture, state["prompt_embeddings"], state["prompt_class"],
                                len(info.classes))
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: a DrywallQA header, but its tensors do not make that model: "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    return model.eval(), info


def read_raw(path: str | Path, device: str = "cpu") -> tuple[dict[str, str], dict]:
    """A weights file's header and tensors as stored (dtype kept): what load_weights rebuilds a model from, and
    what tools that rewrite files (set_thresholds, average_weights) keep."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=device) as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def set_thresholds(path: str | Path, thresholds: dict[str, float], mask_shapes: dict[str, str] | None = None) -> None:
    """Rewrite a shipped file's decision rule (thresholds and mask shapes, tuned on validation) in place;
    tensors are untouched."""
    info, tensors = read_checkpoint(path)
    shapes = mask_shapes or {}
    unknown = (set(thresholds) | set(shapes)) - set(info.classes)
    if unknown:
        raise ValueError(f"decision rule for unknown classes {sorted(unknown)}; classes: {info.classes}")
    bad = {k: v for k, v in shapes.items() if v not in MASK_SHAPES}
    if bad:
        raise ValueError(f"unknown mask shapes {bad}; allowed: {list(MASK_SHAPES)}")
    info.thresholds = {**info.thresholds, **{k: float(v) for k, v in thresholds.items()}}
    info.mask_shapes = {**info.mask_shapes, **shapes}
    write_safetensors(tensors, str(path), metadata=info.to_header())
