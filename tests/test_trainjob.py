"""Training past one GPU on a cluster: the TrainJob a train task submits, built with the Kubeflow SDK's own types and
checked against the Trainer API models by a loopback stand-in of the Kubernetes API (tests/trainer_api.py), and a
train task that submits one, follows it and passes on the model its pods trained from and to S3."""

from __future__ import annotations

from importlib.metadata import version

import boto3
import mlflow
import pytest
import yaml
from kubeflow_trainer_api import models

from sonogen.generators import load_generator
from sonogen.jobs.trainjob import RUNTIME, run_trainjob, train_on_trainer, trainjob_command, trainjob_request
from trainer_api import TrainerApi

IMAGE = f"ghcr.io/sonogen/sonogen-train:{version('sonogen')}"


@pytest.fixture
def trainer_api(request):
    api = TrainerApi(**getattr(request, "param", {}))
    yield api
    api.close()


def two_nodes_of_four_gpus():
    command = trainjob_command("ldm", "consolidation", "s3://bucket/prepared", "s3://bucket/job/config/params.yaml",
                               "s3://bucket/job/model", "lus", "s3://bucket/encoder")
    return trainjob_request(IMAGE, nodes=2, gpus_per_node=4, command=command, labels={"sonogen/family": "ldm"})


@pytest.mark.parametrize("trainer_api", [{"log": ("finished epoch 1/2", "finished epoch 2/2")}], indirect=True)
def test_a_trainjob_of_two_nodes_of_four_gpus_is_what_the_trainer_api_expects(trainer_api):
    trainer, options = two_nodes_of_four_gpus()
    lines: list[str] = []
    name = run_trainjob(trainer_api.client(), trainer, options, lines.append, poll_s=0.05)
    assert trainer_api.invalid == [] and len(trainer_api.received) == 1
    job = models.TrainerV1alpha1TrainJob.from_dict(trainer_api.received[0])
    assert job.metadata.name == name and job.spec.runtime_ref.name == RUNTIME
    assert job.spec.runtime_ref.kind == "TrainingRuntime"  # read from the runtime the SDK found
    assert job.spec.trainer.num_nodes == 2 and job.spec.trainer.image == IMAGE
    limits = {key: value.actual_instance for key, value in job.spec.trainer.resources_per_node.limits.items()}
    assert limits == {"nvidia.com/gpu": "4", "cpu": "16", "memory": "64Gi"}
    command = job.spec.trainer.command
    assert command[:6] == ["torchrun", "-m", "sonogen.cli", "--", "train", "ldm"]
    assert "--nproc-per-node" not in command  # torchrun takes its size from Kubeflow Trainer's PET_* variables
    options = dict(zip(command[6::2], command[7::2]))
    assert options["--data"] == "s3://bucket/prepared" and options["--upload"] == "s3://bucket/job/model"
    assert options["--monitor"] == "us-encoder:s3://bucket/encoder"
    assert job.metadata.labels == {"app.kubernetes.io/part-of": "sonogen", "sonogen/family": "ldm"}
    # its log followed into the task's, then the completed job deleted
    assert lines[1:3] == ["finished epoch 1/2", "finished epoch 2/2"] and lines[-1].endswith("completed")
    assert trainer_api.jobs == {}


@pytest.mark.parametrize("trainer_api", [{"outcome": "Failed", "log": ("CUDA error: out of memory",)}],
                         indirect=True)
def test_a_failed_trainjob_fails_the_task_with_its_log_and_is_kept(trainer_api):
    lines: list[str] = []
    with pytest.raises(RuntimeError, match=r"TrainJob \S+ failed .*kubectl describe trainjob"):
        run_trainjob(trainer_api.client(), *two_nodes_of_four_gpus(), lines.append, poll_s=0.05)
    assert "CUDA error: out of memory" in lines and len(trainer_api.jobs) == 1


def test_the_sdk_reads_sonogens_runtime_as_a_torch_runtime(trainer_api):
    runtime = trainer_api.runtime
    assert models.TrainerV1alpha1TrainingRuntime.from_dict(runtime).to_dict() == runtime  # no unknown fields
    found = trainer_api.client().get_runtime(RUNTIME)
    assert found.name == RUNTIME and found.trainer.framework == "torch"
    container = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert container["containers"][0]["image"] == IMAGE  # the train image of this version


def test_sizes_other_than_whole_nodes_and_gpus_are_refused():
    with pytest.raises(ValueError, match="nodes and gpus_per_node must be at least 1"):
        trainjob_request(IMAGE, 0, 4, ["torchrun"])


@pytest.mark.parametrize("trainer_api", [{"outcome": "run", "processes": 2}], indirect=True)
def test_a_train_task_on_trainer_trains_from_s3_on_two_ranks_and_passes_the_model_on(
        trainer_api, lus, s3_server, aws_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    trainer_api.workdir = tmp_path
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="pipeline")
    for path in lus.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "pipeline", f"run/prepared/{path.relative_to(lus).as_posix()}")
    params = yaml.safe_dump({"train": {"dcgan": {
        "model": {"image_size": 32, "base_channels": 4},
        "train": {"epochs": 2, "batch_size": 4, "eval_samples": 4, "monitor_samples": 8, "nodes": 1,
                  "gpus_per_node": 2}}}})
    lines: list[str] = []
    info = train_on_trainer("dcgan", "consolidation", "s3://pipeline/run/prepared", params, tmp_path / "model",
                            "s3://pipeline/run/model-trainjob", "lus", IMAGE, nodes=1, gpus_per_node=2,
                            client=trainer_api.client(), log=lines.append, poll_s=0.2)
    assert trainer_api.invalid == [], trainer_api.invalid
    assert any("finished epoch 2/2" in line for line in lines), lines
    assert info["ranks"] == 2 and info["final"]["epoch"] == 2
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(info["run_id"])
    assert run.data.params["train.ranks"] == "2" and run.data.params["train.per_rank_batch"] == "2"
    model = load_generator(tmp_path / "model" / "generator")
    assert model.sample(2, seed=3).shape == (2, 1, 32, 32)
