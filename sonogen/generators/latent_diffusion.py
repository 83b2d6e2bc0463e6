"""Latent diffusion on diffusers and peft (Basarab et al.; Wen et al.): the ``ldm`` family.

Its three modes, from scratch, fine-tuning a Stable Diffusion checkpoint (in full or with LoRA) and a ControlNet,
differ only in the networks they start from, what learns and what conditions each image: ``ldm_modes``. The
networks and their persistence as a diffusers pipeline folder are ``ldm_networks``. This file is the training
step (with the autoencoder phase of a from-scratch model, EMA and min-SNR weighting), the held-out losses, the
request checks and the sampling.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sonogen.data.manifest import mask_from_boxes
from sonogen.generators.base import CONFIG, Generator, batch_indices, image_generators
from sonogen.generators.families import register_family
from sonogen.generators.ldm_modes import MODES, ControlMaps, blank_control, mode_of
from sonogen.generators.ldm_networks import SCHEDULERS, AutoencoderStep, posterior_sample
from sonogen.sampling import decode_png, gaussian_latents

CONTROL_SOURCES = ("mask", "boxes")
MAX_GUIDANCE = 20.0
MAX_PROMPT = 500


@dataclass
class LatentDiffusionConfig:
    label: str  # the default label of samples (and of the gates); the model learns every label in `labels`
    mode: str = "from-scratch"
    labels: tuple[str, ...] = ()  # empty: every label of the training data
    image_size: int = 64
    base_model: str = ""  # fine-tune / controlnet: a diffusers SD folder or s3:// URI, or a saved ldm generator
    base_licence: str = ""
    base_origin: str = ""  # on a saved ldm: the checkpoint under that ldm, if any, whose licence this model keeps
    lora_rank: int = 0  # fine-tune: 0 trains the whole UNet
    control: str = "mask"  # controlnet: condition on the dataset's masks or on its boxes, filled
    prompt_template: str = "ultrasound, {label}"
    # from-scratch networks: the autoencoder halves the size once per channel entry after the first
    vae_channels: tuple[int, ...] = (32, 64, 128)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128, 256)
    layers_per_block: int = 1
    embedding_dim: int = 128
    max_labels: int = 8
    vae_steps: int = 500  # from-scratch: steps spent on the autoencoder before the latent UNet
    kl_weight: float = 1e-6
    # training
    lr: float = 1e-4
    lr_vae: float = 1e-3
    label_dropout: float = 0.1  # the unconditional branch classifier-free guidance needs
    snr_gamma: float = 0.0  # > 0: min-SNR-γ loss weighting
    ema_decay: float = 0.999  # 0: no EMA
    gradient_checkpointing: bool = False
    train_timesteps: int = 1000
    # sampling defaults (requests may choose within bounds)
    scheduler: str = "dpmpp"
    steps: int = 25
    guidance_scale: float = 2.0

    def __post_init__(self):
        self.labels, self.vae_channels, self.unet_channels = (
            tuple(self.labels), tuple(self.vae_channels), tuple(self.unet_channels))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "from-scratch" and not self.base_model:
            raise ValueError(f"mode {self.mode} needs base_model: a diffusers Stable Diffusion folder or s3:// URI "
                             "(or, for controlnet, a trained ldm generator folder)")
        if self.control not in CONTROL_SOURCES:
            raise ValueError(f"control must be one of {CONTROL_SOURCES}, got {self.control!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.lora_rank < 0 or (self.lora_rank and self.mode != "fine-tune"):
            raise ValueError("lora_rank is a fine-tune option and must be ≥ 0")
        multiple = 2 ** (len(self.vae_channels) + len(self.unet_channels) - 2)  # autoencoder, then UNet levels
        if self.mode == "from-scratch" and self.image_size % multiple:
            raise ValueError(f"image_size {self.image_size} must be a multiple of {multiple}")
        if "{label}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {label}")
        if not 0 <= self.label_dropout < 1 or not 0 <= self.ema_decay < 1:
            raise ValueError("label_dropout and ema_decay must be in [0, 1)")


def decode_mask(value: Any, size: int) -> torch.Tensor:
    """A mask condition as ``(size, size)`` float {0, 1} (nonzero is inside)."""
    return torch.from_numpy(decode_png(value, size, "mask") > 0).float()


@register_family
class LatentDiffusion(Generator):
    family = "ldm"
    config_class = LatentDiffusionConfig
    conditions = frozenset({"label", "prompt", "mask", "steps", "guidance_scale", "scheduler"})
    gate_variants = MODES  # a ControlNet has its masks to follow, a from-scratch model none

    def __init__(self, config: LatentDiffusionConfig, folder: Path | None = None, control_maps: ControlMaps | None = None):
        """A new model in ``config.mode``, or the one saved in ``folder``; ``control_maps`` replaces a ControlNet's
        masks or boxes with what a family composing this one renders."""
        super().__init__(config)
        self.mode = mode_of(config, control_maps)
        self.nets = self.mode.networks(config, folder)
        self.ema = None
        self._optimizers: dict[str, torch.optim.Optimizer] | None = None
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(self.nets.scheduler_config)
        for module in self.nets.modules().values():
            module.requires_grad_(False)
        for module in self.mode.trained(self.nets):
            for name, parameter in module.named_parameters():
                parameter.requires_grad_(not config.lora_rank or "lora_" in name)
        if self.mode.trains_autoencoder:
            self.vae.requires_grad_(True)  # trained first; later encoded without gradients
        self._autoencoder_step = AutoencoderStep(self.vae)

    # the networks, by name (diffusers' own objects)
    vae = property(lambda self: self.nets.vae)
    unet = property(lambda self: self.nets.unet)
    text_encoder = property(lambda self: self.nets.text_encoder)
    label_embedding = property(lambda self: self.nets.label_embedding)
    controlnet = property(lambda self: self.nets.controlnet)

    @property
    def gate_set(self) -> str:
        return f"{self.family}-{self.config.mode}" if self.gate_variants else self.family

    def networks(self) -> dict[str, nn.Module]:
        return self.nets.modules()

    def _trained_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.mode.trained(self.nets) for p in m.parameters() if p.requires_grad]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._optimizers is None:
            self._optimizers = {"denoiser": torch.optim.AdamW(self._trained_parameters(), lr=self.config.lr)}
            if self.mode.trains_autoencoder:
                self._optimizers["vae"] = torch.optim.AdamW(self.vae.parameters(), lr=self.config.lr_vae)
        return self._optimizers

    def sampling_labels(self) -> tuple[str, ...]:
        return self.config.labels or (self.config.label,)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def draws_requested_lesions(self) -> bool:
        return self.accepts_condition("mask")

    def lesion_request(self, mask: torch.Tensor, boxes: list[list[int]]) -> dict[str, Any] | None:
        """A ControlNet on masks is asked for the mask; one on boxes for the boxes filled, the condition it
        learned (a lesion without boxes cannot be asked for)."""
        if self.config.control == "boxes":
            if not boxes:
                return None
            mask = torch.from_numpy(mask_from_boxes(boxes, *mask.shape[-2:])).float()
        return {"mask": mask.reshape(mask.shape[-2:]).numpy()}

    def _embed(self, labels: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        return self.nets.embed(labels, self.device, self.sampling_labels(), self.config.prompt_template, prompts)

    # training ------------------------------------------------------------------------------------------------

    def training_labels(self, dataset_labels: list[str]) -> list[str]:
        if not self.config.labels:
            self.config.labels = tuple(dataset_labels)
        if len(self.config.labels) > self.config.max_labels:
            raise ValueError(f"{len(self.config.labels)} labels; this ldm embeds at most {self.config.max_labels}")
        if self.config.label not in self.config.labels:
            raise ValueError(f"label {self.config.label!r} is not among the learned labels {self.config.labels}")
        return list(self.config.labels)

    def begin_training(self, images: torch.Tensor, total_steps: int, items: Sequence[dict] = ()) -> None:
        super().begin_training(images, total_steps, items)
        from diffusers.training_utils import EMAModel

        c = self.config
        if self.mode.trains_autoencoder and c.vae_steps >= total_steps:
            raise ValueError(f"vae_steps {c.vae_steps} leaves none of the {total_steps} steps to the latent UNet")
        self._labels = torch.tensor([c.labels.index(item["label"]) + 1 for item in items])
        maps = self.mode.control_maps(c, images, items)
        self._maps = None if maps is None else maps.to(self.device)
        if self._maps is not None and not self._maps.any():
            raise ValueError(blank_control(c.control, items))
        self._scale_images = images[:64]
        if c.gradient_checkpointing:
            for module in self.mode.trained(self.nets):
                if hasattr(module, "enable_gradient_checkpointing"):
                    module.enable_gradient_checkpointing()
        if c.ema_decay:
            # foreach: one fused update, not a Python loop over parameters (6 of 90 ms per H100 step)
            self.ema = EMAModel(self._trained_parameters(), decay=c.ema_decay, foreach=True)
            self.ema.to(self.device)
        self._set_latent_scale()

    def training_batches(self, images: torch.Tensor, batch_size: int, steps: int | None,
                         generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        for indices in batch_indices(len(images), batch_size, steps, generator):
            dropped = torch.rand(len(indices), generator=generator) < self.config.label_dropout
            yield {"images": images[indices], "labels": self._labels[indices].masked_fill(dropped, 0),
                   "maps": None if self._maps is None else self._maps[indices]}

    @torch.no_grad()
    def _set_latent_scale(self) -> None:
        """From-scratch latents get unit variance (SD's ``scaling_factor``) once the autoencoder is trained,
        measured in fp32 on the training images' posterior means, so a resumed run measures the same value."""
        if self.mode.trains_autoencoder and self.step >= self.config.vae_steps:
            with torch.autocast(self.device.type, enabled=False):
                latents = self.vae.encode(self._scale_images.float()).latent_dist.mode()
            self.vae.register_to_config(scaling_factor=float(f"{1 / latents.std().item():.6g}"))

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        c, images = self.config, batch["images"]
        optimizers = self.optimizers()
        if self.mode.trains_autoencoder and self.step < c.vae_steps:
            reconstruction, kl = self.parallel(self._autoencoder_step)(images, self.randn)
            loss = F.l1_loss(reconstruction.float(), images.float()) + c.kl_weight * kl
            optimizers["vae"].zero_grad(set_to_none=True)
            loss.backward()
            optimizers["vae"].step()
            self.step += 1
            self._set_latent_scale()
            return {"loss_vae": loss.item()}
        with torch.no_grad():
            latents = posterior_sample(self.vae.encode(self.nets.vae_input(images)).latent_dist, self.randn)
            latents = latents * self.vae.config.scaling_factor
        noise = self.randn(latents.shape, latents.device, latents.dtype)
        timesteps = self.randint(self.noise_scheduler.config.num_train_timesteps, len(latents), latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        states = self.nets.embed(batch["labels"], self.device, self.sampling_labels(), c.prompt_template,
                                 embedding=self.parallel(self.label_embedding) if self.label_embedding else None)
        prediction = self._predict(noisy, timesteps, states, batch["maps"], parallel=True)
        loss = F.mse_loss(prediction, self._target(latents, noise, timesteps), reduction="none").mean(dim=(1, 2, 3))
        if c.snr_gamma:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, timesteps)
            velocity = self.noise_scheduler.config.prediction_type == "v_prediction"
            loss = loss * torch.clamp(snr, max=c.snr_gamma) / (snr + 1 if velocity else snr)
        loss = loss.mean()
        optimizers["denoiser"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["denoiser"].step()
        if self.ema is not None:
            self.ema.step(self._trained_parameters())
        self.step += 1
        return {"loss": loss.item()}

    def _predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor,
                 maps: torch.Tensor | None, parallel: bool = False) -> torch.Tensor:
        """The UNet's prediction (with the ControlNet's residuals); ``parallel``: through their DDP wrappers."""
        network = self.parallel if parallel else (lambda module: module)
        residuals = {}
        if maps is not None:
            down, mid = network(self.controlnet)(noisy, timesteps, states,
                                                 controlnet_cond=self.nets.control_image(maps), return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return network(self.unet)(noisy, timesteps, states, **residuals).sample.float()

    def distribute(self, wrap, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        for module in self.mode.trained(self.nets):  # the UNet (with its label embedding), or the ControlNet
            self._parallel[id(module)] = wrap(module)
        if self.mode.trains_autoencoder:  # its phase calls encode and decode, not forward
            self._parallel[id(self._autoencoder_step)] = wrap(self._autoencoder_step)

    def _target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps).float()
        return noise.float()

    def held_out_losses(self, images: torch.Tensor, items: Sequence[dict]) -> dict[str, float]:
        from sonogen.generators.ldm_held_out import held_out_losses

        return held_out_losses(self, images, items)

    @contextlib.contextmanager
    def _averaged_weights(self):
        """The EMA weights in place of the trained ones, while sampling and saving during training."""
        if self.ema is None:
            yield
            return
        parameters = self._trained_parameters()
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        try:
            yield
        finally:
            self.ema.restore(parameters)

    # sampling ------------------------------------------------------------------------------------------------

    def accepts_condition(self, key: str) -> bool:
        needs = {"prompt": self.text_encoder, "mask": self.controlnet}
        return key in self.conditions and (key not in needs or needs[key] is not None)

    def check_condition(self, condition: dict[str, Any] | None) -> dict[str, Any]:
        condition = super().check_condition(condition)
        if "prompt" in condition:
            if not self.accepts_condition("prompt"):
                raise ValueError("prompt: this ldm has no text encoder (trained from scratch); give a label")
            if not isinstance(condition["prompt"], str) or len(condition["prompt"]) > MAX_PROMPT:
                raise ValueError(f"prompt must be text of at most {MAX_PROMPT} characters")
        if "mask" in condition:
            if not self.accepts_condition("mask"):
                raise ValueError("mask: this ldm has no ControlNet")
            condition["mask"] = decode_mask(condition["mask"], self.config.image_size)
        steps = condition.get("steps", self.config.steps)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.config.train_timesteps:
            raise ValueError(f"steps must be an integer from 1 to {self.config.train_timesteps}, got {steps!r}")
        scale = condition.get("guidance_scale", self.config.guidance_scale)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= MAX_GUIDANCE:
            raise ValueError(f"guidance_scale must be a number from 0 to {MAX_GUIDANCE:g}, got {scale!r}")
        if condition.get("scheduler", self.config.scheduler) not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {condition['scheduler']!r}")
        return condition

    def pipeline_parts(self, scheduler: str | None = None) -> dict[str, Any]:
        """The components of a Stable Diffusion pipeline over these networks, with the named sampling scheduler."""
        return self.nets.pipeline_parts(scheduler or self.config.scheduler)

    def generate(self, n: int, seed: int, condition: dict[str, Any]) -> torch.Tensor:
        return self.generate_draws([(n, seed)], condition)[0]

    def generate_draws(self, draws, condition: dict[str, Any]) -> tuple[torch.Tensor, None]:
        """Every draw's images in one pipeline call: each image's starting latents and noise come from its own
        seed and index, so an image is the same in any company."""
        c, n = self.config, sum(count for count, _ in draws)
        label = torch.full((n,), self.sampling_labels().index(condition.get("label", c.label)) + 1)
        prompts = [condition["prompt"]] * n if "prompt" in condition else None
        mask = condition.get("mask")
        side = c.image_size // 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (self.unet.config.in_channels, side, side)
        latents = torch.cat([torch.from_numpy(gaussian_latents(seed, count, int(np.prod(shape))))
                             for count, seed in draws]).reshape(n, *shape)
        noise = [g for count, seed in draws for g in image_generators(seed, count)]
        with self._averaged_weights():
            pipe = self.nets.pipeline(condition.get("scheduler") or c.scheduler, with_controlnet=mask is not None)
            extra = {} if mask is None else {"image": self.nets.control_image(mask[None, None].expand(n, 1, -1, -1))}
            images = pipe(prompt_embeds=self._embed(label, prompts),
                          negative_prompt_embeds=self._embed(torch.zeros(n, dtype=torch.long)),
                          num_inference_steps=condition.get("steps", c.steps),
                          guidance_scale=float(condition.get("guidance_scale", c.guidance_scale)),
                          latents=latents.to(self.device), generator=noise,
                          height=c.image_size, width=c.image_size, output_type="pt", **extra).images
        return images.mean(dim=1, keepdim=True) * 2 - 1, None

    # persistence ---------------------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: Path, config: LatentDiffusionConfig) -> LatentDiffusion:
        return cls(config, folder=folder)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with self._averaged_weights():
            self.nets.save(folder)
        (folder / CONFIG).write_text(json.dumps(self.describe(), indent=2) + "\n")
        return folder

    def _weights(self) -> dict[str, torch.Tensor]:
        tensors = super()._weights()
        if self.ema is not None:
            tensors.update({f"ema.{k}": p.detach().contiguous().cpu() for k, p in enumerate(self.ema.shadow_params)})
        return tensors

    def _load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        super()._load_weights(tensors)
        if self.ema is not None:
            for k, shadow in enumerate(self.ema.shadow_params):
                shadow.copy_(tensors[f"ema.{k}"])

    def load_checkpoint(self, path: str | Path) -> None:
        super().load_checkpoint(path)
        self.restore_training_state()

    def restore_training_state(self) -> None:
        """What a checkpoint's weights imply beyond them: the EMA's step count and the latent scale."""
        autoencoder_steps = self.config.vae_steps if self.mode.trains_autoencoder else 0
        if self.ema is not None:
            self.ema.optimization_step = max(0, self.step - autoencoder_steps)
        self._set_latent_scale()
