"""Layout of a single- or few-image generator's samples: does each keep its source's scan area (the fan)?

SSIM and SIFID compare local structure, so a sample that builds the fan from two side-by-side wedges, cuts it,
or shifts it can score like one that keeps it. The scan area, found as ``prepare`` finds it in real recordings,
tells them apart: a sample whose fan is its source's overlaps it almost entirely.
"""

from __future__ import annotations

import numpy as np
import torch

from sonogen.data.prepare import scan_region
from sonogen.sampling import to_uint8
from sonogen.metrics.similarity import resized


def scan_regions(images: torch.Tensor) -> np.ndarray:
    """The scan area of each image ``(N, 1, H, W)`` in [-1, 1], as bool masks ``(N, H, W)``."""
    return np.stack([scan_region(image[None]) for image in to_uint8(images)])


def nearest_scan_iou(images: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """For each image, the intersection over union of its scan area with the best-matching source's, ``(N,)``;
    the sources are resized to the images' size first (a retargeted or pyramid-limited sample)."""
    masks = scan_regions(images)[:, None]
    source_masks = scan_regions(resized(sources, images.shape[-2:]))[None]
    union = (masks | source_masks).sum(axis=(2, 3))
    iou = (masks & source_masks).sum(axis=(2, 3)) / np.maximum(union, 1)
    return torch.from_numpy(iou.max(axis=1)).float()
