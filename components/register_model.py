"""register_model: registers a generator that passed its gates as `<dataset>-<family>-<label>@candidate`."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register_model(model: Input[Model], report: Input[Artifact], alias: str = "candidate") -> str:
    from pathlib import Path

    from sonogen.jobs import register_trained, trained_name

    entry = register_trained(model.path, alias=alias, gate_report=Path(report.path) / trained_name(model.path))
    if entry["registered_model"] is None:
        raise RuntimeError(f"{entry['model_name']} failed its gates {entry['failed_gates']}; not registered")
    return entry["model_uri"]
