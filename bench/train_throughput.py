"""Every family's training step: images/s through the shared trainer, and the FLOP/s it achieves as a fraction of
this machine's GEMM rate in the step's precision (bf16 or fp32), measured in the same run.

    python bench/train_throughput.py [--size 64] [--families dcgan,sinddm,...] [--steps 10] [--warmup 3]
        [--batch N] [--device auto] [--params params.yaml] [--work DIR]

Each family is built from ``--params``' model and train settings (``--size`` replaces the image size of those
that have one) on a phantom of ``--size`` px. What a family builds on is made first: a lesion bank from the
phantom's boxes, an ldm trained for two steps (speed does not depend on the weights). A latent family's
autoencoder phase is cut to its first step, so that the timed steps are the denoiser's, which are most of a run.
Then ``trainer.train`` runs ``--warmup`` + ``--steps`` steps as `sonogen train` runs them (bf16 autocast and
channels-last on a GPU; the family's precision on a CPU), timed from the losses the trainer logs after each step.
A pooled family trains its members as separate runs of its member family, so it has no row of its own.

FLOPs per step: torch's FlopCounterMode over ``--flop-steps`` steps (their mean: the multi-scale families draw a
scale per step) of a fresh model with the same settings, after ``--warmup`` uncounted ones.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from dcgan_throughput import baseline_gemm_rate, device_name, gemm_size
from torch.utils.flop_counter import FlopCounterMode

from sonogen.data import UltrasoundDataset
from sonogen.data.lesion_bank import LesionBank
from sonogen.data.phantom import generate as generate_phantom
from sonogen.data.prepare import prepare
from sonogen.generators import families, get_generator
from sonogen.generators.trainer import GENERATOR_DIR, TrainConfig, resolve_device, train, training_selection
from sonogen.jobs.training import config_from_dict, family_sections, model_settings

ROOT = Path(__file__).resolve().parents[1]


class StepClock:
    """A trainer ``Tracker`` that notes when each step's losses arrive (they are Python floats: the step is done)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.times.append(time.perf_counter())

    def log_image(self, image, path: str) -> None:
        pass


def phantom(folder: Path, size: int) -> Path:
    generate_phantom(folder / "raw", patients=12, frames_per_patient=4, seed=0)
    prepare(folder / "raw", folder / "data", size=size, split="0.7,0.15,0.15", seed=0, stratify=True)
    return folder / "data"


def train_config(params: Path, family: str, device: str, steps: int, batch: int | None) -> TrainConfig:
    settings = {**family_sections(params, family)[1], "epochs": 1, "steps_per_epoch": steps, "eval_samples": 2,
                "eval_every": 1, "checkpoint_every": 1, "log_every_steps": 1, "device": device, "keep_best": False}
    return config_from_dict(TrainConfig, {**settings, **({"batch_size": batch} if batch else {})})


def model_config(family: str, data: Path, label: str, size: int, params: Path, device: str, work: Path):
    """The family's model config, with what it builds on made in ``work``."""
    cls = get_generator(family)
    fields = {field.name for field in dataclasses.fields(cls.config_class)}
    overrides = {key: value for key, value in (("image_size", size), ("vae_steps", 1)) if key in fields}
    settings = model_settings(params, family, label, overrides)
    if "images" in fields and getattr(cls(config_from_dict(cls.config_class, settings)), "learns_one_image", False):
        # the first training image of the label, as `sonogen train sinddm … --set images=[ID]` names one
        settings["images"] = [UltrasoundDataset(data, split="train", labels=[label]).records[0].image]
    for key, what in cls.prerequisites(settings).items():
        folder = work / f"{family}-{key}"
        if what == "lesion_bank":
            LesionBank.build(data, label, "train").save(folder)
        else:  # two steps: the autoencoder's and the denoiser's
            base = get_generator(what)(model_config(what, data, label, size, params, device, work))
            train(base, data, label, train_config(params, what, device, 2, None), folder)
            folder = folder / GENERATOR_DIR
        settings[key] = str(folder)
    return config_from_dict(cls.config_class, settings)


def flops_per_step(family: str, config, data: Path, label: str, train: TrainConfig, device: torch.device,
                   warmup: int, steps: int) -> float:
    """Mean FLOPs of ``steps`` training steps of a fresh model after ``warmup`` others, on the eager operators."""
    torch.manual_seed(0)
    generator = get_generator(family)(config)
    dataset, chosen = training_selection(generator, data, label)
    items = [dataset[k] for k in chosen]
    images = torch.stack([item["image"] for item in items]).to(device)
    generator.to(device)
    generator.begin_training(images, 10**6, items)
    bf16 = train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda")
    counter = FlopCounterMode(display=False)
    batches = generator.training_batches(images, train.batch_size, 10**6, torch.Generator().manual_seed(0))
    for k in range(warmup + steps):
        batch = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext(), \
                counter if k >= warmup else contextlib.nullcontext():
            generator.train_step(batch)
    return counter.get_total_flops() / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--families", help="comma-separated; default: every family that trains runs of its own")
    parser.add_argument("--label", default="consolidation")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--flop-steps", type=int, default=3)
    parser.add_argument("--batch", type=int, help="global batch of every family (default: its train.batch_size)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1: the first timed step starts at a logged one")
    device = resolve_device(args.device)
    chosen = args.families.split(",") if args.families else [f for f in families() if not get_generator(f).pools]
    baselines = {precision: baseline_gemm_rate(device, dtype)
                 for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    print(f"device: {device_name(device)}; torch {torch.__version__}; {args.size} px phantom; label {args.label}; "
          f"{args.steps} timed steps after {args.warmup}")
    print(f"baseline GEMM ({gemm_size(device)}²): bf16 {baselines['bf16'] / 1e12:.3f} TFLOP/s, fp32 "
          f"{baselines['fp32'] / 1e12:.3f} TFLOP/s{' (TF32 off)' if device.type == 'cuda' else ''}\n")
    print("| family | precision | batch | images/s | s/step | GFLOP per step | TFLOP/s | fraction of GEMM |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        data = phantom(work, args.size)
        for family in chosen:
            settings = train_config(args.params, family, args.device, args.warmup + args.steps, args.batch)
            try:
                config = model_config(family, data, args.label, args.size, args.params, args.device, work)
                clock = StepClock()
                torch.manual_seed(0)
                train(get_generator(family)(config), data, args.label, settings, work / family, tracker=clock)
                seconds = (clock.times[args.warmup + args.steps - 1] - clock.times[args.warmup - 1]) / args.steps
                flops = flops_per_step(family, config, data, args.label, settings, device, args.warmup,
                                       args.flop_steps)
            except Exception as error:  # one family's failure is a row of the table, not the end of the run
                print(f"| {family} | failed: {type(error).__name__}: {str(error)[:200]} |", flush=True)
                continue
            precision = settings.precision if settings.precision != "auto" else \
                ("bf16" if device.type == "cuda" else "fp32")
            achieved = flops / seconds
            fraction = achieved / baselines[precision]
            print(f"| {family} | {precision} | {settings.batch_size} | {settings.batch_size / seconds:.1f} | "
                  f"{seconds:.4f} | {flops / 1e9:.2f} | {achieved / 1e12:.3f} | {fraction:.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()
