"""Evaluation gates: the metric suite on one generator (or one synthetic folder) and its pass/fail decision.

A generator passes when every threshold configured for its family holds. Thresholds are optional, one per
gate; a configured gate whose metric could not be measured fails, with the reason, so that missing evidence
never reads as a pass. Feature-space thresholds belong to one extractor, named in the gate set: evaluating
with another extractor is an error, not a comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from sonogen.generators.trainer import resolve_device
from sonogen.metrics import kernel_mmd, one_nn_accuracy
from sonogen.metrics.classifier import predict_proba
from sonogen.metrics.downstream import DownstreamConfig, downstream_usefulness
from sonogen.metrics.features import Extractor
from sonogen.metrics.frechet import fid, sifid
from sonogen.metrics.layout import nearest_scan_iou
from sonogen.metrics.memorisation import memorisation
from sonogen.metrics.protocols import METRICS, class_layout, class_targets
from sonogen.metrics.similarity import mean_pairwise_ms_ssim, ssim_to_references

# gate name → (metric, direction): "max" passes when value ≤ threshold, "min" when value ≥ threshold
GATES: dict[str, tuple[str, str]] = {
    "max_kmmd": ("kmmd", "max"),
    "max_1nn_acc": ("one_nn_acc", "max"),
    "min_1nn_acc": ("one_nn_acc", "min"),
    "max_fid": ("fid", "max"),
    "max_sifid": ("sifid", "max"),
    "max_sifid_ratio": ("sifid_ratio", "max"),
    "min_ssim_to_train": ("ssim_to_train", "min"),
    "max_ssim_to_train": ("ssim_to_train", "max"),
    "min_scan_iou_to_train": ("scan_iou_to_train", "min"),
    "min_confidence": ("confidence", "min"),
    "max_near_copy_fraction": ("near_copy_fraction", "max"),
    "max_pixel_near_copy_fraction": ("pixel_near_copy_fraction", "max"),
    "max_diversity_ratio": ("ms_ssim_diversity_ratio", "max"),
    "min_auc_delta_lower_ci": ("auc_delta_lower_ci", "min"),
    "min_balanced_accuracy_delta_lower_ci": ("balanced_accuracy_delta_lower_ci", "min"),
    "min_mask_dice": ("mask_dice", "min"),
    "min_mask_dice_gain": ("mask_dice_gain", "min"),
    "min_seg_dice_delta": ("seg_dice_delta", "min"),
    "min_seg_dice_delta_lower_ci": ("seg_dice_delta_lower_ci", "min"),
    "min_detection_ap50_delta": ("detection_ap50_delta", "min"),
    "min_detection_ap50_delta_lower_ci": ("detection_ap50_delta_lower_ci", "min"),
}
# settings of a gate set that are not thresholds: the extractor its thresholds hold for, whether promotion to
# champion needs a cross-validation that found the generator helps, and the most a reader study's accuracy interval
# may reach for promotion (read by promote when the version has a study)
SETTINGS = ("extractor", "require_improvement", "max_reader_accuracy_upper_ci")
FEATURE_METRICS = ("kmmd", "kmmd_unbiased", "one_nn_acc", "one_nn_acc_real", "one_nn_acc_synthetic", "fid",
                   "sifid", "sifid_real", "sifid_ratio", "near_copy_fraction", "memorisation_median_ratio")
Sampler = Callable[[int, int], torch.Tensor]  # (n, seed) → images (n, 1, H, W) in [-1, 1]


@dataclass
class EvaluateConfig:
    samples: int = 256  # at most this many synthetic and real images per comparison
    seed: int = 0
    near_copy_ratio: float = 0.5  # distance ratio to the real-to-train baseline under which a sample is a copy
    sifid_max_train_images: int = 8  # SIFID and SSIM to the source images are for single- and few-image generators
    few_image_samples: int = 32  # samples of a single- or few-image generator, as in the papers (32 per model)
    downstream: DownstreamConfig | None = field(default_factory=DownstreamConfig)
    # lesion-placing families: detectors trained on real boxes vs real + as many synthetic ones, one per seed
    detection_seeds: int = 3
    detection_steps: int = 600
    # where generators sample and the downstream classifiers, detectors and segmenter train (auto: cuda if present)
    device: str = "auto"

    def __post_init__(self):
        if isinstance(self.downstream, dict):
            self.downstream = DownstreamConfig(**self.downstream)
        if self.samples < 2 or self.few_image_samples < 2 or not 0 < self.near_copy_ratio < 1:
            raise ValueError("samples and few_image_samples must be ≥ 2 and near_copy_ratio in (0, 1)")
        if self.detection_seeds < 2 or self.detection_steps < 1:
            raise ValueError("detection_seeds must be ≥ 2 (for an interval) and detection_steps ≥ 1")
        resolve_device(self.device)


def check_gates(gates: dict[str, Any]) -> dict[str, Any]:
    """Validates a gate set: known gate names with numeric thresholds, and the extractor they were set for."""
    unknown = sorted(set(gates) - set(GATES) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown gates {unknown}; known gates: {sorted(GATES)} (and {', '.join(SETTINGS)})")
    for name, value in gates.items():
        if name not in SETTINGS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"gate {name} needs a number, got {value!r}")
    limit = gates.get("max_reader_accuracy_upper_ci", 1.0)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0.5 <= limit <= 1:
        raise ValueError(f"max_reader_accuracy_upper_ci must be a number from 0.5 (readers cannot tell) to 1, got "
                         f"{limit!r}")
    if not isinstance(gates.get("require_improvement", False), bool):
        raise ValueError(f"require_improvement must be true or false, got {gates['require_improvement']!r}")
    if any(GATES[name][0] in FEATURE_METRICS for name in gates if name not in SETTINGS) and "extractor" not in gates:
        raise ValueError("feature-space gates need the extractor they were set for, e.g. extractor: us-encoder")
    return gates


def variant_of(gate_set: str) -> tuple[str, str] | None:
    """``(family, variant)`` when ``gate_set`` names a variant of a generator family (``ldm-controlnet``)."""
    from sonogen.generators import families, get_generator

    family, _, variant = gate_set.partition("-")
    return (family, variant) if family in families() and variant in get_generator(family).gate_variants else None


def gates_for(gates: dict[str, dict], gate_set: str) -> dict[str, Any]:
    """The thresholds of ``gate_set``: a variant's (``ldm-controlnet``) added over its family's."""
    family = variant_of(gate_set)
    return {**(gates.get(family[0]) or {} if family else {}), **(gates.get(gate_set) or {})}


def _extractor_kind(extractor: Extractor) -> str:
    return "us-encoder" if extractor.name.endswith("us-encoder") else extractor.name


def apply_gates(metrics: dict[str, float], reasons: dict[str, str], gates: dict[str, Any],
                extractor: Extractor) -> tuple[bool, list[dict]]:
    check_gates(gates)
    if "extractor" in gates and gates["extractor"] != _extractor_kind(extractor):
        raise ValueError(f"the gates were set for extractor {gates['extractor']!r} but this evaluation used "
                         f"{extractor.id}: values from different extractors are never gated together")
    rows = []
    for name, threshold in gates.items():
        if name in SETTINGS:
            continue
        metric, direction = GATES[name]
        value = metrics.get(metric)
        if value is None:
            passed, note = False, f"not measured: {reasons.get(metric, 'no value')}"
        else:
            passed, note = (value <= threshold) if direction == "max" else (value >= threshold), ""
        rows.append({"gate": name, "metric": metric, "value": value, "threshold": threshold, "passed": passed,
                     "extractor": extractor.id if metric in FEATURE_METRICS else "", "note": note})
    return all(row["passed"] for row in rows), rows


def realism(real: torch.Tensor, synthetic: torch.Tensor, extractor: Extractor) -> dict[str, float]:
    """kMMD, 1-NN accuracy and FID between two image sets in the extractor's feature space."""
    real_f, fake_f = extractor(real), extractor(synthetic)
    mmd, nn = kernel_mmd(real_f, fake_f), one_nn_accuracy(real_f, fake_f)
    return {"kmmd": mmd["biased"], "kmmd_unbiased": mmd["unbiased"], "one_nn_acc": nn["overall"],
            "one_nn_acc_real": nn["real"], "one_nn_acc_synthetic": nn["synthetic"], "fid": fid(real_f, fake_f)}


