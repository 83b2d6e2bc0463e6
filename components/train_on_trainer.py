"""train_on_trainer: one generator family on one label trained past one GPU. A Kubeflow Trainer TrainJob runs the
same `sonogen train` under torchrun on `nodes` × `gpus_per_node` GPUs; this small task submits it, prints its log,
waits for it and passes the trained model on (data in and model out through the pipeline's object store)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_on_trainer(
    prepared: Input[Dataset],
    encoder: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    family: str,
    label: str,
    params: str,
    nodes: int,
    gpus_per_node: int,
    image: str,
    dataset_name: str = "lus",
):
    import time

    from sonogen.jobs.trainjob import train_on_trainer as run_training

    info = run_training(family, label, prepared.uri, params, model.path, staging_uri=f"{model.uri}-trainjob",
                        dataset=dataset_name, image=image, nodes=nodes, gpus_per_node=gpus_per_node,
                        encoder_uri=encoder.uri, log=lambda line: print(time.strftime("%H:%M:%S"), line, flush=True))
    model.metadata.update({"family": family, "label": label, "run_id": info["run_id"], "trainjob": info["trainjob"],
                           "ranks": info["ranks"]})
    for key, value in info["final"].items():
        if isinstance(value, float):
            metrics.log_metric(key, value)
