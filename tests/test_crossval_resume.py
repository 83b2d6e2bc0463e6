"""A cross-validation run again. Interrupted in a fold and finished with ``--resume``: the finished fold kept, the
interrupted fold's training continued from its checkpoint, the verdict and every prediction those of an
uninterrupted run, all in one MLflow run; changed settings refused by name, an earlier run replaced without it.
Under a changed evaluation with ``--models-from``: the earlier run's generators tested again, not trained again,
with its predictions; refused where they learned otherwise (train settings, a protocol keeping other patients
apart, an unfinished fold)."""

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
                        "train": {"epochs": 2, "batch_size": 2, "eval_samples": 2}}},
    "evaluate": {"samples": 8, "encoder_epochs": 1, "downstream": {"seeds": 3, "epochs": 1, "bootstrap": 200}},
    "gates": {"dcgan": {"extractor": "us-encoder", "max_near_copy_fraction": 0.5}},
    "register": {"onnx": "fp32"},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return tmp_path


def crossval_cli(lus: Path, *extra: str, out: str = "cv"):
    return CliRunner().invoke(app, ["crossval", "dcgan", "--data", str(lus), "--label", "consolidation", "--folds",
                                    "3", "--out", out, *extra])


def test_an_interrupted_cross_validation_resumed_gives_the_uninterrupted_verdict_in_one_mlflow_run(
        lus, workdir, monkeypatch):
    import mlflow

    whole = jobs_crossval.crossval("dcgan", lus, "consolidation", 3, workdir / "whole", "params.yaml")

    evaluate = jobs_crossval.evaluate_generator

    def lost_in_fold_1(*args, **kwargs):  # after fold 1's generator finished training, before its classifiers
        if "fold 1" in args[6]:
            raise RuntimeError("node lost")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(jobs_crossval, "evaluate_generator", lost_in_fold_1)
    interrupted = crossval_cli(lus)
    assert isinstance(interrupted.exception, RuntimeError), interrupted.output
    assert (workdir / "cv" / "fold-0" / "fold_result.json").is_file()
    assert not (workdir / "cv" / "fold-1" / "fold_result.json").exists()
    monkeypatch.setattr(jobs_crossval, "evaluate_generator", evaluate)

    trained = []
    train_generator = jobs_crossval.train_generator

    def recording(family, data, label, out, *args, **kwargs):
        trained.append((Path(out).parent.name, kwargs["resume"]))
        return train_generator(family, data, label, out, *args, **kwargs)

    monkeypatch.setattr(jobs_crossval, "train_generator", recording)
    result = crossval_cli(lus, "--resume")
    assert result.exit_code == 0, result.output
    assert trained == [("fold-1", True), ("fold-2", False)]  # fold 0 kept; fold 1 from its checkpoint
    assert "fold 0: finished earlier, kept" in result.output

    resumed = json.loads((workdir / "cv" / "crossval_report.json").read_text())
    assert resumed["pooled"] == whole["pooled"]
    for fold, uninterrupted in zip(resumed["folds"], whole["folds"], strict=True):
        for key in ("test_patients", "probabilities", "targets", "metrics", "passed"):
            assert fold[key] == uninterrupted[key], (fold["fold"], key)

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("lus-dcgan").experiment_id
    run_id = json.loads((workdir / "cv" / jobs_crossval.RUN_POINTER).read_text())["run_id"]
    assert len(client.search_runs([experiment], "tags.crossval = 'true'")) == 2  # the uninterrupted run and this
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["crossval.kept_folds"] == "0"
    assert run.data.tags["crossval.verdict"] == whole["pooled"]["verdict"]
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run_id}'")
    assert len(children) == 3  # fold 1's training continued in its own run

    # a section that decides nothing inside a fold may change: every fold is kept, nothing trains
    (workdir / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "register": {"onnx": "none"}}))
    trained.clear()
    again = crossval_cli(lus, "--resume")
    assert again.exit_code == 0, again.output
    assert trained == [] and client.get_run(run_id).data.tags["crossval.kept_folds"] == "0,1,2"

    changed = {**PARAMS, "train": {**PARAMS["train"], "dcgan": {**PARAMS["train"]["dcgan"],
                                                                "train": {"epochs": 3, "batch_size": 2}}}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(changed))
    refused = crossval_cli(lus, "--resume", "--seed", "1")
    assert refused.exit_code == 1 and trained == []
    assert "seed (0 then, 1 now)" in refused.output and "params.yaml's train.dcgan" in refused.output
    assert "without --resume" in refused.output

    # without --resume the earlier run's folds go before the first new fold starts
    def lost_at_once(*args, **kwargs):
        raise RuntimeError("node lost")

    monkeypatch.setattr(jobs_crossval, "crossval_fold", lost_at_once)
    assert isinstance(crossval_cli(lus).exception, RuntimeError)
    assert not list((workdir / "cv").glob("fold-*"))
    assert json.loads((workdir / "cv" / jobs_crossval.RUN_POINTER).read_text())["run_id"] != run_id


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
    again = crossval_cli(lus, "--models-from", "first", out="again")
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
    refused = crossval_cli(lus, "--models-from", "first", "--protocol", "yu2023", out="yu")
    assert refused.exit_code == 1 and trained == []
    assert "fold 0: the model in first/fold-0/model learned from" in refused.output
    assert "keeps validation patients apart" in refused.output

    (workdir / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "train": {**PARAMS["train"], "dcgan": {
        **PARAMS["train"]["dcgan"], "train": {"epochs": 3, "batch_size": 2, "eval_samples": 2}}}}))
    refused = crossval_cli(lus, "--models-from", "first", "--seed", "1", out="longer")
    assert refused.exit_code == 1 and trained == []
    assert "seed (0 then, 1 now)" in refused.output and "params.yaml's train.dcgan" in refused.output
    assert not (workdir / "longer").exists()  # refused before anything is written

    (workdir / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    assert "is this run's --out" in crossval_cli(lus, "--models-from", "first", out="first").output
    assert "holds no cross-validation" in crossval_cli(lus, "--models-from", "nowhere", out="other").output
    shutil.rmtree(workdir / "first" / "fold-2" / "model")
    unfinished = crossval_cli(lus, "--models-from", "first", out="partial")
    assert unfinished.exit_code == 1 and "fold 2 of first did not finish" in unfinished.output
