"""The evaluate step: train the ``us-encoder`` on real data, gate generators, and record the verdict in MLflow.

``sonogen evaluate``, the DVC ``encoder`` and ``evaluate`` stages and the pipeline components call these.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sonogen.data import UltrasoundDataset
from sonogen.data.manifest import MANIFEST, file_sha256, image_id, load_grey
from sonogen.gate_report import REPORT_JSON, write_report
from sonogen.gates import EvaluateConfig, Sampler, apply_gates, evaluate_images, label_metrics
from sonogen.mask_gates import mask_adherence_readings, pair_readings
from sonogen.generators import Generator
from sonogen.generators.trainer import resolve_device
from sonogen.metrics.classifier import ClassifierConfig, predict_proba, save_classifier, train_classifier
from sonogen.metrics.features import Extractor
from sonogen.metrics.memorisation import closest_pairs
from sonogen.metrics.protocols import METRICS
from sonogen.metrics.segmentation import usefulness_metrics
from sonogen.metrics.similarity import resized
from sonogen.tracking import configure_mlflow, dataset_identity, git_commit, set_experiment, use_experiment_of

SAMPLE_BATCH = 64  # bounds the memory one sampling call takes, whatever `samples` is


def split_images(data: str | Path, split: str, labels: list[str] | None = None):
    """Images ``(N, 1, H, W)``, labels and patient ids of one split."""
    dataset = UltrasoundDataset(data, split=split, labels=labels)
    return dataset.images(), [r.label for r in dataset.records], [r.patient_id for r in dataset.records]


def sampler(generator: Generator) -> Sampler:
    def sample(n: int, seed: int) -> torch.Tensor:
        # one seed per batch keeps the set reproducible without holding all latents at once
        return torch.cat([generator.sample(min(SAMPLE_BATCH, n - start), seed * 100_003 + start)
                          for start in range(0, n, SAMPLE_BATCH)])
    return sample


def train_encoder(data: str | Path, out: str | Path, dataset: str, epochs: int = 25, seed: int = 0,
                  device: str = "auto") -> dict:
    """Trains the reduced-VGG classifier on the real training split (every label) on ``device`` (auto: cuda if
    present), reports its validation accuracy, and registers it as ``<dataset>-us-encoder`` so its features carry
    a registry version."""
    import mlflow

    device = resolve_device(device)
    images, labels, _ = split_images(data, "train")
    classes = sorted(set(labels))
    config = ClassifierConfig(classes=classes, epochs=epochs, seed=seed)
    model = train_classifier(images, torch.tensor([classes.index(x) for x in labels]), config, device)
    val_images, val_labels, _ = split_images(data, "val", classes)
    accuracy = float(np.mean([classes[int(k)] == truth for k, truth in
                              zip(predict_proba(model, val_images).argmax(1), val_labels)])) if val_labels else None
    name = f"{dataset}-us-encoder"
    configure_mlflow()
    set_experiment(name)
    client = mlflow.MlflowClient()
    with mlflow.start_run(run_name="us-encoder") as run:
        mlflow.log_params({**{f"classifier.{k}": v for k, v in asdict(config).items()},
                           **dataset_identity(data, classes[0]), "device": str(device)})
        mlflow.set_tags({"dataset": dataset, "code_version": git_commit()})
        if accuracy is not None:
            mlflow.log_metric("val_accuracy", accuracy)
        folder = save_classifier(model, Path(out))
        mlflow.log_artifacts(str(folder), "encoder")
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name, description="Reduced-VGG ultrasound classifier; its pooled "
                                       "penultimate activations are the us-encoder features of the gates.")
    version = client.create_model_version(name, f"{run.info.artifact_uri}/encoder", run.info.run_id).version
    client.set_model_version_tag(name, version, "data_manifest_sha256", file_sha256(Path(data) / MANIFEST))
    save_classifier(model, folder, {"registered_model": name, "version": str(version), "classes": classes,
                                    "val_accuracy": accuracy})
    return {"registered_model": name, "version": str(version), "val_accuracy": accuracy, "folder": str(folder)}


def find_encoder(data: str | Path, dataset: str) -> str | None:
    """``models:/<dataset>-us-encoder/<version>`` of the newest encoder trained on exactly this dataset, if any."""
    import mlflow

    configure_mlflow()
    sha = file_sha256(Path(data) / MANIFEST)
    versions = mlflow.MlflowClient().search_model_versions(f"name='{dataset}-us-encoder'")
    matching = [v for v in versions if v.tags.get("data_manifest_sha256") == sha]
    newest = max(matching, key=lambda v: int(v.version), default=None)
    return f"models:/{newest.name}/{newest.version}" if newest else None


def evaluate_generator(
    generator: Generator,
    data: str | Path,
    extractor: Extractor,
    gates: dict[str, Any],
    config: EvaluateConfig,
    out: str | Path,
    subject: str,
    negative: Generator | None = None,
    history: list[dict] | None = None,
    log: Callable[[str], None] | None = None,
    crossval: dict | None = None,
    data_name: str | None = None,
    pooled_later: bool = False,
) -> dict:
    """Every metric of ``generator`` on its label of the prepared dataset ``data``, gated; report in ``out``.
    The classifiers, detectors and segmenter it trains run on ``config.device``, as should ``generator``; each
    step is announced to ``log``. With a ``crossval`` report of its family and label, usefulness is that report's
    pooled verdict (every patient tested once) instead of one test split's. ``data_name`` is how the report
    names the data (default: its path). ``pooled_later``: a cross-validation fold, whose downstream predictions
    are kept even where its few test patients cannot be scored alone."""
    device = resolve_device(config.device)
    log = log or (lambda message: None)
    label = generator.label
    train, _, _ = split_images(data, "train", [label])
    holdout, _, _ = split_images(data, "test", [label])
    if len(train) < 2:
        raise ValueError(f"{data} has {len(train)} training image(s) of {label!r}: nothing to compare with")
    learned = generator.learned_images()  # single- and few-image models name the images they learned from
    train_records = UltrasoundDataset(data, split="train").records
    sources_mask = torch.tensor([r.image in learned for r in train_records]) if learned else None
    label_images = [r.image for r in train_records if r.label == label]
    if missing := [image_id(image) for image in learned if image not in label_images]:
        raise ValueError(f"{data} has no {label!r} training image {', '.join(missing)}, which this generator "
                         "learned from: evaluate it on the dataset version it was trained on")
    sample = sampler(generator)
    count = config.few_image_samples if learned else min(config.samples, len(train))
    log(f"sampling {count} images on {device}")
    synthetic = sample(count, config.seed)
    # a generator may draw another size than the data's (SinDDM's finest scale is the image limited to ~50k px):
    # real images meet its samples at the samples' size, the size it learned them at
    size = tuple(synthetic.shape[-2:])
    train, holdout = resized(train, size), resized(holdout, size)
    # in the generator's order, the order of its `source` condition, so a count per source names the right one
    sources = train[torch.tensor([label_images.index(image) for image in learned])] if learned else None
    log("realism, memorisation and diversity metrics")
    metrics, reasons, details = evaluate_images(synthetic, train, holdout, extractor, config, sources)
    if "samples_nearest_each_source" in details:
        details["source_images"] = [image_id(image) for image in learned]

    def load_split(split: str):
        images, labels, patients = split_images(data, split)
        return resized(images, size), labels, patients

    more, more_reasons, more_details = label_metrics(
        sample, synthetic, label, load_split, extractor.classifier,
        (lambda n, seed: resized(sampler(negative)(n, seed), size)) if negative else None,
        replace(config, downstream=None) if crossval else config, generator.family, sources_mask,
        config.few_image_samples if learned else None, device, log, pooled_later)
    metrics.update(more)
    reasons.update(more_reasons)
    details.update(more_details)
    if crossval:
        more, more_reasons, details["crossval"] = crossval_metrics(crossval)
        metrics.update(more)
        reasons.update(more_reasons)
    if generator.draws_requested_lesions:
        log("mask adherence: a segmenter on the real masks, then one sample per real test lesion")
        more, more_reasons = mask_adherence_readings(generator, data, config.seed, device)
        metrics.update(more)
        reasons.update(more_reasons)
    elif generator.draws_masks:
        log("mask fidelity: a segmenter on the real masks reads generated pairs; then segmenters with and without them")
        more, more_reasons, segmentation = pair_readings(generator, data, config, device, pooled_later)
        metrics.update(more)
        reasons.update(more_reasons)
        if segmentation:
            details["segmentation"] = segmentation
    # a cross-validated detection verdict replaces this split's, as the pooled AUC replaces its classifiers
    pooled_detection = bool(crossval and crossval["pooled"].get("detection"))
    if generator.places_lesions and not pooled_detection:
        log(f"detection: samples with boxes, then {config.detection_seeds} detectors per training set")
    detection, kept = (_detection_gain(generator, data, config, device, keep=pooled_later)
                       if generator.places_lesions and not pooled_detection else (None, None))
    if detection is not None:
        metrics.update({f"detection_{metric}_delta": detection[f"real+{generator.family}"][metric]["mean"]
                        - detection["real"][metric]["mean"] for metric in ("ap50", "ap", "ap50_large")})
        reasons["detection_ap50_delta_lower_ci"] = (
            "an interval over patients needs cross-validation: sonogen crossval with --protocol diffultra2025, "
            "then sonogen evaluate --crossval")
    report = _report(subject, metrics, reasons, details, gates, extractor, config,
                     {"synthetic": len(synthetic), "real_train": len(train), "real_test": len(holdout)})
    report.update(family=generator.family, gate_set=generator.gate_set, label=label, data=data_name or str(data),
                  data_manifest_sha256=file_sha256(Path(data) / MANIFEST), device=str(device),
                  require_improvement=bool(gates.get("require_improvement")),
                  max_reader_accuracy_upper_ci=gates.get("max_reader_accuracy_upper_ci"))
    if detection is not None:
        report["detection"] = detection
    write_report(report, out, history, closest_pairs(synthetic, train, details["memorisation_pixels"]))
    if kept is not None:  # for the pooled verdict, not the gate report
        report["detection_predictions"] = kept
    return report


def crossval_metrics(report: dict) -> tuple[dict[str, float], dict[str, str], dict]:
    """The usefulness metrics of a cross-validation report's pooled verdict, and its summary for the report."""
    from sonogen.crossval import verdict_line

    pooled = report["pooled"]
    summary = {**{k: v for k, v in pooled.items()}, "folds": len(report["folds"]), "line": verdict_line(pooled)}
    if "delta" not in pooled:
        reason = f"cross-validation: {pooled.get('reason', pooled['verdict'])}"
        return {}, {f"{m}{end}": reason for m in METRICS for end in ("_delta_lower_ci", "_delta")}, summary
    metrics = {}
    for metric in METRICS:
        if metric == pooled["metric"]:
            delta, low = pooled["delta"], pooled["ci_low"]
        elif metric in pooled.get("other_metrics", {}):
            delta, low = pooled["other_metrics"][metric]["delta"], pooled["other_metrics"][metric]["ci95"][0]
        else:
            continue
        metrics.update({f"{metric}_real": pooled[metric]["real"], f"{metric}_real_synthetic":
                        pooled[metric]["real+synthetic"], f"{metric}_delta": delta, f"{metric}_delta_lower_ci": low})
    if segmentation := pooled.get("segmentation"):
        metrics.update(usefulness_metrics(segmentation))
    if detection := pooled.get("detection"):
        for metric in ("ap50", "ap"):
            metrics.update({f"detection_{metric}_delta": detection[f"{metric}_delta"],
                            f"detection_{metric}_delta_lower_ci": detection[f"{metric}_delta_ci95"][0]})
    return metrics, {}, summary


