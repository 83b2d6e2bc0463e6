"""Feature extractors for the metrics; every metric value records which extractor produced it.

An extractor is named ``NAME@VERSION``: ``pixels-16@fixed``; ``<dataset>-us-encoder@<registry version>`` (the
default, trained on the real training split, see ``sonogen.metrics.classifier``); ``inception-v3@<sha>`` and
``resnet34@<sha>`` built from a torchvision / pytorch-fid weight file whose sha256 prefix is the version.
Values from different extractors measure different things and are never gated against each other's thresholds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

PIXELS_16 = "pixels-16"
BACKBONES = ("inception-v3", "resnet34")


def pixel_features(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Images ``(N, 1, H, W)`` in [-1, 1], area-downsampled to ``size``×``size`` and flattened.

    A fixed extractor with no weights: good enough to follow training, blind to fine texture.
    """
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1)


@dataclass(frozen=True)
class Extractor:
    name: str
    version: str
    embed: Callable[[torch.Tensor], torch.Tensor]
    # per-position features ``(N, C, h, w)`` for single-image FID; None where the network has no useful map
    feature_map: Callable[[torch.Tensor], torch.Tensor] | None = None
    # the us-encoder's whole classifier, whose class probabilities give the confidence gate
    classifier: torch.nn.Module | None = None

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        return torch.cat([self.embed(images[i : i + batch_size].float()) for i in range(0, len(images), batch_size)])


def pixel_extractor(size: int = 16) -> Extractor:
    return Extractor(f"pixels-{size}", "fixed", lambda x: pixel_features(x, size),
                     lambda x: F.adaptive_avg_pool2d(x.float(), size))


def encoder_extractor(source: str | Path) -> Extractor:
    """The ``us-encoder``: a saved classifier folder (or ``s3://`` URI), or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``."""
    from sonogen.metrics.classifier import load_classifier

    folder, name, version = Path(source), None, None
    if "://" in str(source) and not str(source).startswith("models:/"):  # an object store (s3://)
        from sonogen.tracking import local_folder

        folder = local_folder(str(source), "us-encoder")
    elif str(source).startswith("models:/"):
        import mlflow

        from sonogen.tracking import resolve_version

        name, version = resolve_version(str(source))  # also points mlflow at the tracking store
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}"))
    model, extra = load_classifier(folder)
    name, version = name or extra.get("registered_model"), version or extra.get("version")
    if not name or not version:
        raise ValueError(f"{source} is an unregistered classifier; register it so its features have a version")
    # the first two blocks keep a 1/4-resolution map with local texture, the SinGAN choice for SIFID
    return Extractor(name, str(version), model.embed, lambda x: model.features[:8](x), model)


def backbone_extractor(name: str, weights: str) -> Extractor:
    from sonogen.metrics.backbones import build_backbone, load_weights

    state = load_weights(weights)
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes())
    network = build_backbone(name, state)
    return Extractor(name, digest.hexdigest()[:12], network.features, getattr(network, "feature_map", None))


def get_extractor(spec: str) -> Extractor:
    """``pixels-16`` (any size), ``us-encoder:FOLDER_OR_MODEL_URI``, ``inception-v3:WEIGHTS``, ``resnet34:WEIGHTS``."""
    kind, _, source = spec.partition(":")
    if kind.startswith("pixels-") and kind[7:].isdigit() and not source:
        return pixel_extractor(int(kind[7:]))
    if kind == "us-encoder" and source:
        return encoder_extractor(source)
    if kind in BACKBONES and source:
        return backbone_extractor(kind, source)
    raise ValueError(
        f"unknown feature extractor {spec!r}; use pixels-16, us-encoder:<folder or models:/ URI>, "
        f"inception-v3:<weights path or s3:// URI> or resnet34:<weights path or s3:// URI>"
    )
