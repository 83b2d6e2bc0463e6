"""register_model: registers a generator that passed its gates as `<dataset>-<family>-<label>@candidate`, and exports
a GAN to ONNX on the version (params.yaml's `register.onnx`: fp32, int8 for CPU serving, or none), so that the slim
serving image serves it without a manual step."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register_model(model: Input[Model], report: Input[Artifact], params: str, alias: str = "candidate") -> str:
    from pathlib import Path

    import yaml

    from sonogen.export import export_if_servable_by_onnx
    from sonogen.jobs import register_trained, trained_name

    entry = register_trained(model.path, alias=alias, gate_report=Path(report.path) / trained_name(model.path))
    if entry["registered_model"] is None:
        raise RuntimeError(f"{entry['model_name']} failed its gates {entry['failed_gates']}; not registered")
    onnx = ((yaml.safe_load(params) or {}).get("register") or {}).get("onnx", "fp32")  # params.yaml's register.onnx
    if exported := export_if_servable_by_onnx(entry["model_uri"], onnx):
        print(f"exported {entry['model_uri']} to ONNX: {exported['artifact']} (max |Δ| {exported['max_abs_diff']:.2g} "
              f"from torch){'; int8 refused: ' + exported['int8_refused'] if 'int8_refused' in exported else ''}",
              flush=True)
    return entry["model_uri"]
