"""Metrics comparing generated images with real ones."""

from sonogen.metrics.features import PIXELS_16, pixel_features
from sonogen.metrics.two_sample import kernel_mmd, one_nn_accuracy

__all__ = ["PIXELS_16", "kernel_mmd", "one_nn_accuracy", "pixel_features"]
