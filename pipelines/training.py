"""The training pipeline: prepare → us-encoder → for each (family, label): train → evaluate → if passed: register;
with DiffUltra: lesion bank → its base ldm → diffultra on both → evaluate → if passed: register.

The same definition runs on a Kubeflow cluster (GPU training tasks, credentials from Kubernetes) and on a laptop
through ``kfp.local`` with no cluster. Its arguments come from ``params.yaml``, so ``dvc repro`` and a pipeline
run of the same parameters call the same ``sonogen`` functions with the same settings.
"""

import itertools
import os
from pathlib import Path

import yaml
from kfp import compiler, dsl, kubernetes

from components.build_lesion_bank import build_lesion_bank
from components.evaluate_gates import evaluate_gates
from components.prepare_data import prepare_data
from components.register_model import register_model
from components.train_encoder import train_encoder
from components.train_generator import train_generator

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


def _register_if_passed(trained: dsl.PipelineTask, gated: dsl.PipelineTask) -> None:
    with dsl.If(gated.outputs["Output"] == True, name="gates-passed"):  # noqa: E712  (a KFP condition)
        _cluster_environment(
            register_model(model=trained.outputs["model"], report=gated.outputs["report"])
        ).set_caching_options(False)  # registering twice must make a new version, never be skipped


@dsl.pipeline(name=PIPELINE_NAME, description="Train, gate and register ultrasound image generators.")
def training_pipeline(
    params: str,
    runs: list = [{"family": "dcgan", "label": "consolidation"}, {"family": "dcgan", "label": "normal"}],  # noqa: B006
    raw: str = "phantom",
    dvc_repo: str = "",
    dvc_rev: str = "",
    dataset_name: str = "lus",
    diffultra_label: str = "",
):
    """``params`` is the text of a params.yaml: KFP passes dict parameters as protobuf Structs, which turn every
    integer into a float, so the sections travel as YAML and each step reads them as ``dvc repro`` does.
    ``diffultra_label`` (empty: none) trains DiffUltra for that lesion label on an ldm of the same data."""
    prepared = _cluster_environment(
        prepare_data(params=params, raw=raw, dvc_repo=dvc_repo, dvc_rev=dvc_rev)
    ).set_cpu_request("2").set_memory_request("8G")
    encoder = _cluster_environment(_on_gpu(
        train_encoder(prepared=prepared.outputs["prepared"], params=params, dataset_name=dataset_name)
    )).set_cpu_request("4").set_memory_request("8G")
    with dsl.ParallelFor(items=runs, name="family-label") as run:
        trained = _gpu_training(train_generator(
            prepared=prepared.outputs["prepared"], family=run.family, label=run.label, params=params,
            dataset_name=dataset_name,
        ))
        gated = _cluster_environment(_on_gpu(evaluate_gates(
            prepared=prepared.outputs["prepared"], model=trained.outputs["model"], encoder=encoder.outputs["encoder"],
            params=params,
        ))).set_cpu_request("4").set_memory_request("8G")
        _register_if_passed(trained, gated)
    with dsl.If(diffultra_label != "", name="diffultra"):
        bank = _cluster_environment(build_lesion_bank(
            prepared=prepared.outputs["prepared"], params=params, dataset_name=dataset_name,
        )).set_cpu_request("2").set_memory_request("4G")
        anatomy = _gpu_training(train_generator(
            prepared=prepared.outputs["prepared"], family="ldm", label=diffultra_label, params=params,
            dataset_name=dataset_name,
        ))
        lesions = _gpu_training(train_generator(
            prepared=prepared.outputs["prepared"], family="diffultra", label=diffultra_label, params=params,
            dataset_name=dataset_name, base=anatomy.outputs["model"], bank=bank.outputs["bank"],
        ))
        gated = _cluster_environment(_on_gpu(evaluate_gates(
            prepared=prepared.outputs["prepared"], model=lesions.outputs["model"], encoder=encoder.outputs["encoder"],
            params=params,
        ))).set_cpu_request("4").set_memory_request("8G")
        _register_if_passed(lesions, gated)


def arguments_from_params(params_text: str) -> dict:
    """Pipeline arguments from the text of params.yaml (the same parameters ``dvc repro`` uses)."""
    params = yaml.safe_load(params_text) or {}
    dataset = params.get("dataset") or {}
    train = params.get("train") or {}
    raw = dataset.get("raw", "data/raw/phantom")
    families, lesion_families = train.get("families", []), train.get("lesion_families") or []
    if "diffultra" in families:
        raise ValueError("train.families: diffultra trains once, on lesion_bank.label; list it in "
                         "train.lesion_families")
    if set(lesion_families) - {"diffultra"}:
        raise ValueError(f"train.lesion_families: only diffultra trains on the lesion bank, got {lesion_families}")
    return {
        "params": params_text,
        "runs": [{"family": f, "label": lb} for f, lb in itertools.product(families, train.get("labels", []))],
        # diffultra trains once, for the lesion bank's label, on its own branch
        "diffultra_label": ((params.get("lesion_bank") or {}).get("label", "consolidation")
                            if lesion_families else ""),
        # the DVC phantom stage's output is simulated inside the pipeline from the same parameters
        "raw": "phantom" if raw == "data/raw/phantom" else raw,
        "dataset_name": dataset.get("name", "lus"),
    }


def compile_pipeline(package_path: str | Path) -> Path:
    compiler.Compiler().compile(training_pipeline, str(package_path))
    return Path(package_path)


def run_local(arguments: dict, pipeline_root: str | Path) -> None:
    """Runs the pipeline here with ``kfp.local``: each task a subprocess of this interpreter, no cluster."""
    from kfp import local

    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    # kfp.local runs the ParallelFor iterations at the same time: each gets its share of the cores, or their
    # torch thread pools oversubscribe the machine (measured 1.66× the time of the sequential dvc repro)
    parallel = max(1, len(arguments.get("runs") or []))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    training_pipeline(**arguments)
