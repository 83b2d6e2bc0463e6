"""SinDDM and FewDDM: multi-scale diffusion learned from one image (Kulikov et al., ICML 2023) or a few
(FewDDM, Zhang et al., ML4H 2023), single-channel.

A pyramid of the training image runs from a coarsest scale of about 3,100 px (short side 42–55 px) up to the
image limited to ~50k px, with a scale factor of about 1.411 refitted so the sides divide evenly. One fully
convolutional denoiser (no down-sampling, receptive field 33 px, so it learns local structure and can sample any
size) serves every scale, told the step and the scale through a joint embedding. The schedule, blur included,
lives in ``MultiScaleScheduler``. FewDDM is the same model fed one randomly chosen image of its set per batch;
with ``layout_per_source`` its coarsest scale is also told which image it learns, and each sample draws one.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from sonogen.data.manifest import image_id
from sonogen.generators.base import Generator, image_generators
from sonogen.generators.multiscale_denoiser import MultiScaleDenoiser, ScaleBatch, build_pyramid, upsample
from sonogen.generators.multiscale_scheduler import MultiScaleScheduler
from sonogen.generators.families import register_family

MAX_RETARGET = 2.0  # a requested size may reach twice the training size per side (bounds a request's memory)
LAYOUT_STREAM = 2  # keeps a sample's source draw apart from its noise (image_generators' stream 1)
LAYOUTS = "layouts"  # the weights file's key for the training images at the coarsest scale


@dataclass
class MultiScaleDDMConfig:
    label: str
    # ids (manifest image path or file stem) of the training images; fewddm picks `max_images` when empty
    images: tuple[str, ...] = ()
    max_images: int = 1
    # measured on the training images when training starts, then saved with the weights
    image_shape: tuple[int, int] | None = None  # (H, W) of the finest scale
    blur_gaps: tuple[float, ...] = ()  # per scale ≥ 1, see MultiScaleScheduler
    max_area: int = 50_000
    # the coarsest scale alone decides the layout: at the reference's ~55 px a small, briefly trained denoiser
    # (receptive field 33 px) tiles the fan from pieces; about its receptive field it keeps one whole fan
    # (params.yaml's CPU recipe; bench/results/sinddm.md)
    coarsest_area: int = 3110
    coarsest_side: tuple[int, int] = (42, 55)
    scale_factor: float = 1.411
    timesteps: int = 100
    channels: int = 160
    lr: float = 1e-3
    # the reference halves the rate at 20/40/70/80/90/110 k of 120 k steps; shorter runs keep the proportions
    lr_milestones: tuple[float, ...] = (1 / 6, 1 / 3, 7 / 12, 2 / 3, 3 / 4, 11 / 12)
    ema_decay: float = 0.995
    ema_start: float = 1 / 60  # share of the run during which the EMA just copies the weights (2 k of 120 k)
    gamma_clamp: float = 0.55
    # multiplies δ_s (the reference's `loss_factor`), so finer scales start noisier and re-create more detail.
    # At 1 the finer scales of an ultrasound still start almost clean (T_s = 1) and samples stay blurry; 20
    # gives the step counts the reference reaches (T_s ≈ 22–33 of 100, its gap being a larger quantity)
    # and samples with speckle and local variation (bench/results/sinddm.md)
    blur_gap_factor: float = 20.0
    # sampling only: each finer scale starts this share of its steps up (diffusers' image-to-image strength).
    # At 1 (the reference's, and that of models saved before this field), a briefly trained denoiser re-creates
    # layout there too, and on POCUS stills carves dark wedges into the coarsest scale's whole fans; 0.5 keeps
    # them, with smoother speckle (bench/results/sinddm.md)
    refine_strength: float = 1.0
    # sampling only: the coarsest scale starts this share of its steps up from its training image's own coarsest
    # scale (saved with the weights) instead of from pure noise. At 1, the reference's, a briefly trained
    # denoiser draws new layouts, on a POCUS still a quarter of them with the fan narrow, shifted or cut; lower
    # keeps the source's fan where it is and varies what lies inside it (bench/results/sinddm.md)
    layout_strength: float = 1.0
    # FewDDM only. Unconditioned, the coarsest scale gives most samples one source's layout (bench/results/sinddm.md);
    # told the source there (a learned vector per image), every sample draws one source's layout uniformly,
    # while the finer scales stay shared by all sources and mix their texture. The coarsest scale is then drawn
    # as often as all images' layouts need: its weight is multiplied by the number of images
    layout_per_source: bool = False

    def __post_init__(self):
        self.images, self.coarsest_side = tuple(self.images), tuple(self.coarsest_side)
        self.lr_milestones, self.blur_gaps = tuple(self.lr_milestones), tuple(self.blur_gaps)
        self.image_shape = tuple(self.image_shape) if self.image_shape else None
        if self.max_images < 1 or len(self.images) > self.max_images:
            raise ValueError(f"max_images must be ≥ 1 and ≥ the {len(self.images)} images named")
        low, high = self.coarsest_side
        if not 1 <= low <= high or self.coarsest_area < 1 or self.max_area < self.coarsest_area:
            raise ValueError("need 1 ≤ coarsest_side[0] ≤ coarsest_side[1] and coarsest_area ≤ max_area")
        if self.scale_factor <= 1 or self.timesteps < 2 or self.channels < 2 or self.channels % 2:
            raise ValueError("scale_factor must be > 1, timesteps ≥ 2, channels even and ≥ 2")
        if self.blur_gap_factor <= 0:
            raise ValueError(f"blur_gap_factor must be positive, got {self.blur_gap_factor}")
        for name in ("refine_strength", "layout_strength"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.image_shape and len(scale_sizes(*self.image_shape, self)) != len(self.blur_gaps) + 1:
            raise ValueError(f"blur_gaps {list(self.blur_gaps)} do not fit the pyramid of {self.image_shape}")


def scale_sizes(height: int, width: int, config: MultiScaleDDMConfig) -> list[tuple[int, int]]:
    """The pyramid's ``(H, W)`` per scale, coarsest first, for an image of ``height × width``."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}×{width}")
    if height * width > config.max_area:
        shrink = math.sqrt(height * width / config.max_area)
        height, width = int(height / shrink), int(width / shrink)
    short, long = min(height, width), max(height, width)
    coarse_short = min(max(round(math.sqrt(config.coarsest_area * short / long)), config.coarsest_side[0]),
                       config.coarsest_side[1])
    n_scales = max(1, round(math.log(short / coarse_short) / math.log(config.scale_factor)) + 1) \
        if short > coarse_short else 1
    if n_scales == 1:
        return [(height, width)]
    factor = math.exp(math.log(short / coarse_short) / (n_scales - 1))
    return [(round(height / factor ** (n_scales - 1 - k)), round(width / factor ** (n_scales - 1 - k)))
            for k in range(n_scales)]


