"""DCGAN for single-channel ultrasound, after Yu et al., "How good are synthetic medical images? An empirical
study with lung ultrasound" (Global Health Labs): one GAN per label, 100-d latent, 2048-channel 4×4 seed,
ConvTranspose/BatchNorm/ReLU up-sampling without biases, a dropout discriminator, BCE on logits.

The number of blocks follows the image size (4 · 2^k), so the 256 px paper network and 32/64/128 px variants
share this code; ``base_channels`` (64 in the paper) scales the widths for tiny test models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sonogen.generators.base import Generator
from sonogen.generators.families import register_family
from sonogen.sampling import gaussian_latents


@dataclass
class DCGANConfig:
    label: str
    image_size: int = 256
    latent_dim: int = 100
    base_channels: int = 64
    dropout: float = 0.25
    lr_generator: float = 1e-5
    lr_discriminator: float = 5e-6
    betas: tuple[float, float] = (0.5, 0.999)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.image_size < 16 or 2 ** round(math.log2(self.image_size)) != self.image_size:
            raise ValueError(f"DCGAN image_size must be a power of two ≥ 16, got {self.image_size}")
        if self.latent_dim < 1 or self.base_channels < 1:
            raise ValueError("latent_dim and base_channels must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def widths(self) -> list[int]:
        """Channels from the 4×4 seed to the last block: [2048, 1024, …, 64] at 256 px."""
        blocks = int(math.log2(self.image_size)) - 2
        return [self.base_channels * 2**k for k in reversed(range(blocks))]


def generator_flops(config: DCGANConfig) -> float:
    """Forward FLOPs (2 per multiply-add) of the generator for one image; 5.41 GFLOP for the 256 px paper net."""
    widths = config.widths + [1]
    macs = config.latent_dim * widths[0] * 16  # 1×1 → 4×4
    side = 4
    for c_in, c_out in zip(widths, widths[1:]):
        macs += c_in * c_out * 16 * side * side  # every input pixel scatters a 4×4 kernel
        side *= 2
    return 2.0 * macs


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGANGenerator(nn.Module):
    def __init__(self, config: DCGANConfig):
        super().__init__()
        widths = config.widths
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(config.latent_dim, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], 1, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])


# A transposed convolution (kernel 4, stride 2, padding 1) writes output row 2i + phase from input rows i - 1, i
# (phase 0: kernel rows 3, 1) or i, i + 1 (phase 1: kernel rows 2, 0): (phase, row of a 3-row window) → kernel row
_PHASE_TAPS = {(0, 0): 3, (0, 1): 1, (1, 1): 2, (1, 2): 0}


def _fold_batch_norm(weight: torch.Tensor, norm: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A transposed convolution's weight ``(in, out, k, k)`` and bias with the BatchNorm after it folded in."""
    if norm is None:
        return weight, weight.new_zeros(weight.shape[1])
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return weight * scale[None, :, None, None], norm.bias - norm.running_mean * scale


