"""``sonogen crossval``: patient-level cross-validation of a family's usefulness, with a pooled verdict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sonogen.cli_common import console, log, user_errors

INDEX = "index.json"


@user_errors
def crossval_command(
    family: Annotated[str | None, typer.Argument(
        help="Generator family; without it, every family × label of params.yaml's crossval section.")] = None,
    data: Annotated[Path, typer.Option(help="Prepared dataset; all its patients are folded (its splits are not "
                                            "used).")] = ...,
    label: Annotated[str | None, typer.Option(help="The label the generator draws (with FAMILY).")] = None,
    folds: Annotated[int | None, typer.Option(min=2, help="Folds by patient (default: crossval.folds, else 5).")]
    = None,
    config: Annotated[Path, typer.Option(help="params.yaml: train.<family>, evaluate, gates, crossval.")]
    = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Report folder (without FAMILY: one subfolder per family-label).")]
    = Path("reports/crossval"),
    dataset: Annotated[str | None, typer.Option(help="Dataset name (default: data folder name).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the fold assignment (default: crossval.seed, else 0).")]
    = None,
    extractor: Annotated[str | None, typer.Option(
        help="Feature extractor shared by the folds' gates (default: each fold trains a us-encoder on its "
             "training patients).")] = None,
    protocol: Annotated[str | None, typer.Option(
        help="Downstream protocol: default, yu2023, zhang2023, basarab2024, diffultra2025, wen2026 "
             "(default: evaluate.downstream.protocol)."
    )] = None,
    resume: Annotated[bool, typer.Option(
        help="Finish the interrupted run in --out: finished folds are kept, an unfinished fold's training continues "
             "from its checkpoint; refused if the settings changed. Without it an earlier run there is replaced.")]
    = False,
    models_from: Annotated[Path | None, typer.Option(
        help="An earlier run's --out (without FAMILY: the folder of its <family>-<label> runs): test its folds' "
             "generators again instead of training them, when only the evaluation changed (protocol's arms, "
             "evaluate, gates); refused unless they were trained as this run would train them.")] = None,
):
    """Train the generator K times, each time without one fold's patients, and test the downstream classifiers on
    those patients; pool every patient's out-of-fold predictions into one verdict: helps, hurts, or no
    measurable effect (with its 95 % patient-bootstrap interval)."""
    from sonogen.jobs import crossval, read_params

    settings = read_params(config).get("crossval") or {}
    folds = folds or settings.get("folds", 5)
    seed = settings.get("seed", 0) if seed is None else seed
    if family is not None:
        if label is None:
            raise ValueError("--label: which label the generator draws (with FAMILY)")
        runs = [(family, label, out, models_from)]
    else:
        runs = [(f, lb, out / f"{f}-{lb}", models_from / f"{f}-{lb}" if models_from else None)
                for f in settings.get("families", []) for lb in settings.get("labels", [])]
        out.mkdir(parents=True, exist_ok=True)
        (out / INDEX).write_text(json.dumps({"runs": [f"{f}-{lb}" for f, lb, _, _ in runs], "folds": folds,
                                             "seed": seed}, indent=2) + "\n")
        if not runs:
            console.print(f"params.yaml's crossval lists no families and labels: nothing to do ({out / INDEX})")
    for run_family, run_label, run_out, run_models in runs:
        report = crossval(run_family, data, run_label, folds, run_out, config, dataset, seed, extractor, log=log,
                          protocol=protocol, resume=resume, models_from=run_models)
        pooled = report["pooled"]
        colour = {"helps": "green", "hurts": "red"}.get(pooled["verdict"], "yellow")
        console.print(f"{run_family}-{run_label}: [{colour}]{pooled['verdict']}[/{colour}]; report "
                      f"{run_out}/crossval_report.md; MLflow run {report['run_id']}")
