"""Feature extractors for the metrics; every metric value records which extractor produced it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PIXELS_16 = "pixels-16"


def pixel_features(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Images ``(N, 1, H, W)`` in [-1, 1], area-downsampled to ``size``×``size`` and flattened.

    A fixed extractor with no weights: good enough to follow training, blind to fine texture.
    """
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1)