@register_family
class SinDDM(Generator):
    family = "sinddm"
    config_class = MultiScaleDDMConfig
    conditions = frozenset({"label", "size"})
    min_training_images = 1
    steps_per_epoch = 500
    learns_one_image: ClassVar[bool] = True  # one model per image, named after it (FewDDM: a few images)

    def __init__(self, config: MultiScaleDDMConfig):
        super().__init__(config)
        if self.learns_one_image and config.max_images != 1:
            raise ValueError("sinddm learns one image (max_images 1); train fewddm for several")
        if config.layout_per_source and config.max_images < 2:
            raise ValueError("layout_per_source needs several images (fewddm with max_images ≥ 2)")
        if config.layout_strength < 1 and config.max_images > 1 and not config.layout_per_source:
            raise ValueError("layout_strength < 1 starts each sample from one training image's layout: with several "
                             "images it needs layout_per_source, which draws the image")
        self.denoiser = MultiScaleDenoiser(config.channels, sources=config.max_images if config.layout_per_source
                                           else 0)
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False)
        self._optimizers: dict[str, torch.optim.Optimizer] | None = None
        self._pyramids: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = []
        self.layouts: torch.Tensor | None = None  # (images, 1, h, w): each training image at the coarsest scale
        self.total_steps: int | None = None

    def networks(self) -> dict[str, nn.Module]:
        return {"denoiser": self.denoiser, "ema": self.ema}

    def learned_images(self) -> tuple[str, ...]:
        return tuple(self.config.images)

    @classmethod
    def name_suffix(cls, settings: dict[str, Any]) -> str:
        images = settings.get("images") or ()
        return f"-{image_id(images[0])}" if cls.learns_one_image and images else ""

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._optimizers is None:
            self._optimizers = {"denoiser": torch.optim.Adam(self.denoiser.parameters(), lr=self.config.lr)}
        return self._optimizers

    def scheduler(self) -> MultiScaleScheduler:
        """A fresh scheduler (sampling sets its scale, so concurrent samplers must not share one)."""
        if self.config.image_shape is None:
            raise ValueError(f"this {self.family} has not been trained: it has no pyramid yet")
        return MultiScaleScheduler(self.config.timesteps, [self.config.blur_gap_factor * gap for gap in
                                                           self.config.blur_gaps], self.config.gamma_clamp)

    # training ----------------------------------------------------------------------------------------------

    def select_training_images(self, image_paths: list[str], patients: list[str]) -> list[int]:
        if self.config.images:
            chosen = [_find(wanted, image_paths) for wanted in self.config.images]
        elif self.learns_one_image:
            raise ValueError(f"sinddm learns one image: name it with --set images=[ID] (one of {len(image_paths)} "
                             f"training images, e.g. {', '.join(image_id(p) for p in image_paths[:3])})")
        else:
            chosen = _spread_over_patients(patients, self.config.max_images)
        self.config.images = tuple(image_paths[k] for k in chosen)
        return chosen

    def begin_training(self, images: torch.Tensor, total_steps: int, items: Sequence[dict] = ()) -> None:
        sizes = scale_sizes(*images.shape[-2:], self.config)
        pyramids = [build_pyramid(image, sizes) for image in images.cpu()]
        gaps = [float(np.mean([(p[k][0] - p[k][1]).pow(2).mean().sqrt().item() for p in pyramids]))
                for k in range(1, len(sizes))]
        # rounded so that a resumed run, measuring again, finds the config of its checkpoint
        self.config.image_shape, self.config.blur_gaps = sizes[-1], tuple(float(f"{g:.6g}") for g in gaps)
        self._pyramids = [[(c.to(self.device), b if b is None else b.to(self.device)) for c, b in p] for p in pyramids]
        self.layouts = torch.stack([pyramid[0][0] for pyramid in pyramids])
        self.total_steps = total_steps

    def training_batches(self, images: torch.Tensor, batch_size: int, steps: int | None,
                         generator: torch.Generator) -> Iterator[ScaleBatch]:
        scheduler = self.scheduler()
        # scales are drawn in proportion to the steps they train, as in the reference; told its source, the
        # coarsest scale learns one layout per image, and each needs the steps one image's layout gets
        weights = torch.tensor([float(scheduler.train_timesteps(s)) for s in range(scheduler.n_scales)])
        if self.config.layout_per_source:
            weights[0] *= len(self._pyramids)
        for _ in range(steps or self.steps_per_epoch):
            scale = int(torch.multinomial(weights, 1, generator=generator))
            source = int(torch.randint(len(self._pyramids), (1,), generator=generator))
            clean, blurred = self._pyramids[source][scale]
            expand = (batch_size, -1, -1, -1)
            yield ScaleBatch(scale, clean.expand(expand), None if blurred is None else blurred.expand(expand), source)

    def learning_rate(self) -> float:
        if not self.total_steps:
            return self.config.lr
        halvings = sum(self.step >= m * self.total_steps for m in self.config.lr_milestones)
        return self.config.lr * 0.5**halvings

    def train_step(self, batch: ScaleBatch) -> dict[str, float]:
        scheduler = self.scheduler()
        clean = batch.clean
        timesteps = self.randint(scheduler.train_timesteps(batch.scale), len(clean), clean.device)
        noise = self.randn(clean.shape, clean.device, clean.dtype)
        target = scheduler.training_target(clean, batch.blurred, timesteps, batch.scale)
        sources = torch.full_like(timesteps, batch.source) if self._told_source(batch.scale) else None
        predicted = self.parallel(self.denoiser)(scheduler.add_noise(target, noise, timesteps), timesteps,
                                                 batch.scale, sources)
        loss = (predicted.float() - noise).abs().mean()  # L1 on the predicted noise
        optimizer = self.optimizers()["denoiser"]
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.step += 1
        self._update_ema()
        return {"loss": loss.item(), "lr": self.learning_rate()}

    def distribute(self, wrap, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        # told its source only at the coarsest scale: the source embedding is unused in the other scales' steps
        self._parallel[id(self.denoiser)] = wrap(self.denoiser, find_unused_parameters=self.config.layout_per_source)

    def _weights(self) -> dict[str, torch.Tensor]:
        layouts = {} if self.layouts is None else {LAYOUTS: self.layouts.contiguous().cpu()}
        return {**super()._weights(), **layouts}

    def _load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        super()._load_weights(tensors)
        self.layouts = tensors.get(LAYOUTS)  # absent from models saved before layout_strength

    def _told_source(self, scale: int) -> bool:
        return self.config.layout_per_source and scale == 0

    @torch.no_grad()
    def _update_ema(self) -> None:
        live, averaged = list(self.denoiser.parameters()), list(self.ema.parameters())
        if self.total_steps is not None and self.step < self.config.ema_start * self.total_steps:
            torch._foreach_copy_(averaged, live)
        else:
            torch._foreach_lerp_(averaged, live, 1 - self.config.ema_decay)

    # sampling ----------------------------------------------------------------------------------------------

    def check_condition(self, condition: dict[str, Any] | None) -> dict[str, Any]:
        condition = super().check_condition(condition)
        if "size" in condition:
            size = condition["size"]
            height, width = self.config.image_shape or (0, 0)
            if (not isinstance(size, (list, tuple)) or len(size) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
                raise ValueError(f"size must be [height, width] in pixels, got {size!r}")
            if not (8 <= size[0] <= MAX_RETARGET * height and 8 <= size[1] <= MAX_RETARGET * width):
                raise ValueError(f"size {list(size)} is outside 8 px … {MAX_RETARGET:g}× the training size "
                                 f"{height}×{width}")
            condition["size"] = (int(size[0]), int(size[1]))
        if "source" in condition:
            condition["source"] = self._source_index(condition["source"])
        return condition

    def accepts_condition(self, key: str) -> bool:
        return key in self.conditions and (key != "source" or self.config.layout_per_source)

    def _source_index(self, source: Any) -> int:
        if not self.accepts_condition("source"):
            raise ValueError(f"this {self.family} was trained without layout_per_source: it cannot be told a source")
        images = self.config.images
        if isinstance(source, str):
            return _find(source, list(images))
        if isinstance(source, bool) or not isinstance(source, int) or not 0 <= source < len(images):
            raise ValueError(f"source must be a training image's index (0–{len(images) - 1}) or id "
                             f"({', '.join(map(image_id, images))}), got {source!r}")
        return source

    def sample_sizes(self, size: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """Per-scale sizes for an output of ``size`` (default: the training size); a different size stretches
        every scale by the same factors (retargeting)."""
        if self.config.image_shape is None:
            raise ValueError(f"this {self.family} has not been trained: it has no pyramid yet")
        sizes = scale_sizes(*self.config.image_shape, self.config)
        if size is None:
            return sizes
        fy, fx = size[0] / sizes[-1][0], size[1] / sizes[-1][1]
        return [*[(max(1, round(h * fy)), max(1, round(w * fx))) for h, w in sizes[:-1]], tuple(size)]

    def layout_sources(self, n: int, seed: int, source: int | None = None) -> torch.Tensor | None:
        """Which training image's layout each of ``n`` samples of ``seed`` takes: ``source`` if given, else a
        draw that, like the noise, depends on the seed and the sample's position only (None: not told, as in
        the paper)."""
        if not self.config.layout_per_source:
            return None
        if source is not None:
            return torch.full((n,), source)
        return torch.cat([torch.randint(len(self.config.images), (1,), generator=g)
                          for g in image_generators(seed, n, stream=LAYOUT_STREAM)])

    @torch.no_grad()
    def scale_samples(self, n: int, seed: int, condition: dict[str, Any] | None = None,
                      generators: list[torch.Generator] | None = None) -> Iterator[torch.Tensor]:
        """The batch after each scale, coarsest first; the last is the sample. ``generators``: each image's noise
        (default: ``image_generators(seed, n)``), for a pool that hands its members some positions of a seed."""
        condition = condition or {}
        scheduler, sizes = self.scheduler(), self.sample_sizes(condition.get("size"))
        generators = generators or image_generators(seed, n)
        sources = self.layout_sources(n, seed, condition.get("source"))
        x = torch.stack([torch.randn(1, *sizes[0], generator=g) for g in generators]).to(self.device)
        blurred = None
        for scale, size in enumerate(sizes):
            scheduler.set_timesteps(scale, self.config.layout_strength if scale == 0 else self.config.refine_strength)
            start = torch.full((n,), int(scheduler.timesteps[0]))
            if scale > 0:
                blurred = upsample(x, size)
                noise = torch.stack([torch.randn(1, *size, generator=g) for g in generators]).to(self.device)
                x = scheduler.add_noise(blurred, noise, start)
            elif self.config.layout_strength < 1:  # x holds the coarsest scale's noise
                x = scheduler.add_noise(self._source_layouts(sources, n, size), x, start)
            told = sources.to(self.device) if self._told_source(scale) else None
            for t in scheduler.timesteps.tolist():
                predicted = self.ema(x, torch.full((n,), t, device=self.device), scale, told).float()
                x = scheduler.step(predicted, t, x, blurred=blurred, generator=generators).prev_sample
            yield x

    def _source_layouts(self, sources: torch.Tensor | None, n: int, size: tuple[int, int]) -> torch.Tensor:
        """Each sample's training image at the coarsest scale, resized to ``size``."""
        if self.layouts is None:
            raise ValueError(f"this {self.family} was saved without its training images' coarsest scale: sample it "
                             "with layout_strength 1, or train it again")
        chosen = self.layouts[torch.zeros(n, dtype=torch.long) if sources is None else sources.cpu()]
        return upsample(chosen, size).to(self.device)

    def generate(self, n: int, seed: int, condition: dict[str, Any]) -> torch.Tensor:
        *_, images = self.scale_samples(n, seed, condition)
        return images.clamp(-1, 1)


@dataclass
class FewDDMConfig(MultiScaleDDMConfig):
    max_images: int = 3  # the paper trains on 2–3 images


@register_family
class FewDDM(SinDDM):
    family = "fewddm"
    config_class = FewDDMConfig
    conditions = frozenset({"label", "size", "source"})  # source: with layout_per_source, one image's layout
    learns_one_image = False


def _find(wanted: str, image_paths: list[str]) -> int:
    matches = [k for k, path in enumerate(image_paths) if wanted in (path, image_id(path))]
    if len(matches) != 1:
        found = "no" if not matches else f"{len(matches)}"
        raise ValueError(f"{found} training images of this label match {wanted!r}; use its manifest path "
                         f"(e.g. {image_paths[0] if image_paths else '-'})")
    return matches[0]


def _spread_over_patients(patients: list[str], count: int) -> list[int]:
    """``count`` image indices, from as many different patients as possible, chosen reproducibly."""
    order = np.random.default_rng(0).permutation(len(patients)).tolist()
    chosen: list[int] = []
    seen: set[str] = set()
    for k in order:
        if patients[k] not in seen and len(chosen) < count:
            chosen.append(k)
            seen.add(patients[k])
    chosen += [k for k in order if k not in chosen][: count - len(chosen)]
    return sorted(chosen)
