"""ONNX export of a generator's sampling network, checked against torch and attached to its model version.

The exported graph maps latents ``(batch, …)`` to images ``(batch, 1, H, W)`` in [-1, 1] with a dynamic batch.
Latents stay outside the graph (``sonogen.sampling``), so a server with ONNX Runtime and no torch draws the same
images for a seed as the torch sampler.

``int8`` exports a statically quantised graph (per-channel int8 weights, activation ranges calibrated on the
generator's own latents). It cannot match torch to ``PARITY_TOLERANCE``; it is accepted when its samples are as
close to torch's in distribution as ``max_mmd_ratio`` says: the kernel MMD between int8 and fp32 images of the
same latents, as a share of the MMD between two fp32 draws of other latents.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

ONNX_TAG = "onnx_artifact"
PRECISION_TAG = "onnx_precision"
INT8_TAGS = ("onnx_mmd_ratio", "onnx_max_grey_diff")
PRECISIONS = ("fp32", "int8")
PARITY_TOLERANCE = 1e-4
MAX_MMD_RATIO = 0.1
# (batch, seed) of the fixed parity inputs: a single image and a full batch
PARITY_INPUTS = ((1, 1), (16, 2))
# int8: the latents that set activation ranges, and those that measure the samples, never the same seeds
CALIBRATION_SEEDS, CALIBRATION_BATCH = range(100, 108), 16
FIDELITY_SEEDS, FIDELITY_SAMPLES = (1, 2), 64


def export_to_onnx(generator, path: str | Path, precision: str = "fp32") -> dict:
    """Writes ``generator``'s sampling network to ``path`` (one file) and compares ONNX Runtime with torch on
    fixed inputs; returns ``max_abs_diff``, ``opset``, ``bytes`` and ``precision``, and for int8 the samples'
    ``max_grey_diff``, ``mean_grey_diff`` and ``mmd_ratio``."""
    import onnx
    import onnxruntime
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        module, example = generator.sampling_network()
        exported = module if precision == "fp32" else generator.int8_sampling_network()[0]
    except NotImplementedError as err:
        raise ValueError(f"{err}; serve it on torch") from None
    module, exported = module.to("cpu").eval(), exported.to("cpu").eval()
    if precision == "fp32":
        _write_onnx(exported, example.cpu(), path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            _write_onnx(exported, example.cpu(), Path(tmp) / "fp32.onnx")
            _quantise(Path(tmp) / "fp32.onnx", path, example.shape[1:])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    @torch.no_grad()
    def both(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        latents = np.random.default_rng(seed).standard_normal((n, *example.shape[1:]), dtype=np.float32)
        return module(torch.from_numpy(latents)).numpy(), session.run(["images"], {"latents": latents})[0]

    worst = 0.0
    for n, seed in PARITY_INPUTS:
        expected, got = both(seed, n)
        if got.shape != expected.shape:
            raise ValueError(f"ONNX output shape {got.shape} differs from torch's {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    report = {"precision": precision, "max_abs_diff": worst, "bytes": path.stat().st_size,
              "opset": next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                            if o.domain in ("", "ai.onnx"))}
    if precision == "int8":
        exact, reduced = both(FIDELITY_SEEDS[0], FIDELITY_SAMPLES)
        report |= _sample_fidelity(exact, reduced, other_draw=both(FIDELITY_SEEDS[1], FIDELITY_SAMPLES)[0])
    generator.to(generator.device)
    return report


def _write_onnx(module, example, path: Path) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(module, (example,), str(path), input_names=["latents"], output_names=["images"],
                      dynamic_shapes=({0: batch},), external_data=False, verbose=False)


def _quantise(source: Path, target: Path, latent_shape: tuple[int, ...]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Latents(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"latents": np.random.default_rng(seed).standard_normal(
                (CALIBRATION_BATCH, *latent_shape), dtype=np.float32)} for seed in CALIBRATION_SEEDS])

        def get_next(self):
            return next(self.batches, None)

    prepared = source.with_name("prepared.onnx")
    quant_pre_process(str(source), str(prepared))
    quantize_static(str(prepared), str(target), Latents(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _sample_fidelity(exact: np.ndarray, reduced: np.ndarray, other_draw: np.ndarray) -> dict:
    import torch

    from sonogen.metrics import kernel_mmd, pixel_features
    from sonogen.sampling import to_uint8

    grey = np.abs(to_uint8(exact).astype(int) - to_uint8(reduced))
    features = [pixel_features(torch.from_numpy(images)) for images in (exact, reduced, other_draw)]
    mmd, between_draws = (kernel_mmd(features[0], other)["biased"] for other in features[1:])
    # a generator that draws one image whatever the latents leaves nothing to compare the int8 one against
    ratio = mmd / between_draws if between_draws > 0 else (0.0 if mmd == 0 else float("inf"))
    return {"max_grey_diff": int(grey.max()), "mean_grey_diff": float(grey.mean()), "mmd_ratio": ratio}


def export_registered(model_uri: str, tolerance: float = PARITY_TOLERANCE, precision: str = "fp32",
                      max_mmd_ratio: float = MAX_MMD_RATIO) -> dict:
    """Exports the generator of ``models:/NAME@ALIAS`` (or ``/VERSION``), logs the ``.onnx`` file to that
    version's run and tags the version with where it is, its precision and its agreement with torch. Raises
    ``ValueError`` when an fp32 graph differs from torch by more than ``tolerance``, or an int8 graph's samples by
    more than ``max_mmd_ratio``; nothing is logged then."""
    import mlflow

    from sonogen.registry import load_registered_generator, model_version, resolve_version

    name, version = resolve_version(model_uri)
    run_id = model_version(name, version).run_id
    generator = load_registered_generator(f"models:/{name}/{version}")
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}-v{version}{'' if precision == 'fp32' else '-' + precision}.onnx"
        report = export_to_onnx(generator, path, precision)
        if precision == "fp32" and report["max_abs_diff"] > tolerance:
            raise ValueError(f"{name} v{version}: ONNX Runtime differs from torch by {report['max_abs_diff']:.3g} "
                             f"(tolerance {tolerance:g}); not logged")
        if precision == "int8" and report["mmd_ratio"] > max_mmd_ratio:
            raise ValueError(f"{name} v{version}: int8 samples are {report['mmd_ratio']:.3g} of two fp32 draws' "
                             f"kernel MMD from the fp32 ones (at most {max_mmd_ratio:g}); not logged")
        client.log_artifact(run_id, str(path), "onnx")
    artifact = f"runs:/{run_id}/onnx/{path.name}"
    tags = {ONNX_TAG: artifact, PRECISION_TAG: precision, "onnx_max_abs_diff": f"{report['max_abs_diff']:.3g}",
            "onnx_opset": str(report["opset"])}
    if precision == "int8":
        tags |= dict(zip(INT8_TAGS, (f"{report['mmd_ratio']:.3g}", str(report["max_grey_diff"]))))
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    left_by_int8 = (set(INT8_TAGS) - set(tags)) & set(model_version(name, version).tags)
    for key in left_by_int8:
        client.delete_model_version_tag(name, version, key)
    return {"model_name": name, "version": version, "artifact": artifact, **report}


ONNX_CHOICES = ("fp32", "int8", "none")


def export_if_servable_by_onnx(model_uri: str, precision: str = "fp32") -> dict | None:
    """``export_registered`` for a generator whose sampling is one network (a GAN), so that the slim serving image
    serves it; None for the others (a diffusion loop), which the torch image serves, and with ``precision``
    ``none``. ``int8`` (CPU serving) falls back to fp32 when its samples fail the int8 gate, and says why in
    ``int8_refused``."""
    from sonogen.registry import load_registered_generator

    if precision not in ONNX_CHOICES:
        raise ValueError(f"the ONNX export at registration is one of {', '.join(ONNX_CHOICES)}, got {precision!r}")
    if precision == "none":
        return None
    try:
        load_registered_generator(model_uri).sampling_network()
    except NotImplementedError:
        return None
    if precision == "int8":
        try:
            return export_registered(model_uri, precision="int8")
        except ValueError as err:
            return {**export_registered(model_uri), "int8_refused": str(err)}
    return export_registered(model_uri)
