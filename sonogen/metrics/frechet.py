"""Fréchet distances between feature distributions: FID for image sets, SIFID for single images."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    Dowson & Landau, J. Multivariate Analysis 12 (1982); used as FID by Heusel et al., NeurIPS 2017:
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``. When the product is singular (fewer
    samples than dimensions) ``eps`` is added to both diagonals, as the reference implementation does.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shapes differ: {mu1.shape} vs {mu2.shape}, {sigma1.shape} vs {sigma2.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular products are handled below
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.abs(covmean.imag).max():.3g} in the matrix square root")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least two feature vectors (N, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray) -> float:
    """Fréchet Inception Distance between two sets of feature vectors ``(N, D)`` (Heusel et al., 2017)."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


def sifid(real_map: torch.Tensor | np.ndarray, fake_map: torch.Tensor | np.ndarray) -> float:
    """Single-image FID (Shaham et al., SinGAN, ICCV 2019): the Fréchet distance between the distributions of
    feature vectors at every spatial position of one real and one generated feature map ``(C, H, W)``."""
    real_map, fake_map = np.asarray(real_map), np.asarray(fake_map)
    if real_map.ndim != 3 or fake_map.ndim != 3 or real_map.shape[0] != fake_map.shape[0]:
        raise ValueError(f"need two (C, H, W) maps with the same C, got {real_map.shape} and {fake_map.shape}")
    return fid(real_map.reshape(real_map.shape[0], -1).T, fake_map.reshape(fake_map.shape[0], -1).T)
