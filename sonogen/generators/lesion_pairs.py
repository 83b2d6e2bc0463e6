"""Lesion pairs (after Wen et al., J. Med. Imaging 2026): a lesion drawn into a healthy image, with its mask.

Three stages on a trained ``ldm`` (the anatomy model), as DiffUltra composes one:
1. *where and what shape*: a box placed on the healthy frame's anatomy by a lesion bank of the training lesions
   (the pleura for lung; a frame without one takes the lesion's own position), and a shape from the label's real
   masks, varied (``lesion_shapes.py``);
2. *lesion synthesis*: a ControlNet on the lesion masks redraws the frame with the lesion in the mask; only the
   mask and ``margin`` pixels around it are kept from it, blended, the rest is the healthy frame;
3. *refinement*: a low-strength img2img pass of the anatomy model over the lesion, its margin and the band
   behind it (shadowing, enhancement), blended in the same way; a segmenter trained beside the ControlNet on the
   real pairs then re-reads the lesion, and its reading replaces the mask where it agrees with it, so the mask
   describes the final image.
The choices and what the paper did are in ``docs/lesionpairs.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sonogen.data.lesion_bank import LesionBank, placement_anatomy
from sonogen.data.manifest import boxes_from_mask
from sonogen.generators.diffultra import DiffUltra, DiffUltraConfig
from sonogen.generators.families import register_family
from sonogen.generators.lesion_shapes import ShapeBank, behind, feathered, near
from sonogen.metrics.segmentation import Segmenter, dice, segment
from sonogen.sampling import to_uint8

SEGMENTER, SHAPES = "segmenter.safetensors", "shapes"


@dataclass
class LesionPairsConfig(DiffUltraConfig):
    strength: float = 0.8  # stage 2: how far the frame is re-noised for the ControlNet (only the lesion is kept)
    shape_size: int = 32  # side at which the real lesion shapes are kept
    shape_jitter: float = 0.3  # how far a drawn outline moves from the real one (0: the real shapes, flipped)
    margin: int = 3  # pixels around the mask that synthesis may change (the blended boundary)
    refine_strength: float = 0.3  # stage 3's img2img strength; 0: no refinement
    posterior: float = 0.5  # stage 3 also changes this many lesion heights behind (below) the lesion
    mask_update: bool = True  # the mask re-read by the segmenter after refinement, where it agrees
    mask_agreement: float = 0.5  # the least Dice between reading and drawn mask for the reading to be kept
    segmenter_width: int = 16
    lr_segmenter: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        if self.bank:
            raise ValueError("lesionpairs builds its lesion bank from its training masks; leave bank empty")
        if self.shape_size < 4 or self.shape_jitter < 0 or self.margin < 0 or self.posterior < 0:
            raise ValueError("shape_size must be ≥ 4, shape_jitter, margin and posterior ≥ 0")
        if not 0 <= self.refine_strength <= 1 or not 0 <= self.mask_agreement <= 1:
            raise ValueError(f"refine_strength and mask_agreement must be in [0, 1], got {self.refine_strength} and "
                             f"{self.mask_agreement}")


@register_family
class LesionPairs(DiffUltra):
    family = "lesionpairs"
    config_class = LesionPairsConfig
    places_lesions = False
    draws_masks = True
    retired_config_keys = frozenset()

    def __init__(self, config: LesionPairsConfig, folder: Path | None = None):
        super().__init__(config, folder)
        self.segmenter = Segmenter(config.segmenter_width)
        self.shapes: ShapeBank | None = None
        self._segmenter_optimizer: torch.optim.Optimizer | None = None
        if folder is not None and (folder / SEGMENTER).is_file():
            self.segmenter.load_state_dict(load_file(str(folder / SEGMENTER)))
            self.shapes = ShapeBank.load(folder / SHAPES)
        self.segmenter.eval()

    def networks(self) -> dict[str, nn.Module]:
        return {**self.ldm.networks(), "segmenter": self.segmenter}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._segmenter_optimizer is None:
            self._segmenter_optimizer = torch.optim.Adam(self.segmenter.parameters(), lr=self.config.lr_segmenter)
        return {**self.ldm.optimizers(), "segmenter": self._segmenter_optimizer}

    @classmethod
    def prerequisites(cls, settings: dict[str, Any]) -> dict[str, str]:
        return {} if settings.get("base_model") else {"base_model": "ldm"}

    # training: the ControlNet on the lesion masks, the segmenter on the same pairs ------------------------------

    def begin_training(self, images: torch.Tensor, total_steps: int, items: Sequence[dict] = ()) -> None:
        masks = [item["mask"][0].numpy().astype(np.uint8) for item in items]
        lesions = [(k, box) for k, (item, mask) in enumerate(zip(items, masks))
                   for box in (item["boxes"].int().tolist() or boxes_from_mask(mask))]
        if not lesions:
            raise ValueError(f"lesionpairs learns from lesion masks, and no {self.config.label} training image has one")
        entries = {}
        for k, box in lesions:
            entries.setdefault(k, (f"train-{k}", items[k]["patient_id"], to_uint8(items[k]["image"][None])[0], []))
            entries[k][3].append(box)
        try:
            self.bank = LesionBank.from_images(list(entries.values()), {"data": "training images", "label":
                                               self.config.label}, self.config.structure_size,
                                               self.config.bank_bandwidth)
            lesions = [(int(lesion.image.split("-")[1]), lesion.box) for lesion in self.bank.lesions]
        except ValueError:  # no pleural line in any frame (breast, say): lesions keep their own positions
            self.bank = None
        self.shapes = ShapeBank.from_lesions([(masks[k], box) for k, box in lesions], self.config.shape_size)
        self.segmenter.train()
        self.ldm.begin_training(images, total_steps, items)

    def _control_maps(self, images: torch.Tensor, items: Sequence[dict]) -> torch.Tensor:
        return torch.stack([item["mask"].float() for item in items])

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        from monai.losses import DiceCELoss

        losses = self.ldm.train_step(batch)
        criterion = DiceCELoss(sigmoid=True, batch=True, smooth_nr=0.0, smooth_dr=1.0)
        loss = criterion(self.parallel(self.segmenter)(batch["images"]).float(), batch["maps"].float())
        optimizer = self.optimizers()["segmenter"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {**losses, "loss_segmenter": loss.item()}

    def distribute(self, wrap, rank: int, world: int) -> None:
        super().distribute(wrap, rank, world)
        self._parallel[id(self.segmenter)] = wrap(self.segmenter)

    # sampling ------------------------------------------------------------------------------------------------

    def generate(self, n: int, seed: int, condition: dict[str, Any]) -> torch.Tensor:
        return self.generate_with_masks(n, seed, condition)[0]

    def generate_with_boxes(self, n: int, seed: int, condition: dict[str, Any]) -> tuple[torch.Tensor, None]:
        return self.generate(n, seed, condition), None

    def generate_with_masks(self, n: int, seed: int, condition: dict[str, Any]) -> tuple[torch.Tensor, list]:
        if self.shapes is None:
            raise ValueError("this lesionpairs has no lesion shapes: train it first")
        c = self.config
        frames = self.backgrounds(n, seed, condition)
        masks = np.stack([self.lesion_mask(frame, np.random.default_rng([seed, k, 1]), condition)
                          for k, frame in enumerate(frames)])
        healthy = torch.from_numpy(frames.astype(np.float32) / 127.5 - 1)[:, None]
        drawn = self.redraw(frames, seed, condition, condition.get("strength", c.strength), masks.astype(np.float32))
        images = _blend(healthy, drawn.cpu(), feathered(masks, near(masks, c.margin), c.margin))
        if c.refine_strength > 0:
            refined = self.redraw(to_uint8(images), seed, condition, c.refine_strength, stream=3)
            core = masks.astype(bool) | behind(masks, c.posterior)
            images = _blend(images, refined.cpu(), feathered(core, near(core, c.margin), c.margin))
        if c.mask_update:
            masks = self._reread(images, masks)
        return images, list(masks)

    def lesion_mask(self, frame: np.ndarray, rng: np.random.Generator, condition: dict[str, Any]) -> np.ndarray:
        """Stage 1: a lesion mask ``(H, W)`` for ``frame`` (uint8), from ``rng``: placed by the lesion bank on the
        frame's anatomy, or where no lesion fits it (a poor generated frame) at a real lesion's own position."""
        try:
            if self.bank is None:
                raise ValueError("no lesion bank")
            anatomy = placement_anatomy(frame, self.bank.typical_depth)
            box, index = self.bank.sample(anatomy, rng, condition.get("size_bias", self.config.size_bias))
        except ValueError:
            index = int(rng.integers(len(self.shapes)))
            box = self.shapes.placed_box(index, frame.shape, rng)
        return self.shapes.draw(index, box, frame.shape, rng, self.config.shape_jitter)

    def _reread(self, images: torch.Tensor, masks: np.ndarray) -> np.ndarray:
        """The segmenter's reading of each lesion within its margin where it agrees with the drawn mask (Dice at
        least ``mask_agreement``), else the drawn mask."""
        read = segment(self.segmenter, images)[:, 0].numpy() & near(masks, self.config.margin)
        agree = dice(torch.from_numpy(read)[:, None], torch.from_numpy(masks)[:, None]).numpy()
        return np.where((agree >= self.config.mask_agreement)[:, None, None], read, masks).astype(np.uint8)

    # persistence ---------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        folder = super().save(folder)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.segmenter.state_dict().items()},
                  str(folder / SEGMENTER))
        if self.shapes is not None:
            self.shapes.save(folder / SHAPES)
        return folder

    def _weights(self) -> dict[str, torch.Tensor]:
        return {**super()._weights(), **{f"segmenter.{k}": v.detach().contiguous().cpu()
                                         for k, v in self.segmenter.state_dict().items()}}

    def _load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        super()._load_weights(tensors)
        self.segmenter.load_state_dict({k[len("segmenter."):]: v for k, v in tensors.items()
                                        if k.startswith("segmenter.")})


def _blend(base: torch.Tensor, drawn: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
    weight = torch.from_numpy(weights)[:, None]
    return base * (1 - weight) + drawn.float() * weight
