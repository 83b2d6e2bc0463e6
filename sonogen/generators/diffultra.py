"""DiffUltra (arXiv 2501.06356): lesion-conditioned synthesis guided by a Lesion-anatomy Bank, with box labels.

A ControlNet on a trained ``ldm`` (the anatomy model) learns to draw a consolidation from a condition map: the
lesion's structure map rendered into its box, or, for the paper's binary baseline, the filled box. Sampling
takes a background (a given negative frame, or a ``background_label`` image the ldm generates), finds its fan
and pleural line, draws a lesion from the bank for that anatomy, renders the condition, and re-noises the
background part-way (``strength``) before the ControlNet denoises it: the anatomy stays, the lesion appears
where its box says. Every image comes with its box. The choices are argued in ``docs/diffultra.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sonogen.data.lesion_bank import (
    CONDITIONS, SIZE_BIASES, Anatomy, LesionBank, detect_anatomy, render_condition, structure_map,
)
from sonogen.data.prepare import scan_region
from sonogen.generators.base import image_generators, to_uint8
from sonogen.generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from sonogen.generators.registry import register_family
from sonogen.sampling import decode_png
from sonogen.tracking import local_folder

BANK = "bank"


@dataclass
class DiffUltraConfig(LatentDiffusionConfig):
    label: str = "consolidation"
    mode: str = "controlnet"  # a ControlNet on `base_model`, a trained ldm generator folder (or SD checkpoint)
    condition: str = "structure"  # or "binary": the filled box, the paper's baseline
    background_label: str = "normal"  # what the ldm generates as the anatomy when no image is given
    bank: str = ""  # a lesion bank folder or URI; empty: built from the training images
    size_bias: str = "none"  # "large": large lesions get half the draws
    strength: float = 0.6  # how far the background is re-noised: 1 keeps nothing of it
    structure_size: int = 32
    bank_bandwidth: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        if self.mode != "controlnet":
            raise ValueError(f"diffultra trains a ControlNet on a trained ldm (mode controlnet), got mode {self.mode!r}")
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.size_bias not in SIZE_BIASES:
            raise ValueError(f"size_bias must be one of {SIZE_BIASES}, got {self.size_bias!r}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")


@register_family
class DiffUltra(LatentDiffusion):
    family = "diffultra"
    config_class = DiffUltraConfig
    conditions = frozenset({"label", "image", "size_bias", "strength", "steps", "guidance_scale", "scheduler"})
    places_lesions = True
    gate_variants = ()  # one gate set: the ControlNet is the whole model, gated on detection

    def __init__(self, config: DiffUltraConfig, folder: Path | None = None):
        super().__init__(config, folder)
        if self.vae.config.latent_channels != 4:
            raise ValueError("diffultra needs an autoencoder with 4 latent channels")
        self.bank: LesionBank | None = None
        if folder is not None and (folder / BANK).is_dir():
            self.bank = LesionBank.load(folder / BANK)
        elif config.bank:
            self.bank = LesionBank.load(local_folder(config.bank, "lesion bank"))

    # training ------------------------------------------------------------------------------------------------

    def training_labels(self, dataset_labels: list[str]) -> list[str]:
        super().training_labels(dataset_labels)
        if self.config.background_label not in self.config.labels:
            raise ValueError(f"background_label {self.config.background_label!r} is not among the base model's "
                             f"labels {self.config.labels}")
        return [self.config.label]  # the ControlNet learns lesions; the base ldm already knows the anatomy

    def begin_training(self, images: torch.Tensor, total_steps: int, items: Sequence[dict] = ()) -> None:
        if self.bank is None:
            entries = [(f"train-{k}", item["patient_id"], to_uint8(item["image"][None])[0],
                        item["boxes"].int().tolist()) for k, item in enumerate(items) if len(item["boxes"])]
            self.bank = LesionBank.from_images(entries, {"data": "training images", "label": self.config.label},
                                               self.config.structure_size, self.config.bank_bandwidth)
        super().begin_training(images, total_steps, items)

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
        condition = dict(condition or {})
        extra = {key: condition.pop(key) for key in ("image", "size_bias", "strength") if key in condition}
        checked = super().check_condition(condition)  # the ldm's own keys: label, steps, guidance_scale, scheduler
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

    def anatomy(self, image: np.ndarray) -> Anatomy:
        """The frame's fan and pleura; where no pleural line is found (a poor generated background), the bank's
        median pleura depth across the fan, so a lesion still lands at a typical place."""
        try:
            return detect_anatomy(image)
        except ValueError:
            fan = scan_region(image[None])
            fan = fan if fan.sum() > image.size // 4 else np.ones_like(fan)
            depth = np.median([lesion.anchor[1] for lesion in self.bank.lesions]) * image.shape[0]
            return Anatomy(fan, np.where(fan.any(axis=0), depth, np.nan))

    def generate(self, n: int, seed: int, condition: dict[str, Any]) -> torch.Tensor:
        return self.generate_with_boxes(n, seed, condition)[0]

    def generate_with_boxes(self, n: int, seed: int, condition: dict[str, Any]) -> tuple[torch.Tensor, list]:
        from diffusers import StableDiffusionControlNetImg2ImgPipeline

        if self.bank is None:
            raise ValueError("this diffultra has no lesion bank (train it, or give config.bank)")
        c = self.config
        sampling = {key: condition[key] for key in ("steps", "guidance_scale", "scheduler") if key in condition}
        if "image" in condition:
            backgrounds = np.repeat(condition["image"][None], n, axis=0)
        else:
            backgrounds = to_uint8(super().generate(n, seed, {**sampling, "label": c.background_label}))
        boxes, maps = [], []
        for k, background in enumerate(backgrounds):
            rng = np.random.default_rng([seed, k, 1])  # image k's lesion depends on the seed and k only
            box, index = self.bank.sample(self.anatomy(background), rng, condition.get("size_bias", c.size_bias))
            structures = None if c.condition == "binary" else [self.bank.structures[index].astype(np.float32)]
            boxes.append([box])
            maps.append(render_condition(background.shape, [box], structures))
        control = self._control_image(torch.from_numpy(np.stack(maps))[:, None])
        pixels = torch.from_numpy(backgrounds.astype(np.float32) / 127.5 - 1)[:, None].to(self.device)
        label = torch.full((n,), self.sampling_labels().index(condition.get("label", c.label)) + 1)
        with self._averaged_weights():
            # latents in, so diffusers skips its RGB preprocessing (the autoencoder may be single-channel)
            latents = self.vae.encode(self._vae_input(pixels)).latent_dist.mode() * self.vae.config.scaling_factor
            pipe = StableDiffusionControlNetImg2ImgPipeline(controlnet=self.controlnet,
                                                            **self.pipeline_parts(condition.get("scheduler")))
            pipe.set_progress_bar_config(disable=True)
            images = pipe(prompt_embeds=self._embed(label), negative_prompt_embeds=self._embed(torch.zeros_like(label)),
                          image=latents, control_image=control.to(self.device),
                          strength=condition.get("strength", c.strength),
                          num_inference_steps=condition.get("steps", c.steps),
                          guidance_scale=float(condition.get("guidance_scale", c.guidance_scale)),
                          generator=image_generators(seed, n, stream=2),
                          height=c.image_size, width=c.image_size, output_type="pt").images
        return images.mean(dim=1, keepdim=True) * 2 - 1, boxes

    # persistence ---------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        folder = super().save(folder)
        if self.bank is not None:
            self.bank.save(folder / BANK)
        return folder
