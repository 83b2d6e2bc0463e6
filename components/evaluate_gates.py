"""evaluate_gates: the gate suite on one trained generator (usefulness from a cross-validation's pooled verdict
when one is given); returns whether it passed."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_gates(
    prepared: Input[Dataset],
    model: Input[Model],
    encoder: Input[Model],
    report: Output[Artifact],
    summary: Output[Markdown],
    metrics: Output[Metrics],
    params: str,
    crossval: Optional[Input[Artifact]] = None,
) -> bool:
    import shutil

    import yaml

    from sonogen.jobs import evaluate_targets

    [result] = evaluate_targets([model.path], prepared.path, f"us-encoder:{encoder.path}",
                                yaml.safe_load(params) or {}, report.path, log=lambda line: print(line, flush=True),
                                crossval=crossval.path if crossval is not None else None)
    shutil.copy(f"{result['report']}/gate_report.md", summary.path)
    for key, value in result["metrics"].items():
        metrics.log_metric(key, value)
    report.metadata.update({"passed": result["passed"], "extractor": result["extractor"]})
    return result["passed"]
