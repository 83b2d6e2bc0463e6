import pytest
import torch
from torch.utils.data import DataLoader

from sonogen.data import UltrasoundDataset, collate
from sonogen.data.phantom import generate
from sonogen.data.prepare import prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    generate(root / "raw", patients=6, frames_per_patient=2, seed=0)
    prepare(root / "raw", root / "prep", size=32, split="0.5,0.25,0.25", seed=0)
    return root / "prep"


def test_items_are_tensors_in_range(prepared):
    ds = UltrasoundDataset(prepared)
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert ds.classes == ["consolidation", "normal"]
    assert item["label_index"] == ds.classes.index(item["label"])


def test_filters(prepared):
    every = UltrasoundDataset(prepared)
    lesions = UltrasoundDataset(prepared, labels=["consolidation"], with_boxes=True)
    normals = UltrasoundDataset(prepared, labels=["normal"])
    assert len(lesions) + len(normals) == len(every) == 12
    assert all(r.boxes for r in lesions.records) and not any(r.boxes for r in normals.records)
    by_split = [UltrasoundDataset(prepared, split=s) for s in ("train", "val", "test")]
    assert sum(len(d) for d in by_split) == len(every)
    assert all(d.classes == every.classes for d in by_split)
    assert len(UltrasoundDataset(prepared, with_mask=False)) == 0


def test_bad_filters_raise_clear_errors(prepared):
    with pytest.raises(ValueError, match="split"):
        UltrasoundDataset(prepared, split="holdout")
    with pytest.raises(ValueError, match="tumour"):
        UltrasoundDataset(prepared, labels=["tumour"])
    with pytest.raises(FileNotFoundError, match="manifest.csv"):
        UltrasoundDataset(prepared / "images")


def test_dataloader_batches_with_ragged_boxes(prepared):
    loader = DataLoader(UltrasoundDataset(prepared), batch_size=5, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (5, 1, 32, 32)
    assert isinstance(batch["boxes"], list) and all(b.shape[1] == 4 for b in batch["boxes"])
    assert len(batch["label"]) == 5
