"""The networks of the multi-scale diffusion families (SinDDM, FewDDM): one fully convolutional denoiser for every
scale of an image pyramid, told the step and the scale through a joint embedding, and the pyramid itself."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def build_pyramid(image: torch.Tensor, sizes: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(clean, blurred)`` per scale of one ``(1, H, W)`` image: ``clean`` resized with an antialiased bicubic
    filter, ``blurred`` the bilinear upsample of the clean scale below (None at scale 0)."""
    cleans = [F.interpolate(image[None].double(), size=size, mode="bicubic", antialias=True, align_corners=False)
              .clamp(-1, 1).float()[0] for size in sizes]
    return [(clean, None if k == 0 else upsample(cleans[k - 1][None], sizes[k])[0]) for k, clean in enumerate(cleans)]


def upsample(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def sinusoidal_embedding(values: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    frequencies = torch.exp(-math.log(10_000) * torch.arange(half, device=values.device) / (half - 1))
    angles = values.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class DenoiserBlock(nn.Module):
    """Depthwise 5×5, plus the step/scale embedding, then 3×3 → GELU → 3×3, with a 1×1 residual."""

    def __init__(self, c_in: int, c_out: int, embedding_dim: int):
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 5, padding=2, groups=c_in)
        self.embedding = nn.Sequential(nn.GELU(), nn.Linear(embedding_dim, c_in))
        self.convs = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GELU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.residual = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x) + self.embedding(embedding)[:, :, None, None]
        return self.convs(h) + self.residual(x)


class MultiScaleDenoiser(nn.Module):
    """Predicts the noise in ``x`` at step ``t`` of ``scale``: channels in → C/2 → C → C → C/2 → 1×1 → out."""

    EMBEDDING = 32  # each of the step and scale sinusoids; the MLP maps their 64 to 128 to 32

    def __init__(self, channels: int = 160, image_channels: int = 1, sources: int = 0):
        super().__init__()
        half, e = channels // 2, self.EMBEDDING
        self.mlp = nn.Sequential(nn.Linear(2 * e, 4 * e), nn.GELU(), nn.Linear(4 * e, e))
        # one vector per training image, added to the step/scale embedding; nn.Embedding's N(0, 1) start is large
        # beside the MLP's output, so it is used at once (from zero, a toy run needed several times the steps)
        self.source_embedding = nn.Embedding(sources, e) if sources else None
        widths = [image_channels, half, channels, channels, half]
        self.blocks = nn.ModuleList(DenoiserBlock(a, b, e) for a, b in zip(widths, widths[1:]))
        self.out = nn.Conv2d(half, image_channels, 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, scale: int,
                sources: torch.Tensor | None = None) -> torch.Tensor:
        scales = torch.full_like(timesteps, scale)
        embedding = self.mlp(torch.cat([sinusoidal_embedding(timesteps, self.EMBEDDING),
                                        sinusoidal_embedding(scales, self.EMBEDDING)], dim=1))
        if sources is not None:
            embedding = embedding + self.source_embedding(sources)
        for block in self.blocks:
            x = block(x, embedding)
        return self.out(x)


@dataclass
class ScaleBatch:
    """One training batch: ``clean`` copies of the ``source``-th image at ``scale``, and their blurred
    counterparts."""

    scale: int
    clean: torch.Tensor
    blurred: torch.Tensor | None
    source: int = 0
