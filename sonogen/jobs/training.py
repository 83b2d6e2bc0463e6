"""The training steps: a family's settings from params.yaml and --set, what it needs first, training with MLflow
tracking, and registering what was trained."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from sonogen.config import config_from_dict
from sonogen.evaluation import gate_tags, read_report
from sonogen.generators import distributed, get_generator
from sonogen.generators.base import CONFIG
from sonogen.generators.trainer import GENERATOR_DIR, TrainConfig, train
from sonogen.jobs.data import build_lesion_bank, read_params
from sonogen.data.licences import commercial_use_of
from sonogen.model_card import build_model_card, training_licences
from sonogen.registry import model_name, register_generator, write_model_card
from sonogen.tracking import (
    RUN_INFO, MlflowTracker, RunRecord, configure_mlflow, dataset_identity, declined, git_commit, set_experiment,
    use_experiment_of, write_declined,
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


def dvc_experiment() -> dict[str, str]:
    """The DVC experiment this runs in (``dvc exp run`` sets these variables for its stages), as MLflow tags, so
    that ``dvc exp show`` and the MLflow run name each other; nothing outside an experiment."""
    import os

    names = {"DVC_EXP_NAME": "dvc.experiment", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}
    return {tag: os.environ[variable] for variable, tag in names.items() if os.environ.get(variable)}


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
        if not (resume and folder.is_dir()) and distributed.current().main:  # one rank builds, the others wait
            settings = {k: v for k, v in (read_params(config_path).get("lesion_bank") or {}).items()
                        if k in ("structure_size", "bandwidth")}
            say(f"{family} needs a lesion bank ({key}): building it from the {label} training boxes")
            build_lesion_bank(data, folder, label, "train", dataset=dataset, **settings)
        distributed.barrier()
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
    parent_run_id: str | None = None,
    monitor: str | None = None,
) -> dict:
    """Trains one generator for one label with MLflow tracking; registers it unless ``register`` is False.
    ``progress`` wraps the epochs (a progress bar), ``log`` receives progress lines (see ``trainer.train``).

    What the family needs first (``Generator.prerequisites``) and is not given is made inside ``out``: a lesion
    bank always, a model to train on only with ``build_prerequisites`` (else it is an error). A label the family declines is an error, or with
    ``skip_declined`` a ``declined.json`` in ``out`` saying why (a DVC matrix of families × labels). With
    ``parent_run_id`` the MLflow run is that run's child (a cross-validation fold).

    Under torchrun every rank calls this; rank 0 alone tracks, writes and registers (the others return their
    rank)."""
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
    train_config = config_from_dict(TrainConfig, family_sections(config_path, family)[1])
    ranks = distributed.start(train_config.collective_timeout_s)
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
    if not ranks.main:
        torch.manual_seed(train_config.seed)
        train(family_class(model_config), data, label, train_config, out, resume=resume)
        return {"rank": ranks.rank, "family": family, "label": label}
    tracking_uri = configure_mlflow()
    run_id = RunRecord.read(out).run_id if resume and (out / RUN_INFO).exists() else None
    if run_id:  # a resumed run continues in its own experiment
        use_experiment_of(run_id)
    else:
        set_experiment(experiment or f"{dataset}-{family}")
    identity = dataset_identity(data, label)
    with mlflow.start_run(run_id=run_id, run_name=f"{family}-{label}",
                          parent_run_id=None if run_id else parent_run_id) as run:
        if run_id is None:
            mlflow.log_params({
                **_flatten("model", asdict(model_config)), **_flatten("train", asdict(train_config)), **identity,
                "train.ranks": ranks.world, "train.per_rank_batch": train_config.batch_size // ranks.world,
            })
            mlflow.set_tags({"family": family, "label": label, "dataset": dataset, "code_version": git_commit(),
                             **dvc_experiment()})
        record = RunRecord(run.info.run_id, tracking_uri, family, label, dataset, str(data))
        record.write(out)
        torch.manual_seed(train_config.seed)  # the networks' initial weights repeat with the run
        generator = family_class(model_config)
        keeps = generator.keeps_best_epoch if train_config.keep_best is None else train_config.keep_best
        summary = train(generator, data, label, train_config, out, MlflowTracker(), resume=resume, progress=progress,
                        log=log, monitor=training_monitor(data, dataset, label, monitor) if keeps else None)
        mlflow.log_artifact(str(out / "history.json"))
        record.final, record.feature_extractor = summary["final"], summary["feature_extractor"]
        record.images = list(generator.learned_images())
        if summary["best_epoch"]:
            record.best = summary["best_epoch"]
            mlflow.set_tags({"best_epoch": record.best["epoch"], "best_epoch.reason": record.best["reason"]})
        record.name = generator_name(family, label, asdict(generator.config))
        record.write(out)
    info = asdict(record)
    if register:
        info.update(register_trained(out))
    return info


def load_config_labels(out: Path) -> list[str]:
    """The labels a trained generator learned (a multi-label model's config names them), else none."""
    import json

    path = out / GENERATOR_DIR / CONFIG
    return list(json.loads(path.read_text())["config"].get("labels") or []) if path.is_file() else []


def training_monitor(data: Path, dataset: str, label: str, spec: str | None):
    """The feature space a GAN's epochs are read in: ``spec``, else the dataset's us-encoder when one is registered
    for this very manifest, else downsampled pixels (the trainer's default)."""
    from sonogen.evaluation import find_encoder
    from sonogen.generators.best_epoch import Monitor
    from sonogen.metrics.classifier import predict_proba
    from sonogen.metrics.features import get_extractor

    if spec is None:
        found = find_encoder(data, dataset)
        if found is None:
            return None
        spec = f"us-encoder:{found}"
    extractor = get_extractor(spec)
    classifier = extractor.classifier
    confidence = None
    if classifier is not None and label in classifier.config.classes:
        index = classifier.config.classes.index(label)
        confidence = lambda images: predict_proba(classifier, images)[:, index]  # noqa: E731
    return Monitor(extractor.id, extractor, confidence)


def generator_name(family: str, label: str, settings: dict[str, Any] | None = None) -> str:
    """``<family>-<label>`` and the family's ``name_suffix`` for these model settings (the training image's id
    for one model per image): the default training folder and the name of the gate report folder."""
    return f"{family}-{label}{get_generator(family).name_suffix({**(settings or {}), 'label': label})}"


def trained_name(folder: str | Path) -> str:
    """The ``generator_name`` of a trained folder."""
    record = RunRecord.read(folder)
    return record.name or generator_name(record.family, record.label)


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
        **({"best_epoch": str(record.best["epoch"]), "best_epoch.reason": record.best["reason"]} if record.best
           else {}),
        **{f"metric.{k}": f"{v:.6g}" if isinstance(v, float) else v for k, v in final.items()},
    }
    counts = training_licences(Path(record.data), list(load_config_labels(out) or [record.label]))
    tags["commercial_use"], tags["commercial_use.reason"] = (commercial_use_of(counts) if counts is not None else
                                                             ("unknown", "the training manifest was not available"))
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
