"""DiffUltra on the phantom, whose pleura and lesions are known: pleural-line error, bank statistics against the
generating distribution, where sampled lesions land, whether the output boxes cover the drawn lesions, and
detection AP of real vs real + DiffUltra vs real + binary-condition boxes.

    python bench/diffultra_phantom.py --out DIR [--size 64 --patients 60 --ldm-steps 3000 --controlnet-steps 1500]
                                      [--strength 0.8] [--data PREPARED --base LDM_GENERATOR] [--synthetic N]
                                      [--conditions structure,binary] [--real-positives N]

``--data`` and ``--base`` reuse a prepared phantom and a base ldm trained on it (``sonogen data phantom``,
``prepare``, ``sonogen train ldm``) instead of generating and training them here.

Everything goes through the library's product paths (phantom → prepare → bank → trainer → sample_with_boxes →
detection gate); results are printed and written to ``DIR/results.json`` with sample grids.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sonogen.data.lesion_bank import LesionBank, detect_anatomy
from sonogen.data.phantom import generate, make_patient, prepared_pleura
from sonogen.data.prepare import prepare
from sonogen.evaluation import boxed_images
from sonogen.generators import load_generator, to_uint8
from sonogen.generators.diffultra import DiffUltra, DiffUltraConfig
from sonogen.generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from sonogen.generators.trainer import TrainConfig, image_grid, train
from sonogen.metrics.detection import DetectorConfig, detect, detection_comparison, train_detector


def pleura_errors(size: int, patients: int = 24) -> list[float]:
    """Mean |detected − true| pleura row (px at ``size``) per frame, frames prepared as ``prepare`` does."""
    errors = []
    for index in range(patients):
        for image, x, y in prepared_pleura(make_patient(0, index, consolidation=index % 2 == 0), 0, 2, size):
            anatomy = detect_anatomy(image)
            errors.append(float(np.nanmean(np.abs(np.interp(x, np.arange(size), anatomy.pleura) - y))))
    return errors


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def coverage(detector, images: torch.Tensor, boxes: list) -> dict[str, float]:
    """How often the real-trained detector's best box overlaps the given box (IoU ≥ 0.3), and the same with the
    boxes shuffled between images (the chance level)."""
    found = [d[0][0] if d[0] else None for d in detect(detector, images, max_detections=1)]
    given = [b[0] for b in boxes]
    shuffled = given[1:] + given[:1]
    hit = lambda pairs: float(np.mean([f is not None and iou(f, g) >= 0.3 for f, g in pairs]))  # noqa: E731
    return {"hit_rate": hit(zip(found, given)), "hit_rate_shuffled_boxes": hit(zip(found, shuffled)),
            "mean_iou": float(np.mean([iou(f, g) if f is not None else 0.0 for f, g in zip(found, given)]))}


def keep_positives(boxed: tuple[torch.Tensor, list], count: int) -> tuple[torch.Tensor, list]:
    """The images without lesions and ``count`` of those with, drawn at random (seed 0)."""
    images, boxes = boxed
    positives = [k for k, b in enumerate(boxes) if b]
    kept = set(np.random.default_rng(0).permutation(positives)[:count].tolist())
    chosen = [k for k, b in enumerate(boxes) if not b or k in kept]
    return images[chosen], [boxes[k] for k in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--ldm-steps", type=int, default=3000)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--controlnet-steps", type=int, default=1500)
    parser.add_argument("--detector-steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strength", type=float, help="how far backgrounds are re-noised (default: the model's)")
    parser.add_argument("--data", type=Path, help="a prepared phantom to use instead of generating one")
    parser.add_argument("--base", type=Path, help="a base ldm generator trained on --data")
    parser.add_argument("--conditions", default="structure,binary", help="the ControlNet conditions to compare")
    parser.add_argument("--real-positives", type=int, help="keep this many real training lesion images, drawn at "
                                                           "random (default: all), as where lesions are scarce")
    parser.add_argument("--synthetic", type=int, help="synthetic images per condition (default: as many as the "
                                                      "real training positives)")
    args = parser.parse_args()
    for given in (args.data, args.base):
        if given is not None and not given.is_dir():
            parser.error(f"{given} is not a folder")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    print(results["machine"])

    errors = {size: pleura_errors(size) for size in (64, 128)}
    results["pleura_error_px"] = {size: {"mean": float(np.mean(e)), "median": float(np.median(e)),
                                         "max": float(np.max(e))} for size, e in errors.items()}
    print("pleura error", json.dumps(results["pleura_error_px"]))

    data = args.data or out / "lus"
    if not data.is_dir():
        generate(out / "raw", patients=args.patients, frames_per_patient=args.frames, seed=0,
                 consolidation_fraction=0.3)
        prepare(out / "raw", data, size=args.size, split="0.6,0.1,0.3", seed=0, stratify=True)
    bank = LesionBank.build(data)
    results["bank"] = bank.statistics()
    results["bank"]["skipped_images"] = len(bank.source["skipped"])
    print("bank", json.dumps(results["bank"]))

    base = args.base or out / "ldm" / "generator"
    if not base.is_dir():
        started = time.perf_counter()
        torch.manual_seed(0)
        model = LatentDiffusion(LatentDiffusionConfig(
            label="normal", image_size=args.size, vae_channels=(32, 64, 128), unet_channels=(64, 128, 256),
            embedding_dim=128, vae_steps=args.vae_steps, lr=2e-4))
        epochs = 10
        train(model, data, "normal", TrainConfig(epochs=epochs, steps_per_epoch=args.ldm_steps // epochs, batch_size=16,
                                                  eval_samples=16, eval_every=epochs, precision="bf16"), base.parent)
        results["ldm_minutes"] = (time.perf_counter() - started) / 60
    models = {}
    for condition in args.conditions.split(","):
        folder = out / f"diffultra-{condition}"
        if not (folder / "generator").is_dir():
            started = time.perf_counter()
            torch.manual_seed(0)
            model = DiffUltra(DiffUltraConfig(base_model=str(base), image_size=args.size,
                                              condition=condition, lr=1e-4))
            epochs = 5
            train(model, data, "consolidation", TrainConfig(
                epochs=epochs, steps_per_epoch=args.controlnet_steps // epochs, batch_size=8, eval_samples=8,
                eval_every=epochs, precision="bf16"), folder)
            results[f"controlnet_{condition}_minutes"] = (time.perf_counter() - started) / 60
        models[condition] = load_generator(folder / "generator")

    real_train, real_test = boxed_images(data, "train"), boxed_images(data, "test")
    if args.real_positives is not None:
        real_train = keep_positives(real_train, args.real_positives)
        results["real_positives"] = args.real_positives
    n_synthetic = sum(1 for b in real_train[1] if b) if args.synthetic is None else args.synthetic
    synthetic = {}
    results["strength"] = next(iter(models.values())).config.strength if args.strength is None else args.strength
    for condition, model in models.items():
        started = time.perf_counter()
        chunks = [model.sample_with_boxes(min(32, n_synthetic - s), seed=s, condition={"strength": results["strength"]})
                  for s in range(0, n_synthetic, 32)]
        images = torch.cat([c[0] for c in chunks])
        boxes = [b for c in chunks for b in c[1]]
        results[f"sampling_{condition}_s_per_image"] = (time.perf_counter() - started) / n_synthetic
        synthetic[condition] = (images, boxes)
        grid = to_uint8(images[:32])
        for k, [[x0, y0, x1, y1]] in enumerate(boxes[:32]):  # the output box, drawn on the grid copy
            grid[k, y0, x0:x1] = grid[k, y1 - 1, x0:x1] = 255
            grid[k, y0:y1, x0] = grid[k, y0:y1, x1 - 1] = 255
        Image.fromarray(image_grid(torch.from_numpy(grid[:, None] / 127.5 - 1))).save(out / f"{condition}.png")
        anatomies = [model.anatomy(image) for image in to_uint8(images)]
        results[f"placement_{condition}"] = {
            "below_pleura": float(np.mean([y0 >= a.pleura_top(x0, x1) - 0.5 for a, [[x0, y0, x1, y1]] in
                                           zip(anatomies, boxes)])),
            "inside_fan": float(np.mean([a.fan[y0:y1, x0:x1].mean() >= 0.9 for a, [[x0, y0, x1, y1]] in
                                         zip(anatomies, boxes)])),
            "large_fraction": float(np.mean([(x1 - x0) * (y1 - y0) / args.size**2 >= bank.large_area
                                             for [[x0, y0, x1, y1]] in boxes]))}
    real_detector = train_detector(*real_train, DetectorConfig(steps=args.detector_steps))
    test_positive = [k for k, b in enumerate(real_test[1]) if b]
    results["coverage_real_test"] = coverage(real_detector, real_test[0][test_positive],
                                             [real_test[1][k] for k in test_positive])
    for condition, (images, boxes) in synthetic.items():
        results[f"coverage_{condition}"] = coverage(real_detector, images, boxes)
    print(json.dumps({k: v for k, v in results.items() if k.startswith(("coverage", "placement", "sampling"))}))

    started = time.perf_counter()
    results["detection"] = detection_comparison(real_train, real_test, synthetic,
                                                DetectorConfig(steps=args.detector_steps), seeds=args.seeds)
    results["detection_minutes"] = (time.perf_counter() - started) / 60
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'trained on':<22}" + "".join(f"{m:>24}" for m in ("ap50", "ap", "ap50_large")))
    for arm, scores in results["detection"].items():
        print(f"{arm:<22}" + "".join(f"{scores[m]['mean']:>8.3f} [{scores[m]['low']:.3f}, {scores[m]['high']:.3f}]"
                                     for m in ("ap50", "ap", "ap50_large")))


if __name__ == "__main__":
    main()
