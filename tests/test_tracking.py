"""Training tracked in a real (temporary) MLflow store, registration, loading by alias, the registry table."""

import json

import mlflow
import pytest
import torch
import yaml
from typer.testing import CliRunner

from sonogen.cli import app
from sonogen.data.phantom import generate
from sonogen.data.prepare import prepare
from sonogen.generators import load_generator
from sonogen.jobs import load_family_config, register_trained, train_generator
from sonogen.registry import list_models, load_sampler


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the embedded store (mlflow.db, mlruns/) lives in the working directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    generate(tmp_path / "raw", patients=6, frames_per_patient=2, seed=0)
    prepare(tmp_path / "raw", tmp_path / "lus", size=32, stratify=True)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({
        "model": {"image_size": 32, "base_channels": 4, "lr_generator": 2e-4, "lr_discriminator": 2e-4},
        "train": {"epochs": 2, "batch_size": 4, "eval_samples": 6, "log_every_steps": 1},
    }))
    return tmp_path


def test_train_logs_run_and_registers_a_candidate(workdir):
    info = train_generator("dcgan", workdir / "lus", "consolidation", workdir / "models" / "c",
                           config_path=workdir / "tiny.yaml")
    assert info["registered_model"] == "lus-dcgan-consolidation" and info["version"] == "1"
    assert (workdir / "mlflow.db").exists()
    client = mlflow.MlflowClient()
    run = client.get_run(info["run_id"])
    assert run.data.params["model.base_channels"] == "4"
    assert run.data.params["data_label"] == "consolidation"
    assert len(run.data.params["data_manifest_sha256"]) == 64
    assert run.data.tags["code_version"]
    kmmd = client.get_metric_history(info["run_id"], "kmmd")
    assert [m.step for m in kmmd] == [1, 2]
    assert len(client.get_metric_history(info["run_id"], "loss_generator")) >= 2
    artifacts = {a.path for a in client.list_artifacts(info["run_id"], "samples")}
    assert artifacts == {"samples/epoch_0001.png", "samples/epoch_0002.png"}

    version = client.get_model_version_by_alias("lus-dcgan-consolidation", "candidate")
    assert str(version.version) == "1"
    assert version.tags["label"] == "consolidation" and float(version.tags["metric.kmmd"]) >= 0
    sampler = load_sampler("models:/lus-dcgan-consolidation@candidate")
    local = load_generator(workdir / "models" / "c" / "generator")
    assert torch.equal(sampler.sample(4, seed=5), local.sample(4, seed=5))
    pyfunc = mlflow.pyfunc.load_model("models:/lus-dcgan-consolidation@candidate")
    images = pyfunc.predict({"n": 3, "seed": 5, "label": "consolidation"})
    assert images.shape == (3, 32, 32) and images.dtype.name == "uint8"


def test_second_training_adds_a_version_and_moves_the_alias(workdir):
    first = train_generator("dcgan", workdir / "lus", "normal", workdir / "m1", config_path=workdir / "tiny.yaml")
    second = train_generator("dcgan", workdir / "lus", "normal", workdir / "m2", config_path=workdir / "tiny.yaml",
                             register=False)
    assert "version" not in second
    registered = register_trained(workdir / "m2")
    assert (first["version"], registered["version"]) == ("1", "2")
    rows = list_models()
    assert [(r["version"], r["aliases"]) for r in rows] == [("2", ["candidate"]), ("1", [])]
    assert "version" not in json.loads((workdir / "m2" / "run.json").read_text()), "training output is not modified"
    result = CliRunner().invoke(app, ["registry", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "lus-dcgan-normal" in result.output and "@candidate" in result.output


def test_resume_continues_the_same_run(workdir):
    config = yaml.safe_load((workdir / "tiny.yaml").read_text())
    first = train_generator("dcgan", workdir / "lus", "normal", workdir / "m", config_path=workdir / "tiny.yaml",
                            register=False)
    config["train"]["epochs"] = 3
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(config))
    resumed = train_generator("dcgan", workdir / "lus", "normal", workdir / "m", config_path=workdir / "tiny.yaml",
                              register=False, resume=True)
    assert resumed["run_id"] == first["run_id"] and resumed["final"]["epoch"] == 3
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(first["run_id"], "kmmd")] == [1, 2, 3]


def test_config_errors_are_clear(workdir):
    (workdir / "bad.yaml").write_text(yaml.safe_dump({"model": {"image_sise": 32}}))
    with pytest.raises(ValueError, match=r"unknown DCGANConfig keys \['image_sise'\]"):
        load_family_config(workdir / "bad.yaml", "dcgan", "normal")
    with pytest.raises(FileNotFoundError, match="train a generator"):
        register_trained(workdir / "nothing")
