"""The output mask contract, in one place: file naming and a checked PNG writer.

A mask file is `<imageID>__<prompt_with_underscores>.png`: single channel, uint8, values only {0, 255},
exactly the source image's width x height.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from drywallqa.vocab import prompt_to_filename_part

MASK_SUFFIX = ".png"
SEPARATOR = "__"


class MaskContractError(ValueError):
    """A mask that is not single-channel uint8 with values in {0, 255}."""


def mask_filename(image_id: str, prompt: str) -> str:
    """('img_001', 'Segment joint/tape') -> 'img_001__segment_joint_tape.png'."""
    part = prompt_to_filename_part(prompt)
    if not part:
        raise ValueError(f"prompt {prompt!r} has no characters usable in a file name")
    return f"{image_id}{SEPARATOR}{part}{MASK_SUFFIX}"


def check_mask(mask: np.ndarray, shape: tuple[int, int] | None = None) -> None:
    """Raise MaskContractError unless `mask` is H x W uint8 with values only {0, 255} (and `shape` if given)."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise MaskContractError(f"mask must be a single-channel H x W array, got shape {getattr(mask, 'shape', None)}")
    if mask.dtype != np.uint8:
        raise MaskContractError(f"mask must be uint8, got {mask.dtype}")
    if np.any((mask != 0) & (mask != 255)):
        raise MaskContractError(f"mask values must be only 0 and 255, got {np.unique(mask)[:8].tolist()}")
    if shape is not None and mask.shape != tuple(shape):
        raise MaskContractError(f"mask shape {mask.shape} differs from the source image's {tuple(shape)}")


def write_mask(path: str | Path, mask: np.ndarray, shape: tuple[int, int] | None = None) -> Path:
    """Write a checked mask as a single-channel 8-bit PNG; the file is replaced atomically."""
    check_mask(mask, shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(MASK_SUFFIX, np.ascontiguousarray(mask))
    if not ok:
        raise OSError(f"cannot encode mask for {path}")
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(buf.tobytes())
        tmp.replace(path)
    except OSError as exc:  # e.g. a full disk: leave no partial .tmp behind, and name the real file
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask PNG back exactly as stored (IMREAD_UNCHANGED): H x W uint8 for a mask this project wrote; a
    foreign PNG may come back with channels or 16 bits, which callers check (the review page names it)."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise OSError(f"cannot read mask {path}")
    return mask


def mask_name_endings(prompts: list[str]) -> tuple[str, ...]:
    """How the names of the masks of `prompts` end ('__segment_crack.png', ...): `name.endswith(these)` tells a
    file an earlier run wrote."""
    parts = (prompt_to_filename_part(p) for p in prompts)
    return tuple(f"{SEPARATOR}{part}{MASK_SUFFIX}" for part in parts if part)
