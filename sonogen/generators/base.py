"""The contract every generator family implements, and its safetensors + JSON persistence.

A family is a ``Generator`` subclass with a typed config dataclass. It owns its networks, optimisers and one
training step; the shared trainer owns the loop, devices, precision, checkpoints, logging and progress. The
contract's data-parallel part (how a step runs on several ranks) is ``distributed.DataParallelSteps``. Saved
generators are a folder with ``config.json`` (family, config, training position) and ``weights.safetensors``;
checkpoints add optimiser state to the same safetensors file. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sonogen.config import config_from_dict
from sonogen.generators import distributed
from sonogen.sampling import to_uint8

CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_METADATA = "sonogen.checkpoint"
FORMAT_VERSION = 1


def image_generators(seed: int, n: int, stream: int = 1) -> list[torch.Generator]:
    """One torch generator per image for the noise a sampler draws, so image ``k`` of a seed gets the same noise
    however many are drawn with it; ``stream`` keeps uses of one seed apart."""
    states = (np.random.SeedSequence([seed, k, stream]).generate_state(1, np.uint64)[0] for k in range(n))
    return [torch.Generator().manual_seed(int(state)) for state in states]


def batch_indices(count: int, batch_size: int, steps: int | None, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of batch indices into ``count`` images: a shuffled pass (the last partial batch dropped when
    there is a full one), or ``steps`` batches drawn with replacement."""
    if steps is not None:
        for _ in range(steps):
            yield torch.randint(count, (batch_size,), generator=generator)
        return
    order = torch.randperm(count, generator=generator)
    end = count - count % batch_size if count >= batch_size else count
    for start in range(0, end, batch_size):
        yield order[start : start + batch_size]


