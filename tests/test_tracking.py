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
from sonogen.registry import list_models, load_registered_generator


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
    sampler = load_registered_generator("models:/lus-dcgan-consolidation@candidate")
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
    result = CliRunner().invoke(app, ["registry", "list"], env={"COLUMNS": "80"})
    assert result.exit_code == 0 and "@candidate" in result.output
    lines = [line.rstrip() for line in result.output.splitlines() if "mlflow.db" not in line]  # (paths run long)
    assert max(map(len, lines)) <= 80 and "lus-dcgan-normal" in lines  # no name folded into narrow cells
    assert any(line.split()[:2] == ["2", "@candidate"] for line in lines)


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


def test_the_same_training_command_gives_the_same_weights_and_a_resumed_run_equals_an_uninterrupted_one(workdir):
    config = yaml.safe_load((workdir / "tiny.yaml").read_text())
    runs = [train_generator("dcgan", workdir / "lus", "normal", workdir / name, config_path=workdir / "tiny.yaml",
                            register=False) for name in ("a", "b")]
    assert runs[0]["run_id"] != runs[1]["run_id"]
    weights = [(workdir / name / "generator" / "weights.safetensors").read_bytes() for name in ("a", "b")]
    assert weights[0] == weights[1], "two runs of one command differ"
    assert (workdir / "a" / "history.json").read_text() == (workdir / "b" / "history.json").read_text()
    assert (workdir / "a" / "checkpoint.safetensors").read_bytes() == (workdir / "b" / "checkpoint.safetensors"
                                                                        ).read_bytes()
    config["train"]["epochs"] = 1
    (workdir / "one.yaml").write_text(yaml.safe_dump(config))
    train_generator("dcgan", workdir / "lus", "normal", workdir / "c", config_path=workdir / "one.yaml",
                    register=False)
    train_generator("dcgan", workdir / "lus", "normal", workdir / "c", config_path=workdir / "tiny.yaml",
                    register=False, resume=True)
    assert (workdir / "c" / "generator" / "weights.safetensors").read_bytes() == weights[0]


def test_training_outside_a_terminal_prints_time_stamped_progress_lines(workdir):
    result = CliRunner().invoke(app, ["train", "dcgan", "--data", "lus", "--label", "normal", "--config", "tiny.yaml",
                                      "--out", "m", "--no-register"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "finished epoch" in line]
    assert [line.split()[3] for line in lines] == ["1/2,", "2/2,"]
    assert all(line[:8].count(":") == 2 and "loss_generator" in line and "kmmd" in line for line in lines)


def test_config_errors_are_clear(workdir):
    (workdir / "bad.yaml").write_text(yaml.safe_dump({"model": {"image_sise": 32}}))
    with pytest.raises(ValueError, match=r"unknown DCGANConfig keys \['image_sise'\]"):
        load_family_config(workdir / "bad.yaml", "dcgan", "normal")
    with pytest.raises(FileNotFoundError, match="train a generator"):
        register_trained(workdir / "nothing")


def test_a_run_in_a_temporary_dvc_workspace_is_kept_in_the_repository_s_store(workdir, monkeypatch):
    """`dvc exp run --queue` runs stages in a copy under .dvc/tmp/exps that it removes afterwards; DVC_ROOT names
    the repository that queued them."""
    from sonogen.tracking import configure_mlflow, set_experiment

    copy = workdir / ".dvc" / "tmp" / "exps" / "tmp0"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(workdir))
    assert configure_mlflow() == f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    experiment = set_experiment("lus-queued")
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        mlflow.log_text("kept", "note.txt")
        artifacts = mlflow.get_artifact_uri()
    assert (workdir.resolve() / "mlruns" / "lus-queued").is_dir()
    assert artifacts.removeprefix("file://").startswith(str(workdir.resolve() / "mlruns"))
    assert not (copy / "mlruns").exists() and not (copy / "mlflow.db").exists()
