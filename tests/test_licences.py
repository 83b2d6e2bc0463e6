"""Licences: a prepare allow-list, and whether a model trained on the kept images may be used commercially."""

import csv

import pytest
import yaml

from sonogen.data.licences import commercial_use, commercial_use_of
from sonogen.data.manifest import read_manifest, write_manifest
from sonogen.data.phantom import generate
from sonogen.data.prepare import prepare


@pytest.mark.parametrize(("licence", "verdict"), [
    ("CC BY 4.0", "yes"), ("CC BY 2.0", "yes"), ("CC-BY-SA-4.0", "yes"), ("CC0-1.0", "yes"),
    ("CC BY-NC 4.0", "no"), ("CC BY-NC -SA 4.0", "no"), ("CC BY-NC-ND 3.0", "no"),
    ("COVID-19 emergency license", "unknown"), ("unknown", "unknown"), ("", "unknown"),
])
def test_the_licence_of_an_image_says_whether_commercial_use_is_allowed(licence, verdict):
    assert commercial_use(licence) == verdict


def test_one_noncommercial_image_makes_the_model_noncommercial():
    from collections import Counter

    assert commercial_use_of(Counter({"CC BY 4.0": 50, "CC BY-NC 4.0": 1}))[0] == "no"
    assert commercial_use_of(Counter({"CC BY 4.0": 50, "COVID-19 emergency license": 1}))[0] == "unknown"
    assert commercial_use_of(Counter({"CC BY 4.0": 50, "CC0-1.0": 3}))[0] == "yes"


@pytest.fixture
def mixed(tmp_path):
    """The phantom with half its patients' images relabelled CC BY-NC 4.0."""
    generate(tmp_path / "raw", patients=8, frames_per_patient=2, seed=0)
    records = read_manifest(tmp_path / "raw")
    for record in records:
        record.licence = "CC BY-NC 4.0" if int(record.patient_id[-1]) // 2 % 2 else "CC BY 4.0"
    write_manifest(tmp_path / "raw", records)
    return tmp_path


def test_prepare_keeps_only_the_allowed_licences_and_the_model_card_follows(mixed, monkeypatch):
    from sonogen.jobs import register_trained, train_generator
    from sonogen.registry import model_card, model_version

    everything = prepare(mixed / "raw", mixed / "all", size=32, stratify=True)
    assert everything["licences"]["commercial_use"] == "no"
    kept = prepare(mixed / "raw", mixed / "open", size=32, stratify=True, licences=["cc by 4.0"])
    assert {r.licence for r in read_manifest(mixed / "open")} == {"CC BY 4.0"}
    assert kept["licences"]["excluded"] == {"CC BY-NC 4.0": 8} and kept["licences"]["commercial_use"] == "yes"
    with pytest.raises(ValueError, match="no image .* allowed licences"):
        prepare(mixed / "raw", mixed / "none", size=32, licences=["MIT"])

    monkeypatch.chdir(mixed)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mixed / 'mlflow.db'}")
    (mixed / "tiny.yaml").write_text(yaml.safe_dump({"model": {"image_size": 32, "base_channels": 4},
                                                     "train": {"epochs": 1, "batch_size": 2, "eval_samples": 2}}))
    for data, expected in (("open", "yes"), ("all", "no")):
        train_generator("dcgan", mixed / data, "consolidation", mixed / f"m-{data}", config_path=mixed / "tiny.yaml",
                        dataset=data, register=False)
        entry = register_trained(mixed / f"m-{data}")
        assert model_version(entry["registered_model"], entry["version"]).tags["commercial_use"] == expected
        assert f"- commercial use: **{expected}**" in model_card(entry["registered_model"], entry["version"])


def test_the_prepare_command_takes_an_allow_list(mixed):
    from typer.testing import CliRunner

    from sonogen.cli import app

    result = CliRunner().invoke(app, ["data", "prepare", str(mixed / "raw"), str(mixed / "open"), "--size", "32",
                                      "--licences", "CC BY 4.0"])
    assert result.exit_code == 0, result.output
    assert "commercial use of models trained on them: yes; left out: CC BY-NC 4.0 8" in result.output
    rows = list(csv.DictReader((mixed / "open" / "manifest.csv").open()))
    assert {row["licence"] for row in rows} == {"CC BY 4.0"}