class ConvolutionalDCGANGenerator(nn.Module):
    """The function of a ``DCGANGenerator`` in eval mode, built from a linear layer and stride-1 3×3 convolutions
    whose four output phases a pixel shuffle interleaves, with the BatchNorms folded in.

    ONNX Runtime quantises convolutions to int8 but leaves transposed convolutions in float between its
    (de)quantise nodes; this form runs every layer in int8, at 2.25× the multiply-adds (each phase reads 4 of
    the window's 9 taps).
    """

    def __init__(self, generator: DCGANGenerator):
        super().__init__()
        layers = list(generator.net)
        transposed = [i for i, layer in enumerate(layers) if isinstance(layer, nn.ConvTranspose2d)]
        with torch.no_grad():
            weight, bias = _fold_batch_norm(layers[0].weight, layers[1])
            self.seed_channels = weight.shape[1]
            self.seed = nn.Linear(weight.shape[0], weight[0].numel())
            self.seed.weight.copy_(weight.flatten(1).T)
            self.seed.bias.copy_(bias.repeat_interleave(weight[0, 0].numel()))
            blocks: list[nn.Module] = []
            for index in transposed[1:]:
                norm = layers[index + 1] if isinstance(layers[index + 1], nn.BatchNorm2d) else None
                weight, bias = _fold_batch_norm(layers[index].weight, norm)
                c_in, c_out = weight.shape[:2]
                kernel = weight.new_zeros(c_out, 2, 2, c_in, 3, 3)
                for (row_phase, row), kernel_row in _PHASE_TAPS.items():
                    for (col_phase, col), kernel_col in _PHASE_TAPS.items():
                        kernel[:, row_phase, col_phase, :, row, col] = weight[:, :, kernel_row, kernel_col].T
                conv = nn.Conv2d(c_in, 4 * c_out, 3, padding=1)
                conv.weight.copy_(kernel.flatten(0, 2))
                conv.bias.copy_(bias.repeat_interleave(4))
                blocks += [conv, nn.PixelShuffle(2), nn.ReLU() if norm is not None else nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(torch.relu(self.seed(z)).unflatten(1, (self.seed_channels, 4, 4)))


class DCGANDiscriminator(nn.Module):
    def __init__(self, config: DCGANConfig):
        super().__init__()
        widths = list(reversed(config.widths))  # 64, 128, …, 2048
        layers: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(zip([1] + widths, widths)):
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False))
            if index > 0:
                layers.append(nn.BatchNorm2d(c_out))
            layers += [nn.LeakyReLU(0.2, True), nn.Dropout(config.dropout)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten()


@register_family
class DCGAN(Generator):
    family = "dcgan"
    config_class = DCGANConfig
    conditions = frozenset({"label"})
    keeps_best_epoch = True  # as Yu et al. picked theirs: its last epoch may copy or collapse

    def __init__(self, config: DCGANConfig):
        super().__init__(config)
        self.generator = DCGANGenerator(config)
        self.discriminator = DCGANDiscriminator(config)
        self._optimizers: dict[str, torch.optim.Optimizer] | None = None

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._optimizers is None:
            c = self.config
            self._optimizers = {
                "generator": torch.optim.Adam(self.generator.parameters(), lr=c.lr_generator, betas=c.betas),
                "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=c.lr_discriminator, betas=c.betas),
            }
        return self._optimizers

    def latents(self, n: int, seed: int) -> torch.Tensor:
        return torch.from_numpy(gaussian_latents(seed, n, self.config.latent_dim))

    def generate(self, n: int, seed: int, condition: dict[str, Any]) -> torch.Tensor:
        return self.generator(self.latents(n, seed).to(self.device))

    def generate_draws(self, draws, condition: dict[str, Any]) -> tuple[torch.Tensor, None]:
        latents = torch.cat([self.latents(n, seed) for n, seed in draws])
        return self.generator(latents.to(self.device)), None

    def sampling_network(self) -> tuple[nn.Module, torch.Tensor]:
        return self.generator, self.latents(2, 0)

    def int8_sampling_network(self) -> tuple[nn.Module, torch.Tensor]:
        return ConvolutionalDCGANGenerator(self.generator), self.latents(2, 0)

    def train_step(self, images: torch.Tensor) -> dict[str, float]:
        optimizers = self.optimizers()
        batch = images.shape[0]
        ones = torch.ones(batch, device=images.device)
        zeros = torch.zeros(batch, device=images.device)
        generator, discriminator = self.parallel(self.generator), self.parallel(self.discriminator)
        fake = generator(self.randn((batch, self.config.latent_dim), images.device))

        optimizers["discriminator"].zero_grad(set_to_none=True)
        real_logits = discriminator(images)
        fake_logits = discriminator(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(real_logits.float(), ones) + F.binary_cross_entropy_with_logits(
            fake_logits.float(), zeros
        )
        loss_d.backward()
        optimizers["discriminator"].step()

        optimizers["generator"].zero_grad(set_to_none=True)
        loss_g = F.binary_cross_entropy_with_logits(discriminator(fake).float(), ones)
        loss_g.backward()
        optimizers["generator"].step()
        self.step += 1
        return {
            "loss_generator": loss_g.item(),
            "loss_discriminator": loss_d.item(),
            "d_real": torch.sigmoid(real_logits.detach().float()).mean().item(),
            "d_fake": torch.sigmoid(fake_logits.detach().float()).mean().item(),
        }