def _subset(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]


def nearest_source_sifid(images: torch.Tensor, sources: torch.Tensor, extractor: Extractor) -> float:
    """Mean SIFID of each image against the source nearest to it in the extractor's feature space."""
    nearest = torch.cdist(extractor(images).double(), extractor(sources).double()).argmin(dim=1)
    with torch.no_grad():
        maps, source_maps = extractor.feature_map(images.float()), extractor.feature_map(sources.float())
    return sum(sifid(source_maps[j], maps[i]) for i, j in enumerate(nearest.tolist())) / len(images)


def evaluate_images(
    synthetic: torch.Tensor,
    train: torch.Tensor,
    holdout: torch.Tensor | None,
    extractor: Extractor,
    config: EvaluateConfig,
    sources: torch.Tensor | None = None,
) -> tuple[dict[str, float], dict[str, str], dict]:
    """The label-free metrics of ``synthetic`` against the real ``train`` images of its label.

    ``holdout`` (real images never trained on) gives the real baseline: the same realism metrics between
    holdout and train, and the real-to-train nearest-neighbour distance memorisation is measured against.
    ``sources`` are the images a single- or few-image generator learned from (default: ``train``): each sample
    is compared with its closest source by SIFID, SSIM and the overlap of their scan areas (whether the fan was
    kept whole); held-out real images compared the same way give SIFID's baseline, ``sifid_ratio`` (below 1:
    samples are closer to their source than another patient's image).
    Returns the metrics, the reasons for metrics not measured, and the details (baseline, memorisation).
    """
    sources = train if sources is None else sources
    train_subset = _subset(train, config.samples, config.seed)
    metrics = realism(train_subset, synthetic, extractor)
    reasons: dict[str, str] = {}
    details: dict[str, Any] = {}
    if holdout is not None and len(holdout) >= 2:
        details["real_baseline"] = realism(train_subset, _subset(holdout, config.samples, config.seed), extractor)
    few = f"computed for single- and few-image generators (≤ {config.sifid_max_train_images} training " \
          f"images); this one has {len(sources)}"
    if len(sources) <= config.sifid_max_train_images:
        to_sources = ssim_to_references(synthetic, sources)
        metrics["ssim_to_train"] = float(to_sources.amax(dim=0).mean())
        if len(sources) > 1:  # a few-image generator may give most samples one source's layout
            details["samples_nearest_each_source"] = torch.bincount(to_sources.argmax(dim=0),
                                                                    minlength=len(sources)).tolist()
        metrics["scan_iou_to_train"] = float(nearest_scan_iou(synthetic, sources).mean())
    else:
        reasons["ssim_to_train"] = reasons["scan_iou_to_train"] = few
    if len(sources) <= config.sifid_max_train_images and extractor.feature_map is not None:
        metrics["sifid"] = nearest_source_sifid(synthetic, sources, extractor)
        if holdout is not None and len(holdout):
            metrics["sifid_real"] = nearest_source_sifid(_subset(holdout, len(synthetic), config.seed), sources,
                                                         extractor)
            metrics["sifid_ratio"] = metrics["sifid"] / max(metrics["sifid_real"], 1e-12)
        else:
            reasons["sifid_ratio"] = "no held-out real images to compare with the sources"
    else:
        reasons["sifid"] = few if extractor.feature_map is not None else f"{extractor.name} has no feature map"
        reasons["sifid_ratio"] = reasons["sifid"]
    held = extractor(holdout) if holdout is not None and len(holdout) else None
    in_features = memorisation(extractor(train), extractor(synthetic), held, config.near_copy_ratio)
    in_pixels = memorisation(train.flatten(1), synthetic.flatten(1),
                             holdout.flatten(1) if held is not None else None, config.near_copy_ratio)
    metrics.update(near_copy_fraction=in_features["near_copy_fraction"],
                   memorisation_median_ratio=in_features["median_ratio"],
                   pixel_near_copy_fraction=in_pixels["near_copy_fraction"],
                   pixel_memorisation_median_ratio=in_pixels["median_ratio"])
    details["memorisation_pixels"] = in_pixels
    real_diversity = mean_pairwise_ms_ssim(train, seed=config.seed)
    metrics.update(ms_ssim_diversity=mean_pairwise_ms_ssim(synthetic, seed=config.seed),
                   ms_ssim_diversity_real=real_diversity)
    metrics["ms_ssim_diversity_ratio"] = metrics["ms_ssim_diversity"] / max(real_diversity, 1e-6)
    return metrics, reasons, details


