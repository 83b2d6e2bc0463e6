"""Training past one GPU on a cluster: the pipeline's train task submits a Kubeflow Trainer ``TrainJob`` (through the
Kubeflow SDK) that runs the same ``sonogen train`` under torchrun on ``nodes`` × ``gpus_per_node`` ranks, follows its
logs, waits for it, and fetches the model it uploaded. Data in and model out go through the object store the
pipeline's artifacts already live in: nothing assumes a shared filesystem.

The runtime (``infra/trainer``: image, torchrun, NCCL settings, shared memory, credentials) is named ``RUNTIME``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

RUNTIME = "sonogen-torch"  # infra/trainer/runtime.yaml
CPU_PER_GPU, MEMORY_PER_GPU_GI = 4, 16  # as the one-GPU train task asks (pipelines/training.py)
JOB_OUT = "/tmp/sonogen/train"  # inside each TrainJob pod; rank 0 uploads it


def trainjob_command(family: str, label: str, data_uri: str, params_uri: str, model_uri: str, dataset: str,
                     encoder_uri: str | None = None) -> list[str]:
    """The command of every TrainJob pod: ``sonogen train`` under torchrun, which reads its nodes, processes per
    node and rendezvous from the ``PET_*`` variables Kubeflow Trainer sets."""
    command = ["torchrun", "-m", "sonogen.cli", "--", "train", family, "--data", data_uri, "--label", label,
               "--config", params_uri, "--dataset", dataset, "--out", JOB_OUT, "--upload", model_uri,
               "--no-register", "--build-prerequisites"]
    return command + (["--monitor", f"us-encoder:{encoder_uri}"] if encoder_uri else [])


def trainjob_request(image: str, nodes: int, gpus_per_node: int, command: list[str], name: str | None = None,
                     labels: dict[str, str] | None = None) -> tuple[Any, list]:
    """The trainer and options ``TrainerClient.train`` takes, as the Kubeflow SDK's own types: ``nodes`` pods of
    ``gpus_per_node`` GPUs (with the CPUs and memory the one-GPU task has per GPU) running ``command``."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.options import Labels, Name, TrainerCommand

    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes and gpus_per_node must be at least 1, got {nodes} and {gpus_per_node}")
    # quantities as text: the SDK would write the integers as floats ("4.0")
    resources = {"nvidia.com/gpu": str(gpus_per_node), "cpu": str(CPU_PER_GPU * gpus_per_node),
                 "memory": f"{MEMORY_PER_GPU_GI * gpus_per_node}Gi"}
    trainer = CustomTrainerContainer(image=image, num_nodes=nodes, resources_per_node=resources)
    options: list = [TrainerCommand(command=command), Labels(labels={"app.kubernetes.io/part-of": "sonogen",
                                                                     **(labels or {})})]
    return trainer, options + ([Name(name=name)] if name else [])


def run_trainjob(client, trainer, options: list, log: Callable[[str], None], runtime: str = RUNTIME,
                 timeout_s: float = 7 * 24 * 3600, start_timeout_s: float = 3600, poll_s: float = 10) -> str:
    """Submits the TrainJob, prints its first node's log as it runs, waits for it and returns its name; a failed
    job raises (and is kept for ``kubectl describe``), a completed one is deleted."""
    name = client.train(runtime=runtime, trainer=trainer, options=options)
    log(f"submitted TrainJob {name} (runtime {runtime}): kubectl get trainjob {name}")
    job = client.wait_for_job_status(name, {"Running", "Complete", "Failed"}, timeout=start_timeout_s,
                                     polling_interval=poll_s)
    for line in client.get_job_logs(name, follow=job.status == "Running"):  # rank 0's node: progress, errors
        log(line.rstrip("\n"))
    if job.status == "Running":
        job = client.wait_for_job_status(name, {"Complete", "Failed"}, timeout=timeout_s, polling_interval=poll_s)
    if job.status == "Failed":
        raise RuntimeError(f"TrainJob {name} failed (its log is above); kept for inspection: "
                           f"kubectl describe trainjob {name}; kubectl logs -l jobset.sigs.k8s.io/jobset-name={name}")
    log(f"TrainJob {name} completed")
    client.delete_job(name)
    return name


def train_on_trainer(family: str, label: str, data_uri: str, params_text: str, model_dir: str | Path,
                     staging_uri: str, dataset: str, image: str, nodes: int, gpus_per_node: int,
                     encoder_uri: str | None = None, client=None, log: Callable[[str], None] = print,
                     poll_s: float = 10) -> dict:
    """Trains ``family`` on ``label`` as a TrainJob and copies the trained folder into ``model_dir``. The params
    travel to the pods, and the model back, through ``staging_uri`` (an ``s3://`` prefix the job may write)."""
    from sonogen.tracking import RunRecord, local_folder, upload_folder

    staging_uri = staging_uri.rstrip("/")
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "params.yaml").write_text(params_text)
        upload_folder(folder, f"{staging_uri}/config")
    command = trainjob_command(family, label, data_uri, f"{staging_uri}/config/params.yaml",
                               f"{staging_uri}/model", dataset, encoder_uri)
    trainer, options = trainjob_request(image, nodes, gpus_per_node, command,
                                        labels={"sonogen/family": family, "sonogen/label": label})
    if client is None:
        from kubeflow.trainer import KubernetesBackendConfig, TrainerClient

        client = TrainerClient(KubernetesBackendConfig())  # in the pod: its service account and namespace
    name = run_trainjob(client, trainer, options, log, poll_s=poll_s)
    shutil.copytree(local_folder(f"{staging_uri}/model", "the TrainJob's model"), model_dir, dirs_exist_ok=True)
    record = RunRecord.read(model_dir)
    return {"trainjob": name, "run_id": record.run_id, "final": record.final, "ranks": nodes * gpus_per_node}
