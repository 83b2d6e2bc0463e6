"""The gates of families that draw lesions into masks: mask adherence (a model asked for a lesion where a real
mask is), and for families that return pairs, mask fidelity and whether the pairs help a segmenter; each read on a
prepared dataset with ``metrics.segmentation``, or the reason it could not be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sonogen.data import UltrasoundDataset
from sonogen.gates import EvaluateConfig
from sonogen.generators import Generator

MASK_METRICS = ("mask_dice", "mask_dice_chance", "mask_dice_gain", "mask_dice_real", "mask_requests")
SEGMENTATION_METRICS = ("seg_dice_real", "seg_dice_real_synthetic", "seg_dice_delta", "seg_dice_delta_lower_ci")


def mask_adherence_readings(generator: Generator, data: str | Path, seed: int,
                    device: torch.device) -> tuple[dict[str, float], dict[str, str]]:
    """Mask adherence on the test images with a lesion mask that the generator can be asked for (its
    ``lesion_request``), or why it was not measured."""
    from sonogen.metrics.segmentation import mask_adherence

    def items(split: str) -> list[dict]:
        dataset = UltrasoundDataset(data, split=split, with_mask=True)
        return [dataset[k] for k in range(len(dataset))]

    def pairs(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([i["image"] for i in items]), torch.stack([i["mask"] for i in items])

    train = items("train")
    lesions = [(i, generator.lesion_request(i["mask"][0], i["boxes"].int().tolist()))
               for i in items("test") if i["mask"].any()]
    test = [(item, request) for item, request in lesions if request is not None]
    if len(test) < 2:
        askable = "" if len(test) == len(lesions) else f" that this generator can be asked for (of {len(lesions)})"
        return {}, dict.fromkeys(MASK_METRICS, f"the test split has {len(test)} image(s) with a lesion mask{askable};"
                                               " 2 are needed")
    if not any(i["mask"].any() for i in train):
        return {}, dict.fromkeys(MASK_METRICS, "the training split has no lesion masks to train the segmenter on")
    return mask_adherence(lambda request, k: generator.sample(1, k, request), *pairs(train),
                          *pairs([item for item, _ in test]), seed=seed, device=device,
                          requests=[request for _, request in test]), {}


def pair_readings(generator: Generator, data: str | Path, config: EvaluateConfig, device: torch.device,
                  pooled_later: bool = False) -> tuple[dict[str, float], dict[str, str], dict | None]:
    """For a family that draws masks, on ``config.samples`` pairs (at most 64): their mask fidelity (a segmenter
    of the real training pairs reads them) and, with a downstream config, whether they help a segmenter find the
    label's lesions on real test patients (one patient will do when a cross-validation pools the folds,
    ``pooled_later``); or why either was not measured."""
    from sonogen.metrics.segmentation import (
        pair_fidelity, segmentation_usefulness, train_segmenter, usefulness_metrics,
    )

    def pairs(split: str) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
        dataset = UltrasoundDataset(data, split=split, with_mask=True)
        items = [dataset[k] for k in range(len(dataset))]
        if not items:
            return torch.empty(0, 1, 1, 1), torch.empty(0, 1, 1, 1), [], []
        return (torch.stack([i["image"] for i in items]), torch.stack([i["mask"] for i in items]),
                [i["patient_id"] for i in items], [i["label"] for i in items])

    train_images, train_masks, _, _ = pairs("train")
    if not train_masks.any():
        reason = "the training split has no lesion masks to train the segmenter on"
        return {}, dict.fromkeys((*MASK_METRICS, *SEGMENTATION_METRICS), reason), None
    images, masks = generator.sample_with_masks(max(2, min(config.samples, 64)), config.seed)
    masks = torch.from_numpy(np.stack(masks))[:, None].float()
    test_images, test_masks, test_patients, test_labels = pairs("test")
    # the reading segmenter of the real pairs is also the first of the real pairs' segmenters below
    reader = train_segmenter(train_images, train_masks, seed=config.seed, device=device)
    metrics = pair_fidelity(images, masks, train_images, train_masks, test_images, test_masks, seed=config.seed,
                            device=device, segmenter=reader)
    own = [k for k, label in enumerate(test_labels) if label == generator.label]
    patients = [test_patients[k] for k in own]
    needed = 1 if pooled_later else 2
    if config.downstream is None or len(set(patients)) < needed:
        why = "evaluate.downstream is off" if config.downstream is None else (
            f"the test split has {len(set(patients))} patient(s) with {generator.label} masks; {needed} needed")
        return metrics, dict.fromkeys(SEGMENTATION_METRICS, why), None
    found = segmentation_usefulness(train_images, train_masks, images, masks, test_images[own], test_masks[own],
                                    patients, config.downstream.seeds, resamples=config.downstream.bootstrap,
                                    seed=config.seed, device=device, real_segmenter=reader)
    metrics.update(usefulness_metrics(found))
    return metrics, {}, found
