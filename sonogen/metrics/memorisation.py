"""Memorisation: how close generated images come to the training images they were learned from.

Each synthetic sample's distance to its nearest training sample is divided by the typical distance between a
*real* image and its nearest training image (the held-out real images when given, else each training image's
nearest other training image). A ratio near 1 is what a new real image looks like; near 0 is a copy. It is
the nearest-neighbour memorisation check common in generative-model evaluation (compare the "authenticity" of
Alaa et al., "How faithful is your synthetic data?", ICML 2022).
"""

from __future__ import annotations

import numpy as np
import torch

from sonogen.sampling import to_uint8


def _nearest(queries: torch.Tensor, references: torch.Tensor, exclude_self: bool = False):
    distances = torch.cdist(queries.double(), references.double())
    if exclude_self:
        distances.fill_diagonal_(float("inf"))
    return distances.min(dim=1)


def memorisation(
    train: torch.Tensor,
    synthetic: torch.Tensor,
    holdout: torch.Tensor | None = None,
    near_copy_ratio: float = 0.5,
) -> dict:
    """Nearest-training-sample ratios of ``synthetic`` feature vectors ``(N, D)``.

    Returns the per-sample ``ratios`` and ``nearest`` training indices, their median and minimum, the
    ``near_copy_fraction`` (ratio below ``near_copy_ratio``), and the ``baseline`` real-to-train distance.
    """
    if len(train) < 2 or len(synthetic) < 1:
        raise ValueError("memorisation needs at least two training samples and one synthetic sample")
    if holdout is not None and len(holdout):
        reference = _nearest(holdout, train).values
    else:
        reference = _nearest(train, train, exclude_self=True).values
    baseline = float(reference.median())
    if baseline <= 0:
        raise ValueError("the real-to-train nearest-neighbour distance is zero: duplicated real images?")
    distances, nearest = _nearest(synthetic, train)
    ratios = distances / baseline
    return {
        "baseline": baseline,
        "median_ratio": float(ratios.median()),
        "min_ratio": float(ratios.min()),
        "near_copy_fraction": float((ratios < near_copy_ratio).double().mean()),
        "near_copy_ratio": near_copy_ratio,
        "ratios": ratios.tolist(),
        "nearest": nearest.tolist(),
    }


def closest_pairs(synthetic: torch.Tensor, train: torch.Tensor, result: dict, k: int = 8) -> np.ndarray:
    """A uint8 review sheet: the ``k`` synthetic images closest to training images (top row) above the
    training image each is closest to (bottom row). Images are ``(N, 1, H, W)`` in [-1, 1]."""
    order = np.argsort(result["ratios"])[:k]
    top = to_uint8(synthetic[order])
    bottom = to_uint8(train[[result["nearest"][i] for i in order]])
    h, w = top.shape[1:]
    sheet = np.zeros((2 * h + 6, len(order) * (w + 2) + 2), dtype=np.uint8)
    for column, (a, b) in enumerate(zip(top, bottom)):
        x = 2 + column * (w + 2)
        sheet[2 : 2 + h, x : x + w] = a
        sheet[4 + h : 4 + 2 * h, x : x + w] = b
    return sheet
