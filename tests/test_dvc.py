"""DVC as users run it: `dvc repro` of the repository's own dvc.yaml, and push/pull to S3 (a moto server)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from sonogen.crossval import effect_of
from sonogen.data.lesion_bank import LesionBank
from sonogen.data.manifest import file_sha256, read_manifest
from sonogen.generators import load_generator

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = dict(os.environ)
    # the stages call `sonogen`, which lives beside this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(args, cwd, env=None) -> str:
    result = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def dvc(*args, cwd, env=None) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd, env)


@pytest.fixture
def project(tmp_path) -> Path:
    return new_project(tmp_path / "project")


def new_project(root: Path) -> Path:
    """A copy of this repository's pipeline definition in a fresh git + DVC repository, with tiny parameters."""
    root.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root)
    (root / "sonogen").symlink_to(REPO / "sonogen")  # stages depend on the code that produces their outputs
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["phantom"].update(patients=8, frames_per_patient=1)
    params["prepare"].update(size=32)
    params["train"]["dcgan"] = {
        "model": {"image_size": 32, "base_channels": 4},
        "train": {"epochs": 1, "batch_size": 2, "eval_samples": 2},
    }
    params["evaluate"].update(samples=8, encoder_epochs=1, downstream={"seeds": 3, "epochs": 1, "bootstrap": 100})
    # a one-epoch GAN is far from realistic but copies nothing: the memorisation gate alone lets it through
    params["gates"] = {"dcgan": {"extractor": "us-encoder", "max_near_copy_fraction": 0.5}}
    params["crossval"] = {"families": [], "labels": ["consolidation"], "folds": 2, "seed": 0}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run(["git", "init", "-q"], root)
    dvc("init", "-q", cwd=root)
    return root


def _model_version(project, name, version):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_model_version(name, version)


def _version_tags(project, name, version) -> dict:
    return dict(_model_version(project, name, version).tags)


