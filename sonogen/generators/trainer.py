"""The training loop every family shares: data, device, precision, checkpoints, quality curves, logging."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from PIL import Image

from sonogen.data import UltrasoundDataset
from sonogen.generators import distributed
from sonogen.generators.base import CHECKPOINT, Generator
from sonogen.generators.best_epoch import BEST_DIR, BestEpoch, Monitor
from sonogen.metrics import PIXELS_16, kernel_mmd, one_nn_accuracy, pixel_features
from sonogen.metrics.layout import nearest_scan_iou
from sonogen.metrics.similarity import nearest_ssim, ssim
from sonogen.sampling import tile, to_uint8

GENERATOR_DIR = "generator"
HISTORY = "history.json"
SAMPLES = "samples.png"  # the last epoch's grid, beside the saved generator
EVAL_SEED = 1234  # fixed latents: epoch-to-epoch grids and curves show the same draws


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 16
    steps_per_epoch: int | None = None  # None: the family's choice (a pass over the data for dataset families)
    checkpoint_every: int = 1
    eval_every: int = 1
    eval_samples: int = 64
    log_every_steps: int = 10
    seed: int = 0
    device: str = "auto"  # auto: cuda when present, else cpu
    precision: str = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu; or "bf16" / "fp32"
    channels_last: bool = True  # used on cuda only
    compile: bool = False
    keep_best: bool | None = None  # keep the best epoch by realism readings (None: the family's choice, GANs do)
    monitor_samples: int = 256  # samples per reading when keeping the best epoch
    # data-parallel training (torchrun): batch_size is the global batch, split evenly over the ranks
    sync_batchnorm: bool = False  # BatchNorm statistics over the global batch (GPU ranks only)
    collective_timeout_s: float = 1800.0  # a rank that waits longer on the others fails instead of hanging
    nodes: int = 1  # on a cluster: the pipeline submits a Kubeflow TrainJob when nodes · gpus_per_node > 1
    gpus_per_node: int = 1

    def __post_init__(self):
        if min(self.epochs, self.batch_size, self.checkpoint_every, self.eval_every, self.steps_per_epoch or 1,
               self.nodes, self.gpus_per_node) < 1:
            raise ValueError("epochs, batch_size, steps_per_epoch, checkpoint_every, eval_every, nodes and "
                             "gpus_per_node must be ≥ 1")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s must be positive, got {self.collective_timeout_s}")
        if self.eval_samples < 2 or self.monitor_samples < 2:
            raise ValueError("eval_samples and monitor_samples must be at least 2")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, image: np.ndarray, path: str) -> None: ...


def image_grid(images: torch.Tensor, columns: int = 8) -> np.ndarray:
    """``(N, 1, H, W)`` in [-1, 1] as one uint8 grid image with a 2-pixel black border between tiles."""
    return tile(to_uint8(images), columns)


class Heartbeat:
    """Progress lines for logs (a pod, CI, ``| tee``) where no progress bar shows: one every ``every_s`` seconds
    of training, with the epoch, step and losses, and one when each epoch ends with its quality readings."""

    SHOWN = ("kmmd", "one_nn_acc", "ssim_to_train", "scan_iou_to_train")  # of the epoch's quality readings

    def __init__(self, log: Callable[[str], None] | None, epochs: int, every_s: float = 30.0):
        self.log, self.epochs, self.every_s = log, epochs, every_s
        self.started = self.last = time.monotonic()
        self.losses: tuple[str, ...] = ()

    def _say(self, what: str, epoch: int, step: int, values: dict[str, float]) -> None:
        self.last = time.monotonic()
        shown = ", ".join(f"{key} {value:.4g}" for key, value in values.items())
        self.log(f"{what} {epoch}/{self.epochs}, step {step}, {self.last - self.started:.0f} s: {shown}")

    def step(self, epoch: int, step: int, losses: dict[str, float]) -> None:
        self.losses = tuple(losses)
        if self.log and time.monotonic() - self.last >= self.every_s:
            self._say("epoch", epoch, step, losses)

    def epoch_done(self, record: dict) -> None:
        if self.log:
            self._say("finished epoch", record["epoch"], record["step"],
                      {k: record[k] for k in (*self.losses, *self.SHOWN) if k in record})


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda where torch sees a GPU, else cpu; a named device must exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name}: torch sees no CUDA GPU on this machine; use auto or cpu")
    return device


FEW_IMAGES = 8  # up to this many training images, samples are also compared with each image (SSIM)
HELD_OUT_IMAGES = 64  # a steady loss reading at each evaluation, and still cheap


def held_out_images(data: str | Path, labels: list[str]) -> tuple[torch.Tensor, list[dict]] | None:
    """Up to ``HELD_OUT_IMAGES`` of the ``val`` split's images of ``labels`` (a fixed draw), with their items."""
    dataset = UltrasoundDataset(data, split="val", labels=labels)
    if not len(dataset):
        return None
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:HELD_OUT_IMAGES]
    items = [dataset[int(k)] for k in chosen]
    return torch.stack([item["image"] for item in items]), items


