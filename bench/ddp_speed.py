"""Data-parallel training speed: R ranks under torchrun against one process, at the same global batch.

    python bench/ddp_speed.py [--ranks 2] [--steps 20] [--families dcgan,ldm]

Each family's training step (DCGAN 64 px, base 32; the from-scratch latent UNet of the ldm benchmark at 64 px) on
random images, timed over ``--steps`` steps after 3 warm-up steps: once in this process (all the machine's threads),
once on ``--ranks`` ranks started by torchrun (gloo on CPUs, NCCL on GPUs; each rank as many threads as its share),
each rank training on its share of the same global batch. ``×`` is the 1-process time over the R-rank time of the
same run. On a GPU machine each rank takes one GPU, and ``--ranks 1`` times DDP's own overhead against plain training.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time

import torch

from sonogen.generators import distributed
from sonogen.generators.dcgan import DCGAN, DCGANConfig
from sonogen.generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from sonogen.generators.trainer import resolve_device

BATCH = {"dcgan": 64, "ldm": 32}


def build(family: str, device: torch.device):
    torch.manual_seed(0)
    if family == "dcgan":
        return DCGAN(DCGANConfig(label="x", image_size=64, base_channels=32)).to(device), None
    model = LatentDiffusion(LatentDiffusionConfig(label="x", labels=("x",), image_size=64, vae_channels=(32, 64, 128),
                                                  unet_channels=(64, 128, 256), vae_steps=1)).to(device)
    return model, [{"label": "x", "mask": None}]


def step_seconds(family: str, steps: int, ddp: bool) -> float:
    """Seconds per step of this rank's share of the global batch (rank 0's clock; the ranks step in lockstep)."""
    ranks = distributed.current()
    device = distributed.device_of(ranks, resolve_device("auto"))
    if device.type == "cuda" and device.index is None:  # DDP names the GPU of its one rank
        device = torch.device("cuda", torch.cuda.current_device())
    model, item = build(family, device)
    batch = BATCH[family]
    images = torch.rand(2 * batch, 1, 64, 64, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    if family == "ldm":
        model.begin_training(images, 10**6, item * len(images))
        model.step = 1  # past the autoencoder phase
    if ddp:
        model.distribute(distributed.ddp_wrapper(device), ranks.rank, ranks.world)
    batches = model.training_batches(images, batch, 10**6, torch.Generator().manual_seed(0))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else \
        contextlib.nullcontext
    for k in range(3 + steps):
        if k == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            distributed.barrier()
            start = time.perf_counter()
        share = next(batches)
        with autocast():
            model.train_step(model.share_batch(share, batch) if ddp else share)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def worker(families: list[str], steps: int, out: str) -> None:
    if not distributed.launched():  # torchrun's single rank is no process group, but DDP needs one, if of one
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo", world_size=1, rank=0)
    ranks = distributed.start(timeout_s=600)
    times = {family: step_seconds(family, steps, ddp=True) for family in families}
    if ranks.main:
        with open(out, "w") as f:
            json.dump(times, f)
    distributed.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--families", default="dcgan,ldm")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    families = args.families.split(",")
    if args.worker:
        return worker(families, args.steps, args.worker)
    single = {family: step_seconds(family, args.steps, ddp=False) for family in families}
    out = "/tmp/sonogen-ddp-speed.json"
    threads = max(1, torch.get_num_threads() // args.ranks)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
                    __file__, "--ranks", str(args.ranks), "--steps", str(args.steps), "--families", args.families,
                    "--worker", out], check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    with open(out) as f:
        ranked = json.load(f)
    device = "cuda " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    print(f"{platform.node()} {device}, torch {torch.__version__}, {torch.get_num_threads()} threads in 1 process, "
          f"{threads} per rank")
    ranked_name = f"{args.ranks} rank{'s' if args.ranks > 1 else ''} under DDP"
    print(f"| family | global batch | 1 process s/step | {ranked_name} s/step | 1 process img/s | "
          f"{ranked_name} img/s | × |")
    print("|---|---|---|---|---|---|---|")
    for family in families:
        one, many, batch = single[family], ranked[family], BATCH[family]
        print(f"| {family} | {batch} | {one:.3f} | {many:.3f} | {batch / one:.0f} | {batch / many:.0f} | "
              f"{one / many:.2f} |")


if __name__ == "__main__":
    main()
