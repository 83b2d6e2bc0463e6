"""crossval_pooled_fold: one fold of a pooled family's cross-validation, its members trained as tasks of their own
on the fold's view and joined: the pool gated and the downstream classifiers tested on the fold's patients."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def crossval_pooled_fold(
    prepared: Input[Dataset],
    model: Input[Model],
    encoder: Input[Model],
    result: Output[Artifact],
    family: str,
    label: str,
    fold: int,
    folds: int,
    params: str,
    seed: int = 0,
    dataset_name: str = "lus",
):
    import tempfile
    import time

    from sonogen.jobs import crossval_fold as run_fold

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(params)
    outcome = run_fold(family, prepared.path, label, fold, folds, result.path, config.name,
                       f"us-encoder:{encoder.path}", dataset_name, seed, view=tempfile.mkdtemp(), trained=model.path,
                       log=lambda line: print(time.strftime("%H:%M:%S"), line, flush=True))
    result.metadata.update({"fold": fold, "passed": outcome["passed"], "test_patients": len(outcome["test_patients"])})
