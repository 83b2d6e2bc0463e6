"""The Lesion-anatomy Bank on the phantom, whose pleura, lesions and generating distribution are known."""

import numpy as np
import pytest

from sonogen.data.lesion_bank import (
    BOX_COLOUR, NOT_FOUND_COLOUR, PLEURA_COLOUR, Anatomy, Lesion, LesionBank, anatomy_overlay, detect_anatomy,
    render_condition, structure_map,
)
from sonogen.data.manifest import load_grey, read_manifest
from sonogen.data.phantom import make_patient, prepared_pleura
from sonogen.data.prepare import scan_region
from sonogen.sampling import tile

FRAMES = 2  # per phantom patient


@pytest.fixture(scope="module")
def phantom128(tmp_path_factory):
    from sonogen.data.phantom import generate
    from sonogen.data.prepare import prepare

    root = tmp_path_factory.mktemp("phantom128")
    generate(root / "raw", patients=12, frames_per_patient=FRAMES, seed=0)
    prepare(root / "raw", root / "lus", size=128, split="0.7,0.15,0.15", seed=0, stratify=True)
    return root / "lus"


def test_the_pleural_line_is_found_within_a_pixel_on_the_phantom():
    errors = []
    for index in (*range(8), 14):  # 14: a chest-wall line as bright as its pleura, above it
        for image, x, y in prepared_pleura(make_patient(0, index, consolidation=index % 2 == 0), 0, 2, 128):
            anatomy = detect_anatomy(image)
            detected = np.interp(x, np.arange(128), anatomy.pleura)
            assert np.isfinite(detected).mean() > 0.8  # seen over most of the true line
            errors.append(np.nanmean(np.abs(detected - y)))
            assert anatomy.fan[int(anatomy.pleura_at(anatomy.centre)), int(anatomy.centre)]
    assert np.mean(errors) < 0.5 and np.max(errors) < 1.0, errors
    with pytest.raises(ValueError, match="fan"):
        detect_anatomy(np.zeros((128, 128), dtype=np.uint8))
    # a flat grey frame is one big scan area with no line in it: rounding in the ridge filter is not a pleura
    with pytest.raises(ValueError, match="no pleural line"):
        detect_anatomy(np.full((128, 128), 128, dtype=np.uint8))


def test_the_anatomy_overlay_draws_the_detected_pleura_and_the_boxes_and_marks_a_frame_without_one():
    [(image, x, y), *_] = prepared_pleura(make_patient(0, 1, consolidation=False), 0, 1, 128)
    overlay = anatomy_overlay(image, [(40, 60, 80, 90)])
    assert overlay.shape == (128, 128, 3) and overlay.dtype == np.uint8
    red_rows = [np.flatnonzero((overlay[:, c] == PLEURA_COLOUR).all(axis=1)) for c in range(128)]
    drawn = [(c, rows.mean()) for c, rows in enumerate(red_rows) if len(rows)]
    assert [c for c, _ in drawn] == list(detect_anatomy(image).columns) and len(drawn) > 32
    truth = np.interp([c for c, _ in drawn], x, y)
    assert np.abs(np.array([row for _, row in drawn]) - truth).max() <= 1.5
    assert (overlay[60, 40:80] == BOX_COLOUR).all() and (overlay[60:90, 79] == BOX_COLOUR).all()
    assert (overlay[61:89, 41:79] != BOX_COLOUR).any(axis=-1).all()  # the inside is not painted
    blank = anatomy_overlay(np.zeros((128, 128), dtype=np.uint8))
    assert (blank[:8, :8] == NOT_FOUND_COLOUR).all() and (blank[8:] == 0).all()
    # boxes past the frame's edges are drawn clipped, an empty one as a point
    edges = anatomy_overlay(np.zeros((128, 128), dtype=np.uint8), [(0, 0, 0, 0), (120, 100, 200, 140)])
    assert (edges[0, 0] == BOX_COLOUR).all() and (edges[127, 127] == BOX_COLOUR).all()
    assert (edges[100, 120:] == BOX_COLOUR).all() and not (edges[1:99, 1:] == BOX_COLOUR).all(axis=-1).any()
    grid = tile(np.stack([overlay, blank, overlay]), columns=2, border=4)
    assert grid.shape == (2 * 132 + 4, 2 * 132 + 4, 3) and (grid[136:, 136:] == 0).all() and (grid[:4] == 0).all()
    assert (grid[4:132, 4:132] == overlay).all() and (grid[4:132, 136:264] == blank).all()
    assert (grid[136:264, 4:132] == overlay).all()


