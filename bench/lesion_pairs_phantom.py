"""Lesion pairs on the phantom, whose masks are exact: does a segmenter of real pairs read each drawn lesion where
its mask says (against chance and the real ceiling), is the healthy frame unchanged outside the lesion's margin and
the band behind it, and do the pairs help a segmenter find lesions on real test patients?

    python bench/lesion_pairs_phantom.py --out DIR [--size 32 --patients 30 --vae-steps 600 --unet-steps 600
                                                    --pairs-steps 600 --pairs 64 --seeds 3]

Three models on the same anatomy model: the trained one, the same with no refinement (stage 3 off), and one whose
ControlNet and segmenter had a single step (what the label-conditioned anatomy model and the compositing give
alone). Lesions are drawn into the healthy frames of the training split. Mask fidelity is read against the
returned masks and, ``*_as_drawn``, against stage 1's (before the segmenter's re-reading replaced some).
Results go to ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sonogen.data.dataset import UltrasoundDataset
from sonogen.data.manifest import load_grey, read_manifest
from sonogen.data.phantom import generate
from sonogen.data.prepare import prepare
from sonogen.generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from sonogen.generators.lesion_pairs import LesionPairs, LesionPairsConfig
from sonogen.generators.lesion_shapes import behind, near
from sonogen.generators.trainer import TrainConfig, train
from sonogen.metrics.segmentation import pair_fidelity, segmentation_usefulness


def png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def real_pairs(data: Path, split: str, label: str | None = None):
    dataset = UltrasoundDataset(data, split=split, with_mask=True, labels=[label] if label else None)
    items = [dataset[k] for k in range(len(dataset))]
    return (torch.stack([i["image"] for i in items]), torch.stack([i["mask"] for i in items]),
            [i["patient_id"] for i in items])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--patients", type=int, default=30)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--unet-steps", type=int, default=600)
    parser.add_argument("--pairs-steps", type=int, default=600)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    out, started = args.out, time.time()
    data = out / "lus"
    if not data.exists():
        generate(out / "raw", patients=args.patients, frames_per_patient=2, seed=1, consolidation_fraction=0.6)
        prepare(out / "raw", data, size=args.size, split="0.6,0.1,0.3", seed=0, stratify=True)
    torch.manual_seed(0)
    tick = time.time()
    base = LatentDiffusion(LatentDiffusionConfig(label="normal", image_size=args.size, vae_channels=(8, 16),
                                                 unet_channels=(16, 32), embedding_dim=16, vae_steps=args.vae_steps,
                                                 steps=10, lr=1e-3))
    train(base, data, "normal", TrainConfig(epochs=1, batch_size=8, steps_per_epoch=args.vae_steps + args.unet_steps,
                                            eval_samples=2, precision="fp32"), out / "base")
    results = {"settings": vars(args) | {"out": str(out)}, "machine": f"{platform.machine()}, "
               f"{torch.get_num_threads()} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}",
               "base_train_s": round(time.time() - tick, 1), "models": {}}
    healthy = [load_grey(data / r.image) for r in read_manifest(data) if r.label == "normal" and r.split == "train"]
    train_images, train_masks, _ = real_pairs(data, "train")
    test_images, test_masks, _ = real_pairs(data, "test")
    lesion_images, lesion_masks, patients = real_pairs(data, "test", "consolidation")
    for name, steps, refine in (("trained", args.pairs_steps, 0.3), ("no refinement", args.pairs_steps, 0.0),
                                ("controlnet untrained", 1, 0.3)):
        tick = time.time()
        model = LesionPairs(LesionPairsConfig(base_model=str(out / "base" / "generator"), image_size=args.size,
                                              steps=10, lr=1e-3, strength=0.6, refine_strength=refine))
        train(model, data, "consolidation", TrainConfig(epochs=1, batch_size=8, steps_per_epoch=steps,
                                                        eval_samples=2, precision="fp32"), out / name)
        trained_s, tick = time.time() - tick, time.time()
        drawn = [model.sample_with_masks(1, k, {"image": png(healthy[k % len(healthy)])}) for k in range(args.pairs)]
        sample_s = time.time() - tick
        images = torch.cat([i for i, _ in drawn])
        masks = np.stack([m for _, [m] in drawn])
        frames = np.stack([healthy[k % len(healthy)] for k in range(args.pairs)]).astype(int)
        pixels = np.rint((images[:, 0].numpy() + 1) * 127.5).astype(int)
        model.config.mask_update = False  # the regions of the masks stage 1 drew
        stage1 = np.stack([m for k in range(args.pairs)
                           for m in model.sample_with_masks(1, k, {"image": png(healthy[k % len(healthy)])})[1]])
        changeable = near(stage1.astype(bool) | behind(stage1, model.config.posterior), model.config.margin)
        masks_t = torch.from_numpy(masks)[:, None].float()
        fidelity = pair_fidelity(images, masks_t, train_images, train_masks, test_images, test_masks, seed=0)
        as_drawn = pair_fidelity(images, torch.from_numpy(stage1)[:, None].float(), train_images, train_masks,
                                 test_images, test_masks, seed=0)  # the same images against stage 1's masks
        useful = segmentation_usefulness(train_images, train_masks, images, masks_t, lesion_images, lesion_masks,
                                         patients, seeds=args.seeds)
        results["models"][name] = {
            **{k: round(float(v), 3) for k, v in fidelity.items()},
            **{f"{k}_as_drawn": round(float(as_drawn[k]), 3) for k in ("mask_dice", "mask_dice_chance",
                                                                     "mask_dice_gain")},
            "outside_max_abs_change": int(np.abs(pixels - frames)[~changeable].max()),
            "changeable_fraction": round(float(changeable.mean()), 3),
            "mask_updated_fraction": round(float(np.mean([not np.array_equal(a, b) for a, b in zip(masks, stage1)])),
                                           3),
            "seg_dice": {k: round(v, 3) for k, v in useful["seg_dice"].items()},
            "seg_dice_delta": round(useful["seg_dice_delta"], 3),
            "seg_dice_delta_ci95": [round(v, 3) for v in useful["seg_dice_delta_ci95"]],
            "test_patients": useful["test_patients"], "train_s": round(trained_s, 1),
            "sample_s_per_pair": round(sample_s / args.pairs, 3)}
        print(name, json.dumps(results["models"][name]), flush=True)
        grid = np.concatenate([np.concatenate(list(pixels[:12].astype(np.uint8)), 1),
                               np.concatenate(list(masks[:12] * 255), 1)], 0)
        Image.fromarray(grid.astype(np.uint8)).save(out / f"pairs-{name.replace(' ', '-')}.png")
    results["wall_s"] = round(time.time() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "models"}))


if __name__ == "__main__":
    main()
