"""Structural similarity from torchmetrics: SSIM (Wang et al., IEEE TIP 13, 2004) and MS-SSIM (Wang, Simoncelli
& Bovik, Asilomar 2003), per image pair and as the mean over random pairs of one set.

The mean pairwise MS-SSIM of a set measures its diversity (Odena et al., ICML 2017): a collapsed generator
repeats itself and scores near 1, so a synthetic set should score no higher than the real set it imitates.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

# the five per-scale exponents of Wang et al. (2003), finest scale first
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
KERNEL = 11  # Gaussian window, sigma 1.5, as in both papers


def resized(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, 1, H, W)`` images at ``size`` (antialiased bilinear), unchanged when already there."""
    if tuple(images.shape[-2:]) == tuple(size) or not len(images):
        return images
    return torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", antialias=True,
                                           align_corners=False)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of each pair of images ``(N, 1, H, W)`` in [-1, 1], shape ``(N,)``."""
    return structural_similarity_index_measure(a.float(), b.float(), data_range=2.0, reduction="none")


def ssim_to_references(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """SSIM of every image with every one of ``references`` (resized to the image's size when a retargeted
    sample differs), shape ``(R, N)``."""
    references = resized(references, images.shape[-2:])
    return torch.stack([ssim(images, reference.expand_as(images)) for reference in references])


def nearest_ssim(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """For each image, its SSIM with the most similar of ``references``, shape ``(N,)``."""
    return ssim_to_references(images, references).amax(dim=0)


def ms_ssim_scales(size: int) -> int:
    """How many of the five scales an image side allows: every scale must stay wider than the window."""
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and size // max(1, scales) ** 2 > KERNEL - 1 and size >= 2 ** (scales + 1):
        scales += 1
    return scales


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of each pair, shape ``(N,)``. Images under 161 px cannot hold five scales: the coarsest are
    dropped and the remaining exponents rescaled to sum to one, so small test images still get a value."""
    scales = ms_ssim_scales(min(a.shape[-2:]))
    weights = MS_SSIM_WEIGHTS[:scales]
    betas = tuple(w / sum(weights) for w in weights)
    return multiscale_structural_similarity_index_measure(
        a.float(), b.float(), data_range=2.0, betas=betas, reduction="none", normalize="relu"
    )


def mean_pairwise_ms_ssim(images: torch.Tensor, pairs: int = 256, seed: int = 0) -> float:
    """Mean MS-SSIM over ``pairs`` random pairs of distinct images of one set (its diversity; lower is more
    diverse)."""
    if len(images) < 2:
        raise ValueError("diversity needs at least two images")
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, len(images), (pairs,), generator=generator)
    second = (first + torch.randint(1, len(images), (pairs,), generator=generator)) % len(images)
    return float(ms_ssim(images[first], images[second]).mean())
