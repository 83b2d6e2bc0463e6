"""The platform's steps as plain functions: the CLI, `dvc repro` and pipeline components all call these."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from sonogen.evaluation import (
    evaluate_generator, find_encoder, gate_tags, read_report, record_in_mlflow, train_encoder,
)
from sonogen.gates import EvaluateConfig, check_gates, gates_for, variant_of
from sonogen.generators import config_from_dict, families, get_generator, load_generator
from sonogen.generators.trainer import GENERATOR_DIR, TrainConfig, resolve_device, train
from sonogen.metrics.features import get_extractor
from sonogen.model_card import build_model_card
from sonogen.registry import load_sampler, model_name, register_generator, resolve_version, write_model_card
from sonogen.tracking import MlflowTracker, configure_mlflow, dataset_identity, git_commit

RUN_INFO = "run.json"


def load_family_config(path: str | Path | None, family: str, label: str,
                       model_overrides: dict[str, Any] | None = None) -> tuple[Any, TrainConfig]:
    """Model and training configs from a YAML file: either ``train: {<family>: {model, train}}`` (params.yaml)
    or top-level ``model`` and ``train`` sections. Without a file, the family's defaults. ``model_overrides``
    (command-line choices such as the training image) win over the file."""
    sections: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        nested = loaded.get("train", {})
        sections = nested[family] if isinstance(nested, dict) and family in nested else loaded
        unknown = sorted(set(sections) - {"model", "train"})
        if unknown:
            raise ValueError(f"{path}: unexpected sections {unknown} for {family}; expected 'model' and 'train'")
    family_class = get_generator(family)
    model = config_from_dict(family_class.config_class,
                             {**(sections.get("model") or {}), **(model_overrides or {}), "label": label})
    return model, config_from_dict(TrainConfig, sections.get("train") or {})


def _flatten(prefix: str, values: dict) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


def train_generator(
    family: str,
    data: str | Path,
    label: str,
    out: str | Path,
    config_path: str | Path | None = None,
    dataset: str | None = None,
    experiment: str | None = None,
    register: bool = True,
    resume: bool = False,
    progress=None,
    model_overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Trains one generator for one label with MLflow tracking; registers it unless ``register`` is False.
    ``progress`` wraps the epochs (a progress bar), ``log`` receives progress lines (see ``trainer.train``)."""
    import mlflow

    data, out = Path(data), Path(out)
    model_config, train_config = load_family_config(config_path, family, label, model_overrides)
    dataset = dataset or data.name
    tracking_uri = configure_mlflow()
    info_path = out / RUN_INFO
    run_id = json.loads(info_path.read_text())["run_id"] if resume and info_path.exists() else None
    mlflow.set_experiment(experiment or f"{dataset}-{family}")
    identity = dataset_identity(data, label)
    with mlflow.start_run(run_id=run_id, run_name=f"{family}-{label}") as run:
        if run_id is None:
            mlflow.log_params({
                **_flatten("model", asdict(model_config)), **_flatten("train", asdict(train_config)), **identity,
            })
            mlflow.set_tags({"family": family, "label": label, "dataset": dataset, "code_version": git_commit()})
        out.mkdir(parents=True, exist_ok=True)
        info = {"run_id": run.info.run_id, "tracking_uri": tracking_uri, "family": family, "label": label,
                "dataset": dataset, "data": str(data)}
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        torch.manual_seed(train_config.seed)  # the networks' initial weights repeat with the run
        generator = get_generator(family)(model_config)
        summary = train(generator, data, label, train_config, out, MlflowTracker(), resume=resume, progress=progress,
                        log=log)
        mlflow.log_artifact(str(out / "history.json"))
        info["final"] = summary["final"]
        info["name"] = generator_name(family, label, getattr(generator.config, "images", ()))
        if getattr(generator.config, "images", ()):
            info["images"] = list(generator.config.images)
        info["feature_extractor"] = summary["feature_extractor"]
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    if register:
        info.update(register_trained(out))
    return info


def read_params(path: str | Path | None) -> dict:
    return (yaml.safe_load(Path(path).read_text()) or {}) if path else {}


