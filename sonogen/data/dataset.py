"""The torch view of a dataset folder: the one way training and metrics read images."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from sonogen.data.manifest import SPLITS, Record, load_grey, read_manifest


class UltrasoundDataset(Dataset):
    """Images of a sonogen dataset folder as tensors, optionally filtered.

    Each item is a dict: ``image`` float32 ``(1, H, W)`` in [-1, 1]; ``label`` (str) and ``label_index`` (int,
    position in ``classes``); ``boxes`` float32 ``(n, 4)``; ``mask`` float32 ``(1, H, W)`` in {0, 1} (zeros
    when the image has no mask file); ``has_mask``; ``patient_id``; ``index`` (row in the filtered manifest).

    ``classes`` lists every label of the whole manifest, sorted, so label indices agree across splits.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        labels: Iterable[str] | None = None,
        with_boxes: bool | None = None,
        with_mask: bool | None = None,
    ):
        self.root = Path(root)
        every = read_manifest(self.root)
        self.classes = sorted({r.label for r in every})
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        wanted = set(labels) if labels is not None else None
        if wanted is not None and (unknown := wanted - set(self.classes)):
            raise ValueError(f"labels {sorted(unknown)} not in this dataset; it has {self.classes}")
        self.records: list[Record] = [
            r
            for r in every
            if (split is None or r.split == split)
            and (wanted is None or r.label in wanted)
            and (with_boxes is None or bool(r.boxes) == with_boxes)
            and (with_mask is None or bool(r.mask) == with_mask)
        ]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = torch.from_numpy(load_grey(self.root / record.image).astype(np.float32) / 127.5 - 1.0)[None]
        if record.mask:
            mask = torch.from_numpy((load_grey(self.root / record.mask) > 127).astype(np.float32))[None]
        else:
            mask = torch.zeros_like(image)
        return {
            "image": image,
            "label": record.label,
            "label_index": self.classes.index(record.label),
            "boxes": torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4),
            "mask": mask,
            "has_mask": bool(record.mask),
            "patient_id": record.patient_id,
            "index": index,
        }

    def images(self) -> torch.Tensor:
        """All images stacked, ``(N, 1, H, W)`` in [-1, 1]; for the small sets metrics work on."""
        if not self.records:
            return torch.empty(0, 1, 0, 0)
        return torch.stack([self[i]["image"] for i in range(len(self))])


def collate(batch: list[dict]) -> dict:
    """Stacks tensors and keeps per-image box lists (their lengths differ), for ``DataLoader(collate_fn=...)``."""
    return {
        key: torch.stack([item[key] for item in batch])
        if isinstance(batch[0][key], torch.Tensor) and key != "boxes"
        else [item[key] for item in batch]
        for key in batch[0]
    }
