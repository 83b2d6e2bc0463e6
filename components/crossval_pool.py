"""crossval_pool: the folds' out-of-fold predictions pooled into one verdict, with its patient-bootstrap interval."""

from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def crossval_pool(
    prepared: Input[Dataset],
    results: Input[List[Artifact]],
    report: Output[Artifact],
    summary: Output[Markdown],
    metrics: Output[Metrics],
    family: str,
    label: str,
    params: str,
    seed: int = 0,
    dataset_name: str = "lus",
) -> str:
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from sonogen.jobs import crossval_report
    from sonogen.jobs.crossval import FOLD_RESULT, PER_FOLD
    from sonogen.tracking import RunRecord

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(params)
    folds = [json.loads((Path(r.path) / FOLD_RESULT).read_text()) for r in results]
    runs = [RunRecord.read(Path(r.path) / "model").run_id for r in results]  # the folds' own MLflow runs
    outcome = crossval_report(folds, report.path, family, label, prepared.path, config.name, dataset_name, seed,
                              PER_FOLD, fold_runs=runs)
    shutil.copy(Path(report.path) / "crossval_report.md", summary.path)
    pooled = outcome["pooled"]
    for key in ("real", "real_plus_synthetic", "delta", "ci_low", "ci_high", "detectable_delta"):
        if key in pooled:
            metrics.log_metric(key, pooled[key])
    report.metadata.update({"verdict": pooled["verdict"], "run_id": outcome["run_id"]})
    return pooled["verdict"]
