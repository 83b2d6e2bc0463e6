"""Patient-level cross-validation: folds that never let a generator see its test patients, the pooled bootstrap
against a plain loop, a copying generator caught whatever its delta, and 3-fold runs on the phantom from the CLI
and from kfp.local whose verdict gates, tags and guards the registered version."""

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from torch import nn
from typer.testing import CliRunner

from sonogen.cli import app
from sonogen.crossval import (BASELINE, AUGMENTED, COPIES, REPEATS_ONLY, assign_folds, detectable_delta, fold_view,
                              patient_labels, pool, pooled_verdict, pooled_scores, verdict_line)
from sonogen.data.manifest import read_manifest, write_manifest
from sonogen.metrics.downstream import REPEATED, DownstreamConfig, roc_table
from sonogen.metrics.protocols import PROTOCOLS
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


def plain_bootstrap(targets, patients, value, resamples, seed):
    """The patient bootstrap written out: patients resampled per class (class order), the same draws for both arms."""
    groups = {p: np.flatnonzero(np.array(patients) == p) for p in sorted(set(patients))}
    strata = [[groups[p] for p in groups if targets[groups[p]][0] == c] for c in sorted(set(targets.tolist()))]
    draws = np.random.default_rng(seed)
    deltas = []
    for _ in range(resamples):
        rows = np.array([row for stratum in strata for i in draws.integers(0, len(stratum), len(stratum))
                         for row in stratum[i]])
        deltas.append(value(AUGMENTED, rows) - value(BASELINE, rows))
    return list(np.percentile(deltas, [2.5, 97.5]))


def test_the_pooled_bootstrap_agrees_with_a_plain_loop():
    rng = np.random.default_rng(3)
    patients = [f"p{k}" for k in range(12) for _ in range(4)]
    targets = np.repeat(np.arange(12) % 2, 4)
    scores = {arm: rng.random((3, len(targets))) + shift * targets for arm, shift in ((BASELINE, 0.2),
                                                                                      (AUGMENTED, 0.5))}
    probabilities = {arm: np.stack([1 - s, s], -1) for arm, s in scores.items()}
    result = pooled_verdict(targets, patients, probabilities, resamples=300, seed=9)

    def auc(arm, rows):  # per seed sklearn's AUC
        return np.mean([roc_auc_score(targets[rows], scores[arm][s][rows]) for s in range(3)])

    everyone = np.arange(len(targets))
    assert result["real"] == pytest.approx(auc(BASELINE, everyone), abs=1e-12)
    assert result["real_plus_synthetic"] == pytest.approx(auc(AUGMENTED, everyone), abs=1e-12)
    assert [result["ci_low"], result["ci_high"]] == pytest.approx(plain_bootstrap(targets, patients, auc, 300, 9),
                                                                  abs=1e-12)
    assert result["verdict"] == ("helps" if result["ci_low"] > 0 else "no measurable effect")


def test_a_three_class_verdict_is_on_balanced_accuracy_with_per_class_f1():
    rng = np.random.default_rng(5)
    patients = [f"p{k}" for k in range(15) for _ in range(3)]
    targets = np.repeat(np.arange(15) % 3, 3)
    classes = ["covid", "pneumonia", "normal"]

    def noisy(sharpness):  # (seeds, images, classes): the true class made more probable by ``sharpness``
        logits = rng.normal(size=(3, len(targets), 3)) + sharpness * np.eye(3)[targets]
        return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)

    probabilities = {BASELINE: noisy(0.5), AUGMENTED: noisy(3.0)}
    result = pooled_verdict(targets, patients, probabilities, classes, 1, "balanced_accuracy", 300, 2)

    def balanced(arm, rows):
        return np.mean([balanced_accuracy_score(targets[rows], probabilities[arm][s][rows].argmax(1))
                        for s in range(3)])

    everyone = np.arange(len(targets))
    assert result["metric"] == "balanced_accuracy"
    assert result["real_plus_synthetic"] == pytest.approx(balanced(AUGMENTED, everyone), abs=1e-12)
    assert [result["ci_low"], result["ci_high"]] == pytest.approx(plain_bootstrap(targets, patients, balanced, 300, 2),
                                                                  abs=1e-12)
    assert result["verdict"] == "helps" and result["patients_per_class"] == dict.fromkeys(classes, 5)
    f1 = f1_score(targets, probabilities[AUGMENTED].mean(0).argmax(1), average=None)
    assert [result["per_class"][AUGMENTED][c]["f1"] for c in classes] == pytest.approx(list(f1))
    assert "auc" in result["other_metrics"]  # the label's AUC comes along, with its own interval


