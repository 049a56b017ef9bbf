"""Load one labelled example: the decoded image and its rasterised mask at native size."""

from __future__ import annotations

import numpy as np

from drywallqa.imageio import read_image_rgb
from drywallqa.train.data.labels import ParsedLabels, rasterize, read_yolo_labels
from drywallqa.train.data.sources import ImageRecord


def load_example(record: ImageRecord, box_strategy: str = "filled_box") -> tuple[np.ndarray, np.ndarray, ParsedLabels]:
    """Returns (RGB uint8 H x W x 3, mask uint8 {0,255} H x W, parsed labels with any issues)."""
    image = read_image_rgb(record.image_path)
    h, w = image.shape[:2]
    labels = read_yolo_labels(record.label_path, w, h)
    return image, rasterize(labels.objects, h, w, box_strategy), labels
