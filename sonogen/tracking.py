"""MLflow tracking: where runs go, and what each run records about its data and code.

Embedded default: ``sqlite:///mlflow.db`` and artifacts under ``mlruns/`` in the working directory, or in the DVC
repository a stage runs for (a queued ``dvc exp run`` works in a temporary copy, whose store would vanish with it).
Any other store (an MLflow server with Postgres + S3) is chosen with ``MLFLOW_TRACKING_URI`` as usual.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import yaml

from sonogen.data.manifest import MANIFEST, file_sha256, read_manifest

DEFAULT_DB = "mlflow.db"
RUN_INFO = "run.json"
DECLINED = "declined.json"


@dataclass
class RunRecord:
    """``run.json`` of a trained folder: the MLflow run (and store) that trained it, and what it trained."""

    run_id: str
    tracking_uri: str
    family: str
    label: str
    dataset: str
    data: str
    name: str = ""  # <family>-<label>, with the family's suffix: the report folder and default training folder
    images: list[str] = field(default_factory=list)  # the images a single- or few-image model learned
    final: dict = field(default_factory=dict)  # the last epoch's losses and quality readings
    feature_extractor: str = ""
    best: dict = field(default_factory=dict)  # the kept epoch of a family that keeps its best (best_epoch.py)

    @classmethod
    def read(cls, folder: str | Path) -> RunRecord:
        path = Path(folder) / RUN_INFO
        if (Path(folder) / DECLINED).is_file():
            reason = json.loads((Path(folder) / DECLINED).read_text())["reason"]
            raise ValueError(f"{folder} holds no generator: {reason}")
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: train a generator into {folder} first")
        values = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})  # (older files carry fields since dropped)

    def write(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / RUN_INFO).write_text(json.dumps(asdict(self), indent=2) + "\n")


def declined(folder: str | Path) -> str | None:
    """Why nothing was trained into ``folder`` (a family that declines a label of a DVC matrix), if so."""
    path = Path(folder) / DECLINED
    return json.loads(path.read_text())["reason"] if path.is_file() else None


def write_declined(folder: str | Path, family: str, label: str, reason: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / DECLINED).write_text(json.dumps({"family": family, "label": label, "reason": reason},
                                                    indent=2) + "\n")


def configure_mlflow() -> str:
    """Points mlflow at ``MLFLOW_TRACKING_URI`` or the embedded SQLite store; returns the URI."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def embedded_uri() -> str:
    """The embedded store's URI: ``mlflow.db`` in ``store_root()``."""
    return f"sqlite:///{store_root() / DEFAULT_DB}"


def store_root() -> Path:
    """The folder of the embedded store: the DVC repository's root while a stage runs (DVC sets ``DVC_ROOT`` to
    the repository that queued an experiment), else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def set_experiment(name: str):
    """``mlflow.set_experiment``; an experiment first made from a temporary DVC workspace keeps its artifacts
    under the repository's ``mlruns/`` (MLflow's default is the working directory's)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    embedded = mlflow.get_tracking_uri() == embedded_uri()
    if embedded and store_root() != Path.cwd().resolve() and mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=str(store_root() / "mlruns" / name))
        except MlflowException:  # made meanwhile by a parallel run
            pass
    return mlflow.set_experiment(name)


def use_experiment_of(run_id: str) -> None:
    """Makes the experiment of ``run_id`` the active one, so that ``mlflow.start_run(run_id=...)`` continues it
    whichever experiment this process (a training, an encoder, an earlier registration) set before."""
    import mlflow

    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)


class MlflowTracker:
    """Logs metrics and images to the active MLflow run."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=step)

    def log_image(self, image: np.ndarray, path: str) -> None:
        import mlflow

        mlflow.log_image(image, artifact_file=path)


def local_folder(uri: str, what: str) -> Path:
    """A local folder for a path or an object-store URI (``s3://...``, downloaded through MLflow's artifact
    stores); ``what`` names it in the error."""
    if "://" not in uri:
        if not Path(uri).is_dir():
            raise FileNotFoundError(f"{what} {uri} is not a folder")
        return Path(uri)
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def local_file(uri: str, what: str) -> Path:
    """A local file for a path or an object-store URI (downloaded as ``local_folder``)."""
    if "://" not in uri:
        if not Path(uri).is_file():
            raise FileNotFoundError(f"{what} {uri} is not a file")
        return Path(uri)
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def upload_folder(folder: str | Path, uri: str) -> None:
    """Copies ``folder``'s content to ``uri`` (``s3://…`` or a local folder) through MLflow's artifact stores."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    get_artifact_repository(uri).log_artifacts(str(folder))


class NotRegistered(ValueError):
    """A registered model, version or alias that does not exist (yet)."""


def resolve_version(model_uri: str) -> tuple[str, str]:
    """``(name, version)`` of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    path = model_uri.removeprefix("models:/")
    if path == model_uri or not path:
        raise ValueError(f"{model_uri!r} is not a models:/NAME@ALIAS or models:/NAME/VERSION URI")
    configure_mlflow()
    if "@" in path:
        name, alias = path.split("@", 1)
        try:
            return name, str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
        except MlflowException as err:
            raise NotRegistered(f"{model_uri} does not exist in {mlflow.get_tracking_uri()}") from err
    name, _, version = path.partition("/")
    if not version.isdigit():
        raise ValueError(f"{model_uri!r}: the version must be a number")
    return name, version


def _find_upwards(start: Path, name: str) -> Path | None:
    for folder in [start, *start.parents]:
        if (folder / name).exists():
            return folder / name
    return None


def dvc_hash(path: str | Path) -> str | None:
    """The DVC content hash recorded for ``path`` in the nearest ``dvc.lock``, if a stage produces it."""
    path = Path(path).resolve()
    lock = _find_upwards(path.parent, "dvc.lock")
    if lock is None:
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if (lock.parent / out["path"]).resolve() == path:
                return out.get("md5")
    return None


def dataset_identity(data: str | Path, label: str) -> dict[str, str | int]:
    records = read_manifest(data)
    return {
        "data_path": str(Path(data)),
        "data_dvc_md5": dvc_hash(data) or "untracked",
        "data_manifest_sha256": file_sha256(Path(data) / MANIFEST),
        "data_label": label,
        "data_train_images": sum(1 for r in records if r.split == "train" and r.label == label),
        "data_patients": len({r.patient_id for r in records}),
    }


def git_commit() -> str:
    """The commit of the code that runs, with ``-dirty`` when the working tree has changes; in the container
    image (no .git) the commit it was built from, ``SONOGEN_GIT_COMMIT``."""
    if os.environ.get("SONOGEN_GIT_COMMIT"):
        return os.environ["SONOGEN_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