def keep_positives(is_positive: torch.Tensor, fraction: float, required: torch.Tensor | None,
                   seed: int) -> torch.Tensor:
    """A mask keeping every negative and ``fraction`` of the positives (at least one), ``required`` ones first,
    the rest drawn with ``seed``: the paper's minority-class setting for single- and few-image generators."""
    positives = torch.nonzero(is_positive).flatten()
    wanted = max(1, round(fraction * len(positives)))
    required = torch.zeros_like(is_positive) if required is None else required.bool() & is_positive
    order = positives[torch.randperm(len(positives), generator=torch.Generator().manual_seed(seed))]
    ranked = torch.cat([order[required[order]], order[~required[order]]])
    keep = ~is_positive
    keep[ranked[: max(wanted, int(required.sum()))]] = True
    return keep


def label_metrics(
    sample: Sampler,
    synthetic: torch.Tensor,
    label: str,
    split_images: Callable[[str], tuple[torch.Tensor, list[str], list[str]]],
    classifier,
    negative_sample: Sampler | None,
    config: EvaluateConfig,
    family: str = "",
    sources: torch.Tensor | None = None,
    n_synthetic: int | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
    pooled_later: bool = False,
) -> tuple[dict[str, float], dict[str, str], dict]:
    """Confidence of the real-data classifier on ``synthetic`` and downstream usefulness of ``sample``.

    ``split_images(split)`` gives a split's images, labels and patient ids. Where the downstream config cuts
    the real positives of ``family`` to a fraction (the few-image setting), the ``sources`` mask of training
    images the generator learned from stays in the kept part. ``n_synthetic`` synthetic positives are added
    (default: ``synthetic_per_real`` per real positive before any cut). Long steps are announced to ``log``.
    ``pooled_later`` (a cross-validation fold): predictions are kept even where this test split cannot be scored."""
    metrics: dict[str, float] = {}
    reasons: dict[str, str] = {}
    details: dict[str, Any] = {}
    if classifier is None:
        reasons["confidence"] = "no classifier: use the us-encoder extractor"
    elif label not in classifier.config.classes:
        reasons["confidence"] = f"the classifier does not know {label!r}"
    else:
        metrics["confidence"] = float(predict_proba(classifier, synthetic)[:, classifier.config.classes.index(label)]
                                      .mean())
    if config.downstream is None:
        reasons["auc_delta_lower_ci"] = "downstream evaluation is switched off"
        return metrics, reasons, details
    protocol = config.downstream.resolved
    train, train_labels, _ = split_images("train")
    classes, positive = class_layout(protocol, label, sorted(set(train_labels)))

    def of_classes(split: str):
        """A split's images and class indices, without the images of no class."""
        images, labels, patients = split_images(split)
        targets = class_targets(labels, classes, label)
        keep = targets >= 0
        return images[torch.from_numpy(keep)], torch.from_numpy(targets[keep]), \
            [p for p, kept in zip(patients, keep) if kept]

    targets = class_targets(train_labels, classes, label)
    in_classes = torch.from_numpy(targets >= 0)
    train, targets = train[in_classes], torch.from_numpy(targets)[in_classes]
    sources = sources[in_classes] if sources is not None else None
    test, test_targets, test_patients = of_classes("test")
    validation = of_classes("val")[:2] if protocol.needs_validation else None
    is_positive = targets == positive
    n_synthetic = n_synthetic or max(1, round(int(is_positive.sum()) * config.downstream.synthetic_per_real))
    fraction = config.downstream.real_positive_fraction.get(family, protocol.label_fraction)
    if fraction < 1:
        keep = keep_positives(is_positive, fraction, sources, config.seed)
        train, targets, is_positive = train[keep], targets[keep], is_positive[keep]
    if log:
        log(f"protocol {protocol.name}: sampling {n_synthetic} synthetic {label} images for the downstream "
            "classifiers" + (f" and {int((~is_positive).sum())} negatives" if negative_sample else ""))
    try:
        result = downstream_usefulness(
            train, targets, test, test_targets, test_patients, sample(n_synthetic, config.seed + 1),
            negative_sample(int((~is_positive).sum()), config.seed + 2) if negative_sample and len(classes) == 2
            else None, config.downstream, device, log, classes, positive, validation, pooled_later)
    except ValueError as err:
        result = {"error": str(err)}
    if "error" in result or "not_measured" in result:
        why = result.get("error") or result["not_measured"]
        reasons.update({f"{metric}{end}": why for metric in METRICS for end in ("_delta", "_delta_lower_ci")})
        details["downstream"] = result
        return metrics, reasons, details
    for metric in METRICS:
        if metric in result:
            metrics.update({f"{metric}_real": result[metric]["real"],
                            f"{metric}_real_synthetic": result[metric]["real+synthetic"],
                            f"{metric}_delta": result[f"{metric}_delta"],
                            f"{metric}_delta_lower_ci": result[f"{metric}_delta_ci95"][0]})
    details["downstream"] = {**result, "real_positive_fraction": fraction}
    return metrics, reasons, details
