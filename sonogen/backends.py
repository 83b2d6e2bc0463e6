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


@dataclass
class Backend:
    version: str
    family: str
    label: str  # the default; a label condition may name any of `labels`
    labels: tuple[str, ...]
    conditions: frozenset[str]
    runtime: str
    places_lesions: bool = False  # draw() returns each image's lesion boxes
    draws_masks: bool = False  # draw() returns each image's lesion mask (H, W) uint8, 1 on the lesion
    # ONNX: latents (B, latent_dim) → uint8 images; torch families sample whole requests instead
    latent_dim: int | None = None
    run: Callable[[np.ndarray], np.ndarray] | None = None
    # torch: (n, seed, condition) → (images, each image's lesion boxes or None)
    sample: Callable[[int, int, dict[str, Any]], tuple[np.ndarray, list | None]] | None = None
    # torch: several (n, seed) draws sharing a condition in as few network calls as the family can
    sample_draws: Callable[[list[tuple[int, int]], dict[str, Any]], tuple[np.ndarray, list | None]] | None = None
    max_batch: int = 16  # images per network call that suit the device and the family (a server's default)

    def draw(self, n: int, seed: int, condition: dict[str, Any] | None = None) -> tuple[np.ndarray, list | None]:
        """Images ``(n, H, W)`` uint8 for ``seed``, whichever runtime holds the generator, with each image's
        lesion boxes from families that place lesions, its lesion mask from families that draw masks, else None."""
        if self.run is not None:
            return self.run(gaussian_latents(seed, n, self.latent_dim)), None
        return self.sample(n, seed, condition or {})

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
    return Backend(version, family, label, (label,), frozenset({"label"}), runtime,
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


def _torch_backend(generator, version: str) -> Backend:
    def sample(n: int, seed: int, condition: dict[str, Any]) -> tuple[np.ndarray, list | None]:
        return sample_draws([(n, seed)], condition)

    def sample_draws(draws: list[tuple[int, int]], condition: dict[str, Any]) -> tuple[np.ndarray, list | None]:
        images, boxes = generator.sample_draws(draws, condition)
        return to_uint8(images), boxes

    return Backend(version, generator.family, generator.config.label, generator.sampling_labels(),
                   frozenset(generator.conditions), f"torch:{generator.device}", generator.places_lesions,
                   generator.draws_masks, sample=sample, sample_draws=sample_draws,
                   max_batch=default_max_batch(generator))


def load_backend(model_uri: str) -> Backend | None:
    """The sampler of ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a saved generator folder (local or
    object-store URI); None while a registry alias or version does not exist yet."""
    import mlflow

    from sonogen.registry import NotRegistered, model_version, resolve_version
    from sonogen.tracking import configure_mlflow

    configure_mlflow()
    if not model_uri.startswith("models:/"):
        from sonogen.generators import load_generator
        from sonogen.generators.trainer import resolve_device

        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
        return _torch_backend(load_generator(folder, resolve_device("auto")), model_uri)
    try:
        name, version = resolve_version(model_uri)
        tags = model_version(name, version).tags
    except NotRegistered:
        return None
    if ONNX_TAG in tags:
        path = mlflow.artifacts.download_artifacts(tags[ONNX_TAG])
        # versions exported before int8 existed carry no precision tag
        return _onnx_backend(path, version, tags["family"], tags["label"], tags.get(PRECISION_TAG, "fp32"))
    try:
        from sonogen.generators.trainer import resolve_device
    except ImportError:  # the serving image: ONNX only, no torch
        raise ValueError(f"{name} version {version} has no ONNX export and torch is not installed here; run "
                         f"`sonogen export onnx models:/{name}/{version}`") from None

    from sonogen.registry import load_registered_generator

    generator = load_registered_generator(f"models:/{name}/{version}", resolve_device("auto"))
    return _torch_backend(generator, version)
