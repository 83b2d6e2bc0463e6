"""Augmentations of the downstream classifiers' training batches: the ones Yu et al. name (flip, gamma, Gaussian
blur, intensity), from MONAI where it has them.

Flips are drawn from the training loop's generator, so the default (flips only) repeats per seed as before;
MONAI's random transforms draw from their own state, seeded by the classifier's seed. MONAI's per-image
transforms run with metadata tracking off (with it, 0.35 ms an image, most of a 32 px classifier's time), and
blur uses MONAI's batched ``GaussianFilter``: its per-image ``RandGaussianSmooth`` builds a kernel per call.
"""

from __future__ import annotations

import contextlib

import torch

AUGMENTATIONS = ("flip", "gamma", "blur", "intensity")
BLUR_SIGMAS = (0.5, 1.0)  # pixels; each image is blurred with one of them, or not at all


@contextlib.contextmanager
def _plain_tensors():
    from monai.data import get_track_meta, set_track_meta

    before = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(before)


class Augmenter:
    """``augmenter(batch, generator)``: the batch ``(N, 1, H, W)`` in [-1, 1] with each augmentation in ``names``
    applied at random, half of the images each; the result stays in [-1, 1]."""

    def __init__(self, names: list[str] | tuple[str, ...], seed: int = 0):
        self.names = tuple(names)
        self.per_image = None
        self.blurs = []
        if unknown := sorted(set(self.names) - set(AUGMENTATIONS)):
            raise ValueError(f"unknown augmentations {unknown}; known: {', '.join(AUGMENTATIONS)}")
        if {"gamma", "intensity"} & set(self.names):
            from monai.transforms import Compose, RandAdjustContrast, RandScaleIntensity, RandShiftIntensity

            steps = [RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5))] if "gamma" in self.names else []
            if "intensity" in self.names:
                steps += [RandScaleIntensity(factors=0.15, prob=0.5), RandShiftIntensity(offsets=0.1, prob=0.5)]
            self.per_image = Compose(steps)
            self.per_image.set_random_state(seed)
        if "blur" in self.names:
            from monai.networks.layers import GaussianFilter

            self.blurs = [GaussianFilter(2, sigma) for sigma in BLUR_SIGMAS]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if "flip" in self.names:
            flip = torch.rand(len(images), generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.blurs:
            choice = torch.randint(0, 2 * len(self.blurs), (len(images),), generator=generator)
            images = images.clone()
            for index, blur in enumerate(self.blurs):
                if (rows := choice == index).any():
                    images[rows] = blur(images[rows])
        if self.per_image is not None:
            with _plain_tensors():
                images = torch.stack([torch.as_tensor(self.per_image(image)) for image in images])
        return images.clamp(-1, 1)
