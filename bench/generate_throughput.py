"""Bulk generation of the 256 px paper DCGAN through the product's path, against the network alone and this
machine's GEMM rate, all measured in the same run.

    python bench/generate_throughput.py [--image-size 256] [--n 4096] [--batches 256,1024] [--precisions fp32,bf16]
        [--channels-last] [--compile] [--device auto]

Per precision and batch, images/s and the fraction of the GEMM rate in that precision (2048² fp32 on a CPU, 8192²
on a GPU; the generator's FLOPs are counted analytically, 5.41 GFLOP per 256 px image) of:

- the network alone: the generator's forward on latents already on the device (the ceiling);
- the sampler: ``Backend.draw`` (what the server and `generate` call: per-image latents drawn on the CPU from each
  image's seed, the network, the images back to the CPU as uint8);
- `generate`: ``generate_dataset`` writing ``--n`` PNGs and the manifest to a local folder (a fresh one per row),
  timed from its second chunk to its return (the first pays for loading the model and the first kernels).

Speed does not depend on the weights, so the generator is random-initialised and saved to a temporary folder,
which every path loads as `sonogen generate --model FOLDER` would (no tracking server needed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from dcgan_throughput import baseline_gemm_rate, device_name, synchronize

from sonogen.backends import load_backend
from sonogen.generate import generate_dataset
from sonogen.generators.dcgan import DCGAN, DCGANConfig, generator_flops
from sonogen.generators.trainer import resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def best_rate(run, images: int, repeats: int, device: torch.device) -> tuple[float, Any]:
    """Images/s of ``run()`` (which makes ``images``), best of ``repeats`` after a warm-up call, and what the last
    call returned."""
    made = run()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        made = run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return images / best, made


def network_rate(model: DCGAN, batch: int, precision: str, device: torch.device, repeats: int) -> float:
    latents = torch.randn(batch, model.config.latent_dim, device=device)
    network = model.generator

    @torch.no_grad()
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            network(latents)

    return best_rate(run, batch, repeats, device)[0]


def generate_rate(folder: Path, out: Path, args: argparse.Namespace, batch: int, precision: str) -> float:
    """Images/s of `generate` after its first chunk (``generate_dataset``'s ``progress`` hook marks each)."""
    started: list[float] = []

    def clocked(chunks):
        for k, chunk in enumerate(chunks):
            if k == 1:
                started.append(time.perf_counter())
            yield chunk

    generate_dataset(str(folder), args.n, str(out), batch=batch, precision=precision, progress=clocked,
                     channels_last=args.channels_last, compile=args.compile)
    return (args.n - batch) / (time.perf_counter() - started[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--n", type=int, default=4096, help="images per `generate` run")
    parser.add_argument("--batches", default="256,1024")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.n < 2 * max(map(int, args.batches.split(","))):
        parser.error("--n must be at least twice the largest batch: `generate` is timed from its second chunk")
    device = resolve_device(args.device)
    torch.manual_seed(0)
    config = DCGANConfig(label="x", image_size=args.image_size)
    flops = generator_flops(config)
    with tempfile.TemporaryDirectory() as scratch:
        folder = DCGAN(config).save(Path(scratch) / "generator")
        model = DCGAN(config).to(device).eval_mode()
        print(f"device: {device_name(device)}; torch {torch.__version__}; {args.image_size} px paper DCGAN, "
              f"{flops / 1e9:.2f} GFLOP per image; generate writes {args.n} images per row"
              f"{'; channels-last' if args.channels_last else ''}{'; compiled' if args.compile else ''}")
        print("\n| precision | batch | GEMM TFLOP/s | network images/s | sampler images/s | generate images/s | "
              "network / GEMM | sampler / GEMM | generate / GEMM |")
        print("|---|---|---|---|---|---|---|---|---|")
        for precision in args.precisions.split(","):
            gemm = baseline_gemm_rate(device, DTYPES[precision])
            backend = load_backend(str(folder), precision, args.channels_last, args.compile)
            if args.channels_last:
                model.generator.to(memory_format=torch.channels_last)
            for batch in map(int, args.batches.split(",")):
                network = network_rate(model, batch, precision, device, args.repeats)
                sampler = best_rate(lambda: backend.draw(batch, 0, {}), batch, args.repeats, device)[0]
                generated = generate_rate(folder, Path(scratch) / f"set-{precision}-{batch}", args, batch,
                                          precision)
                print(f"| {precision} | {batch} | {gemm / 1e12:.2f} | {network:.0f} | {sampler:.0f} | "
                      f"{generated:.0f} | {network * flops / gemm:.3f} | {sampler * flops / gemm:.3f} | "
                      f"{generated * flops / gemm:.3f} |", flush=True)


if __name__ == "__main__":
    main()
