"""The networks of a latent diffusion model and their persistence: an autoencoder, a latent UNet, what conditions
it (a label embedding, or a text encoder and tokenizer), an optional ControlNet, and the noise schedule's config.

diffusers owns the networks and pipelines; this file builds them from scratch or reads them from a diffusers
Stable Diffusion folder (safetensors only) or a saved generator, adds LoRA adapters or a ControlNet, embeds labels
and prompts, assembles sampling pipelines and saves it all as a pipeline folder (``pipeline/``, plus ``lora/``,
``controlnet/`` and the label embedding).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sonogen.generators.base import CONFIG
from sonogen.weights import check_safetensors_folder

SCHEDULERS = ("ddim", "dpmpp", "dpmpp-sde", "ddpm")
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LABEL_EMBEDDING = "label_embedding.safetensors"
LORA_WEIGHTS = "lora/pytorch_lora_weights.safetensors"


def prompt_for(template: str, label: str) -> str:
    return template.format(label=label.replace("_", " "))


def sampling_scheduler(name: str, config) -> Any:
    """The named diffusers scheduler over the training schedule's ``config``."""
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


def posterior_sample(posterior, randn) -> torch.Tensor:
    """A draw from the autoencoder's posterior with noise from ``randn(shape, device, dtype)`` (a rank's share of
    the global batch's draw under data-parallel training; as ``posterior.sample()`` in one process)."""
    return posterior.mean + posterior.std * randn(posterior.mean.shape, posterior.mean.device, posterior.mean.dtype)


