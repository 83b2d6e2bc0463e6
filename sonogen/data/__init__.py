"""Ultrasound datasets: the on-disk contract, importers, the phantom, preprocessing and the torch view.

The torch view is imported on first use, so the manifest side works where torch is not installed (the serving
image).
"""

from sonogen.data.manifest import COLUMNS, SPLITS, Record, read_manifest, write_manifest

__all__ = ["COLUMNS", "SPLITS", "Record", "UltrasoundDataset", "collate", "read_manifest", "write_manifest"]


def __getattr__(name: str):
    if name in ("UltrasoundDataset", "collate"):
        from sonogen.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
