"""Ultrasound datasets: the on-disk contract, importers, the phantom, preprocessing and the torch view."""

from sonogen.data.dataset import UltrasoundDataset, collate
from sonogen.data.manifest import COLUMNS, SPLITS, Record, read_manifest, write_manifest

__all__ = ["COLUMNS", "SPLITS", "Record", "UltrasoundDataset", "collate", "read_manifest", "write_manifest"]
