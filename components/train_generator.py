"""train_generator: one generator family on one label, tracked in MLflow (registration is a later step).

What the family needs first (a lesion bank, a model it builds on) is made in the same task, inside its output; a
GAN's epochs are read with the dataset's us-encoder to keep its best."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_generator(
    prepared: Input[Dataset],
    encoder: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    family: str,
    label: str,
    params: str,
    dataset_name: str = "lus",
):
    import tempfile
    import time

    from sonogen.jobs import train_generator as run_training

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(params)  # read as `dvc repro` reads params.yaml: train.<family>.{model,train}
    info = run_training(family, prepared.path, label, model.path, config.name, dataset=dataset_name,
                        register=False, build_prerequisites=True, monitor=f"us-encoder:{encoder.path}",
                        log=lambda line: print(time.strftime("%H:%M:%S"), line, flush=True))
    model.metadata.update({"family": family, "label": label, "run_id": info["run_id"]})
    for key, value in info["final"].items():
        if isinstance(value, float):
            metrics.log_metric(key, value)
