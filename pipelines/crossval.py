"""The cross-validation pipeline ``sonogen-crossval``: prepare → a fold per task (a ParallelFor, one GPU each on a
cluster; each fold trains its own us-encoder) → the pooled verdict; beside it the us-encoder and the generator
trained on every training patient, the generator gated on that verdict and registered if it passes.

A family that pools models trained apart (``Generator.pools``) runs ``sonogen-crossval-pooled`` instead, where
no fold trains its members one after another: each fold's view of the data and us-encoder are a task, its members
a ParallelFor of one GPU each, their pool the model the fold tests; the model registered is pooled the same way.

The same steps as ``sonogen crossval`` and the DVC ``crossval`` stage (``sonogen.jobs.crossval``); the folds'
generator runs are MLflow runs of their own, which the pooled run names (a cluster has no parent run to nest
them under while they run).
"""

from pathlib import Path

import yaml
from kfp import compiler, dsl

from components.crossval_fold import crossval_fold
from components.crossval_fold_data import crossval_fold_data
from components.crossval_pool import crossval_pool
from components.crossval_pooled_fold import crossval_pooled_fold
from components.train_generator import train_generator
from pipelines.training import (_cluster_environment, _gpu_training, _register_if_passed, gate, pool_trained_apart,
                                prepared_and_encoder)

PIPELINE_NAME = "sonogen-crossval"
POOLED_PIPELINE_NAME = "sonogen-crossval-pooled"


def _verdict(prepared, folded, family, label, params, seed, dataset_name) -> dsl.PipelineTask:
    """The pooled verdict of the folds' results (``dsl.Collected`` over the fold loop)."""
    return _cluster_environment(crossval_pool(
        prepared=prepared.outputs["prepared"], results=dsl.Collected(folded.outputs["result"]), family=family,
        label=label, params=params, seed=seed, dataset_name=dataset_name,
    )).set_cpu_request("2").set_memory_request("4G")


def _fold(prepared, family, label, fold, fold_count, params, seed, dataset_name, pooled: bool) -> dsl.PipelineTask:
    """One fold's task whose ``result`` the verdict pools: the fold trains its generator itself, or (``pooled``)
    its view and us-encoder are a task, its members a ParallelFor of their own and their pool the model tested."""
    if not pooled:
        return _gpu_training(crossval_fold(
            prepared=prepared.outputs["prepared"], family=family, label=label, fold=fold, folds=fold_count,
            params=params, seed=seed, dataset_name=dataset_name,
        ))
    data = _gpu_training(crossval_fold_data(
        prepared=prepared.outputs["prepared"], fold=fold, folds=fold_count, params=params, seed=seed,
        dataset_name=dataset_name,
    ))
    pool = pool_trained_apart(data.outputs["view"], data.outputs["encoder"], family, label, params, dataset_name)
    return _gpu_training(crossval_pooled_fold(
        prepared=prepared.outputs["prepared"], model=pool.outputs["model"], encoder=data.outputs["encoder"],
        family=family, label=label, fold=fold, folds=fold_count, params=params, seed=seed, dataset_name=dataset_name,
    ))


def _crossval_pipeline(name: str, description: str, default_family: str, pooled: bool):
    """``sonogen-crossval``, or with ``pooled`` its pooled families' form (members trained as tasks)."""

    @dsl.pipeline(name=name, description=description)
    def pipeline(
        params: str,
        family: str = default_family,
        label: str = "consolidation",
        folds: list = [0, 1, 2, 3, 4],  # noqa: B006  (a KFP default: the fold indices)
        fold_count: int = 5,
        seed: int = 0,
        raw: str = "phantom",
        dvc_repo: str = "",
        dvc_rev: str = "",
        dataset_name: str = "lus",
    ):
        """``folds`` lists the fold indices (0 … ``fold_count`` − 1) the ParallelFor runs."""
        prepared, encoder = prepared_and_encoder(params, raw, dvc_repo, dvc_rev, dataset_name)
        with dsl.ParallelFor(items=folds, name="fold") as fold:
            folded = _fold(prepared, family, label, fold, fold_count, params, seed, dataset_name, pooled)
        verdict = _verdict(prepared, folded, family, label, params, seed, dataset_name)
        if pooled:
            trained = pool_trained_apart(prepared.outputs["prepared"], encoder.outputs["encoder"], family, label,
                                         params, dataset_name)
        else:
            trained = _gpu_training(train_generator(
                prepared=prepared.outputs["prepared"], encoder=encoder.outputs["encoder"], family=family,
                label=label, params=params, dataset_name=dataset_name,
            ))
        gated = gate(prepared, trained, encoder, params, crossval=verdict.outputs["report"])
        _register_if_passed(trained, gated, params)

    return pipeline


crossval_pipeline = _crossval_pipeline(PIPELINE_NAME, "Cross-validate a generator family's usefulness by patient.",
                                       "dcgan", pooled=False)
crossval_pooled_pipeline = _crossval_pipeline(
    POOLED_PIPELINE_NAME, "Cross-validate a pooled family's usefulness by patient, its members trained apart.",
    "sinddmpool", pooled=True)


def _pipeline_of(family: str | None) -> tuple:
    """The cross-validation pipeline of ``family`` and its name: a pooled family's members train as tasks."""
    from sonogen.generators import get_generator

    if family is not None and get_generator(family).pools is not None:
        return crossval_pooled_pipeline, POOLED_PIPELINE_NAME
    return crossval_pipeline, PIPELINE_NAME


def crossval_arguments(params_text: str, family: str, label: str, folds: int | None = None) -> dict:
    """Arguments of one (family, label) run from the text of params.yaml (its ``crossval`` section)."""
    from pipelines.training import arguments_from_params

    settings = (yaml.safe_load(params_text) or {}).get("crossval") or {}
    count = folds or settings.get("folds", 5)
    shared = {k: v for k, v in arguments_from_params(params_text).items() if k not in ("runs", "trainer_runs", "pool_runs")}
    return {**shared, "family": family, "label": label, "folds": list(range(count)), "fold_count": count,
            "seed": settings.get("seed", 0)}


def compile_crossval_pipeline(package_path: str | Path, family: str | None = None) -> Path:
    """``sonogen-crossval``, or for a pooled ``family`` ``sonogen-crossval-pooled``, as KFP IR YAML."""
    compiler.Compiler().compile(_pipeline_of(family)[0], str(package_path))
    return Path(package_path)


def crossval_pipeline_name(family: str | None) -> str:
    return _pipeline_of(family)[1]


def run_crossval_local(arguments: dict, pipeline_root: str | Path) -> None:
    """Runs the cross-validation here with ``kfp.local`` (the folds one after another share the cores)."""
    import os

    from kfp import local

    from sonogen.tracking import embedded_uri

    os.environ.setdefault("MLFLOW_TRACKING_URI", embedded_uri())  # the tasks' store: the embedded one here
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, len(arguments["folds"])))))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    _pipeline_of(arguments.get("family"))[0](**arguments)
