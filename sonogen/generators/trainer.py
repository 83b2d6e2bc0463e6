"""The training loop every family shares: data, device, precision, checkpoints, quality curves, logging."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from sonogen.data import UltrasoundDataset
from sonogen.generators.base import CHECKPOINT, Generator, to_uint8
from sonogen.metrics import PIXELS_16, kernel_mmd, one_nn_accuracy, pixel_features

GENERATOR_DIR = "generator"
HISTORY = "history.json"
SAMPLES = "samples.png"  # the last epoch's grid, beside the saved generator
EVAL_SEED = 1234  # fixed latents: epoch-to-epoch grids and curves show the same draws


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 16
    checkpoint_every: int = 1
    eval_every: int = 1
    eval_samples: int = 64
    log_every_steps: int = 10
    seed: int = 0
    device: str = "auto"  # auto: cuda when present, else cpu
    precision: str = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu; or "bf16" / "fp32"
    channels_last: bool = True  # used on cuda only
    compile: bool = False

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.eval_every < 1:
            raise ValueError("epochs, batch_size, checkpoint_every and eval_every must be at least 1")
        if self.eval_samples < 2:
            raise ValueError("eval_samples must be at least 2")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, image: np.ndarray, path: str) -> None: ...


def image_grid(images: torch.Tensor, columns: int = 8) -> np.ndarray:
    """``(N, 1, H, W)`` in [-1, 1] as one uint8 grid image with a 2-pixel black border between tiles."""
    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = np.zeros((rows * (h + 2) + 2, columns * (w + 2) + 2), dtype=np.uint8)
    pixels = to_uint8(images)
    for k in range(n):
        r, c = divmod(k, columns)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = pixels[k]
    return grid


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def quality(generator: Generator, real_features: torch.Tensor, n: int) -> tuple[dict[str, float], torch.Tensor]:
    """kMMD and 1-NN accuracy of ``n`` fixed-seed samples against real features, and the samples."""
    samples = generator.sample(n, seed=EVAL_SEED)
    fake = pixel_features(samples)
    mmd, nn_acc = kernel_mmd(real_features, fake), one_nn_accuracy(real_features, fake)
    return {
        "kmmd": mmd["biased"],
        "kmmd_unbiased": mmd["unbiased"],
        "one_nn_acc": nn_acc["overall"],
        "one_nn_acc_real": nn_acc["real"],
        "one_nn_acc_synthetic": nn_acc["synthetic"],
    }, samples


def train(
    generator: Generator,
    data: str | Path,
    label: str,
    config: TrainConfig,
    out: str | Path,
    tracker: Tracker | None = None,
    resume: bool = False,
    progress=None,
) -> dict:
    """Trains on the ``train`` split images of ``label``; writes ``out/generator``, checkpoints and history.

    Per epoch it logs the losses, a sample grid of fixed latents and kMMD / 1-NN accuracy against the real
    training images (extractor ``pixels-16``). ``resume`` continues from ``out/checkpoint.safetensors``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = UltrasoundDataset(data, split="train", labels=[label]).images()
    if len(images) < 2:
        raise ValueError(f"{data} has {len(images)} training image(s) of label {label!r}; at least 2 are needed")
    if images.shape[-1] != getattr(generator.config, "image_size", images.shape[-1]):
        raise ValueError(f"the dataset is {images.shape[-1]} px but the generator is {generator.config.image_size} px")
    device = resolve_device(config.device)
    generator.to(device)
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if device.type == "cuda" and config.channels_last:
        for module in generator.networks().values():
            module.to(memory_format=torch.channels_last)
    step_fn = torch.compile(generator.train_step) if config.compile else generator.train_step
    real_features = pixel_features(images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
                                          [: config.eval_samples]])

    history_path, checkpoint = out / HISTORY, out / CHECKPOINT
    history: list[dict] = []
    if resume and checkpoint.exists():
        generator.load_checkpoint(checkpoint)
        history = [h for h in json.loads(history_path.read_text()) if h["epoch"] <= generator.epoch]
    elif resume:
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
    loader_images = images.to(device)
    if device.type == "cuda" and config.channels_last:
        loader_images = loader_images.contiguous(memory_format=torch.channels_last)

    epochs = range(generator.epoch, config.epochs)
    for epoch in progress(epochs) if progress else epochs:
        # seeded per epoch so a resumed run draws the same batches and noise as an uninterrupted one
        torch.manual_seed(config.seed * 100_003 + epoch)
        order = DataLoader(
            TensorDataset(loader_images),
            batch_size=config.batch_size,
            shuffle=True,
            drop_last=len(images) >= config.batch_size,
            generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch),
        )
        sums: dict[str, float] = {}
        batches = 0
        for (batch,) in order:
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
            with autocast:
                losses = step_fn(batch)
            batches += 1
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value
            if tracker and generator.step % config.log_every_steps == 0:
                tracker.log_metrics(losses, step=generator.step)
        generator.epoch = epoch + 1
        record = {"epoch": generator.epoch, "step": generator.step, **{k: v / batches for k, v in sums.items()}}
        if generator.epoch % config.eval_every == 0 or generator.epoch == config.epochs:
            metrics, samples = quality(generator, real_features, config.eval_samples)
            record.update(metrics)
            grid = image_grid(samples[:32])
            Image.fromarray(grid).save(out / SAMPLES)
            if tracker:
                tracker.log_metrics(metrics, step=generator.epoch)
                tracker.log_image(grid, f"samples/epoch_{generator.epoch:04d}.png")
        history.append(record)
        if generator.epoch % config.checkpoint_every == 0 or generator.epoch == config.epochs:
            generator.save_checkpoint(checkpoint)
            history_path.write_text(json.dumps(history, indent=2) + "\n")
    generator.save(out / GENERATOR_DIR)
    history_path.write_text(json.dumps(history, indent=2) + "\n")
    return {
        "train_images": len(images),
        "feature_extractor": PIXELS_16,
        "train_config": asdict(config),
        "final": history[-1] if history else {},
        "history": history,
    }