def test_bank_statistics_match_the_phantoms_generating_distribution(phantom128, tmp_path):
    bank = LesionBank.build(phantom128, "consolidation", split="train")
    records = {r.image: r for r in read_manifest(phantom128)}
    assert len(bank.lesions) >= 6 and not bank.source["skipped"]
    for lesion in bank.lesions:
        record = records[lesion.image]
        patient = make_patient(0, int(record.patient_id.rsplit("-", 1)[1]), consolidation=True)
        # the phantom's lesions hang from the pleura, centred at `lesion_centre` in fan half-widths
        assert abs(lesion.depth) < 0.05, lesion
        assert abs(lesion.lateral - patient.lesion_centre) < 0.15, (lesion, patient.lesion_centre)
        # and span 2 · lesion_half_width fan half-widths across and lesion_depth of the imaging depth down, both
        # read off the frame as prepared, at its true pleura. The fan widens below the pleura (boxes up to a third
        # wider), the deep border is ragged (±18 %) and prepare rounds boxes outwards
        image, x, y = list(prepared_pleura(patient, 0, FRAMES, bank.image_size))[int(record.origin.rsplit("#")[1])]
        assert np.array_equal(image, load_grey(phantom128 / lesion.image))
        fan = scan_region(image[None])
        centre = np.flatnonzero(fan.any(axis=0)).mean()
        pleura = np.interp(centre, x, y)
        imaging_depth = (pleura - np.flatnonzero(fan[:, round(centre)])[0]) / patient.pleura
        width = lesion.width * bank.image_size / (fan[round(pleura)].sum() / 2) / (2 * patient.lesion_half_width)
        height = lesion.height * bank.image_size / imaging_depth / patient.lesion_depth
        assert 0.85 < width < 1.45 and 0.75 < height < 1.3, (lesion, width, height)
    stats = bank.statistics()
    assert -0.03 < stats["depth"]["median"] < 0.05 and stats["lateral"]["q05"] > -0.4 and stats["lateral"]["q95"] < 0.4
    assert bank.structures.shape == (len(bank.lesions), 32, 32)
    assert np.abs(bank.structures.astype(np.float32)).max() <= 1

    loaded = LesionBank.load(bank.save(tmp_path / "bank"))
    assert loaded.lesions == bank.lesions and np.array_equal(loaded.structures, bank.structures)
    assert loaded.statistics() == stats
    with pytest.raises(FileNotFoundError, match="lesion bank"):
        LesionBank.load(tmp_path)
    with pytest.raises(ValueError, match="no train images of label 'effusion'"):
        LesionBank.build(phantom128, "effusion")


def test_sampled_lesions_lie_below_the_pleura_inside_the_fan_and_large_ones_can_be_favoured(phantom128):
    bank = LesionBank.build(phantom128, "consolidation", split="train")
    negatives = [r for r in read_manifest(phantom128) if r.label == "normal"]
    anatomies = [detect_anatomy(load_grey(phantom128 / r.image)) for r in negatives]
    rng = np.random.default_rng(0)
    drawn = {"none": [], "large": []}
    for bias in drawn:
        for k in range(300):
            anatomy = anatomies[k % len(anatomies)]
            (x0, y0, x1, y1), index = bank.sample(anatomy, rng, bias)
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            assert y0 >= anatomy.pleura_top(x0, x1) - 0.5  # at or below the pleura over the whole box
            assert anatomy.fan[y0:y1, x0:x1].mean() >= 0.9
            drawn[bias].append(bank.large[index])
    assert np.mean(drawn["none"]) < 0.25 and np.mean(drawn["large"]) == pytest.approx(0.5, abs=0.1)
    # same generator state, same placement
    assert bank.sample(anatomies[0], np.random.default_rng(5)) == bank.sample(anatomies[0], np.random.default_rng(5))
    with pytest.raises(ValueError, match="size_bias"):
        bank.sample(anatomies[0], rng, "huge")


