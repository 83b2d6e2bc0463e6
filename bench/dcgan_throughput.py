"""DCGAN training throughput, and achieved FLOP/s as a fraction of this machine's own GEMM rate.

    python bench/dcgan_throughput.py [--device auto|cpu|cuda] [--steps 3] [--compile] [--contiguous]

For each config it times full training steps (discriminator + generator updates) on random batches, counts
their FLOPs with torch's FlopCounterMode, and measures a large matmul in the same precision in the same run
as the baseline: ``fraction = achieved FLOP/s / GEMM FLOP/s``. bf16 autocast on CUDA, fp32 on CPU. ``--compile``
compiles the networks as the trainer's ``train.compile`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from sonogen.generators.dcgan import DCGAN, DCGANConfig, generator_flops
from sonogen.generators.trainer import resolve_device
from sonogen.jobs import load_family_config

CONFIGS = {
    "64 px default (params.yaml)": (load_family_config(Path(__file__).parents[1] / "params.yaml", "dcgan", "x")[0], 16),
    "256 px paper": (DCGANConfig(label="x", image_size=256), 16),
    "256 px paper, batch 256": (DCGANConfig(label="x", image_size=256), 256),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the threads torch uses on it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"


def gemm_size(device: torch.device) -> int:
    """The side of the square matmul every bench's baseline times: large enough to fill the device."""
    return 8192 if device.type == "cuda" else 2048


def baseline_gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a ``gemm_size`` matmul in ``dtype``: the baseline every fraction of GEMM is taken against."""
    return gemm_rate(device, dtype, gemm_size(device), 50 if device.type == "cuda" else 10)


def gemm_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def training_rate(config: DCGANConfig, batch: int, device: torch.device, steps: int,
                  compile: bool = False, channels_last: bool = True) -> tuple[float, float]:
    """(images per second, FLOP per training step)."""
    torch.manual_seed(0)
    model = DCGAN(config).to(device)
    if device.type == "cuda" and channels_last:
        for module in model.networks().values():
            module.to(memory_format=torch.channels_last)
    images = torch.rand(batch, 1, config.image_size, config.image_size, device=device) * 2 - 1
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    # one autocast region per step, as the trainer does: autocast caches the bf16 copies of the weights until its
    # region ends, so a region around many steps would skip their casts and train on stale ones
    with autocast():
        model.train_step(images)  # warm-up: allocator, kernels selection
    with autocast(), FlopCounterMode(display=False) as counter:
        model.train_step(images)
    if compile:  # after counting: FLOPs are counted on the eager operators
        for module in model.networks().values():
            module.compile()
        for _ in range(2):
            with autocast():
                model.train_step(images)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        with autocast():
            model.train_step(images)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return batch * steps / elapsed, float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--contiguous", action="store_true", help="CUDA: NCHW weights instead of channels_last")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    baseline = baseline_gemm_rate(device, dtype)
    print(f"device: {device_name(device)}; torch {torch.__version__}; precision {dtype}")
    print(f"baseline GEMM ({gemm_size(device)}², {dtype}): {baseline / 1e9:.1f} GFLOP/s")
    print(f"256 px generator forward: {generator_flops(DCGANConfig(label='x')) / 1e9:.2f} GFLOP per image\n")
    print("| config | batch | images/s | GFLOP per step | achieved GFLOP/s | fraction of GEMM |")
    print("|---|---|---|---|---|---|")
    for title, (config, batch) in CONFIGS.items():
        if device.type == "cpu" and batch > 16:
            continue  # minutes per step on a laptop CPU; measured on GPUs only
        rate, flops = training_rate(config, batch, device, args.steps, args.compile, not args.contiguous)
        achieved = rate / batch * flops
        print(f"| {title} | {batch} | {rate:.2f} | {flops / 1e9:.1f} | {achieved / 1e9:.1f} | {achieved / baseline:.3f} |")


if __name__ == "__main__":
    main()
