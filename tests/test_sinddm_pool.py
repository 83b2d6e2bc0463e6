"""SinDDM pooled as Zhang et al. ran it: one single-image SinDDM per chosen image, trained in turns and saved as
one model whose samples each come from one member, exactly as that member would draw them."""

import pytest
import torch

from sonogen.data import UltrasoundDataset
from sonogen.generators import load_generator
from sonogen.generators.base import image_generators
from sonogen.generators.sinddm_pool import SinDDMPool, SinDDMPoolConfig
from sonogen.generators.trainer import TrainConfig, train

TINY = {"coarsest_area": 100, "coarsest_side": (8, 12), "timesteps": 20, "channels": 16}


def trained(lus, out, epochs: int, resume: bool = False) -> SinDDMPool:
    torch.manual_seed(0)  # as the train job seeds before building a generator
    # no learning-rate milestones: they are shares of the whole run, which a shorter first run would move
    model = SinDDMPool(SinDDMPoolConfig(label="normal", max_images=2, lr_milestones=(), **TINY))
    train(model, lus, "normal", TrainConfig(epochs=epochs, batch_size=4, steps_per_epoch=10, eval_samples=4), out,
          resume=resume)
    return model


def test_a_pool_trains_one_sinddm_per_image_and_each_sample_is_its_member_s(lus, tmp_path):
    model = trained(lus, tmp_path / "pool", epochs=2)
    patients = {r.image: r.patient_id for r in UltrasoundDataset(lus, split="train", labels=["normal"]).records}
    assert len(model.members) == 2 and len({patients[image] for image in model.config.images}) == 2
    assert model.step == 20 and [m.step for m in model.members] == [10, 10]  # in turns
    for member, image in zip(model.members, model.config.images):
        assert member.config.images == (image,) and len(member._pyramids) == 1  # its own image only
    assert not torch.equal(model.members[0].layouts, model.members[1].layouts)

    drawn, members = model.sample(6, seed=3), model.member_of(6, 3)
    assert set(model.member_of(16, 3).tolist()) == {0, 1}
    noise = image_generators(3, 6)
    for position in range(6):
        member = model.members[int(members[position])]
        *_, alone = member.scale_samples(1, 3, {}, [noise[position]])
        assert torch.allclose(drawn[position], alone[0].clamp(-1, 1), atol=1e-5)
    assert torch.allclose(model.sample(4, seed=3), drawn[:4], atol=1e-5)  # not changed by how many are drawn

    loaded = load_generator(model.save(tmp_path / "saved"))
    assert loaded.family == "sinddmpool" and loaded.learned_images() == model.learned_images()
    assert torch.equal(loaded.sample(6, seed=3), drawn)
    assert loaded.sample(2, 3, {"size": [24, 40]}).shape == (2, 1, 24, 40)
    with pytest.raises(ValueError, match="size"):
        loaded.sample(1, 0, {"size": [4, 4000]})


def test_a_resumed_pool_ends_where_an_uninterrupted_one_does(lus, tmp_path):
    whole = trained(lus, tmp_path / "whole", epochs=2)
    trained(lus, tmp_path / "parts", epochs=1)
    resumed = trained(lus, tmp_path / "parts", epochs=2, resume=True)
    assert [m.step for m in resumed.members] == [10, 10]
    for name, weights in whole._weights().items():
        assert torch.allclose(resumed._weights()[name], weights, atol=1e-6), name


def test_a_pool_refuses_what_only_fewddm_does():
    with pytest.raises(ValueError, match="layout_per_source"):
        SinDDMPoolConfig(label="x", max_images=2, layout_per_source=True)
    with pytest.raises(ValueError, match="not been trained"):
        SinDDMPool(SinDDMPoolConfig(label="x", **TINY)).sample(1, 0)


