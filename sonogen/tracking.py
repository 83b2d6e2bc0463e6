"""MLflow tracking: where runs go, and what each run records about its data and code.

Embedded default: ``sqlite:///mlflow.db`` and artifacts under ``mlruns/`` in the working directory. Any other
store (an MLflow server with Postgres + S3) is chosen with ``MLFLOW_TRACKING_URI`` as usual.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import yaml

from sonogen.data.manifest import MANIFEST, file_sha256, read_manifest

DEFAULT_DB = "mlflow.db"


def configure_mlflow() -> str:
    """Points mlflow at ``MLFLOW_TRACKING_URI`` or the embedded SQLite store; returns the URI."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    mlflow.set_tracking_uri(uri)
    return uri


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