def test_a_gain_that_repeating_real_images_of_the_label_matches_is_not_called_helps():
    rng = np.random.default_rng(3)
    patients = [f"p{k}" for k in range(40) for _ in range(3)]
    targets = np.repeat(np.arange(40) % 2, 3)

    def noisy(sharpness):  # (seeds, images, classes): the true class made more probable by ``sharpness``
        logits = rng.normal(size=(3, len(targets), 2)) + sharpness * np.eye(2)[targets]
        return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)

    real, better = noisy(0.2), noisy(1.5)
    as_good = pooled_verdict(targets, patients, {BASELINE: real, AUGMENTED: better, REPEATED: better.copy()},
                             resamples=200)  # repeating real positives does exactly what the synthetic ones do
    assert as_good["effect"] == "helps" and as_good["verdict"] == REPEATS_ONLY
    assert as_good["over_repeated"]["effect"] == "no measurable effect"
    beyond = pooled_verdict(targets, patients, {BASELINE: real, AUGMENTED: better, REPEATED: real.copy()},
                            resamples=200)  # repeating them does nothing
    assert beyond["verdict"] == beyond["over_repeated"]["effect"] == "helps"
    assert "against as many real images of the label repeated" in verdict_line(beyond)


def test_a_true_effect_of_the_detectable_delta_is_detected_four_times_in_five():
    rng = np.random.default_rng(11)
    patients = [f"p{k}" for k in range(60) for _ in range(3)]
    targets = np.repeat(np.arange(60) % 2, 3)

    def study(accuracy_real, accuracy_synthetic):
        def arm(accuracy):  # (seeds, images, classes): each seed's call right with probability ``accuracy``
            right = rng.random((3, len(targets))) < accuracy
            return np.eye(2)[np.where(right, targets, 1 - targets)] * 0.8 + 0.1

        return pooled_verdict(targets, patients, {BASELINE: arm(accuracy_real), AUGMENTED: arm(accuracy_synthetic)},
                              ["negative", "positive"], 1, "balanced_accuracy", 200, int(rng.integers(1 << 30)))

    planned = np.mean([detectable_delta(r["ci_low"], r["ci_high"]) for r in (study(0.7, 0.7) for _ in range(10))])
    detected = [study(0.7, 0.7 + planned)["ci_low"] > 0 for _ in range(40)]
    assert 0.65 <= np.mean(detected) <= 0.93  # 80 % power; 1.96 standard errors would give ~50 %, 3.92 ~97 %


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
        assert set(fold["per_seed"]["auc"]) == {"real", "real+synthetic", "real+repeated", "synthetic+real-negatives"}
        assert all(len(values) == 3 for values in fold["per_seed"]["auc"].values())  # per training set, per seed
    assert sorted(p for f in report["folds"] for p in f["test_patients"]) == sorted(
        {r.patient_id for r in read_manifest(lus)})
    pooled = report["pooled"]
    assert set(pooled) >= {"metric", "real", "real_plus_synthetic", "delta", "ci_low", "ci_high", "verdict"}
    assert pooled["ci_low"] <= pooled["delta"] <= pooled["ci_high"]
    assert pooled["detectable_delta"] == pytest.approx(detectable_delta(pooled["ci_low"], pooled["ci_high"]))
    markdown = (workdir / "cv" / "dcgan-consolidation" / "crossval_report.md").read_text()
    assert f"±{pooled['detectable_delta']:.3f} or more would be detected" in markdown
    fold_0 = {arm: f"{np.mean(values):.3f}" for arm, values in report["folds"][0]["per_seed"]["auc"].items()}
    assert "| AUC real | AUC real+synthetic | AUC real+repeated |" in markdown
    assert f"| {fold_0['real']} | {fold_0['real+synthetic']} | {fold_0['real+repeated']} |" in markdown
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
    # for DVC: the pooled verdict among the metrics, the pooled scores and out-of-fold ROC among the plots
    headline = json.loads((workdir / "reports" / "gates" / "metrics.json").read_text())["dcgan-consolidation"]
    assert (headline["usefulness"], headline["usefulness_ci_low"]) == (pooled["verdict"], pooled["ci_low"])
    bars = json.loads((workdir / "reports" / "gates" / "downstream" / "dcgan-consolidation.json").read_text())
    assert {row["arm"]: row["score"] for row in bars} == pooled["auc"]
    roc = json.loads((workdir / "reports" / "gates" / "roc" / "dcgan-consolidation.json").read_text())
    targets, scores = pooled_scores(report)
    assert len(targets) == sum(len(f["targets"]) for f in report["folds"])  # every patient's images, once
    assert roc == roc_table(targets, {arm: scores[arm] for arm in ("real", "real+synthetic")})
    assert runner.invoke(app, ["register", "models/dcgan-consolidation", "--gates", "reports/gates"]).exit_code == 0
    version = client.get_model_version("lus-dcgan-consolidation", "1")
    assert version.tags["crossval.verdict"] == pooled["verdict"]
    assert float(version.tags["crossval.ci_low"]) == pytest.approx(pooled["ci_low"], rel=1e-5)
    assert float(version.tags["crossval.detectable_delta"]) == pytest.approx(pooled["detectable_delta"], rel=1e-5)
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
    encoders = [fold["extractor"] for fold in json.loads(report.read_text())["folds"]]
    assert len(set(encoders)) == 3 and all(e.startswith("us-encoder:") for e in encoders)  # each fold its own


