"""Latent diffusion training speed against batch size: from-scratch UNet steps and ControlNet steps.

    python bench/ldm_train_speed.py [--device auto|cpu|cuda] [--steps 40] [--batches 32,128,256]

The 64 px model of the ControlNet mask benchmark (autoencoder 32, 64, 128; UNet 64, 128, 256), bf16 autocast on
CUDA and fp32 on CPU, EMA on, random images and masks. Each row times ``--steps`` training steps after 5 warm-up
steps; ``× images/s`` is against the smallest batch of the same mode in the same run. A step that costs the same
at every batch is bound by kernel launches, not by the GPU's arithmetic.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
from dcgan_throughput import device_name

from sonogen.generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from sonogen.generators.trainer import resolve_device

NETWORKS = dict(image_size=64, vae_channels=(32, 64, 128), unet_channels=(64, 128, 256))


def step_time(config: LatentDiffusionConfig, batch: int, device: torch.device, steps: int) -> float:
    """Seconds per training step of the latent denoiser (or of the ControlNet)."""
    torch.manual_seed(0)
    model = LatentDiffusion(config)
    model.to(device)
    images = torch.rand(2 * batch, 1, 64, 64, device=device) * 2 - 1
    items = [{"label": "consolidation", "mask": (image > 0.5).float().cpu()} for image in images]
    model.begin_training(images, 10**6, items)
    model.step = config.vae_steps  # past the autoencoder phase: every timed step trains the latent networks
    batches = model.training_batches(images, batch, 10**6, torch.Generator().manual_seed(0))

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    for k in range(5 + steps):
        if k == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast():
            model.train_step(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batches", default="32,128,256")
    args = parser.parse_args()
    device = resolve_device(args.device)
    batches = sorted(int(b) for b in args.batches.split(","))
    print(f"device: {device_name(device)}; torch {torch.__version__}\n")
    print("| mode | batch | ms / step | images/s | × images/s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        base = LatentDiffusion(LatentDiffusionConfig(label="consolidation", labels=("consolidation",), vae_steps=1,
                                                     **NETWORKS))
        base.save(Path(folder) / "base")
        modes = {"from-scratch": LatentDiffusionConfig(label="consolidation", labels=("consolidation",),
                                                       vae_steps=1, **NETWORKS),
                 "controlnet": LatentDiffusionConfig(label="consolidation", mode="controlnet",
                                                     base_model=str(Path(folder) / "base"), **NETWORKS)}
        for mode, config in modes.items():
            baseline = None
            for batch in batches:
                seconds = step_time(config, batch, device, args.steps)
                rate = batch / seconds
                baseline = baseline or rate
                print(f"| {mode} | {batch} | {seconds * 1000:.1f} | {rate:,.0f} | {rate / baseline:.2f} |", flush=True)


if __name__ == "__main__":
    main()
