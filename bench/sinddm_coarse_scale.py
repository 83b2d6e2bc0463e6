"""Does SinDDM's coarsest scale learn the image's layout? The coarsest scale alone decides where the fan, the
pleura and the bright echoes go (finer scales only refine), and its steps are cheap, so settings for a short
CPU run can be compared on it: channels, batch, the learning-rate schedule (the reference's halvings squeezed
into the run, or a constant rate) and, optionally, the coarsest scale's side in pixels (default: the
reference's rule, 55 px for a square image).

    python bench/sinddm_coarse_scale.py --data DATASET --image ID [ID ...] [--steps 1500] \
        [--variants 64:8:paper 64:8:constant:36 64:8:constant:36:source ...]

With several ``--image`` it is FewDDM's coarsest scale: each step trains on one of the images, drawn at random,
and a variant ending in ``:source`` tells the denoiser which (``layout_per_source``).
Prints per variant the time per step (and its ratio to the first variant), the mean L1 noise loss of the last
200 steps, and for 16 samples their SSIM to the nearest source's coarsest scale, between samples, how many
samples are nearest each source and, for told variants, the share nearest the source they drew; a grid of the
sources and samples per variant goes to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from sonogen.data import UltrasoundDataset
from sonogen.generators.sinddm import (FewDDM, FewDDMConfig, MultiScaleDDMConfig, ScaleBatch, SinDDM, build_pyramid,
                                      scale_sizes)
from sonogen.generators.trainer import image_grid
from sonogen.metrics.similarity import ssim, ssim_to_references

SCHEDULES = {"paper": MultiScaleDDMConfig.lr_milestones, "constant": ()}


def run(images: torch.Tensor, config: MultiScaleDDMConfig, batch: int, steps: int, bf16: bool):
    torch.manual_seed(0)
    model = FewDDM(config) if isinstance(config, FewDDMConfig) else SinDDM(config)
    model.begin_training(images, total_steps=steps)
    sizes = scale_sizes(*images.shape[-2:], config)
    sources = torch.stack([build_pyramid(image, sizes)[0][0] for image in images])
    draws = torch.randint(len(sources), (steps,), generator=torch.Generator().manual_seed(0))
    losses, start = [], time.perf_counter()
    for draw in draws:
        # one autocast region per step, as the trainer does: autocast caches the bf16 copies of the weights
        # until its region ends, so a region around many steps trains on the weights of the first
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            losses.append(model.train_step(ScaleBatch(0, sources[draw].expand(batch, -1, -1, -1), None,
                                                      int(draw)))["loss"])
    seconds = (time.perf_counter() - start) / steps
    samples = next(model.scale_samples(16, seed=0))
    to_sources = ssim_to_references(samples, sources)
    nearest = torch.bincount(to_sources.argmax(dim=0), minlength=len(sources))
    drawn = model.layout_sources(16, seed=0)
    told = {} if drawn is None else {"drawn_source_counts": torch.bincount(drawn, minlength=len(sources)).tolist(),
                                     "nearest_is_drawn": float((to_sources.argmax(dim=0) == drawn).float().mean())}
    return seconds, {"loss_last_200": sum(losses[-200:]) / len(losses[-200:]),
                     "ssim_to_source": float(to_sources.amax(dim=0).mean()),
                     "ssim_between_samples": float(ssim(samples, samples.roll(1, dims=0)).mean()),
                     "nearest_source_counts": nearest.tolist(), **told}, \
        torch.cat([sources, samples[:16 - len(sources)]])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--image", nargs="+", required=True, help="dataset image ids (file stems); several: FewDDM")
    parser.add_argument("--label", default="pneumonia")
    parser.add_argument("--steps", type=int, default=1500)
    coarsest_sides = [f"64:8:constant:{side}" for side in (48, 42, 39, 36, 32, 24)]
    parser.add_argument("--variants", nargs="+",
                        default=["64:8:paper", "64:8:constant", "160:8:constant", *coarsest_sides],
                        help="CHANNELS:BATCH:SCHEDULE[:COARSEST_SIDE][:source], schedule one of "
                        + ", ".join(SCHEDULES))
    parser.add_argument("--fp32", action="store_true", help="train in fp32 (default: bf16 autocast)")
    parser.add_argument("--out", type=Path, default=Path("sinddm-coarse"))
    args = parser.parse_args()
    dataset = UltrasoundDataset(args.data, labels=[args.label])
    images = []
    for wanted in args.image:
        matches = [k for k, r in enumerate(dataset.records) if Path(r.image).stem == wanted]
        if len(matches) != 1:
            parser.error(f"--image {wanted!r} matches {len(matches)} {args.label} images of {args.data}, need one")
        images.append(dataset[matches[0]]["image"])
    images = torch.stack(images)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; coarsest scale {scale_sizes(*images.shape[-2:], MultiScaleDDMConfig('x'))[0]}")
    args.out.mkdir(parents=True, exist_ok=True)
    baseline = None
    for variant in args.variants:
        channels, batch, schedule, *options = variant.split(":")
        told = options[-1:] == ["source"]
        config = (FewDDMConfig if len(args.image) > 1 else MultiScaleDDMConfig)(
            label="x", images=tuple(args.image), max_images=len(args.image), channels=int(channels),
            lr_milestones=SCHEDULES[schedule], layout_per_source=told)
        if options[:len(options) - told]:
            config = replace(config, coarsest_side=(int(options[0]),) * 2)
        seconds, result, grid = run(images, config, int(batch), args.steps, not args.fp32)
        baseline = baseline or seconds
        print(json.dumps({"variant": variant, "coarsest": scale_sizes(*images.shape[-2:], config)[0],
                          "steps": args.steps, "s_per_step": round(seconds, 3),
                          "time_ratio": round(seconds / baseline, 2),
                          **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}}))
        Image.fromarray(image_grid(grid)).save(args.out / f"{variant.replace(':', '-')}.png")


if __name__ == "__main__":
    main()