def test_by_default_a_fold_measures_with_a_us_encoder_of_its_own_training_patients(lus, workdir):
    import mlflow

    from sonogen.data.manifest import MANIFEST, file_sha256
    from sonogen.jobs.crossval import crossval_fold

    params = {**TINY, "gates": {"dcgan": {"extractor": "us-encoder", "max_near_copy_fraction": 0.5}}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    result = crossval_fold("dcgan", lus, "consolidation", 0, 3, workdir / "fold", "params.yaml", None, "lus",
                           view=workdir / "view")
    assert result["extractor"] == f"us-encoder:{workdir / 'fold' / 'encoder'}"
    [version] = mlflow.MlflowClient().search_model_versions("name='lus-us-encoder'")
    # trained on the fold's view, whose training split holds none of the fold's test patients
    assert version.tags["data_manifest_sha256"] == file_sha256(workdir / "view" / MANIFEST)
    trained_on = {r.patient_id for r in read_manifest(workdir / "view") if r.split == "train"}
    assert trained_on and not trained_on & set(result["test_patients"])
    assert [row for row in result["gates"] if row["gate"] == "max_near_copy_fraction"]


def relabelled(lus: Path, out: Path, names: dict[str, str], split_normals: str | None = None) -> Path:
    """The phantom under other label names (a three-class preset's); with ``split_normals``, every other normal
    patient is given that label, so there are three classes."""
    out.mkdir()
    for folder in ("images", "masks"):
        (out / folder).symlink_to(lus.resolve() / folder, target_is_directory=True)
    normals = sorted({r.patient_id for r in read_manifest(lus) if r.label == "normal"})
    third = set(normals[::2]) if split_normals else set()
    write_manifest(out, [replace(r, label=split_normals if r.patient_id in third else names[r.label])
                         for r in read_manifest(lus)])
    return out


@pytest.mark.parametrize("protocol, label, names, third", [
    ("yu2023", "consolidation", {"consolidation": "consolidation", "normal": "normal"}, None),
    ("zhang2023", "pneumonia", {"consolidation": "pneumonia", "normal": "normal"}, "covid"),
    ("basarab2024", "malignant", {"consolidation": "malignant", "normal": "normal"}, "benign"),
])
def test_each_paper_protocol_runs_its_cross_validation_and_reports_its_metrics(lus, workdir, protocol, label, names,
                                                                               third):
    data = relabelled(lus, workdir / "data", names, third)
    params = {**TINY, "gates": {"dcgan": {"extractor": "pixels-16"}}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["crossval", "dcgan", "--data", str(data), "--label", label, "--folds", "3",
                                      "--out", "cv", "--extractor", "pixels-16", "--protocol", protocol])
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "cv" / "crossval_report.json").read_text())
    pooled, preset = report["pooled"], PROTOCOLS[protocol]
    assert pooled["protocol"] == protocol and pooled["metric"] == preset.metric
    classes = list(preset.classes) or [f"not {label}", label]
    assert set(pooled["per_class"]["real"]) == set(classes)  # per-class precision / recall / F1
    assert set(pooled["patients_per_class"]) == set(classes)
    assert {"auc", "balanced_accuracy"} <= set(pooled)
    assert pooled["ci_low"] <= pooled["delta"] <= pooled["ci_high"]
    for fold in report["folds"]:
        assert fold["classes"] == classes and fold["protocol"] == protocol
        if preset.needs_validation:  # the next fold's patients chose the classifiers; the generator never saw them
            assert fold["validation_patients"] and not set(fold["validation_patients"]) & (
                set(fold["generator_train_patients"]) | set(fold["test_patients"]))
            selection = fold["selection"]["real"]
            assert len(selection["search_scores"]) == preset.search_trials
            assert all(1 <= epoch <= 1 for epoch in selection["epochs"])
    markdown = (workdir / "cv" / "crossval_report.md").read_text()
    assert f"protocol `{protocol}`" in markdown and "F1 per class" in markdown


