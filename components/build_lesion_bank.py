"""build_lesion_bank: DiffUltra's Lesion-anatomy Bank from the prepared dataset's lesion boxes, logged to MLflow."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def build_lesion_bank(prepared: Input[Dataset], bank: Output[Artifact], params: str, dataset_name: str = "lus"):
    import yaml

    from sonogen.jobs import build_lesion_bank as build

    options = (yaml.safe_load(params) or {}).get("lesion_bank") or {}  # as `dvc repro` reads params.yaml
    info = build(prepared.path, bank.path, dataset=dataset_name, **options)
    bank.metadata.update({"run_id": info["run_id"], "lesions": info["statistics"]["lesions"],
                          "skipped_images": len(info["skipped"])})
