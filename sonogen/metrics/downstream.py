"""Downstream usefulness: does adding synthetic positives help a classifier find the label on real patients?

The same reduced-VGG classifier is trained, for each replicate seed, on
  real            real positives + real negatives (the baseline)
  real+synthetic  real positives + synthetic positives + real negatives
  synthetic+real-negatives  synthetic positives + real negatives
  synthetic       synthetic positives + synthetic negatives (needs a generator of the negative label)
and scored by AUC-ROC on the real, patient-level test split. The 95% interval resamples test *patients* with
replacement (frames of one patient are not independent), positive and negative patients separately so each
resample has both classes (a stratified bootstrap), averaging the replicate seeds inside each resample,
as in the "AUC with vs without synthetic data" comparisons of Yu et al. and Basarab et al.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from sonogen.metrics.classifier import ClassifierConfig, predict_proba, train_classifier

BASELINE = "real"
AUGMENTED = "real+synthetic"


@dataclass
class DownstreamConfig:
    seeds: int = 3
    epochs: int = 25
    bootstrap: int = 1000
    synthetic_per_real: float = 1.0  # synthetic positives per real training positive
    # per family, the share of real training positives kept (the rest replaced by synthetic ones): Zhang et al.
    # cut the minority class to 25 % to measure what SinDDM / FewDDM images add
    real_positive_fraction: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if not all(0 < v <= 1 for v in self.real_positive_fraction.values()):
            raise ValueError(f"real_positive_fraction values must be in (0, 1], got {self.real_positive_fraction}")
        if self.seeds < 3:
            raise ValueError(f"downstream usefulness needs at least 3 replicate seeds, got {self.seeds}")
        if self.epochs < 1 or self.bootstrap < 100 or self.synthetic_per_real <= 0:
            raise ValueError("epochs must be ≥ 1, bootstrap ≥ 100 and synthetic_per_real > 0")


def _auc(targets: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(targets, scores))


def downstream_usefulness(
    train_images: torch.Tensor,
    train_positive: torch.Tensor,
    test_images: torch.Tensor,
    test_positive: torch.Tensor,
    test_patients: list[str],
    synthetic_positives: torch.Tensor,
    synthetic_negatives: torch.Tensor | None,
    config: DownstreamConfig,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict:
    """AUC per training condition and the delta of ``real+synthetic`` over ``real`` with its patient bootstrap;
    the classifiers train on ``device``, each announced to ``log`` (they are most of an evaluation's time)."""
    train_positive, test_positive = train_positive.bool(), test_positive.bool().numpy()
    if test_positive.all() or not test_positive.any():
        raise ValueError("the real test split needs both positive and negative images for an AUC")
    if train_positive.all() or not train_positive.any():
        raise ValueError("the real training split needs both positive and negative images")
    real_pos, real_neg = train_images[train_positive], train_images[~train_positive]
    conditions = {
        BASELINE: (real_pos, real_neg),
        AUGMENTED: (torch.cat([real_pos, synthetic_positives]), real_neg),
        "synthetic+real-negatives": (synthetic_positives, real_neg),
    }
    if synthetic_negatives is not None:
        conditions["synthetic"] = (synthetic_positives, synthetic_negatives)
    scores: dict[str, list[np.ndarray]] = {}
    total = len(conditions) * config.seeds
    for index, (name, (positives, negatives)) in enumerate(conditions.items()):
        images = torch.cat([negatives, positives])
        targets = torch.cat([torch.zeros(len(negatives)), torch.ones(len(positives))]).long()
        scores[name] = []
        for seed in range(config.seeds):
            if log:
                log(f"downstream classifier {index * config.seeds + seed + 1}/{total}: {name}, seed {seed}, "
                    f"{len(images)} images of {images.shape[-1]} px, {config.epochs} epochs")
            model = train_classifier(images, targets, ClassifierConfig(
                classes=["negative", "positive"], epochs=config.epochs, seed=seed), device)
            scores[name].append(predict_proba(model, test_images)[:, 1].numpy())

    per_seed = {name: [_auc(test_positive, s) for s in runs] for name, runs in scores.items()}
    patients = np.array(test_patients)
    groups = [np.flatnonzero(patients == p) for p in np.unique(patients)]
    # stratified: positive and negative patients are resampled separately, so every resample has both classes
    strata = [[g for g in groups if test_positive[g].mean() >= 0.5], [g for g in groups if test_positive[g].mean() < 0.5]]
    if not all(strata):
        raise ValueError("the real test split needs patients of both classes for a patient bootstrap")
    rng = np.random.default_rng(0)
    deltas = []
    for _ in range(config.bootstrap):
        rows = np.concatenate([stratum[i] for stratum in strata for i in rng.integers(0, len(stratum), len(stratum))])
        auc = {name: np.mean([_auc(test_positive[rows], s[rows]) for s in scores[name]])
               for name in (BASELINE, AUGMENTED)}
        deltas.append(auc[AUGMENTED] - auc[BASELINE])
    auc_mean = {name: float(np.mean(v)) for name, v in per_seed.items()}
    return {
        "auc": auc_mean,
        "auc_per_seed": per_seed,
        "auc_delta": auc_mean[AUGMENTED] - auc_mean[BASELINE],
        "auc_delta_ci95": [float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))],
        "bootstrap_resamples": len(deltas),
        "test_patients_per_class": {"positive": len(strata[0]), "negative": len(strata[1])},
        "test_images": len(test_positive),
        "test_patients": len(groups),
        "train_real_positives": len(real_pos),
        "train_real_negatives": len(real_neg),
        "synthetic_positives": len(synthetic_positives),
        "seeds": config.seeds,
        "skipped_conditions": [] if synthetic_negatives is not None else
        ["synthetic: no generator of the negative label was given"],
        # the predictions themselves, per condition and seed, for pooling across cross-validation folds
        "scores": {name: [s.tolist() for s in runs] for name, runs in scores.items()},
        "targets": test_positive.astype(int).tolist(),
        "patients": list(test_patients),
    }
