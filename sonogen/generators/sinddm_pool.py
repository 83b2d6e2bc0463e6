"""SinDDM as Zhang et al. (ML4H 2023) ran it for a class: one single-image SinDDM per chosen training image, their
samples pooled into one sampler.

The pool chooses ``max_images`` training images of its label spread over patients (or takes the ``images``
named), trains one SinDDM per image in turns (each member sees its own image only, with its own optimiser, EMA and
learning-rate schedule over its share of the steps), and saves them as one model whose config lists every
member's. A sample's member is drawn from its seed and position, and its noise is the one that position would get
from that member alone, so a sample does not change with how many are drawn with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from sonogen.generators.base import Generator, image_generators
from sonogen.generators.families import register_family
from sonogen.generators.sinddm import LAYOUTS, MultiScaleDDMConfig, SinDDM, _find, _spread_over_patients

MEMBER_STREAM = 3  # keeps a sample's member draw apart from its noise and layout draws


@dataclass
class SinDDMPoolConfig(MultiScaleDDMConfig):
    max_images: int = 8  # the paper pooled eight single-image models per class
    # each member SinDDM's config, filled in when training starts and saved with the pool
    members: tuple[dict, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        self.members = tuple(dict(member) for member in self.members)
        if self.layout_per_source:
            raise ValueError("a sinddmpool's members learn one image each: layout_per_source is fewddm's; remove it")


@register_family
class SinDDMPool(Generator):
    family = "sinddmpool"
    config_class = SinDDMPoolConfig
    conditions = frozenset({"label", "size"})
    min_training_images = 1
    steps_per_epoch = 500
    pools = "sinddm"

    def __init__(self, config: SinDDMPoolConfig):
        super().__init__(config)
        self.members = [SinDDM(member_config(values)) for values in config.members]
        self.total_steps: int | None = None

    def networks(self) -> dict[str, nn.Module]:
        return {f"{name}{k}": module for k, member in enumerate(self.members)
                for name, module in member.networks().items()}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {f"denoiser{k}": member.optimizers()["denoiser"] for k, member in enumerate(self.members)}

    def learned_images(self) -> tuple[str, ...]:
        return tuple(self.config.images)

    @classmethod
    def from_members(cls, members: Sequence[Generator]) -> SinDDMPool:
        """A pool of single-image SinDDMs trained apart, in the given order."""
        if not members or any(member.family != cls.pools for member in members):
            raise ValueError(f"a {cls.family} pools trained {cls.pools} models, got "
                             f"{sorted({member.family for member in members}) or 'none'}")
        for what in ("label", "image_shape"):
            if len(values := {str(getattr(member.config, what)) for member in members}) > 1:
                raise ValueError(f"the models to pool must share their {what}: got {', '.join(sorted(values))}")
        images = [image for member in members for image in member.learned_images()]
        if len(set(images)) < len(images):
            raise ValueError("two of the models to pool learned the same image: pool each image once")
        template = {f.name: getattr(members[0].config, f.name) for f in dataclasses.fields(MultiScaleDDMConfig)}
        pool = cls(SinDDMPoolConfig(**{**template, "images": tuple(images), "max_images": len(images),
                                       "image_shape": None, "blur_gaps": (),
                                       "members": tuple(dataclasses.asdict(m.config) for m in members)}))
        for mine, theirs in zip(pool.members, members):
            mine._load_weights(theirs._weights())
            mine.step, mine.epoch = theirs.step, theirs.epoch
        pool.step, pool.epoch = sum(m.step for m in members), max(m.epoch for m in members)
        return pool

    @classmethod
    def member_sections(cls, model: dict, train: dict, source: str, members: int) -> tuple[dict, dict]:
        # a member trained apart takes the turns it would take in the pool: its share of each epoch's steps
        steps = int(train.get("steps_per_epoch") or cls.steps_per_epoch)
        own = {k: v for k, v in model.items() if k not in ("images", "max_images", "members")}
        return {**own, "images": [source]}, {**train, "steps_per_epoch": -(-steps // members)}

    def to(self, device: torch.device | str) -> SinDDMPool:
        super().to(device)
        for member in self.members:
            member.device = self.device
        return self

    # training ----------------------------------------------------------------------------------------------

    def select_training_images(self, image_paths: list[str], patients: list[str]) -> list[int]:
        chosen = ([_find(wanted, image_paths) for wanted in self.config.images] if self.config.images
                  else _spread_over_patients(patients, self.config.max_images))
        self.config.images = tuple(image_paths[k] for k in chosen)
        template = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(MultiScaleDDMConfig)}
        self.members = [SinDDM(member_config({**template, "images": (image,), "max_images": 1}))
                        for image in self.config.images]
        return chosen

    def begin_training(self, images: torch.Tensor, total_steps: int, items: Sequence[dict] = ()) -> None:
        if len(images) != len(self.members):
            raise ValueError(f"{len(images)} training images for {len(self.members)} members")
        self.total_steps = total_steps
        for k, member in enumerate(self.members):
            member.begin_training(images[k : k + 1], self.member_steps(k, total_steps))
        self.config.members = tuple(dataclasses.asdict(member.config) for member in self.members)

    def member_steps(self, k: int, steps: int) -> int:
        """How many of the pool's first ``steps`` steps are member ``k``'s (they take turns)."""
        return len(range(k, steps, len(self.members)))

    def training_batches(self, images: torch.Tensor, batch_size: int, steps: int | None,
                         generator: torch.Generator) -> Iterator[tuple[int, Any]]:
        steps = steps or self.steps_per_epoch
        turns = [member.training_batches(images[k : k + 1], batch_size, -(-steps // len(self.members)), generator)
                 for k, member in enumerate(self.members)]  # drawn lazily: the turns taken decide how many each gives
        first = self.step  # read once: train_step advances it while this is drawn from
        for step in range(first, first + steps):
            k = step % len(self.members)
            yield k, next(turns[k])

    def train_step(self, batch: tuple[int, Any]) -> dict[str, float]:
        k, member_batch = batch
        losses = self.members[k].train_step(member_batch)
        self.step += 1
        return losses

    def distribute(self, wrap, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        for member in self.members:
            member.distribute(wrap, rank, world)

    def load_checkpoint(self, path) -> None:
        super().load_checkpoint(path)
        for k, member in enumerate(self.members):  # each member's schedule runs on its own steps
            member.step = self.member_steps(k, self.step)

    def _weights(self) -> dict[str, torch.Tensor]:
        layouts = {f"{LAYOUTS}{k}": m.layouts.contiguous().cpu() for k, m in enumerate(self.members)
                   if m.layouts is not None}
        return {**super()._weights(), **layouts}

    def _load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        super()._load_weights(tensors)
        for k, member in enumerate(self.members):
            member.layouts = tensors.get(f"{LAYOUTS}{k}")

    # sampling ----------------------------------------------------------------------------------------------

    def check_condition(self, condition: dict[str, Any] | None) -> dict[str, Any]:
        condition = super().check_condition(condition)
        if not self.members:
            raise ValueError("this sinddmpool has not been trained: it has no members yet")
        return self.members[0].check_condition(condition)  # every member learned an image of the same size

    def member_of(self, n: int, seed: int) -> torch.Tensor:
        """The member that draws each of ``n`` samples of ``seed`` (by the seed and the sample's position)."""
        return torch.cat([torch.randint(len(self.members), (1,), generator=g)
                          for g in image_generators(seed, n, stream=MEMBER_STREAM)])

    @torch.no_grad()
    def generate(self, n: int, seed: int, condition: dict[str, Any]) -> torch.Tensor:
        members, noise = self.member_of(n, seed), image_generators(seed, n)
        images: list[torch.Tensor | None] = [None] * n
        for k, member in enumerate(self.members):
            positions = torch.nonzero(members == k).flatten().tolist()
            if positions:
                *_, drawn = member.scale_samples(len(positions), seed, condition, [noise[p] for p in positions])
                for position, image in zip(positions, drawn.clamp(-1, 1)):
                    images[position] = image
        return torch.stack(images)


def member_config(values: dict[str, Any]) -> MultiScaleDDMConfig:
    return SinDDM.saved_config({k: v for k, v in values.items() if k != "members"})
