"""Patient-level cross-validation of a generator family's usefulness, pooled into one verdict.

Every patient of the dataset is put in one of K folds, stratified by label and deterministic from the seed. In
fold k the generator learns from the other folds' patients only; its samples join those patients' images to train
the downstream classifiers, which are tested on fold k's patients. So every patient is tested exactly once, by
models that never saw them, and the out-of-fold predictions of all patients are pooled: a metric per training set,
the paired delta, and a 95 % interval from a patient bootstrap (patients resampled within their label's stratum,
the same resample for both sets). ``helps`` when the interval lies above 0, ``hurts`` below, else ``no measurable
effect``; a generator that copies its fold's training images is reported as copying whatever its delta. A
family that places lesions has its folds' detections pooled the same way (AP50 and AP), one that draws masks its
segmenters' Dice; under a detection protocol (``diffultra2025``) the verdict is taken on AP50, under a segmentation
one (``wen2026``) on the Dice.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written by headless jobs
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sonogen.data.manifest import read_manifest, write_manifest  # noqa: E402
from sonogen.data.splits import unit_hash  # noqa: E402
from sonogen.metrics.detection import pooled_detection  # noqa: E402
from sonogen.metrics.downstream import AUGMENTED, BASELINE, REPEATED, patient_strata, summarise  # noqa: E402
from sonogen.metrics.protocols import METRICS, get_protocol  # noqa: E402
from sonogen.metrics.segmentation import summarise_dice  # noqa: E402

REPORT_JSON, REPORT_MD = "crossval_report.json", "crossval_report.md"
FOLD_BARS, POOLED_ROC = "fold_auc.png", "pooled_roc.png"
COPY_GATES = ("max_near_copy_fraction", "max_pixel_near_copy_fraction")
# a true delta of (z_0.975 + z_0.8) standard errors gives an interval clear of 0 four times in five; the standard
# error is read from the 95 % interval (half its width over z_0.975): docs/crossval.md, "How it decides"
DETECTABLE_PER_WIDTH = (1.959964 + 0.841621) / (2 * 1.959964)

HELPS, HURTS, NO_EFFECT, COPIES = "helps", "hurts", "no measurable effect", "copies training images"
# the delta helps, but no more than the same number of real images of the label repeated (the control arm)
REPEATS_ONLY = "helps no more than repeated real images"


def detectable_delta(low: float, high: float) -> float:
    """The smallest true delta this design detects with 80 % power at the 5 % level, from its 95 % interval."""
    return DETECTABLE_PER_WIDTH * (high - low)


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


def fold_view(data: str | Path, fold_of: dict[str, int], fold: int, out: str | Path,
              validation: int | None = None, link: bool = True) -> Path:
    """The dataset as fold ``fold`` sees it, in ``out``: its patients are the test split, fold ``validation``'s
    (if any) the val split, every other patient training data (the dataset's own splits are not used); images
    and masks are the dataset's (linked, or copied without ``link``: a dataset of its own for other machines)."""
    data, out = Path(data).resolve(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("images", "masks"):
        if (data / folder).is_dir() and not (out / folder).exists():
            if link:
                os.symlink(data / folder, out / folder, target_is_directory=True)
            else:
                shutil.copytree(data / folder, out / folder)
    split = {fold: "test", validation: "val"}
    write_manifest(out, [replace(r, split=split.get(fold_of[r.patient_id], "train")) for r in read_manifest(data)])
    return out


def effect_of(low: float, high: float) -> str:
    """The verdict of a delta's 95 % interval: above 0 helps, below 0 hurts, else no measurable effect."""
    return HELPS if low > 0 else HURTS if high < 0 else NO_EFFECT


def pooled_verdict(targets: np.ndarray, patients: list[str], probabilities: dict[str, np.ndarray],
                   classes: list[str] | None = None, positive: int = 1, metric: str = "auc", resamples: int = 1000,
                   seed: int = 0) -> dict:
    """The pooled comparison of ``real+synthetic`` against ``real`` on the protocol's ``metric``:
    ``probabilities[arm]`` is ``(seeds, images, classes)`` of out-of-fold predictions, ``targets`` the images'
    class indices; each arm's value is the mean over seeds of the metric of its pooled predictions. Every other
    metric, per-class precision / recall / F1 and each class's patients come along."""
    targets = np.asarray(targets).astype(int)
    classes = classes or ["negative", "positive"]
    strata = patient_strata(targets, patients)
    summary = summarise(targets, patients, probabilities, classes, positive, resamples, seed)
    low, high = summary[f"{metric}_delta_ci95"]
    effect = verdict = effect_of(low, high)
    control = {}
    if f"{metric}_over_repeated" in summary:
        control_low, control_high = summary[f"{metric}_over_repeated_ci95"]
        control = {"over_repeated": {"delta": summary[f"{metric}_over_repeated"], "ci95": [control_low, control_high],
                                     "effect": effect_of(control_low, control_high)}}
        if effect == HELPS and control["over_repeated"]["effect"] != HELPS:
            verdict = REPEATS_ONLY  # extra examples of the label help; the synthetic ones are not shown to add more
    return {"metric": metric, **{m: summary[m] for m in METRICS if m in summary}, **control,
            "real": summary[metric][BASELINE], "real_plus_synthetic": summary[metric][AUGMENTED],
            "delta": summary[f"{metric}_delta"], "ci_low": low, "ci_high": high, "effect": effect, "verdict": verdict,
            "other_metrics": {m: {"delta": summary[f"{m}_delta"], "ci95": summary[f"{m}_delta_ci95"]}
                              for m in METRICS if m in summary and m != metric},
            "per_class": summary["per_class"], "bootstrap_resamples": resamples,
            "patients": {"positive": len(strata.get(positive, [])),
                         "negative": sum(len(s) for c, s in strata.items() if c != positive)},
            "patients_per_class": {classes[c]: len(s) for c, s in strata.items()}, "images": len(targets)}


def fold_probabilities(fold: dict) -> dict[str, np.ndarray]:
    """A fold's ``(seeds, images, classes)`` predictions per arm (a label-vs-rest score ``s`` is ``[1-s, s]``)."""
    if "probabilities" in fold:
        return {arm: np.asarray(p) for arm, p in fold["probabilities"].items()}
    return {arm: np.stack([1 - np.asarray(s), np.asarray(s)], -1) for arm, s in fold["scores"].items()}


def pool(folds: list[dict], resamples: int = 1000, seed: int = 0) -> dict:
    """The report of a cross-validation from its folds' results (``fold_result``), in fold order."""
    folds = sorted(folds, key=lambda f: f["fold"])
    tested = [p for f in folds for p in f["test_patients"]]
    if len(tested) != len(set(tested)):
        raise ValueError("a patient was tested in two folds")
    scoring = [f for f in folds if "scores" in f or "probabilities" in f]
    if len(scoring) < len(folds):
        missing = ", ".join(f"{f['fold']} ({f.get('downstream_error', 'no scores')})" for f in folds if f not in scoring)
        pooled = {"metric": "auc", "verdict": "not measured", "effect": "not measured",
                  "reason": f"the downstream classifiers did not run in fold(s) {missing}"}
    else:
        each = [fold_probabilities(f) for f in scoring]
        first = scoring[0]
        pooled = pooled_verdict(np.concatenate([f.get("class_targets", f["targets"]) for f in scoring]),
                                [p for f in scoring for p in f["image_patients"]],
                                # the arms of every fold (a control arm is missing from folds run before it)
                                {arm: np.concatenate([e[arm] for e in each], axis=1) for arm in each[0]
                                 if all(arm in e for e in each)},
                                first.get("classes"), first.get("positive", 1), first.get("metric", "auc"),
                                resamples, seed)
        pooled["protocol"] = first.get("protocol", "default")
    if all("detection" in f for f in folds):
        detection = pooled_detection([b for f in folds for b in f["detection"]["truths"]],
                                     [p for f in folds for p in f["detection"]["image_patients"]],
                                     {arm: [[d for f in folds for d in f["detection"]["predictions"][arm][s]]
                                            for s in range(len(folds[0]["detection"]["predictions"][arm]))]
                                      for arm in (BASELINE, AUGMENTED)}, BASELINE, AUGMENTED, resamples, seed)
        pooled["detection"] = detection
        protocol = folds[0].get("protocol", "default")
        if get_protocol(protocol).detection:  # the verdict is on detection, the classifiers' metrics come along
            pooled = _verdict_on(pooled, protocol, "ap50", detection["ap50"], detection["ap50_delta"],
                                 detection["ap50_delta_ci95"], detection["patients_per_class"],
                                 {"ap": {"delta": detection["ap_delta"], "ci95": detection["ap_delta_ci95"]}})
    if folds and all("segmentation" in f for f in folds):
        pooled["segmentation"] = summarise_dice(
            {arm: np.concatenate([np.asarray(f["segmentation"]["dice"][arm]) for f in folds], axis=1)
             for arm in (BASELINE, AUGMENTED)},
            [p for f in folds for p in f["segmentation"]["image_patients"]], resamples, seed)
        protocol = folds[0].get("protocol", "default")
        if get_protocol(protocol).segmentation:  # the verdict on segmentation, the classifiers' metrics come along
            found = pooled["segmentation"]
            pooled = {**_verdict_on(pooled, protocol, "seg_dice", found["seg_dice"], found["seg_dice_delta"],
                                    found["seg_dice_delta_ci95"], {"with lesions": found["test_patients"]}),
                      "seg_dice": found["seg_dice"]}
    if "ci_low" in pooled:
        pooled["detectable_delta"] = detectable_delta(pooled["ci_low"], pooled["ci_high"])
    copying = [f["fold"] for f in folds if any(not row["passed"] for row in f["gates"] if row["gate"] in COPY_GATES)]
    if copying:
        pooled["verdict"] = COPIES
        pooled["copying_folds"] = copying
    return {"folds": folds, "pooled": pooled}


def _verdict_on(pooled: dict, protocol: str, metric: str, values: dict[str, float], delta: float,
                interval: list[float], patients_per_class: dict[str, int], others: dict | None = None) -> dict:
    """``pooled`` with its verdict taken on ``metric`` (a protocol's detection or segmentation) in place of the
    classifiers', whose metrics come along with ``others`` in ``other_metrics``."""
    low, high = interval
    effect = effect_of(low, high)
    return {**{k: v for k, v in pooled.items() if k not in ("verdict", "effect", "reason", "over_repeated")},
            "protocol": protocol, "metric": metric, "real": values[BASELINE], "real_plus_synthetic": values[AUGMENTED],
            "delta": delta, "ci_low": low, "ci_high": high, "effect": effect, "verdict": effect,
            "patients_per_class": patients_per_class, "other_metrics": {**(others or {}), **_classifier_metrics(pooled)}}


def _classifier_metrics(pooled: dict) -> dict:
    """The classifiers' deltas and intervals of a pooled verdict, for a verdict taken on another metric."""
    if "delta" not in pooled:
        return {}
    return {pooled["metric"]: {"delta": pooled["delta"], "ci95": [pooled["ci_low"], pooled["ci_high"]]},
            **pooled.get("other_metrics", {})}


NAMES = {"auc": "AUC", "balanced_accuracy": "balanced accuracy", "ap50": "detection AP50", "ap": "detection AP",
         "seg_dice": "lesion Dice"}


def fold_values(fold: dict, metric: str) -> dict[str, list[float]]:
    """A fold's per-seed values of ``metric`` per arm (reports before protocols carry AUC only)."""
    return fold.get("per_seed", {}).get(metric) or (fold.get("auc", {}) if metric == "auc" else {})


def verdict_line(pooled: dict) -> str:
    if "delta" not in pooled:
        return f"{pooled['verdict']}: {pooled.get('reason', '')}"
    line = (f"{pooled['verdict']}: {NAMES[pooled['metric']]} {pooled['real_plus_synthetic']:.3f} with synthetic "
            f"images against {pooled['real']:.3f} without, delta {pooled['delta']:+.3f}, 95% interval "
            f"[{pooled['ci_low']:+.3f}, {pooled['ci_high']:+.3f}] over "
            + ", ".join((f"{n} patients {name}" if name.startswith("with") else f"{n} {name} patients")
                        for name, n in pooled.get(
                "patients_per_class", {"positive": pooled["patients"]["positive"],
                                       "negative": pooled["patients"]["negative"]}).items()))
    if control := pooled.get("over_repeated"):
        line += (f"; against as many real images of the label repeated: {control['delta']:+.3f} "
                 f"[{control['ci95'][0]:+.3f}, {control['ci95'][1]:+.3f}]")
    if "detectable_delta" in pooled:
        line += f"; detectable at 80 % power: ±{pooled['detectable_delta']:.3f}"
    if pooled["verdict"] == COPIES:
        line += f" (effect {pooled['effect']}, but folds {pooled['copying_folds']} copy training images)"
    return line


def write_report(report: dict, out: str | Path) -> Path:
    """``crossval_report.json`` (every fold's predictions included), ``crossval_report.md`` and the plots."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=1) + "\n")
    pooled = report["pooled"]
    metric = pooled.get("metric", "auc")
    name = NAMES[metric]
    lines = [f"# Cross-validation: {report.get('family', '')} on {report.get('label', '')}", "",
             f"**{verdict_line(pooled)}**", "",
             f"{len(report['folds'])} folds by patient (seed {report.get('seed', 0)}), data `{report.get('data', '')}`, "
             f"protocol `{pooled.get('protocol', 'default')}`; each fold's generator learned from the other folds' "
             "patients only.", ""]
    if "detectable_delta" in pooled:
        lines += [f"With these patients a true change of {name} of ±{pooled['detectable_delta']:.3f} or more would "
                  "be detected four times in five (80 % power at the 5 % level, from the interval's width); a smaller "
                  "one can hide in `no measurable effect`.", ""]
    arms = [BASELINE, AUGMENTED] + [REPEATED] * any(REPEATED in fold_values(f, metric) for f in report["folds"])
    lines += ["| fold | generator trained on (patients) | tested on (patients) | gates (other than usefulness) | "
              + "".join(f"{name} {arm} | " for arm in arms).rstrip(), "|---|---|---|---|" + "---|" * len(arms)]
    for fold in report["folds"]:
        failed = [row["gate"] for row in fold["gates"] if not row["passed"]]
        values = fold_values(fold, metric)
        cells = "".join(f"{np.mean(values[arm]):.3f} | " if arm in values else "n/a | " for arm in arms)
        lines.append(f"| {fold['fold']} | {len(fold['generator_train_patients'])} | {len(fold['test_patients'])} | "
                     f"{'passed' if not failed else 'failed: ' + ', '.join(failed)} | {cells}".rstrip())
    for other, values in pooled.get("other_metrics", {}).items():
        lines += ["", f"{NAMES[other]}: delta {values['delta']:+.3f}, 95% interval [{values['ci95'][0]:+.3f}, "
                  f"{values['ci95'][1]:+.3f}]."]
    if (detection := pooled.get("detection")) and metric != "ap50":
        lines += ["", "Lesion detection (pooled): " + "; ".join(
            f"{NAMES[m]} {detection[m][AUGMENTED]:.3f} with synthetic images against {detection[m][BASELINE]:.3f} "
            f"without, delta {detection[f'{m}_delta']:+.3f}, 95% interval [{detection[f'{m}_delta_ci95'][0]:+.3f}, "
            f"{detection[f'{m}_delta_ci95'][1]:+.3f}]" for m in ("ap50", "ap")) + "."]
    if (segmentation := pooled.get("segmentation")) and metric != "seg_dice":
        low, high = segmentation["seg_dice_delta_ci95"]
        lines += ["", f"Lesion segmentation (pooled): Dice {segmentation['seg_dice'][AUGMENTED]:.3f} with synthetic "
                  f"pairs against {segmentation['seg_dice'][BASELINE]:.3f} without, delta "
                  f"{segmentation['seg_dice_delta']:+.3f}, 95% interval [{low:+.3f}, {high:+.3f}]."]
    if per_class := pooled.get("per_class"):
        classes = list(next(iter(per_class.values())))
        lines += ["", "Pooled out-of-fold precision / recall / F1 per class (seed-averaged predictions):", "",
                  "| training set | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
        lines += [f"| {arm} | " + " | ".join(f"{v['precision']:.2f} / {v['recall']:.2f} / {v['f1']:.2f}"
                                            for v in rows.values()) + " |" for arm, rows in per_class.items()]
    lines += ["", f"![per fold]({FOLD_BARS})", "", f"![pooled ROC]({POOLED_ROC})", ""]
    (out / REPORT_MD).write_text("\n".join(lines))
    _plot(report, out)
    return out


def _plot(report: dict, out: Path) -> None:
    metric = report["pooled"].get("metric", "auc")
    folds = [f for f in report["folds"] if fold_values(f, metric)]
    if not folds:
        return
    arms = list(fold_values(folds[0], metric))
    figure, axis = plt.subplots(figsize=(1.2 * len(folds) * len(arms) / 2 + 3, 3.6))
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        axis.bar(np.arange(len(folds)) + k * width, [np.mean(fold_values(f, metric)[arm]) for f in folds], width,
                 label=arm)
    axis.set_xticks(np.arange(len(folds)) + 0.4 - width / 2, [f"fold {f['fold']}" for f in folds])
    axis.set(ylabel=f"{NAMES[metric]}, the fold's patients", ylim=(0, 1.05))
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / FOLD_BARS, dpi=110)
    plt.close(figure)
    from sklearn.metrics import roc_curve

    if (pooled := pooled_scores(report)) is None:
        return
    targets, scores = pooled
    figure, axis = plt.subplots(figsize=(4.2, 4))
    for arm in arms:
        fpr, tpr, _ = roc_curve(targets, scores[arm].mean(0))
        axis.plot(fpr, tpr, label=f"{arm} (AUC {report['pooled'].get('auc', {}).get(arm, float('nan')):.3f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title="pooled out-of-fold ROC, the label")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / POOLED_ROC, dpi=110)
    plt.close(figure)


def pooled_scores(report: dict) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """Every patient's out-of-fold label-vs-rest targets and each arm's ``(seeds, images)`` scores, folds pooled;
    None where a fold has no classifier predictions."""
    folds = [f for f in report["folds"] if "targets" in f]
    if not folds or len(folds) < len(report["folds"]):
        return None
    arms = fold_probabilities(folds[0])
    return (np.concatenate([f["targets"] for f in folds]),
            {arm: np.concatenate([fold_probabilities(f)[arm][..., f.get("positive", 1)] for f in folds], axis=1)
             for arm in arms})


def read_report(folder: str | Path) -> dict:
    path = Path(folder) / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `sonogen crossval` first")
    return json.loads(path.read_text())