def boxed_images(data: str | Path, split: str) -> tuple[torch.Tensor, list]:
    """A split's images ``(N, 1, H, W)`` and each image's boxes (none on images without lesions)."""
    dataset = UltrasoundDataset(data, split=split)
    items = [dataset[k] for k in range(len(dataset))]
    return torch.stack([i["image"] for i in items]), [i["boxes"].tolist() for i in items]


def _detection_gain(generator: Generator, data: str | Path, config: EvaluateConfig, device: torch.device,
                    keep: bool = False) -> tuple[dict, dict | None]:
    """The DiffUltra claim on this dataset: AP on the real test boxes of detectors trained on the real training
    images (boxes on the lesion label, none on the others) against the same plus one synthetic image with its
    box per real lesion image. With ``keep``, also the detections, the test boxes and the test images' patients
    (a cross-validation fold's, pooled later)."""
    from sonogen.metrics.detection import (DetectorConfig, detector_predictions, large_lesion_area,
                                           score_predictions)
    from sonogen.sampling import chunk_seed

    train = boxed_images(data, "train")
    wanted = min(config.samples, max(1, sum(1 for boxes in train[1] if boxes)))
    chunks = [generator.sample_with_boxes(min(32, wanted - start), chunk_seed(config.seed, start // 32))
              for start in range(0, wanted, 32)]
    synthetic = (torch.cat([images for images, _ in chunks]), [b for _, boxes in chunks for b in boxes])
    test = boxed_images(data, "test")
    predictions = detector_predictions(train, test[0], {generator.family: synthetic},
                                       DetectorConfig(steps=config.detection_steps, seed=config.seed),
                                       config.detection_seeds, device)
    report = score_predictions(predictions, test[1], large_lesion_area(train[1]))
    kept = {"predictions": predictions, "truths": test[1],
            "patients": [r.patient_id for r in UltrasoundDataset(data, split="test").records]} if keep else None
    return report, kept


def read_image_folder(folder: str | Path) -> torch.Tensor:
    """Every PNG/JPEG under ``folder`` as grey ``(N, 1, H, W)`` in [-1, 1]; all images must share one size."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise FileNotFoundError(f"no PNG or JPEG images under {folder}")
    arrays = [load_grey(p) for p in paths]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"{folder} holds images of several sizes {sorted({a.shape for a in arrays})}; "
                         "resize them to one size first (e.g. `sonogen data prepare`)")
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 127.5 - 1)[:, None]


def evaluate_folders(real: str | Path, synthetic: str | Path, extractor: Extractor, gates: dict[str, Any],
                     config: EvaluateConfig, out: str | Path) -> dict:
    """The label-free gates for any generator's output: ``synthetic`` images against the ``real`` ones."""
    real_images, synthetic_images = read_image_folder(real), read_image_folder(synthetic)
    if real_images.shape[-2:] != synthetic_images.shape[-2:]:
        raise ValueError(f"real images are {tuple(real_images.shape[-2:])} px, synthetic "
                         f"{tuple(synthetic_images.shape[-2:])} px: they must match")
    metrics, reasons, details = evaluate_images(synthetic_images, real_images, None, extractor, config)
    reasons.update(confidence="needs a labelled dataset", auc_delta_lower_ci="needs a labelled dataset")
    report = _report(f"{synthetic} vs {real}", metrics, reasons, details, gates, extractor, config,
                     {"synthetic": len(synthetic_images), "real_train": len(real_images)})
    write_report(report, out, None, closest_pairs(synthetic_images, real_images, details["memorisation_pixels"]))
    return report


def _report(subject, metrics, reasons, details, gates, extractor, config, samples) -> dict:
    passed, rows = apply_gates(metrics, reasons, gates, extractor)
    return {
        "subject": subject,
        "passed": passed,
        "gates": rows,
        "extractor": extractor.id,
        "metrics": metrics,
        "not_measured": {k: v for k, v in reasons.items() if k not in metrics},
        "samples": samples,
        "near_copy_ratio": config.near_copy_ratio,
        "pixel_memorisation_baseline": details["memorisation_pixels"]["baseline"],
        **{k: v for k, v in details.items() if k != "memorisation_pixels"},
        "config": asdict(config),
    }


def record_in_mlflow(report: dict, report_dir: str | Path, run_id: str | None,
                     version: tuple[str, str] | None = None) -> None:
    """Gate metrics and the report go to the generator's training run; the verdict also to its model version."""
    import mlflow

    configure_mlflow()
    numbers = {f"gate.{k}": float(v) for k, v in report["metrics"].items() if v is not None and np.isfinite(v)}
    if run_id:
        use_experiment_of(run_id)  # training the us-encoder in this process may have set another one
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics(numbers)
            mlflow.log_artifacts(str(report_dir), "gate_report")
            mlflow.set_tags({"gate": "passed" if report["passed"] else "failed",
                             "gate.extractor": report["extractor"]})
    if version:
        client = mlflow.MlflowClient()
        for key, value in gate_tags(report).items():
            client.set_model_version_tag(*version, key, value)


def gate_tags(report: dict) -> dict[str, str]:
    """The tags a model version carries about its gate result, and the cross-validation verdict it was gated on."""
    tags = {"gate": "passed" if report["passed"] else "failed", "gate.extractor": report["extractor"],
            **{f"gate.{row['metric']}": f"{row['value']:.6g}" for row in report["gates"] if row["value"] is not None}}
    if report.get("require_improvement"):
        tags["gate.require_improvement"] = "true"
    if report.get("max_reader_accuracy_upper_ci") is not None:
        tags["gate.max_reader_accuracy_upper_ci"] = str(report["max_reader_accuracy_upper_ci"])
    pooled = report.get("crossval") or {}
    if "verdict" in pooled:
        tags["crossval.verdict"] = pooled["verdict"]
        tags["crossval.metric"] = pooled.get("metric", "auc")
        tags.update({f"crossval.{key}": f"{pooled[key]:.6g}"
                     for key in ("delta", "ci_low", "ci_high", "detectable_delta") if key in pooled})
    return tags


def read_report(folder: str | Path) -> dict:
    path = Path(folder) / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `sonogen evaluate` first")
    return json.loads(path.read_text())
