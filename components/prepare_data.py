"""prepare_data: the raw dataset (the phantom, a path, or a DVC-tracked folder) → a prepared, split dataset."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_data(
    prepared: Output[Dataset],
    params: str,
    raw: str = "phantom",
    dvc_repo: str = "",
    dvc_rev: str = "",
):
    import yaml

    from sonogen.jobs import prepare_dataset

    sections = yaml.safe_load(params) or {}
    report = prepare_dataset(raw, prepared.path, phantom=sections.get("phantom"), prepare=sections.get("prepare"),
                             dvc_repo=dvc_repo or None, dvc_rev=dvc_rev or None)
    prepared.metadata.update({"images": report["images"], "patients": report["patients"],
                              "manifest_sha256": report["manifest_sha256"]})