def test_the_position_prior_conditions_on_the_anchor():
    fan = np.ones((64, 64), dtype=bool)
    lesions = [Lesion("a.png", "p1", [10, 20, 20, 30], (0.5, 0.2), -0.5, 0.0, 0.15, 0.15),
               Lesion("b.png", "p2", [40, 40, 50, 50], (0.5, 0.6), 0.5, 0.0, 0.15, 0.15)]
    bank = LesionBank(lesions, np.zeros((2, 8, 8), dtype=np.float16), 64, {}, bandwidth=0.05)
    high, low = bank.weights((0.5, 0.2)), bank.weights((0.5, 0.6))
    assert high[0] > 0.99 and low[1] > 0.99  # each anatomy draws the lesion seen on an anatomy like it
    shallow = Anatomy(fan, np.full(64, 12.8))
    box, index = bank.sample(shallow, np.random.default_rng(0))
    assert index == 0 and box[0] + (box[2] - box[0]) / 2 < 32  # left of the centre, like lesion a
    with pytest.raises(ValueError, match="at least one"):
        LesionBank([], np.zeros((0, 8, 8)), 64, {})


def test_condition_maps_render_structure_or_filled_boxes():
    image = np.full((32, 32), 100, dtype=np.uint8)
    image[12:14, 8:24] = 250  # a bright line (an air bronchogram) across the lesion
    structure = structure_map(image, [8, 8, 24, 24], 16)
    assert structure.shape == (16, 16) and structure.max() == 1 and structure.min() >= -1
    assert structure[4:6].mean() > 0.5 and structure[12:].mean() < 0.1  # the line, 4 px into the 16 px box
    assert np.allclose(structure_map(np.full((32, 32), 90, np.uint8), [0, 0, 32, 32], 16), 0)

    binary = render_condition((32, 32), [[4, 6, 10, 20]], None)
    assert binary[6:20, 4:10].min() == 1 and binary.sum() == 6 * 14
    rendered = render_condition((32, 32), [[8, 8, 24, 24]], [structure])
    assert rendered[:8].max() == 0 and 0 <= rendered.min() and rendered.max() <= 1
    assert rendered[12:14, 8:24].mean() > 0.8 and rendered[20:24, 8:24].mean() == pytest.approx(0.5, abs=0.1)


def test_the_lesion_bank_command_writes_the_bank_and_logs_it_to_mlflow(phantom128, tmp_path, monkeypatch):
    import mlflow
    from typer.testing import CliRunner

    from sonogen.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = CliRunner().invoke(app, ["data", "lesion-bank", str(phantom128), "bank", "--dataset", "lus"])
    assert result.exit_code == 0, result.output
    assert "lesion bank of" in result.output
    bank = LesionBank.load(tmp_path / "bank")
    assert bank.source["data_manifest_sha256"] and bank.source["label"] == "consolidation"
    [run] = mlflow.search_runs(experiment_names=["lus-lesion-bank"], output_format="list")
    assert run.data.params["data_manifest_sha256"] == bank.source["data_manifest_sha256"]
    assert run.data.metrics["bank.lesions"] == len(bank.lesions)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "lesion_bank")}
    assert artifacts == {"lesion_bank/lesions.json", "lesion_bank/structures.npy", "lesion_bank/anatomy.png"}
    from PIL import Image

    review = np.asarray(Image.open(tmp_path / "bank" / "anatomy.png"))
    images = min(bank.source["images"], 64)  # the first 64 lesion images at most
    assert images == len({lesion.image for lesion in bank.lesions}) + len(bank.source["skipped"])
    assert review.shape == (-(-images // 8) * 130 + 2, 8 * 130 + 2, 3)
    assert (review == PLEURA_COLOUR).all(axis=-1).sum() > 64 * images and (review == BOX_COLOUR).all(axis=-1).any()
    missing = CliRunner().invoke(app, ["data", "lesion-bank", str(phantom128), "other", "--label", "effusion"])
    assert missing.exit_code != 0 and "effusion" in missing.output
