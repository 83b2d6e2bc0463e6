"""The gating step: evaluate trained folders or registered versions against their family's gates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from sonogen.config import config_from_dict
from sonogen.evaluation import evaluate_generator, find_encoder, record_in_mlflow, train_encoder
from sonogen.gates import EvaluateConfig, check_gates, gates_for, variant_of
from sonogen.generators import families, get_generator, load_generator
from sonogen.generators.trainer import GENERATOR_DIR, resolve_device
from sonogen.jobs.dvc_outputs import METRICS, write_dvc_outputs, write_headlines
from sonogen.jobs.training import trained_name
from sonogen.metrics.features import get_extractor
from sonogen.registry import load_registered_generator, resolve_version
from sonogen.tracking import RUN_INFO, RunRecord, configure_mlflow, declined


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


def _crossval_of(folder: str | Path | None, name: str, generator) -> dict | None:
    """The cross-validation report for a target in ``folder``: the folder's own report, or ``folder/<name>``'s
    (a DVC stage's reports by ``<family>-<label>``); it must be of the target's family and label."""
    from sonogen.crossval import REPORT_JSON, read_report

    if folder is None:
        return None
    folder = Path(folder)
    where = folder if (folder / REPORT_JSON).is_file() else folder / name
    if not (where / REPORT_JSON).is_file():
        return None
    report = read_report(where)
    if (report.get("family"), report.get("label")) != (generator.family, generator.label):
        raise ValueError(f"{where} cross-validates {report.get('family')} on {report.get('label')}, not "
                         f"{generator.family} on {generator.label}")
    return report


def evaluate_targets(targets: list[str], data: str | Path, extractor_spec: str | None, params: dict,
                     out: str | Path, dataset: str | None = None,
                     log: Callable[[str], None] | None = None, crossval: str | Path | None = None) -> list[dict]:
    """Gates each target on ``data`` with the ``evaluate`` and ``gates`` sections of ``params``; generators of
    the same family and another label supply the synthetic negatives of the downstream experiment. Results go
    to ``out/<family>-<label>/`` (``out/<model>-v<version>/`` for registry URIs) and to MLflow; each step is
    announced to ``log``, named by its target. A target with a cross-validation report in ``crossval`` is gated
    on its pooled verdict."""
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
        crossval_report = _crossval_of(crossval, target["name"], generator)
        report = evaluate_generator(generator, data, extractor, gates_for(gates, generator.gate_set), config,
                                    report_dir, target["name"], negative, target["history"], announce,
                                    crossval_report)
        record_in_mlflow(report, report_dir, target["run_id"], target["version"])
        results.append({"target": target["name"], "report": str(report_dir), **report})
        write_dvc_outputs(report, target["name"], target["history"], crossval_report, Path(out))
    write_headlines(results, Path(out) / METRICS)
    return results
