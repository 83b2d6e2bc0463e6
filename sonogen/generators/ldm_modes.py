"""What varies between the ways a latent diffusion model is trained: the networks it starts from, which of them
learn (and with which optimisers), and what each training image is conditioned on.

- ``from-scratch``: an autoencoder trained on the dataset for its first ``vae_steps``, then the latent UNet and a
  label embedding (no outside weights);
- ``fine-tune``: a Stable Diffusion checkpoint's UNet, in full or through LoRA adapters, prompted from the labels;
- ``controlnet``: a ControlNet on top of a saved ldm or an SD checkpoint, the rest frozen, conditioned on a map
  per training image (lesion masks, boxes filled, or what a family that composes it renders).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from sonogen.data.manifest import mask_from_boxes
from sonogen.generators.ldm_networks import LatentNetworks
from sonogen.tracking import local_folder

# the condition map of each training image, (N, 1, H, W) in [0, 1], from the images and their dataset items
ControlMaps = Callable[[torch.Tensor, Sequence[dict]], torch.Tensor]


class Mode:
    name: str
    trains_autoencoder = False
    has_control = False

    def networks(self, config, folder: Path | None) -> LatentNetworks:
        """The networks: a saved generator's (``folder``), or those this mode starts from."""
        if folder is not None:
            return LatentNetworks.read(folder / "pipeline", folder)
        return self.start(config)

    def start(self, config) -> LatentNetworks:
        raise NotImplementedError

    def trained(self, nets: LatentNetworks) -> list[nn.Module]:
        """The modules that learn; everything else stays frozen."""
        return [m for m in (nets.unet, nets.label_embedding) if m is not None]

    def control_maps(self, config, images: torch.Tensor, items: Sequence[dict]) -> torch.Tensor | None:
        return None


def _read_base(config, what: str) -> LatentNetworks:
    """The base of a fine-tune or ControlNet; a saved ldm passes on its labels, licence and checkpoint origin."""
    if not config.base_model:
        raise ValueError(f"mode {config.mode} needs base_model: a diffusers Stable Diffusion folder or s3:// URI"
                         f"{' or a trained ldm generator folder' if what == 'controlnet' else ''}")
    nets, saved = LatentNetworks.read_base(local_folder(config.base_model, "base model"))
    if saved is not None:  # its label embedding's rows are its labels, in its order; its checkpoint's terms bind
        config.labels = config.labels or tuple(saved["labels"])
        config.base_licence = config.base_licence or saved.get("base_licence", "")
        config.base_origin = config.base_origin or saved.get("base_origin") or saved.get("base_model", "")
    return nets


class FromScratch(Mode):
    name = "from-scratch"
    trains_autoencoder = True

    def start(self, config) -> LatentNetworks:
        return LatentNetworks.from_scratch(config)


class FineTune(Mode):
    name = "fine-tune"

    def start(self, config) -> LatentNetworks:
        nets = _read_base(config, self.name)
        if config.lora_rank:
            nets.add_lora(config.lora_rank)
        return nets


class ControlNet(Mode):
    name = "controlnet"
    has_control = True

    def __init__(self, maps: ControlMaps | None = None):
        self.maps = maps  # None: the config's control source, masks or boxes

    def networks(self, config, folder: Path | None) -> LatentNetworks:
        nets = super().networks(config, folder)
        if nets.controlnet is None:
            nets.add_controlnet()
        return nets

    def start(self, config) -> LatentNetworks:
        return _read_base(config, self.name)

    def trained(self, nets: LatentNetworks) -> list[nn.Module]:
        return [nets.controlnet]

    def control_maps(self, config, images: torch.Tensor, items: Sequence[dict]) -> torch.Tensor:
        if self.maps is not None:
            return self.maps(images, items)
        height, width = images.shape[-2:]
        return torch.stack([item["mask"] if config.control == "mask" else torch.from_numpy(
            mask_from_boxes(item["boxes"].int().tolist(), height, width)).float()[None] for item in items])


MODES = ("from-scratch", "fine-tune", "controlnet")


def mode_of(config, maps: ControlMaps | None = None) -> Mode:
    return {"from-scratch": FromScratch, "fine-tune": FineTune}.get(config.mode, lambda: ControlNet(maps))()


def blank_control(control: str, items: Sequence[dict]) -> str:
    """Why a ControlNet on ``control`` has nothing to learn from these training items, and the other source when
    they have it."""
    sources = {"mask": ("lesion masks", any(item["mask"].any() for item in items)),
               "boxes": ("lesion boxes", any(len(item["boxes"]) for item in items))}
    other = next(source for source in sources if source != control)
    hint = f"; they have {sources[other][0]}: train with --set control={other}" if sources[other][1] else ""
    return (f"control {control!r}: the {len(items)} training images have no {sources[control][0]}, so every "
            f"condition would be blank{hint}")