def test_a_protocol_names_what_to_write_when_the_label_is_not_one_of_its_classes(lus, workdir):
    result = CliRunner().invoke(app, ["crossval", "dcgan", "--data", str(lus), "--label", "consolidation",
                                      "--folds", "3", "--out", "cv", "--extractor", "pixels-16",
                                      "--protocol", "zhang2023"])
    assert result.exit_code == 1
    assert "covid, pneumonia, normal" in result.output and "evaluate.downstream.classes" in result.output
    with pytest.raises(ValueError, match="yu2023"):
        DownstreamConfig(protocol="yu2024")


class Placer(Copier):
    """Returns its training images with their lesion boxes: a family that places lesions, in a few lines."""

    family = "placer"
    places_lesions = True

    def __init__(self, config: CopierConfig):
        super().__init__(config)
        self.memory.register_buffer("boxes", torch.full((config.capacity, 4), -1.0))

    def begin_training(self, images: torch.Tensor, total_steps: int, items=()) -> None:
        super().begin_training(images, total_steps, items)
        for k, item in enumerate(list(items)[: self.config.capacity]):
            if len(item["boxes"]):
                self.memory.boxes[k] = item["boxes"][0]

    def generate_with_boxes(self, n: int, seed: int, condition: dict[str, Any]) -> tuple[torch.Tensor, list]:
        rows = [(seed + k) % int(self.memory.count) for k in range(n)]
        boxes = [[self.memory.boxes[r].tolist()] if self.memory.boxes[r, 0] >= 0 else [] for r in rows]
        return self.memory.images[rows].clone(), boxes


@pytest.fixture
def placer():
    register_family(Placer)
    yield
    unregister_family(Placer.family)


