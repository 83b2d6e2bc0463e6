"""train_pool_member: one member of a pooled family, trained on its one image with its share of the pool's
settings, tracked in MLflow (``pool_trained_members`` joins the members into the model that is gated)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_pool_member(
    prepared: Input[Dataset],
    encoder: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    family: str,
    label: str,
    source: str,
    params: str,
    dataset_name: str = "lus",
):
    import tempfile
    import time

    from sonogen.jobs import train_pool_member as run_member

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(params)  # the pool's settings: train.<family>.{model,train}
    info = run_member(family, prepared.path, label, source, model.path, config.name, dataset=dataset_name,
                      monitor=f"us-encoder:{encoder.path}",
                      log=lambda line: print(time.strftime("%H:%M:%S"), line, flush=True))
    model.metadata.update({"family": info["family"], "label": label, "source": source, "run_id": info["run_id"]})
    for key, value in info["final"].items():
        if isinstance(value, float):
            metrics.log_metric(key, value)
