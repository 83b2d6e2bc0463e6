"""train_encoder: the us-encoder (reduced-VGG classifier on the real training split), registered in MLflow."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_encoder(prepared: Input[Dataset], encoder: Output[Model], params: str, dataset_name: str = "lus"):
    import yaml

    from sonogen.evaluation import train_encoder as train
    from sonogen.jobs import evaluation_config

    config, _, epochs = evaluation_config(yaml.safe_load(params) or {})
    info = train(prepared.path, encoder.path, dataset_name, epochs=epochs, device=config.device)
    encoder.metadata.update({k: v for k, v in info.items() if k != "folder"})
