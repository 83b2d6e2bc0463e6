"""The backend that samples a registered generator, resolved from MLflow: ONNX Runtime for exported GAN generators
(no torch needed), torch otherwise. The server and bulk generation share them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sonogen.export import ONNX_TAG, PRECISION_TAG
from sonogen.sampling import gaussian_latents, to_uint8

# the precisions a torch family samples at: bf16 runs the networks under autocast; its images stay within a few
# grey levels of fp32's (tests/test_sampling_precision.py) and repeat with the seed as fp32's do
TORCH_PRECISIONS = ("fp32", "bf16")


@dataclass
class Backend:
    version: str
    family: str
    label: str  # the default; a label condition may name any of `labels`
    labels: tuple[str, ...]
    conditions: frozenset[str]
    runtime: str
    precision: str = "fp32"  # what a request that names none is sampled at
    precisions: tuple[str, ...] = ("fp32",)  # what a request may ask for
    places_lesions: bool = False  # draw() returns each image's lesion boxes
    draws_masks: bool = False  # draw() returns each image's lesion mask (H, W) uint8, 1 on the lesion
    # ONNX: latents (B, latent_dim) → uint8 images; torch families sample whole requests instead
    latent_dim: int | None = None
    run: Callable[[np.ndarray], np.ndarray] | None = None
    # torch: several (n, seed) draws sharing a condition and a precision in as few network calls as the family can
    # → (images, each image's lesion boxes or mask, or None)
    sample_draws: Callable[[list[tuple[int, int]], dict[str, Any], str], tuple[np.ndarray, list | None]] | None = None
    max_batch: int = 16  # images per network call that suit the device and the family (a server's default)

    def draw(self, n: int, seed: int, condition: dict[str, Any] | None = None,
             precision: str | None = None) -> tuple[np.ndarray, list | None]:
        """Images ``(n, H, W)`` uint8 for ``seed``, whichever runtime holds the generator, with each image's
        lesion boxes from families that place lesions, its lesion mask from families that draw masks, else None;
        at ``precision`` (one of ``precisions``; default ``precision``)."""
        precision = self.check_precision(precision)
        if self.run is not None:
            return self.run(gaussian_latents(seed, n, self.latent_dim)), None
        return self.sample_draws([(n, seed)], condition or {}, precision)

    def check_precision(self, precision: str | None) -> str:
        if precision is None:
            return self.precision
        if precision not in self.precisions:
            raise ValueError(f"this {self.family} samples at {' or '.join(self.precisions)} ({self.runtime}), not "
                             f"{precision!r}")
        return precision

    def images(self, n: int, seed: int, condition: dict[str, Any] | None = None) -> np.ndarray:
        return self.draw(n, seed, condition)[0]


def _onnx_backend(path: str, version: str, family: str, label: str, precision: str) -> Backend:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    session = onnxruntime.InferenceSession(path, providers=providers)
    [latents] = session.get_inputs()

    def run(batch: np.ndarray) -> np.ndarray:
        return to_uint8(session.run(["images"], {"latents": batch})[0])

    runtime = f"onnxruntime:{session.get_providers()[0]}{'' if precision == 'fp32' else ':' + precision}"
    on_gpu = session.get_providers()[0] == "CUDAExecutionProvider"
    return Backend(version, family, label, (label,), frozenset({"label"}), runtime, precision, (precision,),
                   latent_dim=int(latents.shape[1]), run=run, max_batch=GAN_GPU_BATCH if on_gpu else CPU_BATCH)


# images per network call by default: a GAN generator is one forward pass, cheap per image, and fills a GPU only
# at large batches (bench/RESULTS.md, sampling the 256 px DCGAN); a diffusion model loops over steps and holds its
# activations for the whole batch
CPU_BATCH, GAN_GPU_BATCH, DIFFUSION_GPU_BATCH = 16, 1024, 64


def default_max_batch(generator) -> int:
    if generator.device.type != "cuda":
        return CPU_BATCH
    try:
        generator.sampling_network()
    except NotImplementedError:
        return DIFFUSION_GPU_BATCH
    return GAN_GPU_BATCH


def _torch_backend(generator, version: str, precision: str, channels_last: bool, compile: bool) -> Backend:
    import torch

    for module in generator.networks().values():
        if channels_last:  # the same weights in NHWC order: faster convolutions on most devices (bench/RESULTS.md)
            module.to(memory_format=torch.channels_last)
        if compile:  # in place, compiled at the first draw of each batch shape
            module.compile()

    def sample_draws(draws: list[tuple[int, int]], condition: dict[str, Any],
                     precision: str) -> tuple[np.ndarray, list | None]:
        # autocast is per thread: entered here, in the thread that samples
        with torch.autocast(generator.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return generator.sample_draws(draws, condition, as_uint8=True)

    backend = Backend(version, generator.family, generator.config.label, generator.sampling_labels(),
                      frozenset(generator.conditions), f"torch:{generator.device}", "fp32", TORCH_PRECISIONS,
                      generator.places_lesions, generator.draws_masks, sample_draws=sample_draws,
                      max_batch=default_max_batch(generator))
    backend.precision = backend.check_precision(precision)
    return backend


def _download(artifact_uri: str) -> str:
    import mlflow

    from sonogen.tracking import configure_mlflow

    configure_mlflow()
    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri)


def load_backend(model_uri: str, precision: str | None = None, channels_last: bool = False,
                 compile: bool = False) -> Backend | None:
    """The sampler of ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a saved generator folder (local or
    object-store URI); None while a registry alias or version does not exist yet. ``precision``: what requests
    that name none are sampled at (default fp32; an ONNX export samples at its own); ``channels_last``: a torch
    family's networks in NHWC memory order; ``compile``: its networks compiled (``torch.compile``)."""
    if not model_uri.startswith("models:/"):
        from sonogen.generators import load_generator
        from sonogen.generators.trainer import resolve_device

        # a local folder needs no tracking client (a GPU box with torch alone serves or generates from one)
        folder = Path(model_uri) if Path(model_uri).is_dir() else Path(_download(model_uri))
        return _torch_backend(load_generator(folder, resolve_device("auto")), model_uri, precision or "fp32",
                              channels_last, compile)
    import mlflow

    from sonogen.registry import NotRegistered, model_version, resolve_version
    from sonogen.tracking import configure_mlflow

    configure_mlflow()
    try:
        name, version = resolve_version(model_uri)
        tags = model_version(name, version).tags
    except NotRegistered:
        return None
    if ONNX_TAG in tags:
        path = mlflow.artifacts.download_artifacts(tags[ONNX_TAG])
        # versions exported before int8 existed carry no precision tag
        backend = _onnx_backend(path, version, tags["family"], tags["label"], tags.get(PRECISION_TAG, "fp32"))
        backend.check_precision(precision)  # the export's precision is the only one
        return backend
    try:
        from sonogen.generators.trainer import resolve_device
    except ImportError:  # the serving image: ONNX only, no torch
        raise ValueError(f"{name} version {version} has no ONNX export and torch is not installed here; run "
                         f"`sonogen export onnx models:/{name}/{version}`") from None

    from sonogen.registry import load_registered_generator

    generator = load_registered_generator(f"models:/{name}/{version}", resolve_device("auto"))
    return _torch_backend(generator, version, precision or "fp32", channels_last, compile)
