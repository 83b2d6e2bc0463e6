"""Latent diffusion sampling: time per image and FID (us-encoder) per sampler and step count, against 1000-step
DDPM sampling of the same model in the same run; fp32 and bf16.

    python bench/ldm_sampling.py --data DATASET --label normal --encoder ENCODER_FOLDER --out DIR
        [--train-steps 8000 --vae-steps 2000] [--samples 512] [--seed-sets 3] [--sample-batch 512] [--device cuda]

It first trains a from-scratch LDM through the shared trainer on the dataset (every label; bf16 on CUDA), or
loads ``DIR/generator`` when it is already there (e.g. trained with ``sonogen train ldm --out DIR``), and writes
grids of real and generated images to ``DIR``.
The FID is between the label's real training images and the samples, with the same number of samples for every
row, so rows compare with each other (not with FIDs of other papers). Every row draws ``--seed-sets`` disjoint sets
of seeds; the spread of its FIDs is the noise of the FID at this sample count, against which a 5 % difference
between samplers can be judged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path

import torch
from PIL import Image

from sonogen.data import UltrasoundDataset
from sonogen.generators import load_generator
from sonogen.generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from sonogen.generators.trainer import GENERATOR_DIR, TrainConfig, image_grid, train
from sonogen.metrics.classifier import embed, load_classifier
from sonogen.metrics.frechet import fid

# (scheduler, steps, bf16); the first row is the baseline of every ratio
ROWS = [("ddpm", 1000, False), ("ddim", 50, False), ("ddim", 20, False), ("dpmpp", 20, False), ("dpmpp", 10, False),
        ("dpmpp-sde", 20, False), ("dpmpp-sde", 10, False), ("dpmpp-sde", 20, True)]
SEED_SET_STRIDE = 1_000_000  # seed set k draws seeds k·stride …, far apart from other sets for any --samples


def trained_model(args, device: torch.device) -> LatentDiffusion:
    folder = args.out / GENERATOR_DIR
    if folder.is_dir():
        return load_generator(folder, device)
    size = UltrasoundDataset(args.data, split="train")[0]["image"].shape[-1]
    model = LatentDiffusion(LatentDiffusionConfig(
        label=args.label, image_size=size, vae_channels=(64, 128, 256), unet_channels=(128, 256, 256),
        layers_per_block=2, embedding_dim=256, vae_steps=args.vae_steps, lr=2e-4, prompt_template="{label}"))
    epochs = args.train_steps // 500
    started = time.perf_counter()
    summary = train(model, args.data, args.label, TrainConfig(
        epochs=epochs, steps_per_epoch=500, batch_size=args.batch, eval_samples=16, eval_every=epochs,
        checkpoint_every=epochs, device=str(device)), args.out)
    print(f"trained {model.step} steps in {time.perf_counter() - started:.0f} s; final {summary['final']}")
    return model


def sample_all(model: LatentDiffusion, n: int, scheduler: str, steps: int, batch: int, bf16: bool,
               first_seed: int = 0) -> torch.Tensor:
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        return torch.cat([model.sample(min(batch, n - start), seed=first_seed + start, condition={
            "scheduler": scheduler, "steps": steps}) for start in range(0, n, batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--label", default="normal")
    parser.add_argument("--encoder", type=Path, required=True, help="a saved us-encoder classifier folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-steps", type=int, default=8000)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sample-batch", type=int, help="images per sampling call (default: --batch)")
    parser.add_argument("--samples", type=int, default=512, help="samples per seed set")
    parser.add_argument("--seed-sets", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if min(args.samples, args.seed_sets) < 1:
        raise ValueError("--samples and --seed-sets must be at least 1")
    device = torch.device(args.device)
    sample_batch = args.sample_batch or args.batch
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, device "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    model = trained_model(args, device)
    real = UltrasoundDataset(args.data, split="train", labels=[args.label]).images()
    encoder, _ = load_classifier(args.encoder)
    encoder.to(device).eval()
    real_features = embed(encoder, real.to(device)).cpu()
    Image.fromarray(image_grid(real[:32])).save(args.out / "real.png")

    rows, baseline = [], None
    for scheduler, steps, bf16 in ROWS:
        sample_all(model, min(sample_batch, args.samples), scheduler, min(steps, 2), sample_batch, bf16)  # warm-up
        fids, seconds = [], 0.0
        for seed_set in range(args.seed_sets):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            samples = sample_all(model, args.samples, scheduler, steps, sample_batch, bf16, seed_set * SEED_SET_STRIDE)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - started
            fids.append(fid(real_features, embed(encoder, samples.to(device)).cpu()))
            if (steps, bf16, seed_set) == (20, False, 0):
                Image.fromarray(image_grid(samples[:32])).save(args.out / f"{scheduler}20.png")
        row = {"scheduler": scheduler, "steps": steps, "precision": "bf16" if bf16 else "fp32",
               "ms_per_image": 1000 * seconds / (args.samples * args.seed_sets), "fids": fids,
               "fid": sum(fids) / len(fids)}
        baseline = baseline or row
        row["speedup_vs_ddpm1000"] = baseline["ms_per_image"] / row["ms_per_image"]
        row["fid_vs_ddpm1000"] = row["fid"] / baseline["fid"]
        rows.append(row)
        print(json.dumps(row))
    (args.out / "sampling.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{args.samples} samples per seed set, {args.seed_sets} seed sets per row")
    print(f"{'sampler':<10}{'steps':>6}{'precision':>10}{'ms/image':>10}{'×faster':>9}{'FID mean':>10}"
          f"{'FID min–max':>16}{'FID ratio':>11}")
    for r in rows:
        spread = f"{min(r['fids']):.3f}–{max(r['fids']):.3f}"
        print(f"{r['scheduler']:<10}{r['steps']:>6}{r['precision']:>10}{r['ms_per_image']:>10.2f}"
              f"{r['speedup_vs_ddpm1000']:>9.1f}{r['fid']:>10.3f}{spread:>16}{r['fid_vs_ddpm1000']:>11.3f}")


if __name__ == "__main__":
    main()
