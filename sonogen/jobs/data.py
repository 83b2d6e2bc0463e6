"""The data steps: preparing a dataset (the phantom, a folder, or a DVC repository's) and building a lesion bank."""

from __future__ import annotations

from pathlib import Path

import yaml

from sonogen.tracking import configure_mlflow, dataset_identity, git_commit, set_experiment


def read_params(path: str | Path | None) -> dict:
    return (yaml.safe_load(Path(path).read_text()) or {}) if path else {}


def prepare_dataset(raw: str, out: str | Path, phantom: dict | None = None, prepare: dict | None = None,
                    dvc_repo: str | None = None, dvc_rev: str | None = None) -> dict:
    """Prepares ``raw``: ``phantom`` (simulated with the ``phantom`` parameters), a folder, or a folder of the DVC
    repository ``dvc_repo`` at ``dvc_rev`` (fetched from its remote, S3 included). ``prepare`` holds params.yaml's
    ``prepare`` section."""
    import tempfile

    from sonogen.data.manifest import MANIFEST, file_sha256
    from sonogen.data.phantom import generate
    from sonogen.data.prepare import prepare as prepare_folder

    options = dict(prepare or {})
    method = options.pop("split_method", "hash")
    if method not in ("hash", "stratify"):
        raise ValueError(f"prepare.split_method must be hash or stratify, got {method!r}")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "raw"
        if raw == "phantom":
            generate(source, **(phantom or {}))
        elif dvc_repo:
            from dvc.repo import Repo

            Repo.get(dvc_repo, raw, out=str(source), rev=dvc_rev)
        else:
            source = Path(raw)
        report = prepare_folder(source, out, stratify=method == "stratify", **options)
    return {**report, "manifest_sha256": file_sha256(Path(out) / MANIFEST)}


def build_lesion_bank(data: str | Path, out: str | Path, label: str = "consolidation", split: str = "train",
                      structure_size: int = 32, bandwidth: float = 0.05, dataset: str | None = None,
                      experiment: str | None = None) -> dict:
    """DiffUltra's Lesion-anatomy Bank of ``label``'s boxes in ``data`` written to ``out`` and logged to MLflow
    (parameters: the dataset's identity; metrics: the bank's statistics; artifacts: the bank itself and
    ``anatomy.png``, up to 64 of its images with the fan, pleural line and boxes it measured them by)."""
    import mlflow
    import numpy as np
    from PIL import Image

    from sonogen.data.lesion_bank import ANATOMY_REVIEW, LesionBank, anatomy_overlay, lesion_images
    from sonogen.sampling import tile

    data, out = Path(data), Path(out)
    images = lesion_images(data, label, split)  # read once: for the bank and for its review
    bank = LesionBank.from_images(images, {"data": str(data), "label": label, "split": split,
                                           **dataset_identity(data, label)}, structure_size, bandwidth)
    review = tile(np.stack([anatomy_overlay(image, boxes) for _, _, image, boxes in images[:64]]))
    bank.save(out)
    Image.fromarray(review).save(out / ANATOMY_REVIEW)
    tracking_uri = configure_mlflow()
    set_experiment(experiment or f"{dataset or data.name}-lesion-bank")
    stats = bank.statistics()
    with mlflow.start_run(run_name=f"lesion-bank-{label}") as run:
        mlflow.log_params({**dataset_identity(data, label), "split": split, "structure_size": structure_size,
                           "bandwidth": bandwidth})
        mlflow.set_tags({"label": label, "dataset": dataset or data.name, "code_version": git_commit()})
        metrics = {}
        for name, value in stats.items():
            metrics.update({f"bank.{name}.{k}": v for k, v in value.items()} if isinstance(value, dict)
                           else {f"bank.{name}": value})
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(out), artifact_path="lesion_bank")
    return {"out": str(out), "run_id": run.info.run_id, "tracking_uri": tracking_uri, "statistics": stats,
            "skipped": bank.source["skipped"]}
