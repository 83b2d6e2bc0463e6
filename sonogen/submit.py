"""Submit a compiled pipeline to a Kubeflow Pipelines endpoint with the standard ``kfp.Client``.

Each distinct package becomes a version of one named pipeline (its name carries the package's content hash, so
resubmitting the same code reuses the version and a code change adds one), the run is filed under an experiment,
and runs execute as the service account that ``infra/`` grants the pipeline's permissions to.
"""

from __future__ import annotations

import hashlib
import json
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

PIPELINE_NAME = "sonogen-training"
SERVICE_ACCOUNT = "sonogen-pipeline-runner"
FINISHED_OK = "SUCCEEDED"


def _display_name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _pipeline_version(client, package: Path, pipeline_name: str, namespace: str | None) -> tuple[str, str]:
    """(pipeline_id, version_id) of ``package``, uploading the pipeline or a new version of it when needed."""
    version_name = f"{version('sonogen')}-{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}"
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=pipeline_name, namespace=namespace,
                                             description="Train, gate and register ultrasound image generators.").pipeline_id
    existing = client.list_pipeline_versions(pipeline_id, filter=_display_name_filter(version_name)).pipeline_versions
    if existing:
        return pipeline_id, existing[0].pipeline_version_id
    uploaded = client.upload_pipeline_version(str(package), version_name, pipeline_id=pipeline_id)
    return pipeline_id, uploaded.pipeline_version_id


def submit_pipeline(
    package: Path,
    host: str,
    arguments: dict[str, Any],
    *,
    experiment: str = "sonogen",
    run_name: str | None = None,
    wait: bool = False,
    timeout_s: int = 7 * 24 * 3600,
    poll_s: float = 5,
    token: str | None = None,
    namespace: str | None = None,
    service_account: str = SERVICE_ACCOUNT,
    pipeline_name: str = PIPELINE_NAME,
) -> dict[str, str]:
    """Upload ``package`` (pipeline IR YAML) to ``host`` and start a run with ``arguments``.

    ``token`` is sent as a bearer token; without it the client uses its usual credentials (kube config,
    in-cluster service-account token). ``namespace`` is the Kubeflow profile of a multi-user install. With
    ``wait`` the call follows the run until it finishes and reports its final state.
    """
    import kfp
    import kfp_server_api
    import urllib3

    package = Path(package)
    try:
        client = kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")
        pipeline_id, version_id = _pipeline_version(client, package, pipeline_name, namespace)
        experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
        run = client.run_pipeline(
            experiment_id, run_name or f"{pipeline_name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
            params=arguments, pipeline_id=pipeline_id, version_id=version_id, service_account=service_account,
        )
        if wait:
            run = client.wait_for_run_completion(run.run_id, timeout=timeout_s, sleep_duration=poll_s)
    except kfp_server_api.ApiException as err:
        hint = " (pass --token or set KFP_TOKEN)" if err.status in (401, 403) else ""
        raise ConnectionError(f"Kubeflow Pipelines at {host} answered HTTP {err.status} {err.reason}{hint}: "
                              f"{(err.body or '').strip()[:500]}") from err
    except urllib3.exceptions.HTTPError as err:
        raise ConnectionError(f"cannot reach Kubeflow Pipelines at {host}: {err}") from err
    return {
        "run_id": run.run_id,
        "run_url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}",
        "pipeline_id": pipeline_id,
        "version_id": version_id,
        "experiment_id": experiment_id,
        "state": str(run.state or "PENDING"),
    }
