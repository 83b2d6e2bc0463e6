"""Latent diffusion on diffusers and peft, in three modes (Basarab et al.; Wen et al.):

- ``from-scratch``: a single-channel ``AutoencoderKL`` trained on the dataset, then a latent
  ``UNet2DConditionModel`` that cross-attends to a learned label embedding (no outside weights);
- ``fine-tune``: a diffusers-format Stable Diffusion checkpoint (local folder or object-store URI), its UNet
  fine-tuned in full or through LoRA adapters on the attention projections, prompted from the labels;
- ``controlnet``: a ``ControlNetModel`` trained on top of either (a saved ``ldm`` generator or an SD checkpoint),
  conditioned on lesion masks or rasterised boxes.

diffusers owns the networks, noise schedulers, EMA and sampling pipelines; this file is the ultrasound glue:
grey ↔ 3 channels, prompts and label embeddings, conditioning maps, the training step, and persistence as a
diffusers pipeline folder (``pipeline/``, plus ``lora/`` and ``controlnet/``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from sonogen.data.manifest import mask_from_boxes
from sonogen.generators.base import CONFIG, Generator, batch_indices, image_generators
from sonogen.generators.registry import register_family
from sonogen.sampling import decode_png, gaussian_latents
from sonogen.tracking import local_folder
from sonogen.weights import check_safetensors_folder

MODES = ("from-scratch", "fine-tune", "controlnet")
SCHEDULERS = ("ddim", "dpmpp", "dpmpp-sde", "ddpm")
CONTROL_SOURCES = ("mask", "boxes")
MAX_GUIDANCE = 20.0
MAX_PROMPT = 500
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LABEL_EMBEDDING = "label_embedding.safetensors"
HELD_OUT_TIMESTEPS = 10  # spread evenly over the schedule, so the held-out loss reads like the training loss


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


def prompt_for(template: str, label: str) -> str:
    return template.format(label=label.replace("_", " "))


def _scheduler(name: str, config) -> Any:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    # without diffusers' record of which values were defaults, a schedule built here samples as it does saved
    settings = {key: value for key, value in config.items() if key != "_use_default_values"}
    # trailing spacing starts every schedule at the last training step (SD's "leading" one never reaches it) and
    # keeps a full-length schedule inside the table, where "leading" plus steps_offset runs one past its end
    settings["timestep_spacing"] = "trailing"
    if name == "dpmpp-sde":
        # the stochastic DPM-Solver++(2M): fresh noise each step, as DDPM draws, which ODE solvers go without
        return DPMSolverMultistepScheduler.from_config(settings, algorithm_type="sde-dpmsolver++")
    return {"ddim": DDIMScheduler, "dpmpp": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}[name].from_config(settings)


def decode_mask(value: Any, size: int) -> torch.Tensor:
    """A mask condition as ``(size, size)`` float {0, 1} (nonzero is inside)."""
    return torch.from_numpy(decode_png(value, size, "mask") > 0).float()


def _of_other_patients(patients: list[str]) -> list[int] | None:
    """For each image, the next one (cyclically) of another patient; None when they are all one patient's."""
    count = len(patients)
    partners = [next((j % count for j in range(k + 1, k + count) if patients[j % count] != patient), None)
                for k, patient in enumerate(patients)]
    return None if None in partners else partners


def _blank_control(control: str, items: Sequence[dict]) -> str:
    """Why a ControlNet on ``control`` has nothing to learn from these training items, and the other source when
    they have it."""
    sources = {"mask": ("lesion masks", any(item["mask"].any() for item in items)),
               "boxes": ("lesion boxes", any(len(item["boxes"]) for item in items))}
    other = next(source for source in sources if source != control)
    hint = f"; they have {sources[other][0]}: train with --control {other}" if sources[other][1] else ""
    return (f"control {control!r}: the {len(items)} training images have no {sources[control][0]}, so every "
            f"condition would be blank{hint}")


