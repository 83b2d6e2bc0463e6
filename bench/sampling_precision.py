"""Sampling precision, memory order and compilation: fp32 NCHW eager (the baseline) against bf16, channels-last,
``torch.compile`` and their combinations, through the product's sampling path (``sonogen.backends.load_backend``:
what ``generate`` and the torch server run).

    python bench/sampling_precision.py [GENERATOR_FOLDER ...] [--n 64] [--repeats 3]

Without folders it times random-initialised models: the paper DCGAN at 64 and 128 px and a 64 px latent diffusion
model (DPM-Solver++ 20 steps); with folders, those saved generators (e.g. trained cross-validation folds). Per
model and setting: images/s (best of ``--repeats`` draws of ``--n`` images after a warm-up draw, which compiles a
compiled setting), the ratio to fp32 NCHW eager in the same run, and how far its uint8 images are from fp32's
(mean and largest |Δ| in grey levels).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sonogen.backends import load_backend

SETTINGS = (("fp32", False, False), ("bf16", False, False), ("fp32", True, False), ("bf16", True, False),
            ("fp32", False, True), ("bf16", True, True))  # precision, channels-last, compiled


def random_models(folder: Path) -> list[tuple[str, str]]:
    from sonogen.generators.dcgan import DCGAN, DCGANConfig
    from sonogen.generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig

    saved = []
    for size in (64, 128):
        torch.manual_seed(0)
        model = DCGAN(DCGANConfig(label="x", image_size=size))
        saved.append((f"DCGAN {size} px, random", str(model.eval_mode().save(folder / f"dcgan{size}"))))
    torch.manual_seed(0)
    ldm = LatentDiffusion(LatentDiffusionConfig(label="x", labels=("x",), image_size=64, vae_channels=(32, 64, 128),
                                                unet_channels=(64, 128, 256), steps=20))
    saved.append(("ldm 64 px, random, 20 steps", str(ldm.eval_mode().save(folder / "ldm64"))))
    return saved


def images_per_second(backend, n: int, repeats: int) -> tuple[float, np.ndarray]:
    drawn = backend.images(n, 0)  # warm-up, and the images compared
    best = min(_timed(lambda: backend.images(n, 0)) for _ in range(repeats))
    return n / best, drawn


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        models = [("/".join(Path(f).resolve().parts[-4:-1]), f) for f in args.folders] or \
            random_models(Path(scratch))
        print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}, n={args.n}, best of {args.repeats}")
        print("| model | setting | images/s | × fp32 NCHW eager | mean |Δ| | max |Δ| |\n|---|---|---|---|---|---|")
        for name, folder in models:
            baseline, exact = None, None
            for precision, channels_last, compiled in SETTINGS:
                backend = load_backend(folder, precision, channels_last, compiled)
                rate, drawn = images_per_second(backend, args.n, args.repeats)
                baseline, exact = (rate, drawn) if baseline is None else (baseline, exact)
                difference = np.abs(drawn.astype(int) - exact.astype(int))
                setting = f"{precision}{', channels-last' if channels_last else ''}{', compiled' if compiled else ''}"
                print(f"| {name} | {setting} | {rate:.1f} | {rate / baseline:.2f} | {difference.mean():.2f} | "
                      f"{difference.max()} |", flush=True)


if __name__ == "__main__":
    main()
