"""The ``sonogen pipeline`` commands: compile the Kubeflow pipelines, run them here (kfp.local) or on a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sonogen.cli_common import console, user_errors as _user_errors

pipeline_app = typer.Typer(help="Kubeflow Pipelines: compile the training and cross-validation pipelines, run them "
                                "here or on a cluster.", no_args_is_help=True)
Which = Annotated[str, typer.Option("--pipeline", help="training; crossval (sonogen-crossval, sonogen-crossval-pooled "
                                                       "for a pooled family: one family and label per run, --family "
                                                       "and --label); or generate (sonogen-generate: a synthetic "
                                                       "dataset in shards, --model, --n, --out).")]


Image = Annotated[str | None, typer.Option(
    help="Component image (default: $SONOGEN_IMAGE, else ghcr.io/sonogen/sonogen-train:<version>).")]


def _set_image(image: str | None) -> None:
    import os

    if image:
        os.environ["SONOGEN_IMAGE"] = image  # components read it when their module is imported


@pipeline_app.command("compile")
@_user_errors
def pipeline_compile_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the pipeline IR YAML.")]
    = Path("training_pipeline.yaml"),
    params: Annotated[Path | None, typer.Option(
        help="params.yaml whose families, labels and settings become the compiled pipeline's defaults.")] = None,
    image: Image = None,
    pipeline: Which = "training",
    family: Annotated[str | None, typer.Option(
        help="crossval: a family that pools models trained apart compiles sonogen-crossval-pooled.")] = None,
):
    """Compile the training (or cross-validation) pipeline to KFP IR YAML."""
    _set_image(image)
    if pipeline == "crossval":
        from pipelines.crossval import compile_crossval_pipeline

        console.print(f"wrote {compile_crossval_pipeline(out, family)}")
        return
    if pipeline == "generate":
        from pipelines.generation import compile_generation_pipeline

        console.print(f"wrote {compile_generation_pipeline(out)}")
        return
    _check_pipeline(pipeline)
    from pipelines.training import compile_pipeline

    console.print(f"wrote {compile_pipeline(out, params.read_text() if params else None)}")


def _check_pipeline(pipeline: str) -> None:
    if pipeline not in ("training", "crossval", "generate"):
        raise ValueError(f"--pipeline must be training, crossval or generate, got {pipeline!r}")


@pipeline_app.command("run")
@_user_errors
def pipeline_run_command(
    params: Annotated[Path, typer.Option(help="params.yaml with the dataset, training, evaluation and gate settings.")]
    = Path("params.yaml"),
    host: Annotated[str | None, typer.Option(help="Kubeflow Pipelines endpoint; without it the run is local.")] = None,
    experiment: Annotated[str, typer.Option(help="KFP experiment of the run (with --host).")] = "sonogen",
    wait: Annotated[bool, typer.Option("--wait", help="Follow the cluster run; exit 1 unless it succeeds.")] = False,
    token: Annotated[str | None, typer.Option(envvar="KFP_TOKEN", help="Bearer token for the KFP endpoint "
                                              "(default: the KFP client's own credentials).")] = None,
    namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace (multi-user installs).")] = None,
    service_account: Annotated[str, typer.Option(help="Kubernetes service account of the cluster run "
                                                 "(infra/ creates the default; in a profile: default-editor).")]
    = "sonogen-pipeline-runner",
    image: Image = None,
    pipeline_root: Annotated[Path, typer.Option(help="Where a local run keeps task outputs.")] = Path(".kfp"),
    raw: Annotated[str | None, typer.Option(help="Raw dataset instead of params.yaml's: a folder (with "
                                            "--dvc-repo, a path in that DVC repository) or 'phantom'.")] = None,
    dvc_repo: Annotated[str | None, typer.Option(help="Git URL of a DVC repository holding --raw.")] = None,
    dvc_rev: Annotated[str | None, typer.Option(help="Revision of --dvc-repo.")] = None,
    pipeline: Which = "training",
    family: Annotated[str | None, typer.Option(help="crossval: the family to cross-validate.")] = None,
    label: Annotated[str | None, typer.Option(help="crossval: the label it draws.")] = None,
    folds: Annotated[int | None, typer.Option(min=2, help="crossval: folds (default: params.yaml's crossval.folds).")]
    = None,
    model: Annotated[str | None, typer.Option(help="generate: models:/NAME@ALIAS or models:/NAME/VERSION.")] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="generate: number of images.")] = None,
    out: Annotated[str | None, typer.Option(help="generate: s3://bucket/prefix (a cluster) or a folder.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="generate: seed of the whole set.")] = 0,
    batch: Annotated[int, typer.Option(min=1, help="generate: images per chunk.")] = 64,
    condition: Annotated[str, typer.Option(help="generate: what every image is drawn with, as JSON.")] = "{}",
    shards: Annotated[int, typer.Option(min=1, help="generate: workers, one GPU each on a cluster.")] = 1,
    condition_folder: Annotated[str, typer.Option(
        help="generate: KEY=FOLDER, each image drawn with its own PNG of FOLDER as condition KEY (an s3:// prefix "
             "on a cluster, where every shard can read it).")] = "",
    precision: Annotated[str | None, typer.Option(
        help="generate: fp32, or bf16 for torch families (default: the model's own).")] = None,
):
    """Run the training (or cross-validation) pipeline: locally with kfp.local (default) or on a Kubeflow cluster
    (--host)."""
    import functools
    import tempfile

    _set_image(image)
    _check_pipeline(pipeline)
    from pipelines.crossval import (compile_crossval_pipeline, crossval_arguments, crossval_pipeline_name,
                                    run_crossval_local)
    from pipelines.generation import (PIPELINE_NAME as GENERATE, compile_generation_pipeline, generation_arguments,
                                      run_generation_local)
    from pipelines.training import PIPELINE_NAME as TRAINING, arguments_from_params, compile_pipeline, run_local
    from sonogen.registry import list_models

    if pipeline == "generate":
        from sonogen.generate import condition_of

        if not model or not n or not out:
            raise ValueError("--pipeline generate needs --model, --n and --out")
        arguments = generation_arguments(model, n, out, seed, batch, condition_of(condition), shards, condition_folder,
                                         precision)
        compile_package, run_here, name = compile_generation_pipeline, run_generation_local, GENERATE
    elif not params.is_file():
        raise FileNotFoundError(f"{params} not found")
    elif pipeline == "crossval":
        if not family or not label:
            raise ValueError("--pipeline crossval needs --family and --label")
        arguments = crossval_arguments(params.read_text(), family, label, folds)
        compile_package = functools.partial(compile_crossval_pipeline, family=family)
        run_here, name = run_crossval_local, crossval_pipeline_name(family)
    else:
        arguments = arguments_from_params(params.read_text())
        compile_package, run_here, name = compile_pipeline, run_local, TRAINING
    if pipeline != "generate":
        arguments.update({k: v for k, v in {"raw": raw, "dvc_repo": dvc_repo, "dvc_rev": dvc_rev}.items() if v})
    if host:
        from sonogen.submit import submit_pipeline

        with tempfile.TemporaryDirectory() as tmp:
            package = compile_package(Path(tmp) / f"{pipeline}_pipeline.yaml")
            result = submit_pipeline(package, host, arguments, experiment=experiment, wait=wait, token=token,
                                     namespace=namespace, service_account=service_account, pipeline_name=name)
        console.print(f"submitted run {result['run_id']}: {result['run_url']}")
        if wait:
            console.print(f"run finished: {result['state']}")
            if result["state"] != "SUCCEEDED":
                raise typer.Exit(1)
        return
    before = {(row["name"], row["version"]) for row in list_models()}
    run_here(arguments, pipeline_root)
    for row in list_models():
        if (row["name"], row["version"]) not in before:
            console.print(f"registered [bold]{row['name']}[/bold] version {row['version']} "
                          f"{' '.join('@' + a for a in row['aliases'])} (gate {row['tags'].get('gate', '-')})")
    for report in sorted(Path(pipeline_root).rglob("crossval_report.md")) if pipeline == "crossval" else []:
        console.print(f"cross-validation report: {report}")
    if pipeline == "generate":
        console.print(f"{n} images in {out} (manifest.csv, generate.json)")
    console.print(f"task outputs and gate reports: {pipeline_root}/")


