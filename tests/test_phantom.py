import numpy as np
import pytest

from sonogen.data.manifest import boxes_from_mask, load_grey, read_manifest
from sonogen.data.phantom import CANVAS, generate, make_patient, render


def test_same_seed_same_images_other_seed_other_images(tmp_path):
    a = generate(tmp_path / "a", patients=3, frames_per_patient=2, seed=7)
    generate(tmp_path / "b", patients=3, frames_per_patient=2, seed=7)
    generate(tmp_path / "c", patients=3, frames_per_patient=2, seed=8)
    hashes = {k: [r.sha256 for r in read_manifest(tmp_path / k)] for k in "abc"}
    assert a["images"] == 6
    assert hashes["a"] == hashes["b"]
    assert not set(hashes["a"]) & set(hashes["c"])


def test_adding_patients_keeps_existing_ones(tmp_path):
    generate(tmp_path / "small", patients=2, frames_per_patient=1, seed=3)
    generate(tmp_path / "large", patients=5, frames_per_patient=1, seed=3)
    small = {r.image: (r.sha256, r.label) for r in read_manifest(tmp_path / "small")}
    large = {r.image: (r.sha256, r.label) for r in read_manifest(tmp_path / "large")}
    assert small.items() <= large.items()


@pytest.mark.parametrize("index", range(6))
def test_boxes_are_exact_and_only_on_consolidations(index):
    patient = make_patient(seed=11, index=index, consolidation=index % 2 == 0)
    image, mask = render(patient, seed=11, frame=index)
    assert image.shape == mask.shape == CANVAS and image.dtype == np.uint8
    boxes = boxes_from_mask(mask)
    if patient.consolidation:
        assert boxes, "a consolidation patient must have a lesion"
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= CANVAS[1] and 0 <= y0 < y1 <= CANVAS[0]
            region = mask[y0:y1, x0:x1]
            assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
        assert (image[mask] > 0).all(), "the lesion lies inside the scan fan"
    else:
        assert not mask.any() and boxes == []


def test_consolidation_is_tissue_like_and_has_bright_bronchograms():
    patient = make_patient(seed=0, index=0, consolidation=True)
    image, mask = render(patient, seed=0, frame=0)
    lesion = image[mask].astype(float)
    assert 40 < np.median(lesion) < 160
    assert np.percentile(lesion, 99) > np.median(lesion) + 50


def test_manifest_boxes_match_masks(tmp_path):
    generate(tmp_path / "p", patients=4, frames_per_patient=2, seed=1)
    records = read_manifest(tmp_path / "p")
    assert {r.label for r in records} == {"consolidation", "normal"}
    for r in records:
        assert r.mask, "phantom masks are known, also when empty"
        assert boxes_from_mask(load_grey(tmp_path / "p" / r.mask)) == r.boxes
        assert bool(r.boxes) == (r.label == "consolidation")


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="patients"):
        generate(tmp_path / "x", patients=0, frames_per_patient=1)
    with pytest.raises(ValueError, match="consolidation_fraction"):
        generate(tmp_path / "x", patients=1, frames_per_patient=1, consolidation_fraction=1.5)