def test_a_pool_cross_validates_under_the_zhang_protocol_from_each_fold_s_own_patients(lus, tmp_path, monkeypatch):
    import json

    import yaml
    from typer.testing import CliRunner

    from sonogen.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "train": {"sinddmpool": {"model": {**TINY, "coarsest_side": [8, 12], "max_images": 2},
                                 "train": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 2, "eval_samples": 2}}},
        "evaluate": {"samples": 8, "few_image_samples": 8, "encoder_epochs": 1,
                     # the paper's three classes are not the phantom's: its two stand in
                     "downstream": {"protocol": "zhang2023", "classes": ["consolidation", "normal"], "seeds": 3,
                                    "epochs": 1, "bootstrap": 100}},
        "gates": {"sinddmpool": {"extractor": "pixels-16"}}}))
    result = CliRunner().invoke(app, ["crossval", "sinddmpool", "--data", str(lus), "--label", "consolidation",
                                      "--folds", "3", "--out", "cv", "--extractor", "pixels-16"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cv" / "crossval_report.json").read_text())
    assert report["pooled"]["protocol"] == "zhang2023" and report["pooled"]["metric"] == "balanced_accuracy"
    patient_of = {r.image: r.patient_id for r in UltrasoundDataset(lus).records}
    for fold in report["folds"]:
        saved = json.loads((tmp_path / "cv" / f"fold-{fold['fold']}" / "model" / "generator" / "config.json")
                           .read_text())["config"]
        assert len(saved["members"]) == 2  # one SinDDM per image, each of a patient the fold trains on
        assert {patient_of[image] for image in saved["images"]} <= set(fold["generator_train_patients"])


def test_sinddms_trained_apart_pool_into_one_registered_model(lus, tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from sonogen.cli import app
    from sonogen.jobs import train_generator
    from sonogen.registry import load_registered_generator, model_version

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"train": {"sinddm": {
        "model": {**TINY, "coarsest_side": [8, 12]},
        "train": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 2, "eval_samples": 2}}}}))
    records = UltrasoundDataset(lus, split="train", labels=["consolidation"]).records
    images = [records[0].image, next(r.image for r in records if r.patient_id != records[0].patient_id)]
    folders = []
    for k, image in enumerate(images):  # as parallel tasks would, each on its own
        folders.append(tmp_path / "models" / f"member-{k}")
        train_generator("sinddm", lus, "consolidation", folders[-1], "tiny.yaml", "lus", register=False,
                        model_overrides={"images": [image]})
    runner = CliRunner()
    result = runner.invoke(app, ["pool", *map(str, folders), "--out", "models/pool"])
    assert result.exit_code == 0, result.output
    pooled = load_registered_generator("models:/lus-sinddmpool-consolidation/1")
    assert pooled.family == "sinddmpool" and list(pooled.learned_images()) == images
    assert model_version("lus-sinddmpool-consolidation", "1").tags["training_images"] == ",".join(images)
    members = [load_generator(folder / "generator") for folder in folders]
    drawn, chosen, noise = pooled.sample(4, 1), pooled.member_of(4, 1), image_generators(1, 4)
    for position in range(4):
        *_, alone = members[int(chosen[position])].scale_samples(1, 1, {}, [noise[position]])
        assert torch.allclose(drawn[position], alone[0].clamp(-1, 1), atol=1e-5)
    twice = runner.invoke(app, ["pool", str(folders[0]), str(folders[0]), "--out", "models/twice"])
    assert twice.exit_code == 1 and "same image" in twice.output


def test_members_trained_as_tasks_of_their_own_take_the_pool_s_images_settings_and_order(lus, tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from sonogen.cli import app
    from sonogen.generators.trainer import training_selection
    from sonogen.jobs import pool_trained

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    pool_settings = {"model": {**TINY, "coarsest_side": [8, 12], "max_images": 2, "layout_strength": 0.6},
                     "train": {"epochs": 2, "steps_per_epoch": 6, "batch_size": 2, "eval_samples": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"sinddmpool": pool_settings}}))
    runner = CliRunner()
    listed = runner.invoke(app, ["pool-members", "sinddmpool", "--data", str(lus), "--label", "consolidation",
                                 "--config", "params.yaml"])
    assert listed.exit_code == 0, listed.output
    sources = listed.output.split()
    one_job = SinDDMPool(SinDDMPoolConfig(label="consolidation", max_images=2, **TINY))
    dataset, chosen = training_selection(one_job, lus, "consolidation")
    assert sources == [dataset.records[k].image for k in chosen]  # the images a pool trained in one job learns

    folders = []
    for source in reversed(sources):  # the tasks finish in any order
        folders.append(tmp_path / f"member-{len(folders)}")
        result = runner.invoke(app, ["train", "sinddmpool", "--member", source, "--data", str(lus), "--label",
                                     "consolidation", "--config", "params.yaml", "--out", str(folders[-1])])
        assert result.exit_code == 0, result.output
    member = load_generator(folders[0] / "generator")
    assert member.family == "sinddm" and member.config.images == (sources[-1],)
    assert member.config.layout_strength == 0.6 and member.step == 2 * 3  # its turns: half of each pool epoch

    pooled = pool_trained(folders, tmp_path / "pool", register=False, order=sources)
    assert list(load_generator(tmp_path / "pool" / "generator").learned_images()) == sources
    assert pooled["family"] == "sinddmpool" and pooled["images"] == sources

    wrong = runner.invoke(app, ["train", "sinddmpool", "--member", "nowhere.png", "--data", str(lus), "--label",
                                "consolidation", "--config", "params.yaml"])
    assert wrong.exit_code == 1 and "is not one of the 2 images" in wrong.output
    not_pooled = runner.invoke(app, ["pool-members", "dcgan", "--data", str(lus), "--label", "consolidation"])
    assert not_pooled.exit_code == 1 and "pools no models" in not_pooled.output
    with pytest.raises(ValueError, match="other images than the pool's"):
        pool_trained(folders[:1], tmp_path / "short", register=False, order=sources)


