"""The MLflow Model Registry side: register generators, find and load them by alias, list them."""

from __future__ import annotations

from pathlib import Path

from sonogen.generators import Generator, load_generator
from sonogen.tracking import configure_mlflow

CANDIDATE = "candidate"
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


def load_sampler(model_uri: str, device: str = "cpu") -> Generator:
    """The generator behind ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``, or a runs:/ URI)."""
    import mlflow

    configure_mlflow()
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    candidates = sorted((folder / "artifacts").glob("*/config.json"))
    if not candidates:
        raise FileNotFoundError(f"{model_uri} holds no sonogen generator (no artifacts/*/config.json)")
    return load_generator(candidates[0].parent, device=device)


def resolve_version(model_uri: str) -> tuple[str, str]:
    """``(name, version)`` of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    import mlflow

    path = model_uri.removeprefix("models:/")
    if path == model_uri or not path:
        raise ValueError(f"{model_uri!r} is not a models:/NAME@ALIAS or models:/NAME/VERSION URI")
    configure_mlflow()
    if "@" in path:
        name, alias = path.split("@", 1)
        return name, str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    name, _, version = path.partition("/")
    if not version.isdigit():
        raise ValueError(f"{model_uri!r}: the version must be a number")
    return name, version


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
