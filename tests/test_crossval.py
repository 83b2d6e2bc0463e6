"""Patient-level cross-validation: folds that never let a generator see its test patients, the pooled bootstrap
against a plain loop, a copying generator caught whatever its delta, and 3-fold runs on the phantom from the CLI
and from kfp.local whose verdict gates, tags and guards the registered version."""

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score
from torch import nn
from typer.testing import CliRunner

from sonogen.cli import app
from sonogen.crossval import (BASELINE, AUGMENTED, COPIES, assign_folds, fold_view, patient_labels, pool,
                              pooled_verdict)
from sonogen.data.manifest import read_manifest
from sonogen.generators import Generator, register_family
from sonogen.generators.families import unregister_family

TINY = {
    "train": {"families": ["dcgan"], "labels": ["consolidation"],
              "dcgan": {"model": {"image_size": 32, "base_channels": 4},
                        "train": {"epochs": 1, "batch_size": 2, "eval_samples": 2}}},
    "evaluate": {"samples": 8, "encoder_epochs": 1, "downstream": {"seeds": 3, "epochs": 1, "bootstrap": 200}},
    "gates": {"dcgan": {"extractor": "pixels-16", "max_near_copy_fraction": 0.5, "min_auc_delta_lower_ci": -1.0,
                        "require_improvement": True}},
    "crossval": {"families": ["dcgan"], "labels": ["consolidation"], "folds": 3},
}


