import json

import numpy as np
import pytest
from PIL import Image

from sonogen.data.manifest import boxes_from_mask, load_grey, read_manifest
from sonogen.data.phantom import generate, make_patient, render
from sonogen.data.prepare import Geometry, prepare, scan_region


@pytest.fixture(scope="module")
def phantom_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "raw"
    generate(root, patients=6, frames_per_patient=2, seed=4)
    return root


def test_prepared_images_are_square_grey_and_split_by_patient(phantom_raw, tmp_path):
    report = prepare(phantom_raw, tmp_path / "prep", size=64, split="0.5,0.25,0.25", seed=2)
    records = read_manifest(tmp_path / "prep")
    assert len(records) == report["images"] == report["images_in"] == 12
    assert report["patients_in_several_splits"] == []
    assert report == json.loads((tmp_path / "prep" / "prepare_report.json").read_text())
    splits_of = {}
    for r in records:
        with Image.open(tmp_path / "prep" / r.image) as im:
            assert im.mode == "L" and im.size == (64, 64)
        splits_of.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())


def test_prepare_is_deterministic(phantom_raw, tmp_path):
    prepare(phantom_raw, tmp_path / "a", size=48, seed=1)
    prepare(phantom_raw, tmp_path / "b", size=48, seed=1)
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (tmp_path / "b" / "manifest.csv").read_bytes()


def test_text_is_blanked_and_fan_fills_the_frame(phantom_raw, tmp_path):
    prepare(phantom_raw, tmp_path / "prep", size=128)
    record = read_manifest(tmp_path / "prep")[0]
    raw = load_grey(phantom_raw / record.image)
    assert raw[:12, :100].max() > 200, "the raw phantom has burned-in text above the fan"
    image = load_grey(tmp_path / "prep" / record.image)
    assert image[:3, :20].max() == 0 and image[:3, -20:].max() == 0, "corners outside the fan are black"
    rows, cols = np.nonzero(image)
    # the fan is wider than deep: it spans the full width and is padded above and below
    assert cols.min() <= 2 and cols.max() >= 125, "the fan is cropped to the frame"
    assert 90 < rows.max() - rows.min() < 128 and rows.min() > 0


def test_boxes_follow_masks_through_crop_and_resize(phantom_raw, tmp_path):
    prepare(phantom_raw, tmp_path / "prep", size=96)
    lesions = [r for r in read_manifest(tmp_path / "prep") if r.boxes]
    assert lesions
    for r in lesions:
        from_mask = boxes_from_mask(load_grey(tmp_path / "prep" / r.mask))
        assert len(from_mask) == len(r.boxes)
        for moved, measured in zip(sorted(r.boxes), sorted(from_mask)):
            assert np.abs(np.subtract(moved, measured)).max() <= 2
            x0, y0, x1, y1 = moved
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96


def test_scan_region_keeps_dark_areas_inside_the_fan_and_drops_text():
    patient = make_patient(seed=0, index=1, consolidation=False)
    image, _ = render(patient, seed=0, frame=0)
    image[150:200, 140:180] = 0  # an anechoic effusion inside the fan
    region = scan_region(image[None])
    assert region[150:200, 140:180].all()
    assert not region[:12, :100].any(), "burned-in text is not scan area"
    assert not region[:, -8:].any(), "depth ticks are not scan area"


def test_scan_region_matches_a_known_fan_over_frames():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:120, 0:160]
    fan = (y >= 10) & (y < 110) & (np.abs(x - 80) <= 20 + (y - 10) * 0.5)
    frames = np.where(fan, rng.integers(20, 200, (5, 120, 160)), 0).astype(np.uint8)
    frames[:, 60:110, 60:100] = 0  # dark in every frame, but enclosed by echo
    frames[0, 2:6, 2:30] = 255  # annotation text
    region = scan_region(frames)
    assert (region != fan).sum() <= 0.01 * fan.sum()
    assert not region[2:6, 2:30].any()


def test_geometry_maps_boxes_like_pixels():
    region = np.zeros((100, 200), dtype=bool)
    region[20:80, 50:170] = True
    g = Geometry.fit(region, 60)
    assert (g.left, g.top, g.right, g.bottom) == (50, 20, 170, 80)
    assert g.scale == 0.5 and (g.pad_x, g.pad_y) == (0, 15)
    assert g.box([50, 20, 170, 80]) == [0, 15, 60, 45]
    assert g.box([0, 0, 10, 10]) is None
    mask = np.zeros((100, 200), dtype=np.uint8)
    mask[40:60, 90:130] = 255
    moved = g.apply(mask, Image.Resampling.NEAREST)
    assert boxes_from_mask(moved) == [g.box([90, 40, 130, 60])]


def test_blank_images_are_reported_not_dropped_silently(tmp_path):
    from sonogen.data.writer import DatasetWriter, Sample

    with DatasetWriter(tmp_path / "raw", source="t") as writer:
        writer.add_file("black.png", lambda: [Sample(np.zeros((32, 32), np.uint8), "black.png#0")],
                        label="normal", patient_id="p", licence="x")
        patient = make_patient(seed=0, index=0, consolidation=False)
        writer.add_file("fan.png", lambda: [Sample(render(patient, 0, 0)[0], "fan.png#0")],
                        label="normal", patient_id="q", licence="x")
    report = prepare(tmp_path / "raw", tmp_path / "prep", size=32)
    assert report["images_in"] == 2 and report["images"] == 1
    assert report["skipped"] == [{"image": "images/black.png_0.png", "reason": "no scan region found (image is blank)"}]


def test_prepare_rejects_same_folder_and_bad_split(phantom_raw, tmp_path):
    with pytest.raises(ValueError, match="differ"):
        prepare(phantom_raw, phantom_raw)
    with pytest.raises(ValueError, match="fractions"):
        prepare(phantom_raw, tmp_path / "x", split="0.9,0.9,0.1")
