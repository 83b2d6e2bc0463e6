"""The gate report a person reads: ``gate_report.json``, ``gate_report.md`` and its plots."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written by headless jobs
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sonogen.model_card import detection_lines, downstream_lines, segmentation_lines  # noqa: E402

REPORT_JSON, REPORT_MD = "gate_report.json", "gate_report.md"
CURVES, AUC_BARS, CLOSEST_PAIRS = "curves.png", "downstream_auc.png", "closest_pairs.png"


def plot_curves(history: list[dict], out: str | Path, extractor: str = "pixels-16") -> Path | None:
    """kMMD and 1-NN accuracy per training epoch (the curves of Yu et al.'s figure 4)."""
    history = [h for h in history if "kmmd" in h]
    if not history:
        return None
    epochs = [h["epoch"] for h in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [h["kmmd"] for h in history], marker="o", label="kMMD (biased)")
    left.plot(epochs, [h["kmmd_unbiased"] for h in history], marker=".", label="kMMD (unbiased)")
    left.set(xlabel="epoch", ylabel=f"kernel MMD² ({extractor})")
    left.legend()
    for key, label in (("one_nn_acc", "overall"), ("one_nn_acc_real", "real"), ("one_nn_acc_synthetic", "synthetic")):
        right.plot(epochs, [h[key] for h in history], marker="o" if key == "one_nn_acc" else None, label=label)
    right.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    right.set(xlabel="epoch", ylabel="1-NN leave-one-out accuracy", ylim=(0, 1.05))
    right.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return Path(out)


def plot_downstream(downstream: dict, out: str | Path) -> Path:
    """AUC on the real test split per training condition, replicate seeds as dots (Yu et al.'s figure 5)."""
    names = list(downstream["auc"])
    figure, axis = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    axis.bar(range(len(names)), [downstream["auc"][n] for n in names], color="#8fb4d8")
    for k, name in enumerate(names):
        seeds = downstream["auc_per_seed"][name]
        axis.scatter(np.full(len(seeds), k), seeds, color="black", s=12, zorder=3)
    low, high = downstream["auc_delta_ci95"]
    axis.set_title(f"AUC delta real+synthetic vs real: {downstream['auc_delta']:+.3f} (95% CI {low:+.3f}, {high:+.3f})",
                   fontsize=9)
    axis.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    axis.set(ylabel="AUC-ROC, real test patients", ylim=(0, 1.05))
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return Path(out)


def _number(value) -> str:
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [f"# Gate report: {report['subject']} — {verdict}", ""]
    lines += [f"- {key}: {report[key]}" for key in ("family", "gate_set", "label", "data", "extractor")
              if report.get(key)]
    lines += ["- samples: " + ", ".join(f"{k} {v}" for k, v in report["samples"].items()), ""]
    lines += ["| gate | metric | value | threshold | result | extractor |", "|---|---|---|---|---|---|"]
    for row in report["gates"]:
        result = "pass" if row["passed"] else f"**FAIL** {row['note']}".strip()
        lines.append(f"| {row['gate']} | {row['metric']} | {_number(row['value'])} | {_number(row['threshold'])} "
                     f"| {result} | {row['extractor']} |")
    if not report["gates"]:
        lines.append("| (no gates configured) | | | | pass | |")
    baseline = report.get("real_baseline", {})
    lines += ["", "## All metrics", "", "| metric | synthetic vs real train | real test vs real train |",
              "|---|---|---|"]
    lines += [f"| {name} | {_number(value)} | {_number(baseline.get(name))} |"
              for name, value in report["metrics"].items()]
    lines += [f"| {name} | not measured: {reason} | |" for name, reason in report["not_measured"].items()]
    if report.get("samples_nearest_each_source"):
        counts = report["samples_nearest_each_source"]
        names = report.get("source_images") or [f"source {k}" for k in range(len(counts))]
        lines += ["", "Samples nearest each source image (by SSIM): "
                  + ", ".join(f"{name} {count}" for name, count in zip(names, counts))]
    if "auc" in report.get("downstream", {}):
        lines += ["", "## Downstream classifier", ""] + downstream_lines(report["downstream"])
    if report.get("crossval"):
        lines += ["", "## Usefulness, cross-validated", "", report["crossval"]["line"]]
    if report.get("detection"):
        lines += ["", "## Lesion detection", ""] + detection_lines(report["detection"])
    if report.get("segmentation"):
        lines += ["", "## Lesion segmentation", ""] + segmentation_lines(report["segmentation"])
    lines += ["", "Realism metrics compare the synthetic images with the real training images of the label; the last",
              "column is what a fresh real image scores (real test patients), the level a good generator approaches.",
              "Memorisation ratios divide each synthetic image's nearest-training-image distance by the real test",
              f"images' own distance; below {report['near_copy_ratio']} counts as a near copy."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str | Path, history: list[dict] | None = None,
                 closest_pairs: np.ndarray | None = None) -> Path:
    """Writes the JSON, the Markdown and the plots into ``out``; returns the folder."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if history and plot_curves(history, out / CURVES):
        plots.append(CURVES)
    if "auc" in report.get("downstream", {}):
        plot_downstream(report["downstream"], out / AUC_BARS)
        plots.append(AUC_BARS)
    if closest_pairs is not None:
        Image.fromarray(closest_pairs).save(out / CLOSEST_PAIRS)
        plots.append(CLOSEST_PAIRS)
    report = {**report, "plots": plots}
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report) + "".join(f"\n![{name}]({name})\n" for name in plots)
    (out / REPORT_MD).write_text(text)
    return out
