"""Patient-level cross-validation of a generator family's usefulness, pooled into one verdict.

Every patient of the dataset is put in one of K folds, stratified by label and deterministic from the seed. In
fold k the generator learns from the other folds' patients only; its samples join those patients' images to train
the downstream classifiers, which are tested on fold k's patients. So every patient is tested exactly once, by
models that never saw them, and the out-of-fold predictions of all patients are pooled: a metric per training set,
the paired delta, and a 95 % interval from a patient bootstrap (patients resampled within their label's stratum,
the same resample for both sets). ``helps`` when the interval lies above 0, ``hurts`` below, else ``no measurable
effect``; a generator that copies its fold's training images is reported as copying whatever its delta.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written by headless jobs
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sonogen.data.manifest import read_manifest, write_manifest  # noqa: E402
from sonogen.data.splits import unit_hash  # noqa: E402

REPORT_JSON, REPORT_MD = "crossval_report.json", "crossval_report.md"
FOLD_BARS, POOLED_ROC = "fold_auc.png", "pooled_roc.png"
BASELINE, AUGMENTED = "real", "real+synthetic"
COPY_GATES = ("max_near_copy_fraction", "max_pixel_near_copy_fraction")
HELPS, HURTS, NO_EFFECT, COPIES = "helps", "hurts", "no measurable effect", "copies training images"


def patient_labels(records) -> dict[str, str]:
    """Each patient's label for stratifying: the label of most of its frames (ties: the first by name)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        counts[record.patient_id][record.label] += 1
    return {patient: min(c, key=lambda label: (-c[label], label)) for patient, c in counts.items()}


def assign_folds(labels: dict[str, str], folds: int, seed: int = 0) -> dict[str, int]:
    """Fold of every patient: within each label, patients in hash order dealt round the folds, each label starting
    where the last one stopped, so folds differ by at most one patient overall and per label."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    if len(labels) < folds:
        raise ValueError(f"{len(labels)} patients cannot fill {folds} folds")
    assignment, start = {}, 0
    for label in sorted(set(labels.values())):
        patients = sorted((p for p, lb in labels.items() if lb == label), key=lambda p: (unit_hash(seed, p), p))
        for index, patient in enumerate(patients):
            assignment[patient] = (start + index) % folds
        start = (start + len(patients)) % folds
    return assignment


def fold_view(data: str | Path, fold_of: dict[str, int], fold: int, out: str | Path) -> Path:
    """The dataset as fold ``fold`` sees it, in ``out``: its patients are the test split, every other patient is
    training data (the dataset's own splits are not used); images and masks are the dataset's (linked)."""
    data, out = Path(data).resolve(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("images", "masks"):
        if (data / folder).is_dir() and not (out / folder).exists():
            os.symlink(data / folder, out / folder, target_is_directory=True)
    records = read_manifest(data)
    write_manifest(out, [replace(r, split="test" if fold_of[r.patient_id] == fold else "train") for r in records])
    return out


def _auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """AUC-ROC by ranks (Mann-Whitney U, ties averaged): the share of positive-negative pairs ranked right."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts, ends = np.r_[0, boundaries], np.r_[boundaries, len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    positives = targets.astype(bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pooled_verdict(targets: np.ndarray, patients: list[str], scores: dict[str, np.ndarray], resamples: int = 1000,
                   seed: int = 0) -> dict:
    """The pooled comparison of ``real+synthetic`` against ``real``: ``scores[arm]`` is ``(seeds, images)`` of
    out-of-fold predictions; each arm's AUC is the mean over seeds of the AUC of its pooled predictions."""
    targets = np.asarray(targets).astype(bool)
    patients = np.asarray(patients)
    groups = [np.flatnonzero(patients == p) for p in np.unique(patients)]
    strata = [[g for g in groups if targets[g].mean() >= 0.5], [g for g in groups if targets[g].mean() < 0.5]]
    if not all(strata):
        raise ValueError("the pooled test patients need both positive and negative patients")

    def arm_auc(arm: str, rows: np.ndarray) -> float:
        return float(np.mean([_auc(targets[rows], seed_scores[rows]) for seed_scores in scores[arm]]))

    every = np.arange(len(targets))
    auc = {arm: arm_auc(arm, every) for arm in scores}
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    for index in range(resamples):
        rows = np.concatenate([stratum[i] for stratum in strata for i in rng.integers(0, len(stratum), len(stratum))])
        deltas[index] = arm_auc(AUGMENTED, rows) - arm_auc(BASELINE, rows)
    low, high = (float(v) for v in np.percentile(deltas, [2.5, 97.5]))
    effect = HELPS if low > 0 else HURTS if high < 0 else NO_EFFECT
    return {"metric": "auc", "auc": auc, "real": auc[BASELINE], "real_plus_synthetic": auc[AUGMENTED],
            "delta": auc[AUGMENTED] - auc[BASELINE], "ci_low": low, "ci_high": high, "effect": effect,
            "verdict": effect, "bootstrap_resamples": resamples,
            "patients": {"positive": len(strata[0]), "negative": len(strata[1])}, "images": len(targets)}


