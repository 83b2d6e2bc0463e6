"""pool_trained_members: the members trained apart joined into one model of the pooled family, in the order the
pool chose their images, with an MLflow run that names the members' runs (gated and registered as one version)."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pool_trained_members(
    prepared: Input[Dataset],
    members: Input[List[Model]],
    model: Output[Model],
    family: str,
    label: str,
    params: str,
):
    import tempfile

    from sonogen.jobs import pool_sources, pool_trained

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(params)
    order = pool_sources(family, prepared.path, label, config.name)
    info = pool_trained([member.path for member in members], model.path, register=False, order=order)
    model.metadata.update({"family": info["family"], "label": label, "run_id": info["run_id"],
                           "members": len(info["images"])})
