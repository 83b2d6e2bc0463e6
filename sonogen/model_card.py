"""The model card written when a generator version is registered: what it was trained on (data version and
licences), how (config), how it scored (gates), and what it is and is not for."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from sonogen.data.manifest import read_manifest
from sonogen.data.writer import PREPARE_REPORT

INTENDED_USE = (
    "Synthetic ultrasound frames to augment training and testing of downstream models (classification, "
    "detection) for the label above, and to develop and test ML pipelines. Research use."
)
LIMITATIONS = (
    "- Not for diagnosis, clinical decisions, or as evidence about a patient.\n"
    "- Realism and usefulness are measured on the data version and extractor named here; other probes, sites "
    "or devices may differ. Check the gates again before using the images for another population.\n"
    "- The generator may reproduce artefacts and biases of its training data; review samples before use.\n"
    "- Synthetic images inherit the licence terms of the training data listed under Data."
)


def detection_lines(detection: dict) -> list[str]:
    """The detection comparison as a Markdown table: AP per training set, mean [95% interval] over seeds."""
    metrics = list(next(iter(detection.values())))
    lines = ["| trained on | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for arm, scores in detection.items():
        cells = [f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]" for s in (scores[m] for m in metrics)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    seeds = next(iter(next(iter(detection.values())).values()))["seeds"]
    return lines + ["", f"AP on the real test boxes (pycocotools; ap over IoU 0.5:0.95, ap50 at 0.5; large: the top "
                        f"10% of training box areas), {seeds} detector seeds per row, 95% t-intervals."]


def segmentation_lines(segmentation: dict) -> list[str]:
    """The segmentation experiment (real pairs vs real + generated pairs) as Markdown."""
    low, high = segmentation["seg_dice_delta_ci95"]
    return ["| trained on | Dice on real test lesions |", "|---|---|",
            *(f"| {arm} pairs | {value:.3f} |" for arm, value in segmentation["seg_dice"].items()), "",
            f"Delta {segmentation['seg_dice_delta']:+.3f}, 95% interval [{low:+.3f}, {high:+.3f}] over "
            f"{segmentation['test_patients']} test patients ({segmentation['test_images']} images); "
            f"{segmentation['synthetic_pairs']} generated pairs added; {segmentation['seeds']} segmenter seeds per row."]


def downstream_lines(downstream: dict) -> list[str]:
    """The downstream experiment as Markdown: AUC (and balanced accuracy) per training set, mean and per seed, what
    each set held, and the deltas with their intervals, so a failed lower bound reads as a loss or as too few test
    patients to tell."""
    balanced = downstream.get("balanced_accuracy", {})
    lines = ["| trained on | AUC | per seed | balanced accuracy |", "|---|---|---|---|"]
    lines += [f"| {name} | {auc:.3f} | {', '.join(f'{a:.3f}' for a in downstream['auc_per_seed'][name])} | "
              + (f"{balanced[name]:.3f} |" if name in balanced else "n/a |") for name, auc in downstream["auc"].items()]
    fraction = downstream.get("real_positive_fraction", 1.0)
    cut = f" (the training split's cut to {fraction:.0%})" if fraction < 1 else ""
    patients = downstream["test_patients_per_class"]
    classes = downstream.get("classes", ["negative", "positive"])
    protocol = downstream.get("protocol", "default")
    lines += [
        "",
        f"Protocol `{protocol}`, classes {', '.join(classes)}. Trained on {downstream['train_real_positives']} real "
        f"positives{cut} and {downstream['train_real_negatives']} real images of the other classes, with "
        f"{downstream['synthetic_positives']} synthetic positives added or in their stead; {downstream['seeds']} "
        f"seeds per row. Tested on {downstream['test_images']} real test images of {downstream['test_patients']} "
        f"patients ({patients['positive']} positive, {patients['negative']} of the other classes).",
    ]
    for metric, name in (("auc", "AUC"), ("balanced_accuracy", "Balanced accuracy")):
        if f"{metric}_delta_ci95" in downstream:
            low, high = downstream[f"{metric}_delta_ci95"]
            lines.append(f"{name} delta real+synthetic − real: {downstream[f'{metric}_delta']:+.3f}, 95% interval "
                         f"[{low:+.3f}, {high:+.3f}] over {downstream['bootstrap_resamples']} stratified resamples "
                         "of the test patients.")
    return lines


def training_licences(data: Path, labels: list[str]) -> Counter | None:
    """Licence → count of the training images of ``labels``; None when the manifest is not there."""
    try:
        records = [r for r in read_manifest(data) if r.label in labels and r.split == "train"]
    except FileNotFoundError:
        return None
    return Counter(r.licence or "unspecified" for r in records)


def _licences(counts: Counter | None) -> list[str]:
    if counts is None:
        return ["unknown (the training manifest was not available at registration)"]
    return [f"{licence}: {count} training images" for licence, count in counts.most_common()]


def _pseudonyms(data: Path) -> str:
    try:
        return json.loads((data / PREPARE_REPORT).read_text()).get("pseudonyms", "unknown")
    except (OSError, ValueError):
        return "unknown (the prepare report was not available at registration)"


def build_model_card(name: str, version: str, info: dict, tags: dict[str, str], generator_dir: Path,
                     gate_report: dict | None, train_params: dict[str, str]) -> str:
    """Markdown for ``name`` version ``version``; ``info`` is the training run's record (family, label, data)."""
    described = json.loads((generator_dir / "config.json").read_text())
    config = described["config"]
    counts = training_licences(Path(info["data"]), config.get("labels") or [info["label"]])
    base = []
    if config.get("base_model"):
        origin = f" (on `{config['base_origin']}`)" if config.get("base_origin") else ""
        base = [f"- base checkpoint: `{config['base_model']}`{origin}, licence: "
                f"{config.get('base_licence') or 'not given'} (its terms bind this model and its images too)"]
    lines = [
        f"# {name} v{version}",
        "",
        f"{info['family']} generator of **{info['label']}** frames, trained on dataset `{info['dataset']}` "
        f"(training run `{info['run_id']}`, code `{tags.get('code_version', 'unknown')}`).",
        "",
        "## Data",
        f"- prepared dataset: `{info['data']}`",
        f"- DVC md5: `{tags.get('data_dvc_md5', 'unknown')}`; manifest sha256: `{tags.get('data_manifest_sha256', 'unknown')}`",
        f"- patient ids: {_pseudonyms(Path(info['data']))}",
        "- licences:",
        *[f"  - {line}" for line in _licences(counts)],
        f"- commercial use: **{tags.get('commercial_use', 'unknown')}** ({tags.get('commercial_use.reason', '')})",
        *base,
        "",
        "## Training",
        f"- the weights of epoch {described['epoch']}, step {described['step']}",
        *([f"- kept {tags['best_epoch.reason']}"] if tags.get("best_epoch.reason") else []),
        "- model config: `" + json.dumps(config, sort_keys=True) + "`",
        "- training config: `" + json.dumps(train_params, sort_keys=True) + "`",
        "",
        "## Gates",
    ]
    if gate_report is None:
        lines.append("Not evaluated: this version was registered without a gate report.")
    else:
        lines += [f"**{'passed' if gate_report['passed'] else 'failed'}** with extractor `{gate_report['extractor']}`.", "",
                  "| gate | value | threshold | passed |", "|---|---|---|---|"]
        for row in gate_report["gates"]:
            value = "n/a" if row["value"] is None else f"{row['value']:.4g}"
            lines.append(f"| {row['gate']} | {value} | {row.get('threshold', '')} | {'yes' if row['passed'] else 'no'} |")
        if "auc" in gate_report.get("downstream", {}):
            lines += ["", "### Downstream classifier", ""] + downstream_lines(gate_report["downstream"])
        if gate_report.get("crossval"):
            crossval = gate_report["crossval"]
            lines += ["", "### Usefulness, cross-validated", "",
                      f"{crossval['line']} ({crossval['folds']} folds by patient; every patient tested once by "
                      f"models that never saw them)."]
        if gate_report.get("detection"):
            lines += ["", "### Lesion detection", ""] + detection_lines(gate_report["detection"])
        if gate_report.get("segmentation"):
            lines += ["", "### Lesion segmentation", ""] + segmentation_lines(gate_report["segmentation"])
    lines += ["", "## Intended use", INTENDED_USE, "", "## Limitations", LIMITATIONS, ""]
    return "\n".join(lines)
