"""The MLflow Model Registry side: register generators, find and load them by alias, list them, promote them
(with an audit trail in version tags) and roll promotions back."""

from __future__ import annotations

import getpass
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sonogen.tracking import (  # noqa: F401  (resolve_version re-exported)
    NotRegistered, configure_mlflow, resolve_version, use_experiment_of,
)

if TYPE_CHECKING:  # torch stays out of the serving image, which imports this module
    from sonogen.generators import Generator

CANDIDATE = "candidate"
CHAMPION = "champion"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# what the pyfunc wrapper needs at load time; pinned by the project's lock where it is installed
PIP_REQUIREMENTS = ["sonogen", "torch==2.13.0", "safetensors", "numpy"]


def model_name(dataset: str, family: str, label: str) -> str:
    return f"{dataset}-{family}-{label}"


def register_generator(
    run_id: str, generator_dir: str | Path, name: str, tags: dict[str, str], alias: str | None = CANDIDATE
) -> str:
    """Logs the saved generator as a pyfunc model of ``run_id``, registers it under ``name``; returns the version."""
    import mlflow

    configure_mlflow()
    client = mlflow.MlflowClient()
    use_experiment_of(run_id)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"generator": str(generator_dir)},
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


def load_registered_generator(model_uri: str, device: str = "cpu") -> Generator:
    """The generator behind ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``, or a runs:/ URI)."""
    import mlflow

    from sonogen.generators import load_generator

    configure_mlflow()
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    candidates = sorted((folder / "artifacts").glob("*/config.json"))
    if not candidates:
        raise FileNotFoundError(f"{model_uri} holds no sonogen generator (no artifacts/*/config.json)")
    return load_generator(candidates[0].parent, device=device)


def model_version(name: str, version: str):
    """MLflow's ``ModelVersion`` ``version`` of ``name``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    configure_mlflow()
    try:
        return mlflow.MlflowClient().get_model_version(name, str(version))
    except MlflowException as err:
        raise NotRegistered(f"{name} has no version {version} in {mlflow.get_tracking_uri()}") from err


def model_name_of(model_uri: str) -> str:
    """The registered name in ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; a folder's (or object
    prefix's) own name for a saved generator elsewhere."""
    if model_uri.startswith("models:/"):
        return model_uri.removeprefix("models:/").split("@")[0].split("/")[0]
    return Path(model_uri.rstrip("/")).name


def list_models() -> list[dict]:
    """One row per registered model version: name, version, aliases, gate and key metrics, run."""
    import mlflow

    configure_mlflow()
    client = mlflow.MlflowClient()
    rows = []
    for model in client.search_registered_models():
        aliases_of: dict[str, list[str]] = {}
        for alias, version in client.get_registered_model(model.name).aliases.items():
            aliases_of.setdefault(str(version), []).append(alias)
        for version in client.search_model_versions(f"name='{model.name}'"):
            rows.append({
                "name": model.name,
                "version": str(version.version),
                "aliases": sorted(aliases_of.get(str(version.version), [])),
                "tags": dict(version.tags),
                "run_id": version.run_id,
                "created": version.creation_timestamp,
            })
    return sorted(rows, key=lambda r: (r["name"], -int(r["version"])))


def write_model_card(name: str, version: str, card: str) -> None:
    """Stores the card as the version's description (shown in the MLflow UI) and as ``model_card/`` artifact
    of its run."""
    import mlflow

    client = mlflow.MlflowClient()
    client.update_model_version(name, version, description=card)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}-v{version}.md"
        path.write_text(card)
        client.log_artifact(model_version(name, version).run_id, str(path), "model_card")


def model_card(name: str, version: str | None = None, alias: str = CHAMPION) -> str:
    """The card of ``version`` (default: the version ``alias`` points at, else the latest)."""
    import mlflow

    configure_mlflow()
    client = mlflow.MlflowClient()
    if version is None:
        version = _holder(client, name, alias)
    if version is None:
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise ValueError(f"no registered model {name!r}")
        version = str(max(int(v.version) for v in versions))
    card = model_version(name, version).description
    return card or f"# {name} v{version}\n\nNo model card: this version was registered without one.\n"