@pytest.fixture
def workdir(lus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    return tmp_path


def test_folds_put_each_patient_in_one_fold_balanced_per_label_and_the_views_hide_the_test_patients(lus, tmp_path):
    records = read_manifest(lus)
    labels = patient_labels(records)
    folds = assign_folds(labels, 3, seed=4)
    assert folds == assign_folds(labels, 3, seed=4) and set(folds) == set(labels)
    for label in set(labels.values()):
        sizes = Counter(f for p, f in folds.items() if labels[p] == label)
        assert max(sizes.values()) - min(sizes.values()) <= 1, label
    assert max(Counter(folds.values()).values()) - min(Counter(folds.values()).values()) <= 1
    tested = []
    for fold in range(3):
        view = read_manifest(fold_view(lus, folds, fold, tmp_path / f"view-{fold}"))
        train = {r.patient_id for r in view if r.split == "train"}
        test = {r.patient_id for r in view if r.split == "test"}
        assert not train & test and train | test == set(labels) and len(view) == len(records)
        assert (tmp_path / f"view-{fold}" / view[0].image).is_file()
        tested += sorted(test)
    assert sorted(tested) == sorted(labels), "every patient is tested exactly once"
    with pytest.raises(ValueError, match="at least 2 folds"):
        assign_folds(labels, 1)


def test_the_pooled_bootstrap_agrees_with_a_plain_loop():
    rng = np.random.default_rng(3)
    patients = [f"p{k}" for k in range(12) for _ in range(4)]
    targets = np.repeat(np.arange(12) % 2, 4)
    scores = {arm: rng.random((3, len(targets))) + shift * targets for arm, shift in ((BASELINE, 0.2),
                                                                                      (AUGMENTED, 0.5))}
    result = pooled_verdict(targets, patients, scores, resamples=300, seed=9)

    # the same computation, written out: per seed sklearn's AUC, patients resampled per stratum with the same draws
    def auc(arm, rows):
        return np.mean([roc_auc_score(targets[rows], scores[arm][s][rows]) for s in range(3)])

    groups = {p: np.flatnonzero(np.array(patients) == p) for p in sorted(set(patients))}
    strata = [[groups[p] for p in groups if targets[groups[p]][0] == 1], [groups[p] for p in groups
                                                                          if targets[groups[p]][0] == 0]]
    draws = np.random.default_rng(9)
    deltas = []
    for _ in range(300):
        rows = []
        for stratum in strata:
            for i in draws.integers(0, len(stratum), len(stratum)):
                rows.extend(stratum[i])
        rows = np.array(rows)
        deltas.append(auc(AUGMENTED, rows) - auc(BASELINE, rows))
    everyone = np.arange(len(targets))
    assert result["real"] == pytest.approx(auc(BASELINE, everyone), abs=1e-12)
    assert result["real_plus_synthetic"] == pytest.approx(auc(AUGMENTED, everyone), abs=1e-12)
    assert [result["ci_low"], result["ci_high"]] == pytest.approx(list(np.percentile(deltas, [2.5, 97.5])), abs=1e-12)
    assert result["verdict"] == ("helps" if result["ci_low"] > 0 else "no measurable effect")


def test_a_generator_that_copies_is_reported_as_copying_whatever_its_delta():
    fold = {"fold": 0, "test_patients": ["a"], "gates": [{"gate": "max_near_copy_fraction", "passed": False}]}
    other = {"fold": 1, "test_patients": ["b"], "gates": [{"gate": "max_near_copy_fraction", "passed": True}]}
    report = pool([fold, other])
    assert report["pooled"]["verdict"] == COPIES and report["pooled"]["copying_folds"] == [0]
    with pytest.raises(ValueError, match="tested in two folds"):
        pool([fold, {**other, "test_patients": ["a"]}])


@dataclass
class CopierConfig:
    label: str
    image_size: int = 32
    capacity: int = 64


class Copier(Generator):
    """Returns its training images as they are: what the memorisation gates exist to catch."""

    family = "copier"
    config_class = CopierConfig
    conditions = frozenset({"label"})

    def __init__(self, config: CopierConfig):
        super().__init__(config)
        self.memory = nn.Module()
        self.memory.register_buffer("images", torch.zeros(config.capacity, 1, config.image_size, config.image_size))
        self.memory.register_buffer("count", torch.zeros((), dtype=torch.long))

    def networks(self) -> dict[str, nn.Module]:
        return {"memory": self.memory}

    def optimizers(self) -> dict:
        return {}

    def begin_training(self, images: torch.Tensor, total_steps: int, items=()) -> None:
        kept = images[: self.config.capacity]
        self.memory.images[: len(kept)] = kept
        self.memory.count.fill_(len(kept))

    def train_step(self, batch: torch.Tensor) -> dict[str, float]:
        self.step += 1
        return {"loss": 0.0}

    def generate(self, n: int, seed: int, condition: dict[str, Any]) -> torch.Tensor:
        count = int(self.memory.count)
        return self.memory.images[[(seed + k) % count for k in range(n)]].clone()


@pytest.fixture
def copier():
    register_family(Copier)
    yield
    unregister_family(Copier.family)


def test_a_copying_family_s_cross_validation_says_it_copies(lus, workdir, copier):
    params = {**TINY, "train": {**TINY["train"], "copier": {"train": {"epochs": 1, "batch_size": 2,
                                                                     "eval_samples": 2}}},
              "gates": {"copier": {"extractor": "pixels-16", "max_pixel_near_copy_fraction": 0.05}}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["crossval", "copier", "--data", str(lus), "--label", "consolidation",
                                      "--folds", "3", "--out", "cv", "--extractor", "pixels-16"])
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "cv" / "crossval_report.json").read_text())
    assert report["pooled"]["verdict"] == COPIES and report["pooled"]["copying_folds"] == [0, 1, 2]
    assert all(not row["passed"] for f in report["folds"] for row in f["gates"])
    assert "copies training images" in (workdir / "cv" / "crossval_report.md").read_text()