class Generator(distributed.DataParallelSteps, ABC):
    """A generator family. Its ``config_class`` is a dataclass with at least ``label`` (the label the generator is
    named for and gated on). Everything the platform (training, evaluation, the pipelines, serving) needs to know
    about a family is asked here, never by reading its config or importing its module."""

    family: ClassVar[str]
    config_class: ClassVar[type]
    # the condition keys `sample` accepts, e.g. {"label"}, {"prompt", "mask"}, {"boxes"}
    conditions: ClassVar[frozenset[str]] = frozenset()
    # families that learn from one or a few chosen images change these, and the training hooks below
    min_training_images: ClassVar[int] = 2
    steps_per_epoch: ClassVar[int | None] = None  # None: an epoch is one pass over the training images
    places_lesions: ClassVar[bool] = False  # samples come with lesion boxes (``generate_with_boxes``)
    draws_masks: ClassVar[bool] = False  # samples come with lesion masks (``generate_with_masks``)
    keeps_best_epoch: ClassVar[bool] = False  # a GAN keeps its best epoch by realism readings (best_epoch.py)
    # params.yaml gate sets beyond the family's: ``<family>-<variant>`` adds thresholds for one variant only
    gate_variants: ClassVar[tuple[str, ...]] = ()
    # config keys of generators saved by earlier versions that this family no longer has: ignored when they load
    retired_config_keys: ClassVar[frozenset[str]] = frozenset()
    # the family whose models this family pools when they were trained apart (``from_members``), or None
    pools: ClassVar[str | None] = None

    def __init__(self, config):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.family} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.step = 0
        self.epoch = 0
        self.device = torch.device("cpu")
        self._mode_lock = threading.Lock()
        self.rank, self.world = 0, 1  # data-parallel position (``distribute``)
        self._parallel: dict[int, nn.Module] = {}

    @abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """Every module whose weights define the generator (and its critics while training)."""

    @abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimisers, created on first use so sampling-only loads need none."""

    # what the platform asks --------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """The label this generator is named for, samples by default and is gated on."""
        return self.config.label

    @property
    def image_size(self) -> int | None:
        """The side of the square images it learns and samples, or None when it takes its training images' size
        (a multi-scale model samples any size)."""
        return None

    def learned_images(self) -> tuple[str, ...]:
        """The manifest paths of the training images a single- or few-image model learned from (the gates compare
        its samples with each of them); () for a model of the whole training split."""
        return ()

    # the class methods below read a family's model settings as params.yaml and --set give them (label included),
    # before a config is built: a config that needs a base model cannot be built until the base is there

    @classmethod
    def name_suffix(cls, settings: dict[str, Any]) -> str:
        """What follows ``<family>-<label>`` in the model's default folder and report name (``""``; the training
        image's id for families with one model per image)."""
        return ""

    @classmethod
    def prerequisites(cls, settings: dict[str, Any]) -> dict[str, str]:
        """What must exist before training, as ``{config key: what}`` for the keys the settings leave empty:
        ``"lesion_bank"`` (the training split's lesion bank, built first), or a family name (a model of that family
        trained first on the same data and label, with ``train.<family>``'s settings). The key is then set to the
        folder made."""
        return {}

    @classmethod
    def declines(cls, settings: dict[str, Any]) -> str | None:
        """Why this family trains no generator for the settings' label (a label its samples are drawn into rather
        than drawn from), or None when it does; the pipelines leave such runs out and say why."""
        return None

    @property
    def draws_requested_lesions(self) -> bool:
        """Whether it draws a lesion where a request asks (a mask-conditioned model): the mask-adherence gate
        measures how well, with ``lesion_request``."""
        return False

    def lesion_request(self, mask: torch.Tensor, boxes: list[list[int]]) -> dict[str, Any] | None:
        """The condition asking for a lesion where ``mask`` ``(H, W)`` is (with its ``boxes``), or None when
        this lesion cannot be asked for (a model conditioned on boxes, and a lesion without them)."""
        return None

    @property
    def gate_set(self) -> str:
        """The name of the gate set this generator answers to (``gates_for`` adds its family's)."""
        return self.family

    def training_labels(self, dataset_labels: list[str]) -> list[str]:
        """The labels whose training images the family learns from: its own (one generator per label)."""
        return [self.config.label]

    def sampling_labels(self) -> tuple[str, ...]:
        """The labels a ``label`` condition may name."""
        return (self.config.label,)

    def select_training_images(self, image_paths: list[str], patients: list[str]) -> list[int]:
        """Which of the label's training images (manifest paths, with their patients) to learn from: all."""
        return list(range(len(image_paths)))

    def begin_training(self, images: torch.Tensor, total_steps: int, items: Sequence[dict] = ()) -> None:
        """Called before the first step, and again on resume, with the training images on the device and their
        dataset items (label, boxes, mask)."""
        if self.image_size is not None and images.shape[-1] != self.image_size:
            raise ValueError(f"the dataset is {images.shape[-1]} px but the generator is {self.image_size} px")

    def training_batches(self, images: torch.Tensor, batch_size: int, steps: int | None,
                         generator: torch.Generator) -> Iterator[Any]:
        """One epoch of batches for ``train_step``: images ``(B, 1, H, W)`` at ``batch_indices``."""
        for indices in batch_indices(len(images), batch_size, steps, generator):
            yield images[indices]

    def held_out_losses(self, images: torch.Tensor, items: Sequence[dict]) -> dict[str, float]:
        """The training loss on held-out images (the ``val`` split of the learned labels, on the device, with
        their dataset items), logged beside the training loss so that memorising shows as the two parting.
        Families whose loss has no held-out reading (a GAN's, a single image's) return none."""
        return {}

    @abstractmethod
    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimisation step on a batch of ``training_batches`` (by default images ``(B, 1, H, W)`` in
        [-1, 1]); returns the losses."""

    @abstractmethod
    def generate(self, n: int, seed: int, condition: dict[str, Any]) -> torch.Tensor:
        """``n`` images ``(n, 1, H, W)`` in [-1, 1], drawing all randomness from ``seed`` on the CPU (so that
        devices and runtimes agree)."""

    def generate_with_boxes(self, n: int, seed: int, condition: dict[str, Any]) -> tuple[torch.Tensor, list | None]:
        """``generate``, with the lesion boxes ``[x0, y0, x1, y1]`` of each image for families that place lesions
        (None for the others)."""
        return self.generate(n, seed, condition), None

    def generate_with_masks(self, n: int, seed: int, condition: dict[str, Any]) -> tuple[torch.Tensor, list]:
        """``generate``, with each image's lesion mask ``(H, W)`` uint8 (1 on the lesion), for families that draw
        masks: the pairs a segmentation model trains on."""
        raise NotImplementedError(f"the {self.family} family draws no masks")

    def sampling_network(self) -> tuple[nn.Module, torch.Tensor]:
        """The network that turns seeded latents into images, with example latents, for ONNX export; a family
        whose sampling is more than one network call (a diffusion loop) raises ``NotImplementedError``."""
        raise NotImplementedError(f"the {self.family} family has no single sampling network to export")

    def int8_sampling_network(self) -> tuple[nn.Module, torch.Tensor]:
        """``sampling_network`` in a form whose every layer ONNX Runtime quantises to int8; families without one
        raise ``NotImplementedError``."""
        raise NotImplementedError(f"the {self.family} family has no int8 sampling network to export")

    def to(self, device: torch.device | str) -> Generator:
        self.device = torch.device(device)
        for module in self.networks().values():
            module.to(self.device)
        return self

    def accepts_condition(self, key: str) -> bool:
        """Whether this generator (not only its family) takes the condition ``key``."""
        return key in self.conditions

    def check_condition(self, condition: dict[str, Any] | None) -> dict[str, Any]:
        condition = dict(condition or {})
        unsupported = sorted(set(condition) - self.conditions)
        if unsupported:
            raise ValueError(f"{self.family} does not take the condition(s) {unsupported}; it takes "
                             f"{sorted(self.conditions)}")
        labels = self.sampling_labels()
        if "label" in condition and condition["label"] not in labels:
            raise ValueError(f"this {self.family} generates {' or '.join(map(repr, labels))} images, "
                             f"not {condition['label']!r}")
        return condition

    def sample(self, n: int, seed: int, condition: dict[str, Any] | None = None) -> torch.Tensor:
        """``n`` images for ``seed``: the same seed, weights and condition always give the same images."""
        return self.sample_with_boxes(n, seed, condition)[0]

    def sample_with_boxes(self, n: int, seed: int, condition: dict[str, Any] | None = None
                          ) -> tuple[torch.Tensor, list | None]:
        """``sample`` and each image's lesions: its list of boxes from families that place lesions, its mask from
        families that draw masks (``sample_with_masks``), else None."""
        return self.sample_draws([(n, seed)], condition)

    sample_with_masks = sample_with_boxes

    @torch.no_grad()
    def sample_draws(self, draws: Sequence[tuple[int, int]], condition: dict[str, Any] | None = None,
                     as_uint8: bool = False) -> tuple[Any, list | None]:
        """The images (and boxes) of several draws ``(n, seed)`` that share ``condition``, in order: each draw's are
        the images ``sample`` gives it alone, made in as few network calls as the family can (``generate_draws``):
        what a server runs for concurrent requests. ``as_uint8``: as ``sampling.to_uint8`` gives them, made on the
        device (a quarter of the bytes to copy back).

        Safe to call from many threads: a generator whose networks are all in eval mode (as loaded) samples
        without touching them; one in training mode is switched to eval and back under a lock, so no
        concurrent call ever runs a network in training mode (where BatchNorm would update its statistics).
        """
        for n, seed in draws:
            if n < 1:
                raise ValueError(f"n must be at least 1, got {n}")
            if seed < 0:
                raise ValueError(f"seed must be a non-negative integer, got {seed}")
        condition = self.check_condition(condition)
        with self._mode_lock:
            modes = {name: module.training for name, module in self.networks().items()}
            if any(modes.values()):
                for module in self.networks().values():
                    module.eval()
                try:
                    return self._generate_on_cpu(draws, condition, as_uint8)
                finally:
                    for name, module in self.networks().items():
                        module.train(modes[name])
        return self._generate_on_cpu(draws, condition, as_uint8)

    def generate_draws(self, draws: Sequence[tuple[int, int]], condition: dict[str, Any]
                       ) -> tuple[torch.Tensor, list | None]:
        """``generate_with_boxes`` (``generate_with_masks``) of each draw, concatenated; a family whose sampling
        runs on per-image noise overrides it to draw them all in one batched call."""
        generate = self.generate_with_masks if self.draws_masks else self.generate_with_boxes
        parts = [generate(n, seed, condition) for n, seed in draws]
        boxes = None if parts[0][1] is None else [box for _, part in parts for box in part]
        return torch.cat([images for images, _ in parts]), boxes

    def _generate_on_cpu(self, draws: Sequence[tuple[int, int]], condition: dict[str, Any], as_uint8: bool) -> tuple:
        images, boxes = self.generate_draws(draws, condition)
        return to_uint8(images) if as_uint8 else images.float().cpu(), boxes

    def eval_mode(self) -> Generator:
        """Every network in eval mode, as a loaded generator samples."""
        with self._mode_lock:
            for module in self.networks().values():
                module.eval()
        return self

    @classmethod
    def from_members(cls, members: Sequence[Generator]) -> Generator:
        """One model of trained generators of the family ``pools`` names (trained apart, e.g. as parallel tasks)."""
        raise NotImplementedError(f"the {cls.family} family pools no other models")

    @classmethod
    def member_sections(cls, model: dict, train: dict, source: str, members: int) -> tuple[dict, dict]:
        """The (model, train) settings, from this family's, of the member learning ``source`` of ``members``."""
        raise NotImplementedError(f"the {cls.family} family pools no other models")

    # persistence -------------------------------------------------------------------------------------------

    @classmethod
    def saved_config(cls, values: dict[str, Any]):
        """The config of a saved generator's ``config.json`` (keys since retired dropped)."""
        return config_from_dict(cls.config_class, {k: v for k, v in values.items()
                                                   if k not in cls.retired_config_keys})

    @classmethod
    def from_folder(cls, folder: Path, config) -> Generator:
        """The generator saved in ``folder`` with ``config`` (read from its ``config.json``)."""
        generator = cls(config)
        generator._load_weights(load_file(str(folder / WEIGHTS)))
        return generator

    def describe(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "family": self.family, "config": dataclasses.asdict(self.config),
                "step": self.step, "epoch": self.epoch}

    def _weights(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{key}": tensor.detach().contiguous().cpu()
            for name, module in self.networks().items()
            for key, tensor in module.state_dict().items()
        }

    def _load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, module in self.networks().items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic(folder / WEIGHTS, lambda tmp: save_file(self._weights(), tmp))
        _atomic(folder / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(self.describe(), indent=2) + "\n"))
        return folder

    def save_checkpoint(self, path: str | Path) -> None:
        """Weights, optimiser state and training position in one file, replaced atomically."""
        tensors = self._weights()
        groups = {}
        for name, optimizer in self.optimizers().items():
            state = optimizer.state_dict()
            groups[name] = state["param_groups"]
            for index, values in state["state"].items():
                for key, value in values.items():
                    tensors[f"optim.{name}.{index}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
        # one metadata key: safetensors writes several in a random order, and the file must repeat byte for byte
        metadata = {CHECKPOINT_METADATA: json.dumps({"describe": self.describe(), "param_groups": groups})}
        _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def load_checkpoint(self, path: str | Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(path))
        if CHECKPOINT_METADATA in metadata:
            saved = json.loads(metadata[CHECKPOINT_METADATA])
        else:  # written before the metadata became one key
            saved = {key: json.loads(metadata[key]) for key in ("describe", "param_groups")}
        described = saved["describe"]
        if described["family"] != self.family:
            raise ValueError(f"{path} was written by {described['family']}, not {self.family}; cannot resume from it")
        # with defaults filled in, so that a checkpoint written before a config field was added still matches
        if _as_saved(self.saved_config(described["config"])) != _as_saved(self.config):
            raise ValueError(f"{path} was written with another config; cannot resume from it")
        self._load_weights(tensors)
        groups = saved["param_groups"]
        for name, optimizer in self.optimizers().items():
            state: dict[int, dict[str, torch.Tensor]] = {}
            prefix = f"optim.{name}."
            for key, value in tensors.items():
                if key.startswith(prefix):
                    index, field = key[len(prefix) :].split(".", 1)
                    state.setdefault(int(index), {})[field] = value.to(self.device)
            optimizer.load_state_dict({"state": state, "param_groups": groups[name]})
        self.step, self.epoch = described["step"], described["epoch"]


def _as_saved(config: Any) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(config)))  # tuples become lists, as in the file


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    os.replace(tmp, path)