@register_family
class LatentDiffusion(Generator):
    family = "ldm"
    config_class = LatentDiffusionConfig
    conditions = frozenset({"label", "prompt", "mask", "steps", "guidance_scale", "scheduler"})
    gate_variants = MODES  # a ControlNet has its masks to follow, a from-scratch model none

    def __init__(self, config: LatentDiffusionConfig, folder: Path | None = None):
        super().__init__(config)
        from diffusers import ControlNetModel, DDPMScheduler

        self.tokenizer = self.text_encoder = self.label_embedding = self.controlnet = self.ema = None
        self._label_states: torch.Tensor | None = None
        self._optimizers: dict[str, torch.optim.Optimizer] | None = None
        if folder is not None:  # a saved generator
            self._read_pipeline(folder / "pipeline", folder)
            if (folder / "controlnet").is_dir():
                self.controlnet = ControlNetModel.from_pretrained(folder / "controlnet", use_safetensors=True)
        elif config.mode == "from-scratch":
            self._build_from_scratch()
        else:
            base = local_folder(config.base_model, "base model")
            if (base / CONFIG).is_file():  # a saved ldm generator: its own pipeline, LoRA merged
                self._read_pipeline(base / "pipeline", base, merge_lora=True)
                saved = json.loads((base / CONFIG).read_text())["config"]
                # its label embedding's rows are its labels, in its order; its checkpoint's terms bind this model too
                config.labels = config.labels or tuple(saved["labels"])
                config.base_licence = config.base_licence or saved.get("base_licence", "")
                config.base_origin = config.base_origin or saved.get("base_origin") or saved.get("base_model", "")
            else:
                self._read_pipeline(base, None)
        if folder is None and config.mode == "fine-tune" and config.lora_rank:
            self._add_lora()
        if config.mode == "controlnet" and self.controlnet is None:
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            self.controlnet = ControlNetModel.from_unet(
                self.unet, conditioning_channels=3,
                conditioning_embedding_out_channels=tuple(16 * 2**k for k in range(int(np.log2(factor)) + 1)))
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        for module in (self.vae, self.unet, self.text_encoder, self.label_embedding, self.controlnet):
            if module is not None:
                module.requires_grad_(False)
        for module in self._trained_modules():
            for name, parameter in module.named_parameters():
                parameter.requires_grad_(not config.lora_rank or "lora_" in name)
        if config.mode == "from-scratch":
            self.vae.requires_grad_(True)  # trained first; later encoded without gradients

    @property
    def gate_set(self) -> str:
        return f"{self.family}-{self.config.mode}" if self.gate_variants else self.family

    # networks ------------------------------------------------------------------------------------------------

    def _build_from_scratch(self) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        c = self.config
        groups = min(32, *c.vae_channels, *c.unet_channels)
        self.vae = AutoencoderKL(
            in_channels=1, out_channels=1, latent_channels=c.latent_channels, block_out_channels=c.vae_channels,
            down_block_types=("DownEncoderBlock2D",) * len(c.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(c.vae_channels),
            layers_per_block=c.layers_per_block, norm_num_groups=groups, sample_size=c.image_size)
        depth = len(c.unet_channels)
        self.unet = UNet2DConditionModel(
            sample_size=c.image_size // 2 ** (len(c.vae_channels) - 1), in_channels=c.latent_channels,
            out_channels=c.latent_channels, block_out_channels=c.unet_channels, layers_per_block=c.layers_per_block,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
            cross_attention_dim=c.embedding_dim, attention_head_dim=8, norm_num_groups=groups)
        # row 0 is "no label", the unconditional branch of classifier-free guidance
        self.label_embedding = nn.Embedding(c.max_labels + 1, c.embedding_dim)
        self.scheduler_config = DDPMScheduler(num_train_timesteps=c.train_timesteps, beta_schedule="scaled_linear",
                                              beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                              clip_sample=False).config

    def _read_pipeline(self, path: Path, saved: Path | None, merge_lora: bool = False) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        for part in ("vae", "unet", "text_encoder"):
            check_safetensors_folder(path / part, f"the {part} of {path}")
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True)
        self.scheduler_config = DDPMScheduler.from_pretrained(path, subfolder="scheduler").config
        if (path / "text_encoder").is_dir():
            from transformers import CLIPTextModel, CLIPTokenizer

            self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        self._base_pipeline = path
        if saved is not None and (saved / LABEL_EMBEDDING).is_file():
            weights = load_file(str(saved / LABEL_EMBEDDING))["weight"]
            self.label_embedding = nn.Embedding(*weights.shape)
            self.label_embedding.load_state_dict({"weight": weights})
        if saved is not None and (saved / "lora").is_dir():
            self._add_lora(load_file(str(saved / "lora" / "pytorch_lora_weights.safetensors")))
            if merge_lora:
                self.unet.fuse_lora()
                self.unet.unload_lora()

    def _add_lora(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        from peft import LoraConfig, set_peft_model_state_dict

        rank = self.config.lora_rank or next(v.shape[0] for k, v in weights.items() if "lora_A" in k)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=LORA_TARGETS))
        if weights is not None:
            set_peft_model_state_dict(self.unet, {k.removeprefix("unet."): v for k, v in weights.items()})

    def _trained_modules(self) -> list[nn.Module]:
        if self.config.mode == "controlnet":
            return [self.controlnet]
        return [m for m in (self.unet, self.label_embedding) if m is not None]

    def networks(self) -> dict[str, nn.Module]:
        modules = {"vae": self.vae, "unet": self.unet, "text_encoder": self.text_encoder,
                   "label_embedding": self.label_embedding, "controlnet": self.controlnet}
        return {name: module for name, module in modules.items() if module is not None}

    def _trained_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._trained_modules() for p in m.parameters() if p.requires_grad]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._optimizers is None:
            self._optimizers = {"denoiser": torch.optim.AdamW(self._trained_parameters(), lr=self.config.lr)}
            if self.config.mode == "from-scratch":
                self._optimizers["vae"] = torch.optim.AdamW(self.vae.parameters(), lr=self.config.lr_vae)
        return self._optimizers

    def sampling_labels(self) -> tuple[str, ...]:
        return self.config.labels or (self.config.label,)

    # conditioning --------------------------------------------------------------------------------------------

    def _embed(self, labels: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        """Cross-attention states: of the prompts when given, else of the labels (0 is unconditional) through
        the label embedding or the text encoder's reading of each label's prompt."""
        if self.label_embedding is not None:
            return self.label_embedding(labels.to(self.device))[:, None]
        if prompts is not None:
            return self._encode_text(prompts)
        if self._label_states is None:  # the text encoder never trains: each label's prompt is read once
            names = ("",) + self.sampling_labels()
            with torch.autocast(self.device.type, enabled=False):
                self._label_states = self._encode_text(
                    [name and prompt_for(self.config.prompt_template, name) for name in names])
        return self._label_states.to(self.device)[labels.to(self.device)]

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    def _vae_input(self, images: torch.Tensor) -> torch.Tensor:
        return images.expand(-1, self.vae.config.in_channels, -1, -1)

    def _control_image(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.expand(-1, 3, -1, -1)

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
        if c.mode == "from-scratch" and c.vae_steps >= total_steps:
            raise ValueError(f"vae_steps {c.vae_steps} leaves none of the {total_steps} steps to the latent UNet")
        self._labels = torch.tensor([c.labels.index(item["label"]) + 1 for item in items])
        self._maps = self._control_maps(images, items).to(self.device) if c.mode == "controlnet" else None
        if self.accepts_condition("mask") and not self._maps.any():  # diffultra renders its own conditions
            raise ValueError(_blank_control(c.control, items))
        self._scale_images = images[:64]
        if c.gradient_checkpointing:
            for module in self._trained_modules():
                if hasattr(module, "enable_gradient_checkpointing"):
                    module.enable_gradient_checkpointing()
        if c.ema_decay:
            # foreach: one fused update, not a Python loop over parameters (6 of 90 ms per H100 step)
            self.ema = EMAModel(self._trained_parameters(), decay=c.ema_decay, foreach=True)
            self.ema.to(self.device)
        self._set_latent_scale()

    def _control_maps(self, images: torch.Tensor, items: Sequence[dict]) -> torch.Tensor:
        """The ControlNet condition of each training image, ``(N, 1, H, W)`` in [0, 1]."""
        height, width = images.shape[-2:]
        return torch.stack([item["mask"] if self.config.control == "mask" else torch.from_numpy(
            mask_from_boxes(item["boxes"].int().tolist(), height, width)).float()[None] for item in items])

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
        if self.config.mode == "from-scratch" and self.step >= self.config.vae_steps:
            with torch.autocast(self.device.type, enabled=False):
                latents = self.vae.encode(self._scale_images.float()).latent_dist.mode()
            self.vae.register_to_config(scaling_factor=float(f"{1 / latents.std().item():.6g}"))

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        c, images = self.config, batch["images"]
        optimizers = self.optimizers()
        if c.mode == "from-scratch" and self.step < c.vae_steps:
            posterior = self.vae.encode(images).latent_dist
            reconstruction = self.vae.decode(posterior.sample()).sample
            loss = F.l1_loss(reconstruction.float(), images.float()) + c.kl_weight * posterior.kl().mean()
            optimizers["vae"].zero_grad(set_to_none=True)
            loss.backward()
            optimizers["vae"].step()
            self.step += 1
            self._set_latent_scale()
            return {"loss_vae": loss.item()}
        with torch.no_grad():
            latents = self.vae.encode(self._vae_input(images)).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                  device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = self._predict(noisy, timesteps, self._embed(batch["labels"]), batch["maps"])
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
                 maps: torch.Tensor | None) -> torch.Tensor:
        residuals = {}
        if self.config.mode == "controlnet":
            down, mid = self.controlnet(noisy, timesteps, states, controlnet_cond=self._control_image(maps),
                                        return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(noisy, timesteps, states, **residuals).sample.float()

    def _target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps).float()
        return noise.float()

    @torch.no_grad()
    def held_out_losses(self, images: torch.Tensor, items: Sequence[dict]) -> dict[str, float]:
        """``val_loss``: the denoising loss at timesteps spread over the schedule, with fixed noise, under the
        averaged weights that sampling uses. A ControlNet is also read inside the held-out lesions, given each
        image's own condition and given another patient's: ``val_mask_loss_gain`` is the share of the lesion loss
        that the right condition removes (about 0 for a ControlNet that does not read its condition)."""
        c = self.config
        if c.mode == "from-scratch" and self.step < c.vae_steps:
            return {}
        maps = self._control_maps(images, items).to(self.device) if c.mode == "controlnet" else None
        with self._averaged_weights():
            latents = self.vae.encode(self._vae_input(images)).latent_dist.mode() * self.vae.config.scaling_factor
            states = self._embed(torch.tensor([c.labels.index(item["label"]) + 1 for item in items]))
            errors = self._denoising_errors(latents, states, maps)
            losses = {"val_loss": errors.mean().item()}
            if maps is None:
                return losses
            lesion = F.adaptive_max_pool2d((maps > 0).float(), latents.shape[-2:])
            if not lesion.any():
                return losses

            def inside(errors_per_pixel: torch.Tensor) -> float:
                return ((errors_per_pixel * lesion).sum() / lesion.sum()).item()

            losses["val_lesion_loss"] = inside(errors)
            shown = torch.nonzero(lesion.flatten(1).sum(1) > 0).flatten().tolist()
            partners = _of_other_patients([items[k]["patient_id"] for k in shown])
            if partners is None:  # one patient's lesions sit in one place: no other condition to compare with
                return losses
            others = maps.clone()
            others[shown] = maps[[shown[j] for j in partners]]
            other = inside(self._denoising_errors(latents, states, others))
        return {**losses, "val_lesion_loss_other_mask": other,
                "val_mask_loss_gain": 1 - losses["val_lesion_loss"] / other}

    def _denoising_errors(self, latents: torch.Tensor, states: torch.Tensor,
                          maps: torch.Tensor | None) -> torch.Tensor:
        """Squared error per latent pixel ``(N, 1, h, w)``, averaged over ``HELD_OUT_TIMESTEPS`` timesteps and
        channels; the same noise on every call, so two conditions are compared on equal terms."""
        generator = torch.Generator().manual_seed(0)
        total = self.noise_scheduler.config.num_train_timesteps
        errors = torch.zeros(len(latents), 1, *latents.shape[-2:], device=latents.device)
        for fraction in (np.arange(HELD_OUT_TIMESTEPS) + 0.5) / HELD_OUT_TIMESTEPS:
            noise = torch.randn(latents.shape, generator=generator).to(latents.device)
            timesteps = torch.full((len(latents),), int(fraction * total), device=latents.device)
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            prediction = self._predict(noisy, timesteps, states, maps)
            errors += (prediction - self._target(latents, noise, timesteps)).square().mean(dim=1, keepdim=True)
        return errors / HELD_OUT_TIMESTEPS

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
        return dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                    scheduler=_scheduler(scheduler or self.config.scheduler, self.scheduler_config),
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def pipeline(self, scheduler: str | None = None, with_controlnet: bool = True):
        """The diffusers pipeline over these networks with the named sampling scheduler."""
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

        parts = self.pipeline_parts(scheduler)
        if self.controlnet is not None and with_controlnet:
            pipe = StableDiffusionControlNetPipeline(controlnet=self.controlnet, **parts)
        else:
            pipe = StableDiffusionPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate(self, n: int, seed: int, condition: dict[str, Any]) -> torch.Tensor:
        c = self.config
        label = torch.full((n,), self.sampling_labels().index(condition.get("label", c.label)) + 1)
        prompts = [condition["prompt"]] * n if "prompt" in condition else None
        mask = condition.get("mask")
        side = c.image_size // 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (n, self.unet.config.in_channels, side, side)
        latents = torch.from_numpy(gaussian_latents(seed, n, int(np.prod(shape[1:])))).reshape(shape)
        with self._averaged_weights():
            pipe = self.pipeline(condition.get("scheduler"), with_controlnet=mask is not None)
            extra = {} if mask is None else {"image": self._control_image(mask[None, None].expand(n, 1, -1, -1))}
            images = pipe(prompt_embeds=self._embed(label, prompts),
                          negative_prompt_embeds=self._embed(torch.zeros(n, dtype=torch.long)),
                          num_inference_steps=condition.get("steps", c.steps),
                          guidance_scale=float(condition.get("guidance_scale", c.guidance_scale)),
                          latents=latents.to(self.device), generator=image_generators(seed, n),
                          height=c.image_size, width=c.image_size, output_type="pt", **extra).images
        return images.mean(dim=1, keepdim=True) * 2 - 1

    # persistence ---------------------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: Path, config: LatentDiffusionConfig) -> LatentDiffusion:
        return cls(config, folder=folder)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with self._averaged_weights():
            if self.unet_has_lora:
                from peft.utils import get_peft_model_state_dict

                if self._base_pipeline.resolve() != (folder / "pipeline").resolve():
                    shutil.copytree(self._base_pipeline, folder / "pipeline", dirs_exist_ok=True)
                (folder / "lora").mkdir(exist_ok=True)
                save_file({f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(self.unet).items()},
                          str(folder / "lora" / "pytorch_lora_weights.safetensors"))
            else:
                self.pipeline("ddpm", with_controlnet=False).save_pretrained(folder / "pipeline")  # the training schedule
            if self.label_embedding is not None:
                save_file({"weight": self.label_embedding.weight.detach().contiguous().cpu()},
                          str(folder / LABEL_EMBEDDING))
            if self.controlnet is not None:
                self.controlnet.save_pretrained(folder / "controlnet")
        (folder / CONFIG).write_text(json.dumps(self.describe(), indent=2) + "\n")
        return folder

    @property
    def unet_has_lora(self) -> bool:
        return bool(getattr(self.unet, "peft_config", None))

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
        autoencoder_steps = self.config.vae_steps if self.config.mode == "from-scratch" else 0
        if self.ema is not None:
            self.ema.optimization_step = max(0, self.step - autoencoder_steps)
        self._set_latent_scale()