class AutoencoderStep(nn.Module):
    """The autoencoder phase of a from-scratch model as one ``forward`` (so that DDP sees it): the reconstruction
    of a posterior draw and the posterior's mean KL divergence."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, randn) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        return self.vae.decode(posterior_sample(posterior, randn)).sample, posterior.kl().mean()


class LatentNetworks:
    def __init__(self):
        self.vae = self.unet = self.text_encoder = self.tokenizer = None
        self.label_embedding: nn.Embedding | None = None
        self.controlnet = None
        self.scheduler_config: Any = None
        self.source: Path | None = None  # the pipeline folder read, copied when only LoRA weights are saved
        self._label_states: torch.Tensor | None = None

    # building --------------------------------------------------------------------------------------------------

    @classmethod
    def from_scratch(cls, c) -> LatentNetworks:
        """A single-channel autoencoder, a latent UNet cross-attending to a learned label embedding (row 0 is
        "no label", the unconditional branch of classifier-free guidance), and SD's training schedule."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        nets = cls()
        groups = min(32, *c.vae_channels, *c.unet_channels)
        nets.vae = AutoencoderKL(
            in_channels=1, out_channels=1, latent_channels=c.latent_channels, block_out_channels=c.vae_channels,
            down_block_types=("DownEncoderBlock2D",) * len(c.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(c.vae_channels),
            layers_per_block=c.layers_per_block, norm_num_groups=groups, sample_size=c.image_size)
        depth = len(c.unet_channels)
        nets.unet = UNet2DConditionModel(
            sample_size=c.image_size // 2 ** (len(c.vae_channels) - 1), in_channels=c.latent_channels,
            out_channels=c.latent_channels, block_out_channels=c.unet_channels, layers_per_block=c.layers_per_block,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
            cross_attention_dim=c.embedding_dim, attention_head_dim=8, norm_num_groups=groups)
        nets.label_embedding = nn.Embedding(c.max_labels + 1, c.embedding_dim)
        nets.scheduler_config = DDPMScheduler(num_train_timesteps=c.train_timesteps, beta_schedule="scaled_linear",
                                              beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                              clip_sample=False).config
        return nets

    @classmethod
    def read(cls, path: Path, saved: Path | None = None, merge_lora: bool = False) -> LatentNetworks:
        """A diffusers pipeline folder ``path``; with ``saved`` (a saved generator), its label embedding, LoRA
        adapters (merged into the UNet with ``merge_lora``) and ControlNet too."""
        from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

        for part in ("vae", "unet", "text_encoder"):
            check_safetensors_folder(path / part, f"the {part} of {path}")
        nets = cls()
        nets.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
        nets.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True)
        nets.scheduler_config = DDPMScheduler.from_pretrained(path, subfolder="scheduler").config
        if (path / "text_encoder").is_dir():
            from transformers import CLIPTextModel, CLIPTokenizer

            nets.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True)
            nets.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        nets.source = path
        if saved is not None and (saved / LABEL_EMBEDDING).is_file():
            weights = load_file(str(saved / LABEL_EMBEDDING))["weight"]
            nets.label_embedding = nn.Embedding(*weights.shape)
            nets.label_embedding.load_state_dict({"weight": weights})
        if saved is not None and (saved / LORA_WEIGHTS).is_file():
            nets.add_lora(0, load_file(str(saved / LORA_WEIGHTS)))
            if merge_lora:
                nets.unet.fuse_lora()
                nets.unet.unload_lora()
        if saved is not None and (saved / "controlnet").is_dir() and not merge_lora:
            nets.controlnet = ControlNetModel.from_pretrained(saved / "controlnet", use_safetensors=True)
        return nets

    @classmethod
    def read_base(cls, base: Path) -> tuple[LatentNetworks, dict | None]:
        """A base to build on: a saved ldm generator (its pipeline, LoRA merged; and its saved config) or a
        diffusers Stable Diffusion folder (no config)."""
        if (base / CONFIG).is_file():
            return cls.read(base / "pipeline", base, merge_lora=True), json.loads((base / CONFIG).read_text())["config"]
        return cls.read(base), None

    def add_lora(self, rank: int, weights: dict[str, torch.Tensor] | None = None) -> None:
        """LoRA adapters on the UNet's attention projections (``rank`` 0: the rank of ``weights``)."""
        from peft import LoraConfig, set_peft_model_state_dict

        rank = rank or next(v.shape[0] for k, v in weights.items() if "lora_A" in k)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=LORA_TARGETS))
        if weights is not None:
            set_peft_model_state_dict(self.unet, {k.removeprefix("unet."): v for k, v in weights.items()})

    def add_controlnet(self) -> None:
        """A ControlNet copied from the UNet, its condition embedding sized to the autoencoder's down-sampling."""
        from diffusers import ControlNetModel

        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.controlnet = ControlNetModel.from_unet(
            self.unet, conditioning_channels=3,
            conditioning_embedding_out_channels=tuple(16 * 2**k for k in range(int(np.log2(factor)) + 1)))

    @property
    def unet_has_lora(self) -> bool:
        return bool(getattr(self.unet, "peft_config", None))

    def modules(self) -> dict[str, nn.Module]:
        named = {"vae": self.vae, "unet": self.unet, "text_encoder": self.text_encoder,
                 "label_embedding": self.label_embedding, "controlnet": self.controlnet}
        return {name: module for name, module in named.items() if module is not None}

    # conditioning -------------------------------------------------------------------------------------------

    def embed(self, labels: torch.Tensor, device: torch.device, label_names: tuple[str, ...], template: str,
              prompts: list[str] | None = None, embedding: nn.Module | None = None) -> torch.Tensor:
        """Cross-attention states: of the prompts when given, else of the labels (0 is unconditional, k the k-th
        of ``label_names``) through the label embedding (or ``embedding``, its data-parallel wrapper) or the text
        encoder's reading of each label's prompt."""
        if self.label_embedding is not None:
            return (embedding or self.label_embedding)(labels.to(device))[:, None]
        if prompts is not None:
            return self.encode_text(prompts, device)
        if self._label_states is None:  # the text encoder never trains: each label's prompt is read once
            with torch.autocast(device.type, enabled=False):
                self._label_states = self.encode_text(
                    [name and prompt_for(template, name) for name in ("",) + label_names], device)
        return self._label_states.to(device)[labels.to(device)]

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(device))[0]

    def vae_input(self, images: torch.Tensor) -> torch.Tensor:
        return images.expand(-1, self.vae.config.in_channels, -1, -1)

    @staticmethod
    def control_image(maps: torch.Tensor) -> torch.Tensor:
        return maps.expand(-1, 3, -1, -1)

    # pipelines ----------------------------------------------------------------------------------------------

    def pipeline_parts(self, scheduler: str) -> dict[str, Any]:
        """The components of a Stable Diffusion pipeline over these networks, with the named sampling scheduler."""
        return dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                    scheduler=sampling_scheduler(scheduler, self.scheduler_config),
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def pipeline(self, scheduler: str, with_controlnet: bool = True):
        """The diffusers pipeline over these networks with the named sampling scheduler."""
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

        parts = self.pipeline_parts(scheduler)
        if self.controlnet is not None and with_controlnet:
            pipe = StableDiffusionControlNetPipeline(controlnet=self.controlnet, **parts)
        else:
            pipe = StableDiffusionPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # persistence --------------------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """The pipeline (or, for LoRA, the pipeline read and the adapters), the label embedding, the ControlNet."""
        if self.unet_has_lora:
            from peft.utils import get_peft_model_state_dict

            if self.source.resolve() != (folder / "pipeline").resolve():
                shutil.copytree(self.source, folder / "pipeline", dirs_exist_ok=True)
            (folder / LORA_WEIGHTS).parent.mkdir(exist_ok=True)
            save_file({f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(self.unet).items()},
                      str(folder / LORA_WEIGHTS))
        else:
            self.pipeline("ddpm", with_controlnet=False).save_pretrained(folder / "pipeline")  # the training schedule
        if self.label_embedding is not None:
            save_file({"weight": self.label_embedding.weight.detach().contiguous().cpu()},
                      str(folder / LABEL_EMBEDDING))
        if self.controlnet is not None:
            self.controlnet.save_pretrained(folder / "controlnet")
