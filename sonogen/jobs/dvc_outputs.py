"""What the evaluate stage leaves for DVC users: every gated model's headline values (``dvc metrics show``), its
training curves, downstream score per training set and ROC curves (``dvc plots show``), declared in dvc.yaml."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

METRICS = "metrics.json"  # beside the gate reports: every model's headline values
CURVES = "curves"  # per model: kMMD, 1-NN accuracy and losses per epoch
DOWNSTREAM = "downstream"  # per model: the downstream score of each training set (arm)
ROC = "roc"  # per model: ROC of the compared training sets, pooled out-of-fold when cross-validated


def write_headlines(results: list[dict], path: Path) -> None:
    """``{model: {passed: 1 or 0, <metric>: value, …, usefulness: verdict}}`` of the gate reports, merged into
    what ``path`` holds from other models."""
    table = json.loads(path.read_text()) if path.is_file() else {}
    for result in results:
        values = {key: float(value) for key, value in result["metrics"].items()
                  if isinstance(value, (int, float)) and math.isfinite(value)}
        table[result["target"]] = {"passed": int(bool(result["passed"])), **values, **usefulness(result)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(table.items())), indent=2) + "\n")


def usefulness(report: dict) -> dict:
    """The usefulness verdict with its metric, delta and 95 % interval: the cross-validation's pooled one where
    the model was cross-validated, else its test split's; nothing where no downstream experiment ran."""
    from sonogen.crossval import effect_of

    if (pooled := report.get("crossval")) and "ci_low" in pooled:
        metric, delta, low, high, verdict = (pooled["metric"], pooled["delta"], pooled["ci_low"], pooled["ci_high"],
                                             pooled["verdict"])
    elif (downstream := report.get("downstream")) and f"{downstream.get('metric')}_delta_ci95" in downstream:
        metric = downstream["metric"]
        delta, (low, high) = downstream[f"{metric}_delta"], downstream[f"{metric}_delta_ci95"]
        verdict = effect_of(low, high)
    else:
        return {}
    return {"usefulness": verdict, "usefulness_metric": metric, "usefulness_delta": float(delta),
            "usefulness_ci_low": float(low), "usefulness_ci_high": float(high)}


def write_dvc_outputs(report: dict, name: str, history: list[dict] | None, crossval: dict | None,
                      out: Path) -> None:
    """The plot tables of one gated model under ``out`` (see the module's constants)."""
    if history:
        _write(out / CURVES / f"{name}.json", curve_rows(history))
    if bars := downstream_rows(report):
        _write(out / DOWNSTREAM / f"{name}.json", bars)
    if rows := roc_rows(report, crossval):
        _write(out / ROC / f"{name}.json", rows)


def curve_rows(history: list[dict]) -> list[dict]:
    """The epochs of the training history with realism readings: epoch, kMMD, 1-NN accuracy and the losses."""
    return [{"epoch": record["epoch"], "kmmd": record["kmmd"], "one_nn_acc": record["one_nn_acc"],
             **{key: value for key, value in record.items() if key.startswith("loss")}}
            for record in history if "kmmd" in record and "one_nn_acc" in record]


def downstream_rows(report: dict) -> list[dict]:
    """``{arm, score, metric}`` per training set of the downstream experiment (pooled when cross-validated)."""
    source = report.get("crossval") or report.get("downstream") or {}
    metric = source.get("metric")
    values = source.get(metric) if metric else None
    if not isinstance(values, dict):
        return []
    return [{"arm": arm, "score": float(value), "metric": metric} for arm, value in values.items()]


def roc_rows(report: dict, crossval: dict | None) -> list[dict]:
    """The label-vs-rest ROC of the real and real+synthetic training sets on one grid of false-positive rates:
    every patient's out-of-fold predictions when cross-validated, else the test split's."""
    from sonogen.crossval import pooled_scores
    from sonogen.metrics.downstream import AUGMENTED, BASELINE, roc_table

    if crossval is not None:
        if (pooled := pooled_scores(crossval)) is None:
            return []
        targets, scores = pooled
    elif downstream := report.get("downstream"):
        targets, scores = downstream["targets"], downstream["scores"]
    else:
        return []
    return roc_table(targets, {arm: np.asarray(scores[arm]) for arm in (BASELINE, AUGMENTED) if arm in scores})


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")
