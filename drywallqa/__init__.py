"""DrywallQA: text-prompted crack and drywall-taping segmentation for photos and live cameras."""

__version__ = "0.1.0"