def _holder(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _audit() -> dict[str, str]:
    """Who acts, and when (UTC)."""
    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        who = "unknown"
    return {"by": who, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def promote(name: str, version: str, to: str = CHAMPION, reason: str = "", force: bool = False) -> dict:
    """Points ``to`` at ``version``. A version whose gate tag is not ``passed``, or, for the champion, whose gates
    require an improvement its cross-validation did not find, or whose reader study's accuracy interval reaches past
    its gates' ``max_reader_accuracy_upper_ci``, needs ``force`` and a reason. The version records
    who promoted it, when, why, and which version held the alias before."""
    import mlflow

    configure_mlflow()
    client = mlflow.MlflowClient()
    tags = model_version(name, version).tags
    gate = tags.get("gate", "not evaluated")
    if gate != "passed" and not force:
        raise ValueError(f"{name} version {version} has gate {gate!r}; promoting it needs --force and a --reason")
    unproven = (to == CHAMPION and tags.get("gate.require_improvement") == "true"
                and tags.get("crossval.verdict") != "helps")
    if unproven and not force:
        found = (f"its cross-validation says {tags['crossval.verdict']!r}, "
                 f"{tags.get('crossval.metric', 'auc')} delta {tags.get('crossval.delta')} "
                 f"[{tags.get('crossval.ci_low')}, {tags.get('crossval.ci_high')}]"
                 if "crossval.verdict" in tags else "it has no cross-validation (sonogen crossval)")
        raise ValueError(f"{name} version {version}: its gates require a measured improvement "
                         f"(require_improvement) and {found}; promoting it needs --force and a --reason")
    limit, upper = tags.get("gate.max_reader_accuracy_upper_ci"), tags.get("reader_study.ci_high")
    spotted = limit is not None and upper is not None and float(upper) > float(limit)
    if spotted and not force:
        raise ValueError(f"{name} version {version}: its reader study's accuracy at spotting synthetic images "
                         f"reaches {upper} (95% interval), above max_reader_accuracy_upper_ci {limit}; promoting it "
                         "needs --force and a --reason")
    if force and not reason.strip():
        raise ValueError("--force needs a --reason: the audit trail must say why a gate was overridden")
    previous = _holder(client, name, to)
    if previous == str(version):  # promoting again would overwrite the audit trail (and its previous holder)
        raise ValueError(f"{name} version {version} is already @{to}; nothing to promote")
    client.set_registered_model_alias(name, to, str(version))
    overridden = gate != "passed" or unproven or spotted
    record = {**_audit(), "reason": reason, "previous_version": previous or "",
              "forced": str(bool(force and overridden)).lower()}
    for key, value in record.items():
        client.set_model_version_tag(name, str(version), f"{to}.{key}", value)
    return {"model_name": name, "version": str(version), "alias": to, "gate": gate, **record}


def rollback(name: str, alias: str = CHAMPION) -> dict:
    """Returns ``alias`` to the version that held it before the current holder was promoted."""
    import mlflow

    configure_mlflow()
    client = mlflow.MlflowClient()
    current = _holder(client, name, alias)
    if current is None:
        raise ValueError(f"{name} has no @{alias} to roll back")
    previous = client.get_model_version(name, current).tags.get(f"{alias}.previous_version", "")
    if not previous or previous == current:
        raise ValueError(f"{name}@{alias} (version {current}) has no previous holder to return to")
    client.set_registered_model_alias(name, alias, previous)
    record = {**_audit(), "from_version": current}
    for key, value in record.items():
        client.set_model_version_tag(name, previous, f"{alias}.restored_{key}", value)
    return {"model_name": name, "alias": alias, "version": previous, **record}
