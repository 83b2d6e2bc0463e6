"""The training pipeline: prepare → us-encoder → for each (family, label): train → evaluate → if passed: register.

A (family, label) whose params ask for more than one GPU (``train.<family>.train.nodes`` × ``gpus_per_node``) is
in ``trainer_runs``: its train task submits a Kubeflow Trainer TrainJob of that size instead of training in its pod.
A family that pools models trained apart (``Generator.pools``: the pooled SinDDM) is in ``pool_runs``: a task per
member image (a ParallelFor over the images the pool chooses), then one task joins them into the model gated.

What a family needs before training (a lesion bank, a model it builds on: ``Generator.prerequisites``) is made by
its train task; the (family, label) runs a family declines (``Generator.declines``) are left out of the list.

The same definition runs on a Kubeflow cluster (GPU training tasks, credentials from Kubernetes) and on a laptop
through ``kfp.local`` with no cluster. Its arguments come from ``params.yaml``, so ``dvc repro`` and a pipeline
run of the same parameters call the same ``sonogen`` functions with the same settings.
"""

import itertools
import os
from pathlib import Path

import yaml
from kfp import compiler, dsl, kubernetes

from components.evaluate_gates import evaluate_gates
from components.pool_members import pool_members
from components.pool_trained_members import pool_trained_members
from components.prepare_data import prepare_data
from components.register_model import register_model
from components.train_encoder import train_encoder
from components import IMAGE
from components.train_generator import train_generator
from components.train_on_trainer import train_on_trainer
from components.train_pool_member import train_pool_member

PIPELINE_NAME = "sonogen-training"
# cluster wiring (infra/base): object-store credentials from a Secret, service endpoints from a ConfigMap
S3_SECRET, S3_SECRET_KEYS = "sonogen-s3", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
ENV_CONFIG_MAP, ENV_KEYS = "sonogen-env", ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def _cluster_environment(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env={k: k for k in S3_SECRET_KEYS})
    kubernetes.use_config_map_as_env(task, config_map_name=ENV_CONFIG_MAP, config_map_key_to_env={k: k for k in ENV_KEYS})
    return task


def _on_gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """One GPU: for training, and for the gates, which sample and train classifiers, detectors and segmenters."""
    return task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)