def test_pooled_detection_is_the_ap_of_every_fold_s_detections_with_a_patient_interval():
    from sonogen.metrics.detection import average_precision, pooled_detection

    rng = np.random.default_rng(0)
    truths = [[[4.0 + k % 5, 6.0, 14.0 + k % 5, 15.0]] if k % 3 else [] for k in range(60)]
    patients = [f"p{k // 4}" for k in range(60)]
    exact = [(boxes, [0.9] * len(boxes)) for boxes in truths]
    scattered = [([[float(x), float(y), x + 6.0, y + 6.0] for x, y in rng.uniform(0, 24, (2, 2))], [0.5, 0.4])
                 for _ in truths]
    result = pooled_detection(truths, patients, {BASELINE: [scattered, scattered], AUGMENTED: [exact, exact]},
                              BASELINE, AUGMENTED, resamples=50)
    assert result["ap50"][AUGMENTED] == pytest.approx(1.0)
    assert result["ap50"][BASELINE] == pytest.approx(average_precision(scattered, truths)["ap50"])
    assert result["ap50_delta_ci95"][0] > 0 and result["ap_delta"] > 0.5
    assert result["patients_per_class"] == {"with lesions": 15, "without lesions": 0}  # every patient has one
    same = pooled_detection(truths, patients, {BASELINE: [scattered], AUGMENTED: [scattered]}, BASELINE, AUGMENTED,
                            resamples=20)
    assert same["ap50_delta"] == 0 and same["ap50_delta_ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="no test image has a lesion"):
        pooled_detection([[]] * 4, ["a", "a", "b", "b"], {BASELINE: [[([], [])] * 4], AUGMENTED: [[([], [])] * 4]},
                         BASELINE, AUGMENTED)


def test_a_lesion_placing_family_is_judged_on_pooled_detection_under_the_diffultra_protocol(lus, workdir, placer):
    params = {**TINY, "train": {**TINY["train"], "placer": {"train": {"epochs": 1, "batch_size": 2,
                                                                     "eval_samples": 2}}},
              "evaluate": {**TINY["evaluate"], "detection_seeds": 2, "detection_steps": 150},
              "gates": {"placer": {"extractor": "pixels-16", "min_detection_ap50_delta": -1.0}}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["crossval", "placer", "--data", str(lus), "--label", "consolidation",
                                      "--folds", "3", "--out", "cv", "--extractor", "pixels-16",
                                      "--protocol", "diffultra2025"])
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "cv" / "crossval_report.json").read_text())
    pooled, folds = report["pooled"], report["folds"]
    assert pooled["protocol"] == "diffultra2025" and pooled["metric"] == "ap50"
    assert pooled["ci_low"] <= pooled["delta"] <= pooled["ci_high"]
    assert pooled["delta"] == pytest.approx(pooled["detection"]["ap50_delta"])
    assert pooled["detection"]["images"] == len(read_manifest(lus))  # every image tested once, out of fold
    assert {"ap", "auc", "balanced_accuracy"} <= set(pooled["other_metrics"])  # the classifiers' come along
    for fold in folds:  # pooled, so no fold is gated on its own few patients' detection
        assert "min_detection_ap50_delta" not in [row["gate"] for row in fold["gates"]]
        assert len(fold["per_seed"]["ap50"]["real"]) == 2
    assert "detection AP50" in (workdir / "cv" / "crossval_report.md").read_text()
    refused = CliRunner().invoke(app, ["crossval", "dcgan", "--data", str(lus), "--label", "consolidation",
                                       "--folds", "3", "--out", "cv2", "--extractor", "pixels-16",
                                       "--protocol", "diffultra2025"])
    assert refused.exit_code == 1 and "does not place lesions" in refused.output


class Tracer(Copier):
    """Returns its training images with their lesion masks: a family that draws pairs, in a few lines."""

    family = "tracer"
    draws_masks = True

    def __init__(self, config: CopierConfig):
        super().__init__(config)
        self.memory.register_buffer("masks", torch.zeros(config.capacity, config.image_size, config.image_size))

    def begin_training(self, images: torch.Tensor, total_steps: int, items=()) -> None:
        super().begin_training(images, total_steps, items)
        for k, item in enumerate(list(items)[: self.config.capacity]):
            self.memory.masks[k] = item["mask"][0]

    def generate_with_masks(self, n: int, seed: int, condition: dict[str, Any]) -> tuple[torch.Tensor, list]:
        rows = [(seed + k) % int(self.memory.count) for k in range(n)]
        return self.memory.images[rows].clone(), [self.memory.masks[r].numpy().astype(np.uint8) for r in rows]


