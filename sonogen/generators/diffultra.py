"""DiffUltra (arXiv 2501.06356): lesion-conditioned synthesis guided by a Lesion-anatomy Bank, with box labels.

A ControlNet on a trained ``ldm`` (the anatomy model; composed, an ldm in ControlNet mode with this family's
condition maps) learns to draw a consolidation from a condition map: the
lesion's structure map rendered into its box, or, for the paper's binary baseline, the filled box. Sampling
takes a background (a given negative frame, or a ``background_label`` image the ldm generates), finds its fan
and pleural line, draws a lesion from the bank for that anatomy, renders the condition, and re-noises the
background part-way (``strength``) before the ControlNet denoises it: the anatomy stays, the lesion appears
where its box says. Every image comes with its box. The choices are argued in ``docs/diffultra.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from sonogen.data.lesion_bank import (
    CONDITIONS, SIZE_BIASES, LesionBank, placement_anatomy, render_condition, structure_map,
)
from sonogen.generators.base import CONFIG, Generator, image_generators
from sonogen.generators.families import register_family
from sonogen.generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from sonogen.sampling import decode_png, to_uint8
from sonogen.tracking import local_folder

BANK = "bank"
# the ldm config keys DiffUltra inherited before it composed a ControlNet; saved configs still carry them
INHERITED_BEFORE = frozenset({"mode", "lora_rank", "control", "vae_channels", "latent_channels", "unet_channels",
                              "layers_per_block", "embedding_dim", "max_labels", "vae_steps", "kl_weight", "lr_vae",
                              "train_timesteps"})


@dataclass
class DiffUltraConfig:
    label: str = "consolidation"
    base_model: str = ""  # the anatomy model: a trained ldm generator folder or URI (or an SD checkpoint)
    condition: str = "structure"  # or "binary": the filled box, the paper's baseline
    background_label: str = "normal"  # what the ldm generates as the anatomy when no image is given
    bank: str = ""  # a lesion bank folder or URI; empty: built from the training images
    size_bias: str = "none"  # "large": large lesions get half the draws
    strength: float = 0.6  # how far the background is re-noised: 1 keeps nothing of it
    structure_size: int = 32
    bank_bandwidth: float = 0.05
    image_size: int = 64
    # the ControlNet's training and sampling, as an ldm ControlNet's (LatentDiffusionConfig)
    labels: tuple[str, ...] = ()  # the base model's, read from it
    base_licence: str = ""
    base_origin: str = ""
    prompt_template: str = "ultrasound, {label}"
    lr: float = 1e-4
    label_dropout: float = 0.1
    snr_gamma: float = 0.0
    ema_decay: float = 0.999
    gradient_checkpointing: bool = False
    scheduler: str = "dpmpp"
    steps: int = 25
    guidance_scale: float = 2.0

    def __post_init__(self):
        self.labels = tuple(self.labels)
        if not self.base_model:
            raise ValueError("diffultra needs base_model: a trained ldm generator folder (or a Stable Diffusion "
                             "checkpoint); `sonogen train diffultra --build-prerequisites` trains one first")
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.size_bias not in SIZE_BIASES:
            raise ValueError(f"size_bias must be one of {SIZE_BIASES}, got {self.size_bias!r}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        self.controlnet_config()  # the ldm's own checks (scheduler, steps, dropout, ...)

    def controlnet_config(self) -> LatentDiffusionConfig:
        """The ldm ControlNet this model composes."""
        shared = {f.name for f in fields(LatentDiffusionConfig)} & {f.name for f in fields(self)}
        return LatentDiffusionConfig(**{name: getattr(self, name) for name in shared}, mode="controlnet")


@register_family
class DiffUltra(Generator):
    family = "diffultra"
    config_class = DiffUltraConfig
    conditions = frozenset({"label", "image", "size_bias", "strength", "steps", "guidance_scale", "scheduler"})
    places_lesions = True
    retired_config_keys = INHERITED_BEFORE

    def __init__(self, config: DiffUltraConfig, folder: Path | None = None):
        # a ControlNet on the anatomy model, trained on this family's condition maps instead of masks
        self.ldm = LatentDiffusion(config.controlnet_config(), folder, control_maps=self._control_maps)
        super().__init__(config)
        # what the base model passed on (its labels, licence and checkpoint origin) is this model's too
        config.labels, config.base_licence, config.base_origin = (
            self.ldm.config.labels, self.ldm.config.base_licence, self.ldm.config.base_origin)
        if self.ldm.vae.config.latent_channels != 4:
            raise ValueError("diffultra needs an autoencoder with 4 latent channels")
        self.bank: LesionBank | None = None
        if folder is not None and (folder / BANK).is_dir():
            self.bank = LesionBank.load(folder / BANK)
        elif config.bank:
            self.bank = LesionBank.load(local_folder(config.bank, "lesion bank"))

    # the composed ControlNet: its networks, optimisers, training position and weights are this model's
    step = property(lambda self: self.ldm.step, lambda self, value: setattr(self.ldm, "step", value))
    unet = property(lambda self: self.ldm.unet)
    controlnet = property(lambda self: self.ldm.controlnet)

    def networks(self) -> dict[str, nn.Module]:
        return self.ldm.networks()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self.ldm.optimizers()

    def to(self, device: torch.device | str) -> DiffUltra:
        super().to(device)
        self.ldm.device = self.device
        return self

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def sampling_labels(self) -> tuple[str, ...]:
        return self.ldm.sampling_labels()

    @classmethod
    def prerequisites(cls, settings: dict[str, Any]) -> dict[str, str]:
        # the ControlNet draws lesions into an anatomy model (an ldm of the same data) from a lesion bank
        wanted = {"base_model": "ldm", "bank": "lesion_bank"}
        return {key: what for key, what in wanted.items() if not settings.get(key)}

    @classmethod
    def declines(cls, settings: dict[str, Any]) -> str | None:
        background = settings.get("background_label", DiffUltraConfig.background_label)
        if settings.get("label") == background:
            return (f"{cls.family} draws lesions into {background} frames (its background_label); it trains on the "
                    f"lesion labels")
        return None

    # training ------------------------------------------------------------------------------------------------

    def training_labels(self, dataset_labels: list[str]) -> list[str]:
        self.ldm.training_labels(dataset_labels)
        if self.config.background_label not in self.ldm.config.labels:
            raise ValueError(f"background_label {self.config.background_label!r} is not among the base model's "
                             f"labels {self.ldm.config.labels}")
        return [self.config.label]  # the ControlNet learns lesions; the base ldm already knows the anatomy

    def begin_training(self, images: torch.Tensor, total_steps: int, items: Sequence[dict] = ()) -> None:
        if self.bank is None:
            entries = [(f"train-{k}", item["patient_id"], to_uint8(item["image"][None])[0],
                        item["boxes"].int().tolist()) for k, item in enumerate(items) if len(item["boxes"])]
            self.bank = LesionBank.from_images(entries, {"data": "training images", "label": self.config.label},
                                               self.config.structure_size, self.config.bank_bandwidth)
        self.ldm.begin_training(images, total_steps, items)

    def training_batches(self, images: torch.Tensor, batch_size: int, steps: int | None, generator: torch.Generator):
        return self.ldm.training_batches(images, batch_size, steps, generator)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.ldm.train_step(batch)

    def distribute(self, wrap, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.ldm.distribute(wrap, rank, world)

    def held_out_losses(self, images: torch.Tensor, items: Sequence[dict]) -> dict[str, float]:
        return self.ldm.held_out_losses(images, items)

    def _control_maps(self, images: torch.Tensor, items: Sequence[dict]) -> torch.Tensor:
        """Each positive's own lesions as the condition: its structure maps in its boxes (or the boxes filled)."""
        maps = []
        for item in items:
            image, boxes = to_uint8(item["image"][None])[0], item["boxes"].int().tolist()
            structures = None if self.config.condition == "binary" else [
                structure_map(image, box, self.config.structure_size) for box in boxes]
            maps.append(torch.from_numpy(render_condition(image.shape, boxes, structures))[None])
        return torch.stack(maps)

    # sampling ------------------------------------------------------------------------------------------------

    def check_condition(self, condition: dict[str, Any] | None) -> dict[str, Any]:
        condition = super().check_condition(condition)  # this family's keys and labels
        extra = {key: condition.pop(key) for key in ("image", "size_bias", "strength") if key in condition}
        checked = self.ldm.check_condition(condition)  # the ldm's own keys: label, steps, guidance_scale, scheduler
        if "image" in extra:
            checked["image"] = decode_png(extra["image"], self.config.image_size, "image").astype(np.uint8)
        if "size_bias" in extra:
            if extra["size_bias"] not in SIZE_BIASES:
                raise ValueError(f"size_bias must be one of {SIZE_BIASES}, got {extra['size_bias']!r}")
            checked["size_bias"] = extra["size_bias"]
        if "strength" in extra:
            strength = extra["strength"]
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
                raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
            checked["strength"] = float(strength)
        return checked

    def generate(self, n: int, seed: int, condition: dict[str, Any]) -> torch.Tensor:
        return self.generate_with_boxes(n, seed, condition)[0]

    def generate_with_boxes(self, n: int, seed: int, condition: dict[str, Any]) -> tuple[torch.Tensor, list]:
        if self.bank is None:
            raise ValueError("this diffultra has no lesion bank (train it, or give config.bank)")
        c = self.config
        backgrounds = self.backgrounds(n, seed, condition)
        boxes, maps = [], []
        for k, background in enumerate(backgrounds):
            rng = np.random.default_rng([seed, k, 1])  # image k's lesion depends on the seed and k only
            anatomy = placement_anatomy(background, self.bank.typical_depth)
            box, index = self.bank.sample(anatomy, rng, condition.get("size_bias", c.size_bias))
            structures = None if c.condition == "binary" else [self.bank.structures[index].astype(np.float32)]
            boxes.append([box])
            maps.append(render_condition(background.shape, [box], structures))
        return self.redraw(backgrounds, seed, condition, condition.get("strength", c.strength), np.stack(maps)), boxes

    def backgrounds(self, n: int, seed: int, condition: dict[str, Any]) -> np.ndarray:
        """``n`` uint8 frames ``(n, H, W)`` to draw lesions into: the request's ``image``, else ``background_label``
        frames of the anatomy model."""
        if "image" in condition:
            return np.repeat(condition["image"][None], n, axis=0)
        sampling = {key: condition[key] for key in ("steps", "guidance_scale", "scheduler") if key in condition}
        return to_uint8(self.ldm.generate(n, seed, {**sampling, "label": self.config.background_label}))

    def redraw(self, frames: np.ndarray, seed: int, condition: dict[str, Any], strength: float,
               maps: np.ndarray | None = None, stream: int = 2) -> torch.Tensor:
        """``frames`` (uint8) re-noised by ``strength`` and denoised as the condition's label: through the ControlNet
        with condition ``maps`` ``(n, H, W)`` in [0, 1], or by the anatomy model alone (an img2img pass)."""
        from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionImg2ImgPipeline

        c, n, ldm, vae = self.config, len(frames), self.ldm, self.ldm.vae
        pixels = torch.from_numpy(frames.astype(np.float32) / 127.5 - 1)[:, None].to(self.device)
        label = torch.full((n,), self.sampling_labels().index(condition.get("label", c.label)) + 1)
        with ldm._averaged_weights():
            # latents in, so diffusers skips its RGB preprocessing (the autoencoder may be single-channel)
            latents = vae.encode(ldm.nets.vae_input(pixels)).latent_dist.mode() * vae.config.scaling_factor
            parts = ldm.pipeline_parts(condition.get("scheduler"))
            if maps is None:
                pipe, extra = StableDiffusionImg2ImgPipeline(**parts), {}
            else:
                pipe = StableDiffusionControlNetImg2ImgPipeline(controlnet=self.controlnet, **parts)
                extra = {"control_image": ldm.nets.control_image(torch.from_numpy(maps)[:, None]).to(self.device),
                         "height": c.image_size, "width": c.image_size}
            pipe.set_progress_bar_config(disable=True)
            # the pipeline runs int(steps × strength) steps: at least one, or it would return the frames unchanged
            steps = max(condition.get("steps", c.steps), math.ceil(1 / strength))
            images = pipe(prompt_embeds=ldm._embed(label), negative_prompt_embeds=ldm._embed(torch.zeros_like(label)),
                          image=latents, strength=strength, num_inference_steps=steps,
                          guidance_scale=float(condition.get("guidance_scale", c.guidance_scale)),
                          generator=image_generators(seed, n, stream=stream), output_type="pt", **extra).images
        return images.mean(dim=1, keepdim=True) * 2 - 1

    # persistence ---------------------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: Path, config: DiffUltraConfig) -> DiffUltra:
        return cls(config, folder=folder)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with self.ldm._averaged_weights():
            self.ldm.nets.save(folder)
        (folder / CONFIG).write_text(json.dumps(self.describe(), indent=2) + "\n")
        if self.bank is not None:
            self.bank.save(folder / BANK)
        return folder

    def _weights(self) -> dict[str, torch.Tensor]:
        return self.ldm._weights()

    def _load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.ldm._load_weights(tensors)

    def load_checkpoint(self, path: str | Path) -> None:
        super().load_checkpoint(path)
        self.ldm.restore_training_state()
