"""SinDDM speed on one image: training steps/s (batch 32, scales drawn as in training) in fp32 eager (the
baseline), bf16 autocast, and bf16 with a compiled denoiser (CUDA); then sampling time per image per scale.

    python bench/sinddm_speed.py --image IMAGE [--device cpu|cuda] [--channels 160] [--steps 20]
    python bench/sinddm_speed.py --image ID --data DATASET --label pneumonia --train-seconds 300 --out DIR

With ``--data`` it then trains the model through the shared trainer (the dataset's image named ``--image``,
bf16 and compiled on CUDA) for as many 500-step epochs as the measured speed fits in ``--train-seconds``, saves it in ``DIR/generator`` with a grid of samples beside the training image,
and prints the SSIM of the samples to the training image and between samples. The paper model has 160
channels; smaller ``--channels`` fit a CPU budget.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sonogen.generators.sinddm import MultiScaleDDMConfig, SinDDM, scale_sizes


def load_image(path: Path) -> torch.Tensor:
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    return torch.from_numpy(pixels / 127.5 - 1)[None]


def denoiser_macs_per_pixel(model: SinDDM) -> int:
    return sum(m.in_channels // m.groups * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
               for m in model.denoiser.modules() if isinstance(m, torch.nn.Conv2d))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_rate(model: SinDDM, image: torch.Tensor, steps: int, batch: int, bf16: bool, device) -> float:
    draws = list(model.training_batches(image, batch, 2000, torch.Generator().manual_seed(0)))
    warm = list({b.scale: b for b in reversed(draws)}.values())  # every scale once: kernels, compilation

    def step(draw):
        # one autocast region per step, as the trainer does: autocast caches the bf16 copies of the weights
        # until its region ends, so a region around many steps would skip their casts and train on stale ones
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            model.train_step(draw)

    for b in warm:
        step(b)
    sync(device)
    start = time.perf_counter()
    for b in draws[:steps]:
        step(b)
    sync(device)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", type=Path, required=True, help="image file, or the dataset image id with --data")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--label", default="pneumonia")
    parser.add_argument("--train-seconds", type=float, default=300)
    parser.add_argument("--steps-per-second", type=float, help="skip the speed runs: train at this known rate")
    parser.add_argument("--steps-per-epoch", type=int, default=500)
    parser.add_argument("--blur-gap-factor", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("sinddm-bench"))
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.data:
        from sonogen.data import UltrasoundDataset

        dataset = UltrasoundDataset(args.data, split="train", labels=[args.label])
        [index] = [k for k, r in enumerate(dataset.records) if Path(r.image).stem == str(args.image)]
        image = dataset[index]["image"]
    else:
        image = load_image(args.image)
    config = MultiScaleDDMConfig(label=args.label, channels=args.channels)
    sizes = scale_sizes(*image.shape[-2:], config)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(f"image {tuple(image.shape[-2:])} → scales {sizes}")
    rate = args.steps_per_second or measure(args, image, sizes, device)
    if args.data:
        # evaluation and compilation take part of the budget
        epochs = max(1, int(0.75 * rate * args.train_seconds / args.steps_per_epoch))
        train_and_grid(args, device, epochs)


def measure(args, image: torch.Tensor, sizes: list[tuple[int, int]], device: torch.device) -> float:
    """Prints training and sampling speed; returns the fastest training rate."""

    modes = [("fp32 eager", False, False), ("bf16 eager", True, False)]
    if device.type == "cuda":
        modes.append(("bf16 compiled", True, True))
    rates = {}
    for name, bf16, compiled in modes:
        torch.manual_seed(0)
        model = SinDDM(MultiScaleDDMConfig(label=args.label, channels=args.channels, images=("x",))).to(device)
        model.begin_training(image[None].to(device), total_steps=120_000)
        if compiled:
            model.denoiser.compile()
        rates[name] = train_rate(model, image[None].to(device), args.steps, args.batch, bf16, device)
    macs = denoiser_macs_per_pixel(model)
    print(f"denoiser: {macs / 1e6:.2f} M multiply-adds per pixel; scale {sizes[0]} per step: "
          f"{3 * 2 * macs * sizes[0][0] * sizes[0][1] * args.batch / 1e9:.0f} GFLOP (fwd + bwd)")
    for name, rate in rates.items():
        print(f"train  {name:14s} {rate:8.2f} steps/s  ×{rate / rates['fp32 eager']:.2f} of fp32 eager")

    scheduler = model.scheduler()
    n = args.samples
    clock, times = time.perf_counter(), []
    for _ in model.scale_samples(n, seed=0):
        sync(device)
        times.append(time.perf_counter() - clock)
        clock = time.perf_counter()
    for scale, (size, seconds) in enumerate(zip(sizes, times)):
        steps = scheduler.train_timesteps(scale)
        print(f"sample scale {scale} {size[0]}×{size[1]}: {steps:3d} steps, {1000 * seconds / n:8.1f} ms per image "
              f"(batch {n}, fp32)")
    print(f"sample total: {sum(times) / n:.2f} s per image")
    return max(rates.values())


def train_and_grid(args, device: torch.device, epochs: int) -> None:
    from sonogen.generators.trainer import TrainConfig, image_grid, train
    from sonogen.metrics.similarity import nearest_ssim, ssim

    torch.manual_seed(0)
    model = SinDDM(MultiScaleDDMConfig(label=args.label, channels=args.channels, images=(str(args.image),),
                                       blur_gap_factor=args.blur_gap_factor))
    config = TrainConfig(epochs=epochs, batch_size=args.batch, steps_per_epoch=args.steps_per_epoch,
                         eval_samples=8, eval_every=max(1, epochs // 4), checkpoint_every=max(1, epochs // 4),
                         device=str(device), compile=device.type == "cuda")
    start = time.perf_counter()
    summary = train(model, args.data, args.label, config, args.out)
    seconds = time.perf_counter() - start
    samples = model.sample(16, seed=7)
    real = load_image(next(Path(args.data).glob(f"images/{args.image}.png")))[None]
    real = torch.nn.functional.interpolate(real, size=samples.shape[-2:], mode="bicubic", antialias=True)
    Image.fromarray(image_grid(torch.cat([real.clamp(-1, 1), samples[:15]]), columns=4)).save(args.out / "grid.png")
    scheduler = model.scheduler()
    result = {"scale_steps": [scheduler.train_timesteps(k) for k in range(scheduler.n_scales)],
              "train_seconds": round(seconds, 1), "steps": model.step, "final": summary["final"],
              "ssim_to_train": float(nearest_ssim(samples, real).mean()),
              "ssim_between_samples": float(ssim(samples, samples.roll(1, dims=0)).mean())}
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
