"""The generation pipeline ``sonogen-generate``: a synthetic dataset from a registered generator, drawn by a task per
shard (a ParallelFor, one GPU each on a cluster) into one place (an ``s3://`` prefix, or a folder ``dvc add`` can
track), then joined into one sonogen dataset by a merge task. The same steps as ``sonogen generate --shards K
--shard i`` and ``--merge``; a rerun resumes, and other settings into the same place are refused."""

import json
import os
from pathlib import Path

from kfp import compiler, dsl

from components.generate_shard import generate_shard
from components.merge_generated import merge_generated
from pipelines.training import _cluster_environment, _on_gpu

PIPELINE_NAME = "sonogen-generate"


@dsl.pipeline(name=PIPELINE_NAME, description="Draw a synthetic dataset from a registered generator, in shards.")
def generation_pipeline(
    model: str,
    n: int,
    out: str,
    seed: int = 0,
    batch: int = 64,
    condition: str = "{}",
    condition_folder: str = "",
    shard_count: int = 1,
    shards: list = [0],  # noqa: B006  (a KFP default: the shard indices 0 … shard_count − 1)
    precision: str = "",
):
    """``condition`` is a JSON object (what every image is drawn with); ``condition_folder`` ``KEY=FOLDER`` gives
    each image its own file as ``condition[KEY]`` (FOLDER: an ``s3://`` prefix on a cluster); ``shards`` lists the
    indices the ParallelFor runs; ``precision`` fp32, or bf16 for torch families ("": the model's own)."""
    with dsl.ParallelFor(items=shards, name="shard") as shard:
        drawn = _cluster_environment(_on_gpu(generate_shard(
            model=model, n=n, out=out, seed=seed, batch=batch, condition=condition, shards=shard_count, shard=shard,
            condition_folder=condition_folder, precision=precision,
        ))).set_cpu_request("4").set_memory_request("16G").set_retry(2)
    _cluster_environment(merge_generated(out=out, shards=shard_count, done=dsl.Collected(drawn.output))
                         ).set_cpu_request("1").set_memory_request("2G").set_caching_options(False)


def generation_arguments(model: str, n: int, out: str, seed: int = 0, batch: int = 64,
                         condition: dict | None = None, shards: int = 1, condition_folder: str = "",
                         precision: str | None = None) -> dict:
    from sonogen.backends import TORCH_PRECISIONS
    from sonogen.generate import condition_folder_of

    if shards < 1:
        raise ValueError(f"--shards must be at least 1, got {shards}")
    condition_folder_of(condition_folder)  # KEY=FOLDER, checked before anything runs
    if precision is not None and precision not in TORCH_PRECISIONS:
        raise ValueError(f"--precision must be fp32 or bf16, got {precision!r}")
    return {"model": model, "n": n, "out": out, "seed": seed, "batch": batch,
            "condition": json.dumps(condition or {}), "condition_folder": condition_folder, "shard_count": shards,
            "shards": list(range(shards)), "precision": precision or ""}


def compile_generation_pipeline(package_path: str | Path) -> Path:
    compiler.Compiler().compile(generation_pipeline, str(package_path))
    return Path(package_path)


def run_generation_local(arguments: dict, pipeline_root: str | Path) -> None:
    """Runs the generation here with ``kfp.local`` (the shards share the cores)."""
    from kfp import local

    from sonogen.tracking import embedded_uri

    os.environ.setdefault("MLFLOW_TRACKING_URI", embedded_uri())  # the tasks' store: the embedded one here
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(arguments["shards"]))))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    generation_pipeline(**arguments)
