"""Annotated frames: masks drawn over the image, encoded as small base64 JPEGs for MQTT."""

from __future__ import annotations

import base64

import cv2
import numpy as np

# RGB colours per class (others cycle through the palette)
PALETTE = {"crack": (230, 40, 40), "taping": (40, 120, 240)}
_FALLBACK = [(40, 200, 80), (240, 200, 40), (200, 40, 200), (40, 200, 200)]


def color_for(class_name: str, index: int = 0) -> tuple[int, int, int]:
    return PALETTE.get(class_name, _FALLBACK[index % len(_FALLBACK)])


def draw_masks(image: np.ndarray, masks: dict[str, np.ndarray], alpha: float = 0.45,
               max_side: int | None = None) -> np.ndarray:
    """RGB image + {class_name: 0/1 or 0/255 mask} -> RGB image with tinted masks and outlines.

    Masks may be on another grid than the image (the model's): they are scaled to the drawing with nearest
    neighbour. With `max_side` the image is shrunk first, so a small preview costs a small drawing.
    """
    out = shrink_to(image, max_side) if max_side else image
    if out is image:
        out = image.copy()  # never draw on the caller's frame
    oh, ow = out.shape[:2]
    for i, (name, mask) in enumerate(masks.items()):
        if mask.shape[:2] != (oh, ow):
            mask = cv2.resize(mask.astype(np.uint8, copy=False), (ow, oh), interpolation=cv2.INTER_NEAREST)
        m = (mask > 0).view(np.uint8)
        if not cv2.countNonZero(m):
            continue
        color = color_for(name, i)
        tinted = cv2.addWeighted(out, 1 - alpha, np.full_like(out, color), alpha, 0)
        cv2.copyTo(tinted, m, out)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, color, 1)
    return out


def shrink_to(image: np.ndarray, max_side: int) -> np.ndarray:
    """The image scaled down (pixel averaging) so its longer side is at most `max_side`; the image itself
    when it already fits."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return image
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def jpeg_b64(image_rgb: np.ndarray, max_side: int = 640, quality: int = 80) -> str:
    image_rgb = shrink_to(image_rgb, max_side)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")