def test_a_three_fold_cross_validation_from_the_cli_gates_tags_and_guards_the_registered_version(lus, workdir):
    import mlflow

    runner = CliRunner()
    result = runner.invoke(app, ["crossval", "--data", str(lus), "--config", "params.yaml", "--out", "cv",
                                 "--extractor", "pixels-16"])
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "cv" / "dcgan-consolidation" / "crossval_report.json").read_text())
    assert [f["fold"] for f in report["folds"]] == [0, 1, 2]
    for fold in report["folds"]:
        assert not set(fold["generator_train_patients"]) & set(fold["test_patients"])
        assert set(fold["auc"]) == {"real", "real+synthetic", "synthetic+real-negatives"}
        assert all(len(values) == 3 for values in fold["auc"].values())  # per training set, per seed
    assert sorted(p for f in report["folds"] for p in f["test_patients"]) == sorted(
        {r.patient_id for r in read_manifest(lus)})
    pooled = report["pooled"]
    assert set(pooled) >= {"metric", "real", "real_plus_synthetic", "delta", "ci_low", "ci_high", "verdict"}
    assert pooled["ci_low"] <= pooled["delta"] <= pooled["ci_high"]
    for name in ("crossval_report.md", "fold_auc.png", "pooled_roc.png"):
        assert (workdir / "cv" / "dcgan-consolidation" / name).stat().st_size > 0
    client = mlflow.MlflowClient()
    [parent] = client.search_runs([client.get_experiment_by_name("lus-dcgan").experiment_id],
                                  "tags.crossval = 'true'")
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3 and parent.data.tags["crossval.verdict"] == pooled["verdict"]

    assert runner.invoke(app, ["train", "dcgan", "--data", str(lus), "--label", "consolidation", "--config",
                               "params.yaml", "--no-register"]).exit_code == 0
    gated = runner.invoke(app, ["evaluate", "models/dcgan-consolidation", "--data", str(lus), "--config",
                                "params.yaml", "--extractor", "pixels-16", "--crossval", "cv"])
    assert gated.exit_code == 0, gated.output
    gate = json.loads((workdir / "reports" / "gates" / "dcgan-consolidation" / "gate_report.json").read_text())
    assert gate["metrics"]["auc_delta_lower_ci"] == pooled["ci_low"] and "downstream" not in gate
    assert runner.invoke(app, ["register", "models/dcgan-consolidation", "--gates", "reports/gates"]).exit_code == 0
    version = client.get_model_version("lus-dcgan-consolidation", "1")
    assert version.tags["crossval.verdict"] == pooled["verdict"]
    assert float(version.tags["crossval.ci_low"]) == pytest.approx(pooled["ci_low"], rel=1e-5)
    assert "Usefulness, cross-validated" in version.description and pooled["verdict"] in version.description
    promoted = runner.invoke(app, ["registry", "promote", "lus-dcgan-consolidation", "1", "--to", "champion"])
    if pooled["verdict"] == "helps":
        assert promoted.exit_code == 0, promoted.output
    else:  # gates.dcgan.require_improvement: the version must be shown to help
        assert promoted.exit_code == 1 and "require a measured improvement" in promoted.output
        assert f"[{version.tags['crossval.ci_low']}, {version.tags['crossval.ci_high']}]" in promoted.output


def test_the_crossval_pipeline_runs_its_folds_in_parallel_with_kfp_local(workdir):
    from pipelines.crossval import compile_crossval_pipeline

    spec = next(yaml.safe_load_all(compile_crossval_pipeline(workdir / "cv.yaml").read_text()))
    assert spec["pipelineInfo"]["name"] == "sonogen-crossval"
    loop = spec["root"]["dag"]["tasks"]["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--folds"
    pooled = spec["root"]["dag"]["tasks"]["crossval-pool"]["inputs"]["artifacts"]["results"]
    assert pooled["taskOutputArtifact"]["producerTask"] == "for-loop-1"  # dsl.Collected over the folds

    params = {**TINY, "dataset": {"name": "lus", "raw": "data/raw/phantom"},
              "phantom": {"patients": 8, "frames_per_patient": 3, "seed": 0, "consolidation_fraction": 0.5},
              "prepare": {"size": 32, "split": "0.7,0.15,0.15", "seed": 0, "split_method": "stratify"},
              "gates": {"dcgan": {"extractor": "us-encoder", "max_near_copy_fraction": 0.5,
                                  "min_auc_delta_lower_ci": -1.0}}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["pipeline", "run", "--pipeline", "crossval", "--family", "dcgan", "--label",
                                      "consolidation", "--folds", "3"])
    assert result.exit_code == 0, result.output
    [report] = (workdir / ".kfp").rglob("crossval-pool/report/crossval_report.json")
    pooled = json.loads(report.read_text())["pooled"]
    assert "registered lus-dcgan-consolidation version 1" in result.output
    import mlflow

    tags = mlflow.MlflowClient().get_model_version("lus-dcgan-consolidation", "1").tags
    assert tags["crossval.verdict"] == pooled["verdict"]