def quality(generator: Generator, real: torch.Tensor, n: int) -> tuple[dict[str, float], torch.Tensor]:
    """``n`` fixed-seed samples and how they compare with the real images: kMMD and 1-NN accuracy (pixels-16)
    when there are two or more; for a few, the SSIM of each sample to its closest real image (a copy scores 1),
    the overlap of their scan areas (a lost fan scores low) and SSIM between samples (a collapsed generator
    scores near 1)."""
    samples = generator.sample(n, seed=EVAL_SEED)
    metrics = {}
    if len(real) >= 2:
        real_features, fake = pixel_features(real), pixel_features(samples)
        mmd, nn_acc = kernel_mmd(real_features, fake), one_nn_accuracy(real_features, fake)
        metrics.update(kmmd=mmd["biased"], kmmd_unbiased=mmd["unbiased"], one_nn_acc=nn_acc["overall"],
                       one_nn_acc_real=nn_acc["real"], one_nn_acc_synthetic=nn_acc["synthetic"])
    if len(real) <= FEW_IMAGES:
        metrics["ssim_to_train"] = float(nearest_ssim(samples, real).mean())
        metrics["scan_iou_to_train"] = float(nearest_scan_iou(samples, real).mean())
        metrics["ssim_between_samples"] = float(ssim(samples, samples.roll(1, dims=0)).mean())
    return metrics, samples


def training_selection(generator: Generator, data: str | Path, label: str) -> tuple[UltrasoundDataset, list[int]]:
    """The ``train`` split of ``label`` (or of every label the family learns) and the indices of the images the
    generator chose to learn from (``select_training_images``)."""
    dataset = UltrasoundDataset(data, split="train", labels=[label])
    if (learned := generator.training_labels(dataset.classes)) != [label]:
        dataset = UltrasoundDataset(data, split="train", labels=learned)
    chosen = generator.select_training_images([r.image for r in dataset.records],
                                              [r.patient_id for r in dataset.records])
    if len(chosen) < generator.min_training_images:
        raise ValueError(f"{data} has {len(chosen)} training image(s) of label {label!r} for {generator.family}; "
                         f"at least {generator.min_training_images} are needed")
    return dataset, chosen


