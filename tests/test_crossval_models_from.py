"""``sonogen crossval --models-from``: an earlier cross-validation's fold generators tested again under a changed
evaluation without training them again, with the predictions of the run that trained them; refused where they
learned otherwise (train settings, a protocol keeping other patients apart, an unfinished fold)."""

import importlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sonogen.cli import app

jobs_crossval = importlib.import_module("sonogen.jobs.crossval")  # the module: sonogen.jobs.crossval is its function

PARAMS = {
    "train": {"families": ["dcgan"], "labels": ["consolidation"],
              "dcgan": {"model": {"image_size": 32, "base_channels": 4},
                        "train": {"epochs": 1, "batch_size": 2, "eval_samples": 2}}},
    "evaluate": {"samples": 8, "encoder_epochs": 1, "downstream": {"seeds": 3, "epochs": 1, "bootstrap": 200}},
    "gates": {"dcgan": {"extractor": "us-encoder", "max_near_copy_fraction": 0.5}},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return tmp_path


def crossval_cli(lus: Path, out: str, *extra: str):
    return CliRunner().invoke(app, ["crossval", "dcgan", "--data", str(lus), "--label", "consolidation", "--folds",
                                    "3", "--out", out, *extra])


def test_models_from_tests_the_earlier_generators_again_and_refuses_ones_trained_otherwise(lus, workdir, monkeypatch):
    import mlflow

    first = jobs_crossval.crossval("dcgan", lus, "consolidation", 3, workdir / "first", "params.yaml")

    trained = []
    train_generator = jobs_crossval.train_generator

    def recording(family, data, label, out, *args, **kwargs):
        trained.append(Path(out).parent.name)
        return train_generator(family, data, label, out, *args, **kwargs)

    monkeypatch.setattr(jobs_crossval, "train_generator", recording)
    # only the evaluation changes: a coarser bootstrap and a stricter gate
    (workdir / "params.yaml").write_text(yaml.safe_dump({
        **PARAMS, "evaluate": {**PARAMS["evaluate"], "downstream": {**PARAMS["evaluate"]["downstream"],
                                                                    "bootstrap": 100}},
        "gates": {"dcgan": {"extractor": "us-encoder", "max_near_copy_fraction": 0.4}}}))
    again = crossval_cli(lus, "again", "--models-from", "first")
    assert again.exit_code == 0, again.output
    assert trained == [] and "testing the dcgan trained apart" in again.output

    report = json.loads((workdir / "again" / "crossval_report.json").read_text())
    for fold, earlier in zip(report["folds"], first["folds"], strict=True):
        weights = Path("model") / jobs_crossval.GENERATOR_DIR
        for name in (workdir / "first" / f"fold-{fold['fold']}" / weights).iterdir():
            assert (workdir / "again" / f"fold-{fold['fold']}" / weights / name.name).read_bytes() == \
                name.read_bytes()
        for key in ("generator_train_patients", "test_patients", "probabilities", "targets", "metrics"):
            assert fold[key] == earlier[key], (fold["fold"], key)
    assert report["pooled"]["delta"] == first["pooled"]["delta"]

    client = mlflow.MlflowClient()
    run = client.get_run(json.loads((workdir / "again" / jobs_crossval.RUN_POINTER).read_text())["run_id"])
    assert run.data.tags["crossval.models_from"] == "first"
    assert run.data.tags["crossval.models_from_run"] == first["run_id"]
    assert json.loads((workdir / "again" / jobs_crossval.SETTINGS).read_text())["models_from"] == "first"

    # a protocol that keeps validation patients apart trains each fold's generator on fewer patients
    refused = crossval_cli(lus, "yu", "--models-from", "first", "--protocol", "yu2023")
    assert refused.exit_code == 1 and trained == []
    assert "fold 0: the model in first/fold-0/model learned from" in refused.output
    assert "keeps validation patients apart" in refused.output

    (workdir / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "train": {**PARAMS["train"], "dcgan": {
        **PARAMS["train"]["dcgan"], "train": {"epochs": 2, "batch_size": 2, "eval_samples": 2}}}}))
    refused = crossval_cli(lus, "longer", "--models-from", "first", "--seed", "1")
    assert refused.exit_code == 1 and trained == []
    assert "seed (0 then, 1 now)" in refused.output and "params.yaml's train.dcgan" in refused.output
    assert not (workdir / "longer").exists()  # refused before anything is written

    (workdir / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    assert "is this run's --out" in crossval_cli(lus, "first", "--models-from", "first").output
    assert "holds no cross-validation" in crossval_cli(lus, "other", "--models-from", "nowhere").output
    shutil.rmtree(workdir / "first" / "fold-2" / "model")
    unfinished = crossval_cli(lus, "partial", "--models-from", "first")
    assert unfinished.exit_code == 1 and "fold 2 of first did not finish" in unfinished.output
