"""The platform's steps as plain functions: the CLI, `dvc repro` and pipeline components all call these."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from sonogen.config import config_from_dict
from sonogen.evaluation import (
    evaluate_generator, find_encoder, gate_tags, read_report, record_in_mlflow, train_encoder,
)
from sonogen.gates import EvaluateConfig, check_gates, gates_for, variant_of
from sonogen.generators import families, get_generator, load_generator
from sonogen.generators.base import CONFIG
from sonogen.generators.trainer import GENERATOR_DIR, TrainConfig, resolve_device, train
from sonogen.metrics.features import get_extractor
from sonogen.model_card import build_model_card
from sonogen.registry import load_registered_generator, model_name, register_generator, resolve_version, write_model_card
from sonogen.tracking import (
    RUN_INFO, MlflowTracker, RunRecord, configure_mlflow, dataset_identity, declined, git_commit, write_declined,
)

def family_sections(source: str | Path | dict | None, family: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``model`` and ``train`` settings of ``family`` in a YAML file (or its loaded content):
    ``train: {<family>: {model, train}}`` (params.yaml) or top-level ``model`` and ``train`` sections."""
    if source is None:
        return {}, {}
    loaded = source if isinstance(source, dict) else yaml.safe_load(Path(source).read_text()) or {}
    path = "params" if isinstance(source, dict) else source
    nested = loaded.get("train", {})
    if isinstance(nested, dict) and (family in nested or "families" in nested):  # params.yaml
        sections = nested.get(family) or {}
    else:  # a file of one family's settings
        sections = loaded
    if not isinstance(sections, dict):
        raise ValueError(f"{path}: train.{family} must be a mapping with 'model' and 'train'")
    unknown = sorted(set(sections) - {"model", "train"})
    if unknown:
        raise ValueError(f"{path}: unexpected sections {unknown} for {family}; expected 'model' and 'train'")
    return dict(sections.get("model") or {}), dict(sections.get("train") or {})


def model_settings(path: str | Path | dict | None, family: str, label: str,
                   model_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model settings of ``family`` for ``label``: the file's, with ``model_overrides`` (the command line's
    ``--set``) winning; what the family's ``prerequisites`` and ``declines`` read."""
    return {**family_sections(path, family)[0], **(model_overrides or {}), "label": label}


def load_family_config(path: str | Path | None, family: str, label: str,
                       model_overrides: dict[str, Any] | None = None) -> tuple[Any, TrainConfig]:
    """Model and training configs of ``family`` from a YAML file (see ``family_sections``); without a file, the
    family's defaults. ``model_overrides`` win over the file."""
    settings = model_settings(path, family, label, model_overrides)
    return (config_from_dict(get_generator(family).config_class, settings),
            config_from_dict(TrainConfig, family_sections(path, family)[1]))


def _flatten(prefix: str, values: dict) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


def _prerequisite(what: str, key: str, family: str, data: Path, label: str, out: Path,
                  config_path: str | Path | None, dataset: str, resume: bool,
                  log: Callable[[str], None] | None) -> Path:
    """Makes what ``family`` needs before training (its ``prerequisites``) inside ``out``: a lesion bank
    (``out/bank``, with params' ``lesion_bank`` settings) or a model of another family (``out/base``)."""
    say = log or (lambda message: None)
    if what == "lesion_bank":
        folder = out / "bank"
        if not (resume and folder.is_dir()):
            settings = {k: v for k, v in (read_params(config_path).get("lesion_bank") or {}).items()
                        if k in ("structure_size", "bandwidth")}
            say(f"{family} needs a lesion bank ({key}): building it from the {label} training boxes")
            build_lesion_bank(data, folder, label, "train", dataset=dataset, **settings)
        return folder
    folder = out / "base"
    if not (resume and (folder / GENERATOR_DIR / CONFIG).is_file()):
        say(f"{family} needs a {what} model ({key}): training it first (train.{what} settings)")
        train_generator(what, data, label, folder, config_path, dataset, register=False, log=log,
                        build_prerequisites=True)
    return folder / GENERATOR_DIR


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
    build_prerequisites: bool = False,
    skip_declined: bool = False,
) -> dict:
    """Trains one generator for one label with MLflow tracking; registers it unless ``register`` is False.
    ``progress`` wraps the epochs (a progress bar), ``log`` receives progress lines (see ``trainer.train``).

    What the family needs first (``Generator.prerequisites``) and is not given is made inside ``out``: a lesion
    bank always, a model to train on only with ``build_prerequisites`` (else it is an error). A label the family declines is an error, or with
    ``skip_declined`` a ``declined.json`` in ``out`` saying why (a DVC matrix of families × labels)."""
    import mlflow

    data, out = Path(data), Path(out)
    family_class = get_generator(family)
    settings = model_settings(config_path, family, label, model_overrides)
    dataset = dataset or data.name
    if reason := family_class.declines(settings):
        if not skip_declined:
            raise ValueError(f"{family} does not train on {label}: {reason}")
        write_declined(out, family, label, reason)
        return {"declined": reason, "family": family, "label": label}
    needed = family_class.prerequisites(settings)
    # a lesion bank is quick to build from the data; a model to train on is a run of its own, made when asked
    models = {key: what for key, what in needed.items() if what != "lesion_bank"}
    if models and not build_prerequisites:
        keys = ", ".join(f"{key} (a trained {what})" for key, what in models.items())
        raise ValueError(f"{family} needs {keys}: give it (--set KEY=FOLDER) or --build-prerequisites to train it "
                         f"first")
    for key, what in needed.items():
        settings[key] = str(_prerequisite(what, key, family, data, label, out, config_path, dataset, resume, log))
    model_config = config_from_dict(family_class.config_class, settings)
    train_config = config_from_dict(TrainConfig, family_sections(config_path, family)[1])
    tracking_uri = configure_mlflow()
    run_id = RunRecord.read(out).run_id if resume and (out / RUN_INFO).exists() else None
    mlflow.set_experiment(experiment or f"{dataset}-{family}")
    identity = dataset_identity(data, label)
    with mlflow.start_run(run_id=run_id, run_name=f"{family}-{label}") as run:
        if run_id is None:
            mlflow.log_params({
                **_flatten("model", asdict(model_config)), **_flatten("train", asdict(train_config)), **identity,
            })
            mlflow.set_tags({"family": family, "label": label, "dataset": dataset, "code_version": git_commit()})
        record = RunRecord(run.info.run_id, tracking_uri, family, label, dataset, str(data))
        record.write(out)
        torch.manual_seed(train_config.seed)  # the networks' initial weights repeat with the run
        generator = family_class(model_config)
        summary = train(generator, data, label, train_config, out, MlflowTracker(), resume=resume, progress=progress,
                        log=log)
        mlflow.log_artifact(str(out / "history.json"))
        record.final, record.feature_extractor = summary["final"], summary["feature_extractor"]
        record.images = list(generator.learned_images())
        record.name = generator_name(family, label, asdict(generator.config))
        record.write(out)
    info = asdict(record)
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