def pool(folds: list[dict], resamples: int = 1000, seed: int = 0) -> dict:
    """The report of a cross-validation from its folds' results (``fold_result``), in fold order."""
    folds = sorted(folds, key=lambda f: f["fold"])
    tested = [p for f in folds for p in f["test_patients"]]
    if len(tested) != len(set(tested)):
        raise ValueError("a patient was tested in two folds")
    scoring = [f for f in folds if "scores" in f]
    if len(scoring) < len(folds):
        missing = ", ".join(f"{f['fold']} ({f.get('downstream_error', 'no scores')})" for f in folds if f not in scoring)
        pooled = {"metric": "auc", "verdict": "not measured", "effect": "not measured",
                  "reason": f"the downstream classifiers did not run in fold(s) {missing}"}
    else:
        arms = list(scoring[0]["scores"])
        pooled = pooled_verdict(np.concatenate([f["targets"] for f in scoring]),
                                [p for f in scoring for p in f["image_patients"]],
                                {arm: np.concatenate([np.asarray(f["scores"][arm]) for f in scoring], axis=1)
                                 for arm in arms}, resamples, seed)
    copying = [f["fold"] for f in folds if any(not row["passed"] for row in f["gates"] if row["gate"] in COPY_GATES)]
    if copying:
        pooled["verdict"] = COPIES
        pooled["copying_folds"] = copying
    return {"folds": folds, "pooled": pooled}


def verdict_line(pooled: dict) -> str:
    if "delta" not in pooled:
        return f"{pooled['verdict']}: {pooled.get('reason', '')}"
    line = (f"{pooled['verdict']}: AUC {pooled['real_plus_synthetic']:.3f} with synthetic images against "
            f"{pooled['real']:.3f} without, delta {pooled['delta']:+.3f}, 95% interval [{pooled['ci_low']:+.3f}, "
            f"{pooled['ci_high']:+.3f}] over {pooled['patients']['positive']} positive and "
            f"{pooled['patients']['negative']} negative patients")
    if pooled["verdict"] == COPIES:
        line += f" (effect {pooled['effect']}, but folds {pooled['copying_folds']} copy training images)"
    return line


def write_report(report: dict, out: str | Path) -> Path:
    """``crossval_report.json`` (every fold's predictions included), ``crossval_report.md`` and the plots."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=1) + "\n")
    pooled = report["pooled"]
    lines = [f"# Cross-validation: {report.get('family', '')} on {report.get('label', '')}", "",
             f"**{verdict_line(pooled)}**", "",
             f"{len(report['folds'])} folds by patient (seed {report.get('seed', 0)}), data `{report.get('data', '')}`; "
             "each fold's generator learned from the other folds' patients only.", "",
             "| fold | generator trained on (patients) | tested on (patients) | gates (other than usefulness) | "
             "AUC real | AUC real+synthetic |", "|---|---|---|---|---|---|"]
    for fold in report["folds"]:
        failed = [row["gate"] for row in fold["gates"] if not row["passed"]]
        aucs = fold.get("auc", {})
        cells = [f"{np.mean(aucs[arm]):.3f}" if arm in aucs else "n/a" for arm in (BASELINE, AUGMENTED)]
        lines.append(f"| {fold['fold']} | {len(fold['generator_train_patients'])} | {len(fold['test_patients'])} | "
                     f"{'passed' if not failed else 'failed: ' + ', '.join(failed)} | {cells[0]} | {cells[1]} |")
    lines += ["", f"![per fold]({FOLD_BARS})", "", f"![pooled ROC]({POOLED_ROC})", ""]
    (out / REPORT_MD).write_text("\n".join(lines))
    _plot(report, out)
    return out


def _plot(report: dict, out: Path) -> None:
    folds = [f for f in report["folds"] if "auc" in f]
    if not folds:
        return
    arms = list(folds[0]["auc"])
    figure, axis = plt.subplots(figsize=(1.2 * len(folds) * len(arms) / 2 + 3, 3.6))
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        axis.bar(np.arange(len(folds)) + k * width, [np.mean(f["auc"][arm]) for f in folds], width, label=arm)
    axis.set_xticks(np.arange(len(folds)) + 0.4 - width / 2, [f"fold {f['fold']}" for f in folds])
    axis.set(ylabel="AUC-ROC, the fold's patients", ylim=(0, 1.05))
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / FOLD_BARS, dpi=110)
    plt.close(figure)
    from sklearn.metrics import roc_curve

    targets = np.concatenate([f["targets"] for f in folds])
    figure, axis = plt.subplots(figsize=(4.2, 4))
    for arm in arms:
        scores = np.concatenate([np.mean(f["scores"][arm], axis=0) for f in folds])
        fpr, tpr, _ = roc_curve(targets, scores)
        axis.plot(fpr, tpr, label=f"{arm} (AUC {report['pooled'].get('auc', {}).get(arm, float('nan')):.3f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title="pooled out-of-fold ROC")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / POOLED_ROC, dpi=110)
    plt.close(figure)


def read_report(folder: str | Path) -> dict:
    path = Path(folder) / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `sonogen crossval` first")
    return json.loads(path.read_text())