def evaluation_config(params: dict) -> tuple[EvaluateConfig, dict[str, dict], int]:
    """From params.yaml's content: the ``evaluate`` section, the ``gates`` sets (per family, and per variant
    such as ``ldm-controlnet``) and the encoder's epochs."""
    section = dict(params.get("evaluate") or {})
    encoder_epochs = section.pop("encoder_epochs", 25)
    gates = params.get("gates") or {}
    for name in gates:
        family, _, variant = name.partition("-")
        is_variant = variant_of(name) is not None
        # other names are free: gate sets for folders of images from outside generators (evaluate --family)
        if variant and family in families() and not is_variant:
            known = ", ".join(f"{family}-{v}" for v in get_generator(family).gate_variants) or "none"
            raise ValueError(f"gates.{name}: {family} has no variant {variant!r}; its variants: {known}")
        own = gates[name] or {}
        if is_variant and "extractor" in own and own["extractor"] != (gates.get(family) or {}).get("extractor"):
            raise ValueError(f"gates.{name}: a variant's thresholds hold for its family's extractor; "
                             f"drop extractor {own['extractor']!r} or set it on gates.{family}")
        try:
            check_gates(gates_for(gates, name))
        except ValueError as err:
            raise ValueError(f"gates.{name}: {err}") from None
    return config_from_dict(EvaluateConfig, section), gates, encoder_epochs


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
    mlflow.set_experiment(experiment or f"{dataset or data.name}-lesion-bank")
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


def generator_name(family: str, label: str, images: tuple[str, ...] | list[str] = ()) -> str:
    """``<family>-<label>``, plus the image id for families with one model per image: the default training
    folder and the name of the gate report folder."""
    if get_generator(family).one_model_per_image and images:
        from sonogen.generators.sinddm import image_id

        return f"{family}-{label}-{image_id(images[0])}"
    return f"{family}-{label}"


def trained_name(folder: str | Path) -> str:
    """The ``generator_name`` of a trained folder."""
    if not (Path(folder) / RUN_INFO).is_file():
        raise FileNotFoundError(f"{Path(folder) / RUN_INFO} not found: train a generator into {folder} first")
    info = json.loads((Path(folder) / RUN_INFO).read_text())
    return info.get("name") or generator_name(info["family"], info["label"])