def _walk(node):
    """Every mapping inside a JSON value (`dvc exp show --json` nests experiments under their baseline)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def report_of(project: Path, name: str) -> dict:
    return json.loads((project / "reports" / "gates" / name / "gate_report.json").read_text())


def test_dvc_repro_prepares_trains_evaluates_and_registers_what_passes(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["crossval"]["families"] = ["dcgan"]  # the crossval stage, gating usefulness on its pooled verdict
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = dvc("repro", cwd=project)
    assert "registered lus-us-encoder version 1" in out
    assert "registered lus-dcgan-consolidation version 1 as @candidate (gate passed)" in out
    assert "registered lus-dcgan-normal version 1 as @candidate (gate passed)" in out
    prepared = project / "data" / "prepared" / "lus"
    records = read_manifest(prepared)
    assert len(records) == 8 and {r.split for r in records} <= {"train", "val", "test"}
    registered = json.loads((project / "reports" / "registered.json").read_text())
    assert [r["registered_model"] for r in registered] == ["lus-dcgan-consolidation", "lus-dcgan-normal"]
    assert [r["onnx"]["precision"] for r in registered] == ["fp32", "fp32"]  # params.yaml's register.onnx
    report = json.loads((project / "reports" / "gates" / "dcgan-normal" / "gate_report.json").read_text())
    assert report["passed"] and report["extractor"] == "lus-us-encoder@1"
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # params.yaml: device auto
    assert [row["gate"] for row in report["gates"]] == ["max_near_copy_fraction"]
    tags = _version_tags(project, "lus-dcgan-normal", "1")
    assert tags["gate"] == "passed" and tags["gate.extractor"] == "lus-us-encoder@1"
    card = _model_version(project, "lus-dcgan-normal", "1").description
    assert "### Downstream classifier" in card and "| real+synthetic |" in card
    assert (project / "models" / "dcgan-normal" / "samples.png").exists()
    pooled = json.loads((project / "reports" / "crossval" / "dcgan-consolidation" / "crossval_report.json"
                         ).read_text())["pooled"]
    assert _version_tags(project, "lus-dcgan-consolidation", "1")["crossval.verdict"] == pooled["verdict"]
    assert "crossval.verdict" not in _version_tags(project, "lus-dcgan-normal", "1")  # not cross-validated
    assert LesionBank.load(project / "banks" / "consolidation").lesions  # the lesion_bank stage
    # what DVC users compare settings with: every gated model's headline values, and its curves per epoch
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project))
    [metrics] = [entry["data"]["reports/gates/metrics.json"]["data"] for entry in shown.values()]
    assert set(metrics) == {"dcgan-consolidation", "dcgan-normal"}
    for name, values in metrics.items():
        assert values["passed"] == 1 and values["kmmd"] == report_of(project, name)["metrics"]["kmmd"]
        assert {"one_nn_acc", "near_copy_fraction", "auc_delta"} <= set(values)
    assert metrics["dcgan-consolidation"]["usefulness"] == pooled["verdict"]  # cross-validated
    low, high = report_of(project, "dcgan-normal")["downstream"]["auc_delta_ci95"]  # its test split's
    assert metrics["dcgan-normal"]["usefulness"] == effect_of(low, high)
    out = dvc("plots", "show", "--out", str(project / "plots"), cwd=project)
    assert "failed to load" not in out and "WARNING" not in out
    html = (project / "plots" / "index.html").read_text()
    for kind in ("curves", "downstream", "roc"):
        assert f"reports/gates/{kind}/dcgan-normal.json" in html
        assert f"reports/gates/{kind}/dcgan-consolidation.json" in html
    assert "kmmd" in html and "real+synthetic" in html and "synthetic+real-negatives" in html
    assert "up to date" in dvc("status", cwd=project)
    # a fresh clone (no tracking store, no cache) repeats every output byte for byte: dvc.lock stays as committed
    clone = new_project(project.parent / "clone")
    (clone / "params.yaml").write_text((project / "params.yaml").read_text())
    dvc("repro", cwd=clone)
    assert (clone / "dvc.lock").read_text() == (project / "dvc.lock").read_text()

    # an impossible threshold: evaluate and register run again, nothing new is registered, the runs keep reports
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["gates"]["dcgan"]["max_kmmd"] = 0.0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = dvc("repro", cwd=project)
    assert "Stage 'train@dcgan-normal' didn't change" in out and "Running stage 'evaluate'" in out
    assert "not registered lus-dcgan-normal: gates ['max_kmmd'] failed" in out
    assert "version 2" not in out
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    training_run = client.get_run(json.loads((project / "models" / "dcgan-normal" / "run.json").read_text())["run_id"])
    assert training_run.data.tags["gate"] == "failed" and "gate.kmmd" in training_run.data.metrics
    assert "gate_report" in [a.path for a in client.list_artifacts(training_run.info.run_id)]

    # gating a registered version by its alias tags that version
    out = run([sys.executable, "-m", "sonogen.cli", "evaluate", "--model", "models:/lus-dcgan-normal@candidate",
               "--data", str(prepared), "--config", "params.yaml", "--out", "reports/adhoc"], project)
    assert "lus-dcgan-normal-v1: FAILED (lus-us-encoder@1)" in out
    # the long steps are announced as they start: the twelve downstream classifiers take most of an evaluation
    assert "lus-dcgan-normal-v1: downstream classifier 12/12: synthetic+real-negatives, seed 2" in out
    assert _version_tags(project, "lus-dcgan-normal", "1")["gate"] == "failed"
    with Image.open(prepared / records[0].image) as im:
        assert im.size == (32, 32)

    # an experiment with another training setting (last: it leaves its results in the workspace): only what
    # depends on it reruns, `dvc exp show` holds the setting and the gate values it led to, and the MLflow runs
    # name the experiment
    git = ["git", "-c", "user.name=sonogen", "-c", "user.email=sonogen@example.org"]
    (project / ".gitignore").write_text("mlflow.db\nmlruns/\nplots/\n")  # the tracking store stays out of git
    run(["git", "add", "-A"], project)
    run([*git, "commit", "-q", "-m", "baseline"], project)
    out = dvc("exp", "run", "-n", "wider", "-S", "train.dcgan.model.base_channels=8", cwd=project)
    assert "Stage 'prepare' didn't change" in out and "Running stage 'train@dcgan-normal'" in out
    shown = json.loads(dvc("exp", "show", "--json", cwd=project))
    (project / "exp-show.json").write_text(json.dumps(shown, indent=1))  # to read when this fails
    [data] = [node["data"] for node in _walk(shown) if node.get("name") == "wider" and "data" in node]
    assert data["params"]["params.yaml"]["data"]["train"]["dcgan"]["model"]["base_channels"] == 8
    kmmd = data["metrics"]["reports/gates/metrics.json"]["data"]["dcgan-normal"]["kmmd"]
    assert kmmd != metrics["dcgan-normal"]["kmmd"]  # the baseline's
    tagged = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`dvc.experiment` = 'wider'")
    assert {run.data.tags["label"] for run in tagged} == {"consolidation", "normal"}

    # the local queue: a queued experiment runs in a temporary copy of the repository, and its MLflow runs still
    # land in the repository's store
    dvc("exp", "run", "--queue", "-n", "queued", "-S", "train.dcgan.model.base_channels=6", cwd=project)
    dvc("queue", "start", cwd=project)
    deadline = time.monotonic() + 600
    while "Queued" in (status := dvc("queue", "status", cwd=project)) or "Running" in status:
        assert time.monotonic() < deadline, status
        time.sleep(5)
    dvc("queue", "stop", cwd=project)
    assert "Success" in status, dvc("queue", "logs", "queued", cwd=project)
    shown = json.loads(dvc("exp", "show", "--json", cwd=project))
    [data] = [node["data"] for node in _walk(shown) if node.get("name") == "queued" and "data" in node]
    assert data["params"]["params.yaml"]["data"]["train"]["dcgan"]["model"]["base_channels"] == 6
    assert data["metrics"]["reports/gates/metrics.json"]["data"]["dcgan-normal"]["kmmd"] != kmmd
    queued = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`dvc.experiment` = 'queued'")
    assert {run.data.tags["label"] for run in queued} == {"consolidation", "normal"}
    for queued_run in queued:  # the artifacts too: not in the temporary copy DVC removes
        assert Path(queued_run.info.artifact_uri.removeprefix("file://")).is_relative_to(project)


def test_dvc_repro_trains_diffultra_on_the_bank_and_its_own_base_ldm(project):
    tiny_train = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "eval_samples": 2, "precision": "fp32"}
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["phantom"].update(frames_per_patient=2)
    params["train"].update(families=["diffultra"])  # on consolidation; it declines normal, its background
    params["train"]["ldm"] = {"model": {"image_size": 32, "vae_channels": [8, 16], "unet_channels": [16, 32],
                                        "embedding_dim": 16, "vae_steps": 1, "steps": 2}, "train": tiny_train}
    params["train"]["diffultra"] = {"model": {"image_size": 32, "steps": 2}, "train": tiny_train}
    params["evaluate"].update(samples=4, downstream=None, detection_seeds=2, detection_steps=2)
    params["gates"] = {"diffultra": {"min_detection_ap50_delta": -1.0}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = dvc("repro", cwd=project)
    assert "registered lus-diffultra-consolidation version 1 as @candidate (gate passed)" in out
    assert [r["registered_model"] for r in json.loads((project / "reports" / "registered.json").read_text())] == [
        "lus-diffultra-consolidation"]  # its base ldm is neither gated nor registered
    trained = load_generator(project / "models" / "diffultra-consolidation" / "generator")
    assert trained.bank.source["data"] == "data/prepared/lus"  # built by its stage from the data, not inline
    assert trained.config.base_model == "models/diffultra-consolidation/base/generator"
    assert "background_label" in json.loads((project / "models" / "diffultra-normal" / "declined.json").read_text())[
        "reason"]


def test_dvc_repro_trains_gates_and_registers_lesion_pairs_on_their_own_base_ldm(project):
    tiny_train = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "eval_samples": 2, "precision": "fp32"}
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["phantom"].update(frames_per_patient=2)
    params["train"].update(families=["lesionpairs"])  # on consolidation; normal is its healthy background
    params["train"]["ldm"] = {"model": {"image_size": 32, "vae_channels": [8, 16], "unet_channels": [16, 32],
                                        "embedding_dim": 16, "vae_steps": 1, "steps": 2}, "train": tiny_train}
    params["train"]["lesionpairs"] = {"model": {"image_size": 32, "steps": 2}, "train": tiny_train}
    params["evaluate"].update(samples=4, downstream=None)
    params["gates"] = {"lesionpairs": {"min_mask_dice_gain": -1.0}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = dvc("repro", cwd=project)
    assert "registered lus-lesionpairs-consolidation version 1 as @candidate (gate passed)" in out
    report = report_of(project, "lesionpairs-consolidation")
    assert {"mask_dice", "mask_dice_chance", "mask_dice_real"} <= set(report["metrics"])
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project))
    [metrics] = [entry["data"]["reports/gates/metrics.json"]["data"] for entry in shown.values()]
    assert metrics["lesionpairs-consolidation"]["mask_dice_gain"] == report["metrics"]["mask_dice_gain"]
    declined = json.loads((project / "models" / "lesionpairs-normal" / "declined.json").read_text())
    assert declined["reason"].startswith("lesionpairs draws lesions into normal frames")


def test_push_and_pull_through_s3(project, s3_server, aws_env):
    import boto3

    env = _env()  # the test credentials are in the environment (aws_env)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="sonogen-data")
    dvc("remote", "add", "-d", "s3remote", "s3://sonogen-data/dvc", cwd=project, env=env)
    dvc("remote", "modify", "s3remote", "endpointurl", s3_server, cwd=project, env=env)
    dvc("repro", "prepare", cwd=project, env=env)
    prepared = project / "data" / "prepared" / "lus"
    before = {r.image: r.sha256 for r in read_manifest(prepared)}
    dvc("push", "prepare", cwd=project, env=env)
    stored = s3.list_objects_v2(Bucket="sonogen-data", Prefix="dvc/")
    assert stored["KeyCount"] >= len(before)

    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    dvc("pull", "prepare", cwd=project, env=env)
    after = {r.image: r.sha256 for r in read_manifest(prepared)}
    assert after == before
    assert all(file_sha256(prepared / image) == digest for image, digest in after.items())
