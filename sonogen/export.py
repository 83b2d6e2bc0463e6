"""ONNX export of a generator's sampling network, checked against torch and attached to its model version.

The exported graph maps latents ``(batch, …)`` to images ``(batch, 1, H, W)`` in [-1, 1] with a dynamic batch.
Latents stay outside the graph (``sonogen.sampling``), so a server with ONNX Runtime and no torch draws the same
images for a seed as the torch sampler.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

ONNX_TAG = "onnx_artifact"
PARITY_TOLERANCE = 1e-4
# (batch, seed) of the fixed parity inputs: a single image and a full batch
PARITY_INPUTS = ((1, 1), (16, 2))


def export_to_onnx(generator, path: str | Path) -> dict:
    """Writes ``generator``'s sampling network to ``path`` (one file) and compares ONNX Runtime with torch on
    fixed inputs; returns ``max_abs_diff``, ``opset`` and ``bytes``."""
    import onnx
    import onnxruntime
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module, example = generator.sampling_network()
    module = module.to("cpu").eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(module, (example.cpu(),), str(path), input_names=["latents"], output_names=["images"],
                      dynamic_shapes=({0: batch},), external_data=False, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for n, seed in PARITY_INPUTS:
        latents = np.random.default_rng(seed).standard_normal((n, *example.shape[1:]), dtype=np.float32)
        with torch.no_grad():
            expected = module(torch.from_numpy(latents)).numpy()
        got = session.run(["images"], {"latents": latents})[0]
        if got.shape != expected.shape:
            raise ValueError(f"ONNX output shape {got.shape} differs from torch's {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    generator.to(generator.device)
    opset = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    return {"max_abs_diff": worst, "opset": opset, "bytes": path.stat().st_size}


def export_registered(model_uri: str, tolerance: float = PARITY_TOLERANCE) -> dict:
    """Exports the generator of ``models:/NAME@ALIAS`` (or ``/VERSION``), logs the ``.onnx`` file to that
    version's run and tags the version with where it is and its parity. Raises ``ValueError`` when ONNX
    Runtime and torch differ by more than ``tolerance``; nothing is logged then."""
    import mlflow

    from sonogen.registry import load_sampler, model_version, resolve_version

    name, version = resolve_version(model_uri)
    run_id = model_version(name, version).run_id
    generator = load_sampler(f"models:/{name}/{version}")
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}-v{version}.onnx"
        report = export_to_onnx(generator, path)
        if report["max_abs_diff"] > tolerance:
            raise ValueError(f"{name} v{version}: ONNX Runtime differs from torch by {report['max_abs_diff']:.3g} "
                             f"(tolerance {tolerance:g}); not logged")
        client.log_artifact(run_id, str(path), "onnx")
    artifact = f"runs:/{run_id}/onnx/{path.name}"
    for key, value in {ONNX_TAG: artifact, "onnx_max_abs_diff": f"{report['max_abs_diff']:.3g}",
                       "onnx_opset": str(report["opset"])}.items():
        client.set_model_version_tag(name, version, key, value)
    return {"model_name": name, "version": version, "artifact": artifact, **report}