def _gpu_training(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return _cluster_environment(_on_gpu(task).set_cpu_request("4").set_memory_request("16G").set_retry(2))


def prepared_and_encoder(params, raw, dvc_repo, dvc_rev, dataset_name) -> tuple[dsl.PipelineTask, dsl.PipelineTask]:
    """The tasks every pipeline starts with: the prepared dataset and the us-encoder trained on it."""
    prepared = _cluster_environment(
        prepare_data(params=params, raw=raw, dvc_repo=dvc_repo, dvc_rev=dvc_rev)
    ).set_cpu_request("2").set_memory_request("8G")
    encoder = _cluster_environment(_on_gpu(
        train_encoder(prepared=prepared.outputs["prepared"], params=params, dataset_name=dataset_name)
    )).set_cpu_request("4").set_memory_request("8G")
    return prepared, encoder


def gate(prepared: dsl.PipelineTask, trained: dsl.PipelineTask, encoder: dsl.PipelineTask, params,
         **crossval) -> dsl.PipelineTask:
    return _cluster_environment(_on_gpu(evaluate_gates(
        prepared=prepared.outputs["prepared"], model=trained.outputs["model"], encoder=encoder.outputs["encoder"],
        params=params, **crossval,
    ))).set_cpu_request("4").set_memory_request("8G")


def _register_if_passed(trained: dsl.PipelineTask, gated: dsl.PipelineTask, params) -> None:
    with dsl.If(gated.outputs["Output"] == True, name="gates-passed"):  # noqa: E712  (a KFP condition)
        _cluster_environment(
            register_model(model=trained.outputs["model"], report=gated.outputs["report"], params=params)
        ).set_caching_options(False)  # registering twice must make a new version, never be skipped


def pool_trained_apart(data, encoder, family, label, params, dataset_name) -> dsl.PipelineTask:
    """A pooled family's members trained on ``data`` as tasks of their own (a ParallelFor over the images the pool
    chooses, one GPU each on a cluster), then joined into the model gated: the task whose ``model`` it is."""
    sources = _cluster_environment(pool_members(
        prepared=data, family=family, label=label, params=params,
    )).set_cpu_request("1").set_memory_request("2G")
    # each member item names its family and label: kfp.local (2.17) reads an outer loop's item inside an inner
    # loop as the inner one's
    with dsl.ParallelFor(items=sources.output, name="member") as member_of:
        member = _gpu_training(train_pool_member(
            prepared=data, encoder=encoder, family=member_of.family, label=member_of.label, source=member_of.source,
            params=params, dataset_name=dataset_name,
        ))
    return _cluster_environment(pool_trained_members(
        prepared=data, members=dsl.Collected(member.outputs["model"]), family=family, label=label, params=params,
    )).set_cpu_request("1").set_memory_request("4G")


@dsl.pipeline(name=PIPELINE_NAME, description="Train, gate and register ultrasound image generators.")
def training_pipeline(
    params: str,
    runs: list = [{"family": "dcgan", "label": "consolidation"}, {"family": "dcgan", "label": "normal"}],  # noqa: B006
    trainer_runs: list = [],  # noqa: B006  ({family, label, nodes, gpus_per_node}: trained as TrainJobs)
    pool_runs: list = [],  # noqa: B006  ({family, label} of pooled families: a task per member)
    raw: str = "phantom",
    dvc_repo: str = "",
    dvc_rev: str = "",
    dataset_name: str = "lus",
):
    """``params`` is the text of a params.yaml: KFP passes dict parameters as protobuf Structs, which turn every
    integer into a float, so the sections travel as YAML and each step reads them as ``dvc repro`` does."""
    prepared, encoder = prepared_and_encoder(params, raw, dvc_repo, dvc_rev, dataset_name)
    with dsl.ParallelFor(items=runs, name="family-label") as run:
        trained = _gpu_training(train_generator(
            prepared=prepared.outputs["prepared"], encoder=encoder.outputs["encoder"], family=run.family,
            label=run.label, params=params,
            dataset_name=dataset_name,
        ))
        _register_if_passed(trained, gate(prepared, trained, encoder, params), params)
    with dsl.ParallelFor(items=trainer_runs, name="family-label-on-trainer") as run:
        # a small pod that submits and follows the TrainJob; the GPUs are the job's
        trained = _cluster_environment(train_on_trainer(
            prepared=prepared.outputs["prepared"], encoder=encoder.outputs["encoder"], family=run.family,
            label=run.label, params=params, nodes=run.nodes, gpus_per_node=run.gpus_per_node, image=IMAGE,
            dataset_name=dataset_name,
        )).set_cpu_request("1").set_memory_request("2G")
        _register_if_passed(trained, gate(prepared, trained, encoder, params), params)
    with dsl.ParallelFor(items=pool_runs, name="pooled-family-label") as run:
        pooled = pool_trained_apart(prepared.outputs["prepared"], encoder.outputs["encoder"], run.family, run.label,
                                    params, dataset_name)
        _register_if_passed(pooled, gate(prepared, pooled, encoder, params), params)


def arguments_from_params(params_text: str) -> dict:
    """Pipeline arguments from the text of params.yaml (the same parameters ``dvc repro`` uses)."""
    from sonogen.generators import get_generator
    from sonogen.generators.trainer import TrainConfig
    from sonogen.jobs import family_sections, model_settings

    params = yaml.safe_load(params_text) or {}
    dataset = params.get("dataset") or {}
    train = params.get("train") or {}
    raw = dataset.get("raw", "data/raw/phantom")
    runs, trainer_runs, pool_runs = [], [], []
    for family, label in itertools.product(train.get("families", []), train.get("labels", [])):
        if get_generator(family).declines(model_settings(params, family, label)):
            continue
        settings = family_sections(params, family)[1]
        nodes = int(settings.get("nodes", TrainConfig.nodes))
        gpus_per_node = int(settings.get("gpus_per_node", TrainConfig.gpus_per_node))
        if get_generator(family).pools is not None:
            if nodes * gpus_per_node > 1:
                raise ValueError(f"train.{family}.train asks for {nodes} × {gpus_per_node} GPUs, and the pipeline "
                                 f"trains each {family} member as a task of one GPU: remove nodes and gpus_per_node")
            pool_runs.append({"family": family, "label": label})
        elif nodes * gpus_per_node > 1:
            trainer_runs.append({"family": family, "label": label, "nodes": nodes, "gpus_per_node": gpus_per_node})
        else:
            runs.append({"family": family, "label": label})
    return {
        "params": params_text,
        "runs": runs,
        "trainer_runs": trainer_runs,
        "pool_runs": pool_runs,
        # the DVC phantom stage's output is simulated inside the pipeline from the same parameters
        "raw": "phantom" if raw == "data/raw/phantom" else raw,
        "dataset_name": dataset.get("name", "lus"),
    }


def compile_pipeline(package_path: str | Path, params_text: str | None = None) -> Path:
    """The pipeline as KFP IR YAML; with ``params_text`` (a params.yaml) its runs, raw data and dataset name become
    the defaults, so an uploaded pipeline runs those families and labels unless told otherwise. (The params text
    itself stays a required argument: KFP writes defaults into the file's header comment line by line, and a
    multi-line default breaks the YAML.)"""
    defaults = None
    if params_text is not None:
        defaults = {k: v for k, v in arguments_from_params(params_text).items() if k != "params"}
    compiler.Compiler().compile(training_pipeline, str(package_path), pipeline_parameters=defaults)
    return Path(package_path)


def run_local(arguments: dict, pipeline_root: str | Path) -> None:
    """Runs the pipeline here with ``kfp.local``: each task a subprocess of this interpreter, no cluster."""
    from kfp import local

    from sonogen.tracking import embedded_uri

    os.environ.setdefault("MLFLOW_TRACKING_URI", embedded_uri())  # the tasks' store: the embedded one here
    # kfp.local runs the ParallelFor iterations at the same time: each gets its share of the cores, or their
    # torch thread pools oversubscribe the machine (measured 1.66× the time of the sequential dvc repro)
    parallel = max(1, len(arguments.get("runs") or []))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    training_pipeline(**arguments)