def train(
    generator: Generator,
    data: str | Path,
    label: str,
    config: TrainConfig,
    out: str | Path,
    tracker: Tracker | None = None,
    resume: bool = False,
    progress=None,
    log: Callable[[str], None] | None = None,
    monitor: Monitor | None = None,
) -> dict:
    """Trains on the ``train`` split images of ``label`` (or of every label the family learns; those it selects);
    writes ``out/generator``, checkpoints and history.

    Under torchrun each rank runs this with the same arguments: every rank draws the same global batches and
    trains on its share of each (``Generator.distribute``); rank 0 alone evaluates, logs and writes.

    Per epoch it logs the losses, a sample grid of fixed latents, ``quality`` against the real training images
    and the family's ``held_out_losses`` on the ``val`` split. ``resume`` continues from
    ``out/checkpoint.safetensors``. ``progress`` wraps the epochs (a progress bar); ``log`` receives progress
    lines at least every 30 s and at each epoch's end (for logs, where no bar shows). A family that keeps its
    best epoch (or ``config.keep_best``) is read in ``monitor``'s feature space (default: pixels) at each
    evaluation, and the best epoch's weights are the ones saved (``best_epoch``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset, chosen = training_selection(generator, data, label)
    learned = generator.training_labels(dataset.classes)
    items = [dataset[k] for k in chosen]
    images = torch.stack([item["image"] for item in items])
    ranks = distributed.current()
    device = distributed.device_of(ranks, resolve_device(config.device))
    if ranks.distributed and config.batch_size % ranks.world:
        raise ValueError(f"train.batch_size {config.batch_size} is the global batch: make it a multiple of the "
                         f"{ranks.world} ranks")
    generator.to(device)
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if device.type == "cuda" and config.channels_last:
        for module in generator.networks().values():
            module.to(memory_format=torch.channels_last)
    if config.compile:
        for module in generator.networks().values():
            module.compile()  # in place: the state dict keeps its keys
    held_out = held_out_images(data, learned)
    own = images[[k for k, item in enumerate(items) if item["label"] == label]]
    real = own[torch.randperm(len(own), generator=torch.Generator().manual_seed(0))[: config.eval_samples]]
    loader_images = images.to(device)
    if device.type == "cuda" and config.channels_last:
        loader_images = loader_images.contiguous(memory_format=torch.channels_last)
    steps = config.steps_per_epoch or generator.steps_per_epoch
    batches_per_epoch = steps or max(1, len(images) // config.batch_size)
    generator.begin_training(loader_images, batches_per_epoch * config.epochs, items)

    history_path, checkpoint = out / HISTORY, out / CHECKPOINT
    history: list[dict] = []
    if resume and checkpoint.exists():
        generator.load_checkpoint(checkpoint)
        history = [h for h in json.loads(history_path.read_text()) if h["epoch"] <= generator.epoch]
    elif resume:
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
    if ranks.distributed:
        if config.sync_batchnorm:
            for module in generator.networks().values():
                distributed.sync_batchnorm(module, device)
        generator.distribute(distributed.ddp_wrapper(device), ranks.rank, ranks.world)
    main = ranks.main

    keep_best = generator.keeps_best_epoch if config.keep_best is None else config.keep_best
    if keep_best:
        monitor = monitor or Monitor(PIXELS_16, pixel_features)
        monitor.samples = config.monitor_samples
        monitor_real = own[torch.randperm(len(own), generator=torch.Generator().manual_seed(1))][:monitor.samples]
    best = BestEpoch.load(out) if resume else BestEpoch()
    epochs = range(generator.epoch, config.epochs)
    heartbeat = Heartbeat(log if main else None, config.epochs)
    for epoch in progress(epochs) if progress and main else epochs:
        # seeded per epoch so a resumed run draws the same batches and noise as an uninterrupted one
        torch.manual_seed(config.seed * 100_003 + epoch)
        order = generator.training_batches(loader_images, config.batch_size, steps,
                                           torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        sums: dict[str, float] = {}
        batches = 0
        for batch in order:
            if ranks.distributed:
                batch = generator.share_batch(batch, distributed.batch_size_of(batch))
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
            with autocast:
                losses = generator.train_step(batch)
            batches += 1
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value
            if main and tracker and generator.step % config.log_every_steps == 0:  # rank 0's share
                tracker.log_metrics(losses, step=generator.step)
            heartbeat.step(epoch + 1, generator.step, losses)
        generator.epoch = epoch + 1
        losses = distributed.mean_over_ranks({k: v / batches for k, v in sums.items()})
        record = {"epoch": generator.epoch, "step": generator.step, **losses}
        if not main:
            continue
        if generator.epoch % config.eval_every == 0 or generator.epoch == config.epochs:
            metrics, samples = quality(generator, real, config.eval_samples)
            if held_out is not None:
                metrics.update(generator.held_out_losses(held_out[0].to(device), held_out[1]))
            if keep_best:
                readings = monitor.read(generator, monitor_real)
                metrics.update({f"monitor_{key}": value for key, value in readings.items()})
                if best.offer(monitor, generator.epoch, readings):
                    generator.save(out / BEST_DIR)
                    best.save(out)
            record.update(metrics)
            grid = image_grid(samples[:32])
            Image.fromarray(grid).save(out / SAMPLES)
            if tracker:
                tracker.log_metrics(metrics, step=generator.epoch)
                tracker.log_image(grid, f"samples/epoch_{generator.epoch:04d}.png")
        history.append(record)
        heartbeat.epoch_done(record)
        if generator.epoch % config.checkpoint_every == 0 or generator.epoch == config.epochs:
            generator.save_checkpoint(checkpoint)
            history_path.write_text(json.dumps(history, indent=2) + "\n")
    if main:
        if keep_best and best.epoch:  # the kept epoch's weights are the model
            shutil.rmtree(out / GENERATOR_DIR, ignore_errors=True)
            shutil.copytree(out / BEST_DIR, out / GENERATOR_DIR)
        else:
            generator.save(out / GENERATOR_DIR)
        history_path.write_text(json.dumps(history, indent=2) + "\n")
    distributed.barrier()  # the others wait for rank 0's model before the job counts as done
    return {
        "ranks": ranks.world,
        "per_rank_batch": config.batch_size // ranks.world,
        "best_epoch": asdict(best) if keep_best else None,
        "train_images": len(images),
        "feature_extractor": PIXELS_16,
        "train_config": asdict(config),
        "final": history[-1] if history else {},
        "history": history,
    }