def _check_run_is_tracked(folder: Path, info: dict) -> None:
    """The results of a trained folder go to its training run: fail before any work when this store lacks it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = configure_mlflow()
    try:
        mlflow.MlflowClient().get_run(info["run_id"])
    except MlflowException:
        raise ValueError(f"{folder} was trained in MLflow run {info['run_id']} of {info.get('tracking_uri')}, "
                         f"which the tracking store {uri} does not have: set MLFLOW_TRACKING_URI to the store it "
                         f"was trained with") from None


def _target(spec: str, device: torch.device) -> dict:
    """A trained folder (``models/dcgan-normal``) or a registry URI, as generator + where to record results."""
    folder = Path(spec)
    if (folder / RUN_INFO).is_file():
        info = json.loads((folder / RUN_INFO).read_text())
        _check_run_is_tracked(folder, info)
        history = folder / "history.json"
        return {"generator": load_generator(folder / GENERATOR_DIR, device), "run_id": info["run_id"], "version": None,
                "name": trained_name(folder),
                "history": json.loads(history.read_text()) if history.exists() else None}
    if not spec.startswith("models:/"):
        raise FileNotFoundError(f"{spec} is neither a trained folder (with {RUN_INFO}) nor a models:/ URI")
    name, version = resolve_version(spec)
    import mlflow

    run_id = mlflow.MlflowClient().get_model_version(name, version).run_id
    return {"generator": load_sampler(spec, device), "run_id": run_id, "version": (name, version),
            "name": f"{name}-v{version}", "history": None}


def evaluate_targets(targets: list[str], data: str | Path, extractor_spec: str | None, params: dict,
                     out: str | Path, dataset: str | None = None,
                     log: Callable[[str], None] | None = None) -> list[dict]:
    """Gates each target on ``data`` with the ``evaluate`` and ``gates`` sections of ``params``; generators of
    the same family and another label supply the synthetic negatives of the downstream experiment. Results go
    to ``out/<family>-<label>/`` (``out/<model>-v<version>/`` for registry URIs) and to MLflow; each step is
    announced to ``log``, named by its target."""
    config, gates, encoder_epochs = evaluation_config(params)
    data = Path(data)
    device = resolve_device(config.device)
    loaded = [_target(spec, device) for spec in targets]
    if extractor_spec in (None, "us-encoder"):
        dataset = dataset or data.name
        uri = find_encoder(data, dataset)
        if uri is None:
            if log:
                log(f"training the us-encoder on {data} ({encoder_epochs} epochs)")
            uri = train_encoder(data, Path("encoders") / f"{dataset}-us-encoder", dataset, encoder_epochs,
                                device=config.device)["folder"]
        extractor_spec = f"us-encoder:{uri}"
    extractor = get_extractor(extractor_spec)
    results = []
    for target in loaded:
        generator = target["generator"]
        negative = next((t["generator"] for t in loaded if t["generator"].family == generator.family
                         and t["generator"].config.label != generator.config.label), None)
        report_dir = Path(out) / target["name"]
        announce = (lambda message, name=target["name"]: log(f"{name}: {message}")) if log else None
        report = evaluate_generator(generator, data, extractor, gates_for(gates, generator.gate_set), config,
                                    report_dir, target["name"], negative, target["history"], announce)
        record_in_mlflow(report, report_dir, target["run_id"], target["version"])
        results.append({"target": target["name"], "report": str(report_dir), **report})
    return results


def register_trained(out: str | Path, alias: str | None = "candidate", gate_report: str | Path | None = None) -> dict:
    """Registers the generator trained into ``out`` as ``<dataset>-<family>-<label>``, tagged with its data,
    code and metrics, and gives that version ``alias``. With ``gate_report`` (the folder `evaluate` wrote for
    it), only a generator whose gates passed is registered; a failing one stays a run with its report."""
    import mlflow
    from mlflow.exceptions import MlflowException

    out = Path(out)
    if not (out / RUN_INFO).is_file():
        raise FileNotFoundError(f"{out / RUN_INFO} not found: train a generator into {out} first")
    info = json.loads((out / RUN_INFO).read_text())
    configure_mlflow()
    try:
        run = mlflow.MlflowClient().get_run(info["run_id"])
    except MlflowException as err:
        raise ValueError(f"the training run {info['run_id']} of {out} is not in the tracking store: {err}") from err
    final = {k: v for k, v in info.get("final", {}).items() if k in ("kmmd", "one_nn_acc", "epoch", "step")}
    tags = {
        "family": info["family"],
        "label": info["label"],
        "data_dvc_md5": run.data.params.get("data_dvc_md5", "unknown"),
        "data_manifest_sha256": run.data.params.get("data_manifest_sha256", "unknown"),
        "code_version": run.data.tags.get("code_version", "unknown"),
        "feature_extractor": info.get("feature_extractor", ""),
        **({"training_images": ",".join(info["images"])} if info.get("images") else {}),
        **{f"metric.{k}": f"{v:.6g}" if isinstance(v, float) else v for k, v in final.items()},
    }
    name = model_name(info["dataset"], info["family"], info["label"])
    report = None
    if gate_report is not None:
        report = read_report(gate_report)
        if not report["passed"]:
            failed = [row["gate"] for row in report["gates"] if not row["passed"]]
            return {"registered_model": None, "model_name": name, "gate": "failed", "failed_gates": failed,
                    "run_id": info["run_id"], "report": str(Path(gate_report) / "gate_report.md")}
        tags.update(gate_tags(report))
    version = register_generator(info["run_id"], out / GENERATOR_DIR, name, tags, alias=alias)
    train_params = {k: v for k, v in run.data.params.items() if k.startswith("train.")}
    write_model_card(name, version, build_model_card(name, version, info, tags, out / GENERATOR_DIR, report,
                                                     train_params))
    # the trained folder stays as training wrote it (it is a DVC output); the caller records the version
    return {"registered_model": name, "version": version, "alias": alias, "model_uri": f"models:/{name}/{version}",
            "gate": tags.get("gate", "not evaluated")}
