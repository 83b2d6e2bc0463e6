"""Downstream usefulness: does adding synthetic images of a label help a classifier find it on real patients?

The same reduced-VGG classifier is trained, for each replicate seed, on
  real            the real training images (the baseline)
  real+synthetic  the same plus synthetic images of the label
  real+repeated   the same plus as many real images of the label drawn again (with replacement): the control that
                  tells what synthetic images add from what any extra examples of the label add (class balance)
  synthetic+real-negatives  synthetic images of the label in place of the real ones
  synthetic       synthetic images of the label and of the other class (label vs rest, with a generator of it)
and scored on the real, patient-level test split: AUC-ROC of the label, balanced accuracy and per-class
precision / recall / F1. How the classifiers learn (classes, augmentations, search, validation epoch) is the
protocol's (``protocols.py``). The 95 % intervals resample test *patients* with replacement (frames of one
patient are not independent) within each class's patients, so every resample has every class, averaging the
replicate seeds inside each resample, as in the "with vs without synthetic data" comparisons of the papers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from sklearn.metrics import precision_recall_fscore_support

from sonogen.metrics.classifier import ClassifierConfig, predict_proba, train_classifier
from sonogen.metrics.protocols import METRICS, Protocol, get_protocol, search_space

BASELINE = "real"
AUGMENTED = "real+synthetic"
REPEATED = "real+repeated"


@dataclass
class DownstreamConfig:
    protocol: str = "default"  # protocols.PROTOCOLS
    classes: list[str] = field(default_factory=list)  # in place of the protocol's, where the dataset names them
    seeds: int = 3
    epochs: int = 25
    bootstrap: int = 1000
    synthetic_per_real: float = 1.0  # synthetic images per real training image of the label
    # per family, the share of the label's real training images kept (the rest replaced by synthetic ones); the
    # protocol's share for the families not named here
    real_positive_fraction: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        get_protocol(self.protocol, self.classes)
        if not all(0 < v <= 1 for v in self.real_positive_fraction.values()):
            raise ValueError(f"real_positive_fraction values must be in (0, 1], got {self.real_positive_fraction}")
        if self.seeds < 3:
            raise ValueError(f"downstream usefulness needs at least 3 replicate seeds, got {self.seeds}")
        if self.epochs < 1 or self.bootstrap < 100 or self.synthetic_per_real <= 0:
            raise ValueError("epochs must be ≥ 1, bootstrap ≥ 100 and synthetic_per_real > 0")

    @property
    def resolved(self) -> Protocol:
        return get_protocol(self.protocol, self.classes)


def rank_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """AUC-ROC by ranks (Mann-Whitney U, ties averaged): the share of positive-negative pairs ranked right."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    boundaries = np.flatnonzero(np.diff(scores[order])) + 1
    for start, end in zip(np.r_[0, boundaries], np.r_[boundaries, len(scores)]):
        ranks[order[start:end]] = (start + end + 1) / 2
    positive = positive.astype(bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score(metric: str, targets: np.ndarray, probabilities: np.ndarray, positive: int) -> float:
    """``auc`` of class ``positive`` against the rest, or ``balanced_accuracy`` (mean recall of the classes
    present) of the most probable class."""
    if metric == "auc":
        return rank_auc(targets == positive, probabilities[:, positive])
    predicted = probabilities.argmax(1)
    return float(np.mean([(predicted[targets == c] == c).mean() for c in np.unique(targets)]))


def roc_table(targets: np.ndarray, scores: dict[str, np.ndarray], points: int = 51) -> list[dict[str, float]]:
    """Each arm's ROC curve (its ``(seeds, images)`` scores averaged over seeds) read at ``points`` evenly spaced
    false-positive rates, one row per rate, ``{fpr, <arm>: tpr}``: one table overlays the arms (a DVC plot); empty
    where the targets hold one class."""
    from sklearn.metrics import roc_curve

    targets = np.asarray(targets).astype(int)
    if len(np.unique(targets)) < 2:
        return []
    grid = np.linspace(0, 1, points)
    curves = {}
    for arm, values in scores.items():
        fpr, tpr, _ = roc_curve(targets, np.asarray(values).reshape(-1, len(targets)).mean(0))
        curves[arm] = np.interp(grid, fpr, tpr)
    return [{"fpr": round(float(rate), 6), **{arm: float(curve[i]) for arm, curve in curves.items()}}
            for i, rate in enumerate(grid)]


def per_class(targets: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    precision, recall, f1, _ = precision_recall_fscore_support(
        targets, probabilities.argmax(1), labels=list(range(len(classes))), zero_division=0)
    return {name: {"precision": float(p), "recall": float(r), "f1": float(f)}
            for name, p, r, f in zip(classes, precision, recall, f1)}


def patient_strata(targets: np.ndarray, patients: list[str]) -> dict[int, list[np.ndarray]]:
    """The test images' rows grouped by patient, the patients grouped by their class (that of most of their
    images; ties to the higher class index, the label in label vs rest)."""
    patients = np.asarray(patients)
    by_class: dict[int, list[np.ndarray]] = {}
    for patient in np.unique(patients):
        rows = np.flatnonzero(patients == patient)
        counts = np.bincount(targets[rows])
        by_class.setdefault(max(range(len(counts)), key=lambda c: (counts[c], c)), []).append(rows)
    if len(by_class) < 2:
        raise ValueError("the test patients need both positive and negative patients for a patient bootstrap")
    return dict(sorted(by_class.items()))


def patient_resamples(strata: list[list[np.ndarray]], resamples: int, seed: int = 0) -> Iterator[np.ndarray]:
    """``resamples`` bootstrap draws of image rows: in each stratum its patients (each a list of rows) drawn with
    replacement, as many as it has."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield np.concatenate([stratum[i] for stratum in strata for i in rng.integers(0, len(stratum), len(stratum))])


def paired_bootstrap(targets: np.ndarray, patients: list[str], probabilities: dict[str, np.ndarray], metric: str,
                     positive: int, resamples: int, seed: int = 0,
                     pairs: tuple[tuple[str, str], ...] = ((AUGMENTED, BASELINE),)) -> list[tuple[float, float]]:
    """Per pair ``(a, b)`` (``real+synthetic − real``), the 95 % interval of ``metric``'s ``a − b`` over patient
    resamples within each class's patients, every pair on the same resamples and each arm scored once per
    resample; ``probabilities[arm]`` is ``(seeds, images, classes)``, averaged over seeds inside a resample."""
    strata = list(patient_strata(targets, patients).values())
    arms = sorted({arm for pair in pairs for arm in pair})
    scores = {arm: np.empty(resamples) for arm in arms}
    for index, rows in enumerate(patient_resamples(strata, resamples, seed)):
        for arm in arms:
            scores[arm][index] = np.mean([score(metric, targets[rows], p[rows], positive) for p in probabilities[arm]])
    return [(float(np.percentile(scores[a] - scores[b], 2.5)), float(np.percentile(scores[a] - scores[b], 97.5)))
            for a, b in pairs]


def summarise(targets: np.ndarray, patients: list[str], probabilities: dict[str, np.ndarray], classes: list[str],
              positive: int, resamples: int, seed: int = 0) -> dict:
    """Every metric per arm (mean over seeds, and per seed), per-class precision / recall / F1 of the
    seed-averaged probabilities, and each metric's delta with its patient-bootstrap interval (and, with the
    control arm, real+synthetic's delta over it, ``over_repeated``)."""
    result: dict = {}
    # the synthetic images against as many real ones repeated, where the control arm ran
    pairs = ((AUGMENTED, BASELINE),) + (((AUGMENTED, REPEATED),) if REPEATED in probabilities else ())
    for metric in METRICS:
        if metric == "auc" and len(np.unique(targets == positive)) < 2:
            continue
        per_seed = {arm: [score(metric, targets, p, positive) for p in runs] for arm, runs in probabilities.items()}
        mean = {arm: float(np.mean(v)) for arm, v in per_seed.items()}
        intervals = paired_bootstrap(targets, patients, probabilities, metric, positive, resamples, seed, pairs)
        result.update({metric: mean, f"{metric}_per_seed": per_seed,
                       f"{metric}_delta": mean[AUGMENTED] - mean[BASELINE],
                       f"{metric}_delta_ci95": list(intervals[0])})
        if len(pairs) > 1:
            result.update({f"{metric}_over_repeated": mean[AUGMENTED] - mean[REPEATED],
                           f"{metric}_over_repeated_ci95": list(intervals[1])})
    result["per_class"] = {arm: per_class(targets, runs.mean(0), classes) for arm, runs in probabilities.items()}
    return result


def _fit(images, targets, classes, config: DownstreamConfig, protocol: Protocol, seed: int, hyper: dict,
         validation, positive: int, device):
    """One classifier; on a validation set it keeps its best epoch by the protocol's metric."""
    widths = [max(4, round(w * hyper.get("width_multiplier", 1.0))) for w in (16, 32, 64, 128)]
    settings = ClassifierConfig(classes=classes, epochs=config.epochs, seed=seed, augmentations=list(
        protocol.augmentations), lr=hyper.get("lr", 1e-3), dropout=hyper.get("dropout", 0.25), widths=widths)
    validate = None
    if validation is not None and protocol.select_on_validation:
        val_images, val_targets = validation
        validate = lambda model: score(protocol.metric, val_targets, predict_proba(model, val_images).numpy(),  # noqa: E731
                                       positive)
    return train_classifier(images, torch.as_tensor(targets).long(), settings, device, validate)


def downstream_usefulness(
    train_images: torch.Tensor,
    train_targets: torch.Tensor,
    test_images: torch.Tensor,
    test_targets: torch.Tensor,
    test_patients: list[str],
    synthetic_positives: torch.Tensor,
    synthetic_negatives: torch.Tensor | None,
    config: DownstreamConfig,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
    classes: list[str] | None = None,
    positive: int = 1,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep_unmeasurable: bool = False,
) -> dict:
    """Each metric per training set and the deltas of ``real+synthetic`` over ``real`` with their patient
    bootstrap. Targets are class indices into ``classes`` (default: rest / label, or booleans), the synthetic
    images are of class ``positive``; ``validation`` (images, targets) of other patients is where a protocol
    searches and picks epochs. The classifiers train on ``device``, each announced to ``log``. A test split
    without the label or without another class is an error, or with ``keep_unmeasurable`` (a cross-validation
    fold, pooled later) a result with the predictions only and ``not_measured`` saying why."""
    protocol = config.resolved
    classes = list(classes or ["negative", "positive"])
    train_targets, test_targets = train_targets.long().numpy(), test_targets.long().numpy()
    if len(set(train_targets.tolist())) < 2 or positive not in train_targets:
        raise ValueError("the real training split needs both positive and negative images")
    try:
        strata = patient_strata(test_targets, test_patients)
        if positive not in test_targets or positive not in strata:
            raise ValueError
    except ValueError:
        if not keep_unmeasurable:
            raise ValueError("the real test split needs both positive and negative images, and patients of "
                             "both") from None
        strata = None  # the predictions are still made, for a pooled verdict across folds
    if protocol.needs_validation and (validation is None or len(set(validation[1].tolist())) < 2):
        raise ValueError(f"protocol {protocol.name} chooses on validation patients: the data needs a val split "
                         "with the label and another class")
    if validation is not None:
        validation = (validation[0], validation[1].long().numpy())
    real = (train_images, train_targets)
    others = train_targets != positive
    # the control: the label's real training images drawn again, as many as the synthetic ones (seeded)
    repeats = torch.from_numpy(np.random.default_rng(0).choice(np.flatnonzero(~others), len(synthetic_positives)))
    conditions = {
        BASELINE: real,
        AUGMENTED: (torch.cat([train_images, synthetic_positives]),
                    np.r_[train_targets, np.full(len(synthetic_positives), positive)]),
        REPEATED: (torch.cat([train_images, train_images[repeats]]),
                   np.r_[train_targets, np.full(len(synthetic_positives), positive)]),
        "synthetic+real-negatives": (torch.cat([train_images[torch.from_numpy(others)], synthetic_positives]),
                                     np.r_[train_targets[others], np.full(len(synthetic_positives), positive)]),
    }
    if synthetic_negatives is not None and len(classes) == 2:
        conditions["synthetic"] = (torch.cat([synthetic_negatives, synthetic_positives]),
                                   np.r_[np.full(len(synthetic_negatives), 1 - positive),
                                         np.full(len(synthetic_positives), positive)])
    probabilities: dict[str, np.ndarray] = {}
    selection: dict[str, dict] = {}
    trials = search_space(protocol.search_trials, 0) if protocol.search_trials else [{}]
    total = len(conditions) * (config.seeds + (len(trials) if len(trials) > 1 else 0))
    done = 0
    for name, (images, targets) in conditions.items():
        chosen, tried = trials[0], []
        if len(trials) > 1:  # the search: seed 0 of each draw, judged on the validation patients
            for hyper in trials:
                done += 1
                if log:
                    log(f"downstream classifier {done}/{total}: {name}, search {hyper}")
                model = _fit(images, targets, classes, config, protocol, 0, hyper, validation, positive, device)
                tried.append(score(protocol.metric, validation[1], predict_proba(model, validation[0]).numpy(),
                                   positive))
            chosen = trials[int(np.argmax(tried))]
        runs, epochs = [], []
        for seed in range(config.seeds):
            done += 1
            if log:
                log(f"downstream classifier {done}/{total}: {name}, seed {seed}, {len(images)} images of "
                    f"{images.shape[-1]} px, {config.epochs} epochs")
            model = _fit(images, targets, classes, config, protocol, seed, chosen, validation, positive, device)
            runs.append(predict_proba(model, test_images).numpy())
            epochs.append(getattr(model, "selected", {}).get("epoch", config.epochs))
        probabilities[name] = np.stack(runs)
        selection[name] = {"hyperparameters": chosen, "search_scores": tried, "epochs": epochs}

    if strata is None:
        result = {"not_measured": f"the test patients are not of both the label ({classes[positive]}) and "
                                  "another class: predictions kept for pooling only"}
        strata = {}
    else:
        result = summarise(test_targets, test_patients, probabilities, classes, positive, config.bootstrap)
    result.update({
        "protocol": protocol.name,
        "metric": protocol.metric,
        "classes": classes,
        "label_class": classes[positive],
        "selection": selection,
        "test_patients_per_class": {"positive": len(strata.get(positive, [])),
                                    "negative": sum(len(s) for c, s in strata.items() if c != positive)},
        "test_patients_per_label": {classes[c]: len(s) for c, s in strata.items()},
        "test_images": len(test_targets),
        "test_patients": len(set(test_patients)),
        "train_real_positives": int((train_targets == positive).sum()),
        "train_real_negatives": int(others.sum()),
        "synthetic_positives": len(synthetic_positives),
        "seeds": config.seeds,
        "bootstrap_resamples": config.bootstrap,
        "skipped_conditions": [] if "synthetic" in conditions else
        ["synthetic: needs a generator of the other class in label vs rest"],
        # the predictions themselves, per condition and seed, for pooling across cross-validation folds
        "scores": {name: runs[:, :, positive].tolist() for name, runs in probabilities.items()},
        "probabilities": {name: runs.tolist() for name, runs in probabilities.items()},
        "targets": (test_targets == positive).astype(int).tolist(),
        "class_targets": test_targets.tolist(),
        "patients": list(test_patients),
    })
    return result
