"""Prompt -> mask on top of any backend: resize in, per-class probabilities back at source size, thresholds.

Prompts are resolved to classes with the vocabulary stored in the model's metadata, and each class's
decision rule (threshold and mask shape) comes from there too, so a model file is self-describing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from drywallqa.edge.backends import InferenceBackend
from drywallqa.edge.mask_shapes import class_mask
from drywallqa.imageio import to_rgb_uint8

AREA_FROM_FACTOR = 2.0  # shrinking by this factor or more averages pixels (INTER_AREA); less is bilinear


def resize_interpolation(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    """Bilinear, unless the image shrinks by AREA_FROM_FACTOR or more, where bilinear would alias thin cracks.

    A 640 -> 512 shrink is the common case (the dataset's and many cameras' frames, the models' input):
    INTER_AREA at that non-integer ratio costs ~2.4 ms of CPU per frame against ~0.5 ms for bilinear, which
    on a 2-core device is CPU taken from the network, and on the validation split the two score the same
    (IoU within 0.07 points for both shipped models, see docs/model_history.md, "Shrinking 640 → 512").
    """
    factor = max(src_hw[0] / dst_hw[0], src_hw[1] / dst_hw[1])
    return cv2.INTER_AREA if factor >= AREA_FROM_FACTOR else cv2.INTER_LINEAR


class PromptSegmenter:
    """`flip_tta`: average the probabilities of the image and its horizontal and vertical mirror images (three
    network passes; for photos checked offline, where accuracy matters more than time. MODEL.md has its gain).

    `aliases`: {wording: class name or known prompt}, added to the model's own prompt table for this session
    (Vocabulary.with_aliases; VocabularyError for a bad one). One forward pass gives every class, so a site's
    own wording needs no new embedding."""

    def __init__(self, backend: InferenceBackend, flip_tta: bool = False,
                 aliases: Mapping[str, str] | None = None) -> None:
        self.backend = backend
        self.flip_tta = flip_tta
        self.metadata = backend.metadata
        self.vocabulary = self.metadata.vocabulary().with_aliases(aliases)

    @property
    def classes(self) -> list[str]:
        return list(self.metadata.classes)

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.backend.input_hw

    def resolve(self, prompts: Sequence[str]) -> list[str]:
        """Class of each prompt; UnknownPromptError (listing the known prompts) for any unknown one."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        return [self.vocabulary.resolve(p) for p in prompts]

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Any RGB (or gray/RGBA/16-bit) image -> uint8 H x W x 3 at the model's input size."""
        rgb = to_rgb_uint8(image)
        h, w = self.input_hw
        if rgb.shape[:2] == (h, w):
            return np.ascontiguousarray(rgb)
        return cv2.resize(rgb, (w, h), interpolation=resize_interpolation(rgb.shape[:2], (h, w)))

    def network(self, batch: np.ndarray) -> np.ndarray:
        """The backend call alone (uint8 N x H x W x 3 at input size -> float32 N x C x H x W)."""
        if not self.flip_tta:
            return self.backend.infer(batch)
        n = len(batch)
        probs = self.backend.infer(np.concatenate([batch, batch[:, :, ::-1], batch[:, ::-1]]))
        return (probs[:n] + probs[n:2 * n, :, :, ::-1] + probs[2 * n:, :, ::-1]) / np.float32(3)

    @staticmethod
    def postprocess(probs: np.ndarray, source_hw: tuple[int, int]) -> np.ndarray:
        """C x h x w probabilities -> C x H0 x W0 (bilinear), clipped to [0, 1]."""
        h0, w0 = source_hw
        if probs.shape[1:] == (h0, w0):
            return probs.astype(np.float32, copy=False)
        hwc = np.ascontiguousarray(probs.transpose(1, 2, 0), dtype=np.float32)
        out = cv2.resize(hwc, (w0, h0), interpolation=cv2.INTER_LINEAR)
        if out.ndim == 2:
            out = out[..., None]
        return np.clip(out.transpose(2, 0, 1), 0.0, 1.0)

    def probabilities_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not len(images):
            return []
        batch = np.stack([self.preprocess(im) for im in images])
        probs = self.network(batch)
        return [self.postprocess(p, np.asarray(im).shape[:2]) for p, im in zip(probs, images, strict=True)]

    def model_probabilities(self, image: np.ndarray) -> np.ndarray:
        """C x h x w float32 probabilities on the model's own grid (no resize back): for analysis that
        reports in source pixels itself, as the live loop's does."""
        return self.network(self.preprocess(image)[None])[0]

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """C x H0 x W0 float32 probabilities at the source size, classes in `metadata.classes` order."""
        return self.probabilities_batch([image])[0]

    def class_mask(self, probs: np.ndarray, class_name: str) -> np.ndarray:
        """Bool mask of one class from C x H x W probabilities, under the model's decision rule."""
        k = self.metadata.classes.index(class_name)
        return class_mask(probs[k], self.metadata.thresholds[class_name], self.metadata.mask_shape(class_name))

    def masks_from_probabilities(self, probs: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        classes = self.resolve(prompts)
        by_class = {cls: self.class_mask(probs, cls).view(np.uint8) * np.uint8(255) for cls in set(classes)}
        return {prompt: by_class[cls].copy() for prompt, cls in zip(prompts, classes, strict=True)}

    def masks_batch(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[dict[str, np.ndarray]]:
        self.resolve(prompts)  # fail on an unknown prompt before spending time on inference
        return [self.masks_from_probabilities(p, prompts) for p in self.probabilities_batch(images)]

    def masks(self, image: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """{prompt: uint8 {0, 255} mask at the source size}; prompts keep the caller's spelling as keys."""
        return self.masks_batch([image], prompts)[0]
