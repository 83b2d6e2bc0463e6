"""crossval_fold: one fold of a patient-level cross-validation (a us-encoder and the generator trained without the
fold's patients, the generator gated, and the downstream classifiers tested on them)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def crossval_fold(
    prepared: Input[Dataset],
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
        config.write(params)  # read as `dvc repro` reads params.yaml
    outcome = run_fold(family, prepared.path, label, fold, folds, result.path, config.name,
                       None, dataset_name, seed, view=tempfile.mkdtemp(),  # None: the fold's own us-encoder
                       log=lambda line: print(time.strftime("%H:%M:%S"), line, flush=True))
    result.metadata.update({"fold": fold, "passed": outcome["passed"], "test_patients": len(outcome["test_patients"])})