def generator_name(family: str, label: str, settings: dict[str, Any] | None = None) -> str:
    """``<family>-<label>`` and the family's ``name_suffix`` for these model settings (the training image's id
    for one model per image): the default training folder and the name of the gate report folder."""
    return f"{family}-{label}{get_generator(family).name_suffix({**(settings or {}), 'label': label})}"


def trained_name(folder: str | Path) -> str:
    """The ``generator_name`` of a trained folder."""
    record = RunRecord.read(folder)
    return record.name or generator_name(record.family, record.label)


def _check_run_is_tracked(folder: Path, record: RunRecord) -> None:
    """The results of a trained folder go to its training run: fail before any work when this store lacks it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = configure_mlflow()
    try:
        mlflow.MlflowClient().get_run(record.run_id)
    except MlflowException:
        raise ValueError(f"{folder} was trained in MLflow run {record.run_id} of {record.tracking_uri}, "
                         f"which the tracking store {uri} does not have: set MLFLOW_TRACKING_URI to the store it "
                         f"was trained with") from None


def _target(spec: str, device: torch.device) -> dict:
    """A trained folder (``models/dcgan-normal``) or a registry URI, as generator + where to record results."""
    folder = Path(spec)
    if (folder / RUN_INFO).is_file():
        record = RunRecord.read(folder)
        _check_run_is_tracked(folder, record)
        history = folder / "history.json"
        return {"generator": load_generator(folder / GENERATOR_DIR, device), "run_id": record.run_id,
                "version": None, "name": trained_name(folder),
                "history": json.loads(history.read_text()) if history.exists() else None}
    if not spec.startswith("models:/"):
        raise FileNotFoundError(f"{spec} is neither a trained folder (with {RUN_INFO}) nor a models:/ URI")
    name, version = resolve_version(spec)
    import mlflow

    run_id = mlflow.MlflowClient().get_model_version(name, version).run_id
    return {"generator": load_registered_generator(spec, device), "run_id": run_id, "version": (name, version),
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
    for spec in [spec for spec in targets if declined(spec)]:  # a DVC matrix's family × label it does not train
        if log:
            log(f"{Path(spec).name}: nothing to gate: {declined(spec)}")
    loaded = [_target(spec, device) for spec in targets if not declined(spec)]
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
                         and t["generator"].label != generator.label), None)
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
    if reason := declined(out):
        return {"registered_model": None, "declined": reason}
    record = RunRecord.read(out)
    configure_mlflow()
    try:
        run = mlflow.MlflowClient().get_run(record.run_id)
    except MlflowException as err:
        raise ValueError(f"the training run {record.run_id} of {out} is not in the tracking store: {err}") from err
    final = {k: v for k, v in record.final.items() if k in ("kmmd", "one_nn_acc", "epoch", "step")}
    tags = {
        "family": record.family,
        "label": record.label,
        "data_dvc_md5": run.data.params.get("data_dvc_md5", "unknown"),
        "data_manifest_sha256": run.data.params.get("data_manifest_sha256", "unknown"),
        "code_version": run.data.tags.get("code_version", "unknown"),
        "feature_extractor": record.feature_extractor,
        **({"training_images": ",".join(record.images)} if record.images else {}),
        **{f"metric.{k}": f"{v:.6g}" if isinstance(v, float) else v for k, v in final.items()},
    }
    name = model_name(record.dataset, record.family, record.label)
    report = None
    if gate_report is not None:
        report = read_report(gate_report)
        if not report["passed"]:
            failed = [row["gate"] for row in report["gates"] if not row["passed"]]
            return {"registered_model": None, "model_name": name, "gate": "failed", "failed_gates": failed,
                    "run_id": record.run_id, "report": str(Path(gate_report) / "gate_report.md")}
        tags.update(gate_tags(report))
    version = register_generator(record.run_id, out / GENERATOR_DIR, name, tags, alias=alias)
    train_params = {k: v for k, v in run.data.params.items() if k.startswith("train.")}
    write_model_card(name, version, build_model_card(name, version, asdict(record), tags, out / GENERATOR_DIR,
                                                     report, train_params))
    # the trained folder stays as training wrote it (it is a DVC output); the caller records the version
    return {"registered_model": name, "version": version, "alias": alias, "model_uri": f"models:/{name}/{version}",
            "gate": tags.get("gate", "not evaluated")}
