"""A cross-validation interrupted in a fold and finished with ``--resume``: the finished fold kept, the
interrupted fold's training continued from its checkpoint, the verdict and every prediction those of an
uninterrupted run, all in one MLflow run; changed settings refused by name, an earlier run replaced without it."""

import importlib
import json
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


def crossval_cli(lus: Path, *extra: str):
    return CliRunner().invoke(app, ["crossval", "dcgan", "--data", str(lus), "--label", "consolidation", "--folds",
                                    "3", "--out", "cv", *extra])


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
