"""crossval_fold_data: one fold's view of the data as a dataset of its own, and the fold's us-encoder trained on
its training patients; the tasks that train a pooled family's members on that fold read both."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def crossval_fold_data(
    prepared: Input[Dataset],
    view: Output[Dataset],
    encoder: Output[Model],
    fold: int,
    folds: int,
    params: str,
    seed: int = 0,
    dataset_name: str = "lus",
):
    import tempfile

    from sonogen.jobs.crossval import crossval_fold_data as fold_data

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(params)  # read as `dvc repro` reads params.yaml
    info = fold_data(prepared.path, fold, folds, view.path, encoder.path, config.name, dataset_name, seed)
    view.metadata.update({"fold": fold, "test_patients": len(info["test_patients"])})
