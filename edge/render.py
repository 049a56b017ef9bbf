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


def draw_masks(image: np.ndarray, masks: dict[str, np.ndarray], alpha: float = 0.45) -> np.ndarray:
    """RGB image + {class_name: 0/1 or 0/255 mask} -> RGB image with tinted masks and outlines."""
    out = image.copy()
    for i, (name, mask) in enumerate(masks.items()):
        m = mask > 0
        if not m.any():
            continue
        color = np.array(color_for(name, i), np.float32)
        out[m] = (out[m].astype(np.float32) * (1 - alpha) + color * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), 1)
    return out


def jpeg_b64(image_rgb: np.ndarray, max_side: int = 640, quality: int = 80) -> str:
    h, w = image_rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        image_rgb = cv2.resize(image_rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")