def test_a_pooled_cross_validation_pipeline_trains_each_fold_s_members_as_tasks_with_kfp_local(tmp_path, monkeypatch):
    import json

    import yaml
    from typer.testing import CliRunner

    from pipelines.crossval import compile_crossval_pipeline
    from sonogen.cli import app
    from sonogen.crossval import assign_folds, fold_view, patient_labels
    from sonogen.data.manifest import read_manifest
    from sonogen.jobs import pool_sources

    spec = next(yaml.safe_load_all(compile_crossval_pipeline(tmp_path / "cv.yaml", "sinddmpool").read_text()))
    assert spec["pipelineInfo"]["name"] == "sonogen-crossval-pooled"
    fold_tasks = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert {"crossval-fold-data", "pool-members", "for-loop-2", "pool-trained-members", "crossval-pooled-fold"} <= \
        set(fold_tasks)  # inside each fold, a loop over its members
    assert set(spec["components"]["comp-for-loop-2"]["dag"]["tasks"]) == {"train-pool-member"}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = {"dataset": {"name": "lus", "raw": "data/raw/phantom"},
              "phantom": {"patients": 8, "frames_per_patient": 3, "seed": 0, "consolidation_fraction": 0.5},
              "prepare": {"size": 32, "split": "0.7,0.15,0.15", "seed": 0, "split_method": "stratify"},
              "train": {"sinddmpool": {"model": {**TINY, "coarsest_side": [8, 12], "max_images": 2},
                                       "train": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 2,
                                                 "eval_samples": 2}}},
              "evaluate": {"samples": 8, "few_image_samples": 8, "encoder_epochs": 1,
                           "downstream": {"seeds": 3, "epochs": 1, "bootstrap": 100}},
              "gates": {"sinddmpool": {"extractor": "us-encoder", "max_near_copy_fraction": 1.0,
                                       "max_pixel_near_copy_fraction": 1.0, "min_auc_delta_lower_ci": -1.0}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["pipeline", "run", "--pipeline", "crossval", "--family", "sinddmpool",
                                      "--label", "consolidation", "--folds", "2"])
    assert result.exit_code == 0, result.output
    [report] = (tmp_path / ".kfp").rglob("crossval-pool/report/crossval_report.json")
    folds = json.loads(report.read_text())["folds"]
    [prepared] = (tmp_path / ".kfp").rglob("prepare-data/prepared")
    fold_of = assign_folds(patient_labels(read_manifest(prepared)), 2, 0)
    for fold in folds:
        [result_folder] = [p for p in (tmp_path / ".kfp").rglob("crossval-pooled-fold*/result")
                           if json.loads((p / "fold_result.json").read_text())["fold"] == fold["fold"]]
        learned = json.loads((result_folder / "model" / "generator" / "config.json").read_text())["config"]["images"]
        view = fold_view(prepared, fold_of, fold["fold"], tmp_path / f"view-{fold['fold']}")
        # the members the fold's tasks trained are the pool that `sonogen crossval` trains in the fold, in its order
        assert learned == pool_sources("sinddmpool", view, "consolidation", "params.yaml")
        assert fold["extractor"].startswith("us-encoder:") and "crossval-fold-data" in fold["extractor"]
    assert "registered lus-sinddmpool-consolidation version 1" in result.output  # pooled the same way, gated
