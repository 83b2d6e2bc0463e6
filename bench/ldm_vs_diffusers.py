"""The ldm's sampling through the product (``load_backend``: what `generate` and the server run) against a plain
diffusers pipeline on the same weights, scheduler, steps, batch and starting latents, in the same run.

    python bench/ldm_vs_diffusers.py [--generator FOLDER] [--image-size 64] [--n 64] [--repeats 3]
        [--compile] [--device auto]

Without ``--generator``, a random-initialised from-scratch ldm of params.yaml's widths at ``--image-size`` (speed
does not depend on the weights). The plain pipeline is what a diffusers user writes for that folder:
``StableDiffusionPipeline.from_pretrained(FOLDER/pipeline, dtype=…)`` with the model's sampling scheduler
from the saved config, called with the model's label embeddings as ``prompt_embeds`` (a from-scratch ldm has no
text encoder), its steps and guidance scale. Rows: images/s (best of ``--repeats`` draws of ``--n`` after a
warm-up draw, which compiles a compiled row), × the plain fp32 pipeline and × the plain bf16 one, and how far the
product's uint8 images are from the plain pipeline's in the same precision (the same computation: 0 or 1 grey level).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from dcgan_throughput import device_name
from generate_throughput import best_rate

from sonogen.backends import load_backend
from sonogen.generators import load_generator
from sonogen.generators.base import image_generators
from sonogen.generators.latent_diffusion import LatentDiffusion
from sonogen.generators.ldm_networks import sampling_scheduler
from sonogen.generators.trainer import resolve_device
from sonogen.jobs.training import load_family_config
from sonogen.sampling import gaussian_latents, to_uint8

ROOT = Path(__file__).resolve().parents[1]
SEED = 0


def plain_pipeline(folder: Path, model: LatentDiffusion, precision: str, n: int, device: torch.device):
    """A draw of ``n`` images by a plain diffusers pipeline read from ``folder``, as uint8."""
    from diffusers import StableDiffusionPipeline

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        folder / "pipeline", dtype=dtype, safety_checker=None, requires_safety_checker=False,
        text_encoder=None, tokenizer=None, feature_extractor=None, image_encoder=None).to(device)
    pipe.scheduler = sampling_scheduler(model.config.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    c = model.config
    label = torch.full((n,), model.sampling_labels().index(c.label) + 1)
    with torch.no_grad():
        positive = model._embed(label).to(dtype)
        negative = model._embed(torch.zeros(n, dtype=torch.long)).to(dtype)
    side = c.image_size // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (pipe.unet.config.in_channels, side, side)
    latents = torch.from_numpy(gaussian_latents(SEED, n, int(np.prod(shape)))).reshape(n, *shape)

    def draw() -> np.ndarray:
        images = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=c.steps,
                      guidance_scale=c.guidance_scale, latents=latents.to(device, dtype),
                      generator=image_generators(SEED, n), height=c.image_size, width=c.image_size,
                      output_type="pt").images
        return to_uint8(images.float().mean(dim=1, keepdim=True) * 2 - 1)

    return draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", type=Path, help="a saved ldm folder (default: a random-initialised one)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the product compiled (minutes on a CPU)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.generator
        if folder is None:
            config, _ = load_family_config(ROOT / "params.yaml", "ldm", "consolidation",
                                           {"image_size": args.image_size, "labels": ["consolidation", "normal"]})
            torch.manual_seed(0)
            folder = LatentDiffusion(config).save(Path(scratch) / "ldm")
        model = load_generator(folder, device)
        c = model.config
        print(f"device: {device_name(device)}; torch {torch.__version__}; ldm {c.image_size} px, {c.scheduler} "
              f"{c.steps} steps, guidance {c.guidance_scale}; {args.n} images per draw")
        rows, plain = [], {}
        for precision in ("fp32", "bf16"):
            rate, images = best_rate(plain_pipeline(folder, model, precision, args.n, device), args.n,
                                     args.repeats, device)
            plain[precision] = (rate, images)
            rows.append((f"plain diffusers {precision}", precision, rate, None))
        settings = [("fp32", False, False), ("bf16", False, False), ("bf16", True, False)]
        settings += [("bf16", False, True)] if args.compile else []
        for precision, channels_last, compiled in settings:
            backend = load_backend(str(folder), precision, channels_last, compiled)
            rate, images = best_rate(lambda: backend.draw(args.n, SEED, {})[0], args.n, args.repeats, device)
            title = f"sonogen {precision}{' channels-last' if channels_last else ''}{' compiled' if compiled else ''}"
            difference = np.abs(images.astype(int) - plain[precision][1].astype(int))
            rows.append((title, precision, rate, difference))
        print("\n| path | images/s | × plain fp32 | × plain bf16 | vs plain, same precision: max (mean) grey "
              "levels |")
        print("|---|---|---|---|---|")
        for title, precision, rate, difference in rows:
            agreement = "" if difference is None else f"{difference.max()} ({difference.mean():.3f})"
            print(f"| {title} | {rate:.2f} | {rate / plain['fp32'][0]:.2f} | {rate / plain['bf16'][0]:.2f} | "
                  f"{agreement} |")


if __name__ == "__main__":
    main()