@pytest.fixture
def tracer():
    register_family(Tracer)
    yield
    unregister_family(Tracer.family)


def test_a_family_that_draws_pairs_is_judged_on_pooled_segmentation_under_the_wen_protocol(lus, workdir, tracer):
    params = {**TINY, "train": {**TINY["train"], "tracer": {"train": {"epochs": 1, "batch_size": 2,
                                                                     "eval_samples": 2}}},
              "gates": {"tracer": {"extractor": "pixels-16", "min_seg_dice_delta_lower_ci": -1.0}}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["crossval", "tracer", "--data", str(lus), "--label", "consolidation",
                                      "--folds", "3", "--out", "cv", "--extractor", "pixels-16",
                                      "--protocol", "wen2026"])
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "cv" / "crossval_report.json").read_text())
    pooled, folds = report["pooled"], report["folds"]
    assert pooled["protocol"] == "wen2026" and pooled["metric"] == "seg_dice"
    assert pooled["ci_low"] <= pooled["delta"] <= pooled["ci_high"]
    lesions = [r for r in read_manifest(lus) if r.label == "consolidation"]
    assert pooled["segmentation"]["test_images"] == len(lesions)  # every lesion image tested once, out of fold
    assert pooled["patients_per_class"] == {"with lesions": len({r.patient_id for r in lesions})}
    # the pooled value is the mean of every fold's per-image Dice: nothing is averaged per fold first
    dice = np.concatenate([np.asarray(f["segmentation"]["dice"]["real"]) for f in folds], axis=1)
    assert pooled["real"] == pytest.approx(dice.mean(0).mean())
    assert {"auc", "balanced_accuracy"} <= set(pooled["other_metrics"])  # the classifiers' come along
    for fold in folds:
        assert "min_seg_dice_delta_lower_ci" not in [row["gate"] for row in fold["gates"]]
        assert len(fold["per_seed"]["seg_dice"]["real+synthetic"]) == 3
    assert "lesion Dice" in (workdir / "cv" / "crossval_report.md").read_text()
    refused = CliRunner().invoke(app, ["crossval", "dcgan", "--data", str(lus), "--label", "consolidation",
                                       "--folds", "3", "--out", "cv2", "--extractor", "pixels-16",
                                       "--protocol", "wen2026"])
    assert refused.exit_code == 1 and "draws no masks" in refused.output


def test_each_fold_can_train_the_other_label_too_for_the_arm_of_synthetic_images_only(lus, workdir):
    params = {**TINY, "crossval": {**TINY["crossval"], "synthetic_only": True}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["crossval", "dcgan", "--data", str(lus), "--label", "consolidation",
                                      "--folds", "2", "--out", "cv", "--extractor", "pixels-16"])
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "cv" / "crossval_report.json").read_text())
    arms = {"real", "real+synthetic", "real+repeated", "synthetic+real-negatives", "synthetic"}
    for fold in report["folds"]:
        assert set(fold["probabilities"]) == arms and set(fold["per_seed"]["auc"]) == arms
        negative = json.loads((workdir / "cv" / f"fold-{fold['fold']}" / "negative" / "run.json").read_text())
        assert negative["label"] == "normal"  # trained on the fold's training patients, as the positive one
    assert set(report["pooled"]["auc"]) == arms  # every arm pooled over every patient

    three = workdir / "three-labels"
    three.mkdir()
    for folder in ("images", "masks"):
        (three / folder).symlink_to(lus / folder)
    records = read_manifest(lus)
    first = next(r.patient_id for r in records if r.label == "normal")
    write_manifest(three, [replace(r, label="pneumonia") if r.patient_id == first else r for r in records])
    refused = CliRunner().invoke(app, ["crossval", "dcgan", "--data", str(three), "--label", "consolidation",
                                       "--folds", "2", "--out", "cv3", "--extractor", "pixels-16"])
    assert refused.exit_code == 1 and "it needs a two-label dataset" in refused.output
