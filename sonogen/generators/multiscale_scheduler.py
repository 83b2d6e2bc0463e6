"""SinDDM's noise and blur schedule (Kulikov et al., ICML 2023) behind the diffusers scheduler interface
(``set_timesteps``, ``step``, ``add_noise``), so the denoiser holds no schedule maths.

All scales share one cosine noise schedule of ``T`` steps. Scale 0, the coarsest, is plain DDPM. A finer scale
``s`` starts from ``x̃``, the bilinear upsample of the sample one scale below; its distance to the truth is the
scale's *blur gap* ``δ_s`` (the RMS difference between the training image at that scale and the upsample of the
scale below, in model units). With the noise-to-signal ratio ``σ_t = √(1 − ᾱ_t) / √ᾱ_t``:

- scale ``s`` trains and samples only the steps ``t < T_s``, where ``T_s`` is the first step whose ``σ_t``
  exceeds ``δ_s``: more noise than that would wipe out information the coarser scale already fixed;
- its clean target is the mix ``γ_t x̃ + (1 − γ_t) x`` with ``γ_t = min(σ_t / δ_s, 1)``: mostly the blurred
  image while the noise is strong, the sharp one as ``t → 0``;
- sampling noises ``x̃`` to step ``T_s − 1`` (a strength below 1 starts lower), clamps ``γ_t`` to ``≤ 0.55``
  and steps deterministically, as the reference implementation does (its posterior variance weight ω defaults
  to 0).

The reference measures the blur gap as ``‖x − x̃‖₂ / numel`` on 0–255 pixels; the RMS in model units used here
is the quantity that ``σ_t`` is compared with (both are standard deviations of the same image scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def cosine_alphas_cumprod(timesteps: int, offset: float = 0.008) -> np.ndarray:
    """``ᾱ_t`` of the cosine schedule (Nichol & Dhariwal, 2021), with each ``β_t`` clipped at 0.999."""
    x = np.linspace(0, timesteps, timesteps + 1) / timesteps
    curve = np.cos((x + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = np.clip(1 - curve[1:] / curve[:-1], 0, 0.999)
    return np.cumprod(1 - betas)


@dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class MultiScaleScheduler:
    def __init__(self, num_train_timesteps: int = 100, blur_gaps: Sequence[float] = (), gamma_clamp: float = 0.55):
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
        if any(gap <= 0 for gap in blur_gaps):
            raise ValueError(f"blur gaps must be positive, got {list(blur_gaps)}")
        self.num_train_timesteps = num_train_timesteps
        self.blur_gaps = [float(gap) for gap in blur_gaps]
        self.gamma_clamp = gamma_clamp
        alphas_cumprod = cosine_alphas_cumprod(num_train_timesteps)
        self.noise_to_signal = np.sqrt(1 - alphas_cumprod) / np.sqrt(alphas_cumprod)
        self.alphas_cumprod = torch.tensor(alphas_cumprod, dtype=torch.float64)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        betas = 1 - self.alphas_cumprod / previous
        self.posterior_variance = betas * (1 - previous) / (1 - self.alphas_cumprod)
        self.posterior_coef_original = betas * previous.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_coef_sample = (1 - previous) * (1 - betas).sqrt() / (1 - self.alphas_cumprod)
        self.scale = 0
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    @property
    def n_scales(self) -> int:
        return len(self.blur_gaps) + 1

    def _check_scale(self, scale: int) -> None:
        if not 0 <= scale < self.n_scales:
            raise ValueError(f"scale must be in [0, {self.n_scales - 1}], got {scale}")

    def train_timesteps(self, scale: int) -> int:
        """``T_s``: the steps scale ``s`` is trained and sampled on (all ``T`` at scale 0)."""
        self._check_scale(scale)
        if scale == 0:
            return self.num_train_timesteps
        above = np.nonzero(self.noise_to_signal > self.blur_gaps[scale - 1])[0]
        return max(1, int(above[0])) if len(above) else self.num_train_timesteps

    def gammas(self, scale: int, clamp: bool = False) -> torch.Tensor:
        """``γ_t`` for every step of a scale > 0 (the weight of the blurred image in the clean target)."""
        self._check_scale(scale)
        if scale == 0:
            raise ValueError("scale 0 has no coarser scale to blend with")
        gammas = torch.tensor(self.noise_to_signal / self.blur_gaps[scale - 1]).clamp(0, 1)
        return gammas.clamp(max=self.gamma_clamp) if clamp else gammas

    @staticmethod
    def _per_image(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values[timesteps.cpu()].to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``q(x_t | x_0) = √ᾱ_t x_0 + √(1 − ᾱ_t) ε``, one step per image."""
        scale = self._per_image(self.alphas_cumprod, timesteps, original_samples)
        return scale.sqrt() * original_samples + (1 - scale).sqrt() * noise

    def training_target(self, clean: torch.Tensor, blurred: torch.Tensor, timesteps: torch.Tensor,
                        scale: int) -> torch.Tensor:
        """The clean image the noise is added to: ``clean`` at scale 0, else its blend with ``blurred``."""
        if scale == 0:
            return clean
        gamma = self._per_image(self.gammas(scale), timesteps, clean)
        return gamma * blurred + (1 - gamma) * clean

    def start_timestep(self, scale: int, strength: float = 1.0) -> int:
        """The step sampling at ``scale`` starts from: ``T_s − 1``, or ``strength`` of the way up (as diffusers'
        image-to-image strength: less noise on the image sampling starts from keeps more of it)."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        return max(1, round(strength * self.train_timesteps(scale))) - 1

    def set_timesteps(self, scale: int = 0, strength: float = 1.0) -> None:
        """Prepares sampling at ``scale``: ``timesteps`` runs from its start step down to 0."""
        self.scale = scale
        self.timesteps = torch.arange(self.start_timestep(scale, strength), -1, -1)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             blurred: torch.Tensor | None = None,
             generator: torch.Generator | list[torch.Generator] | None = None) -> SchedulerOutput:
        """``x_{t-1}`` from ``x_t`` and the predicted noise at the scale ``set_timesteps`` chose; ``blurred``
        (the upsampled coarser sample) is needed at scales > 0; ``generator`` (one per image, or one for the
        batch) draws scale 0's noise on the CPU so every device gives the same samples."""
        t = int(timestep)
        a_t = float(self.alphas_cumprod[t])
        predicted = (sample - math.sqrt(1 - a_t) * model_output) / math.sqrt(a_t)
        if self.scale == 0:
            original = predicted.clamp(-1, 1)
            mean = float(self.posterior_coef_original[t]) * original + float(self.posterior_coef_sample[t]) * sample
            if t == 0:
                return SchedulerOutput(mean, original)
            noise = _randn(sample, generator)
            return SchedulerOutput(mean + math.sqrt(float(self.posterior_variance[t])) * noise, original)
        if blurred is None:
            raise ValueError(f"scale {self.scale} needs the upsampled coarser sample (blurred=...)")
        gammas = self.gammas(self.scale, clamp=True)
        sharp = (predicted - float(gammas[t]) * blurred) / (1 - float(gammas[t]))
        if t == 0:
            original = sharp.clamp(-1, 1)
            return SchedulerOutput(original, original)
        blend_previous = (float(gammas[t - 1]) * blurred + (1 - float(gammas[t - 1])) * sharp).clamp(-1, 1)
        a_prev = float(self.alphas_cumprod[t - 1])
        direction = (sample - math.sqrt(a_t) * predicted.clamp(-1, 1)) / math.sqrt(1 - a_t)
        return SchedulerOutput(math.sqrt(a_prev) * blend_previous + math.sqrt(1 - a_prev) * direction,
                               sharp.clamp(-1, 1))


def _randn(like: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    if isinstance(generator, list):
        noise = torch.stack([torch.randn(like.shape[1:], generator=g) for g in generator])
    else:
        noise = torch.randn(like.shape, generator=generator)
    return noise.to(like.device, like.dtype)
