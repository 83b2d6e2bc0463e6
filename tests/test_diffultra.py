"""DiffUltra on tiny models: a ControlNet over a from-scratch ldm, trained on structure-map (or filled-box)
conditions of the phantom's positives, sampling images with their lesion boxes."""

import base64
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sonogen.config import config_from_dict
from sonogen.data.manifest import load_grey, read_manifest
from sonogen.data.lesion_bank import placement_anatomy
from sonogen.generators import load_generator
from sonogen.generators.diffultra import DiffUltra, DiffUltraConfig
from sonogen.generators.trainer import TrainConfig, train

TWO_STEPS = TrainConfig(epochs=1, batch_size=2, steps_per_epoch=2, eval_samples=2, precision="fp32")


def _png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("condition", ["structure", "binary"])
def test_diffultra_trains_only_its_controlnet_and_samples_images_with_their_boxes(lus, base_ldm, tmp_path, condition):
    torch.manual_seed(0)
    model = DiffUltra(DiffUltraConfig(base_model=str(base_ldm), image_size=32, steps=4, condition=condition))
    unet, controlnet = ({k: v.clone() for k, v in m.state_dict().items()} for m in (model.unet, model.controlnet))
    train(model, lus, "consolidation", TWO_STEPS, tmp_path / "run")
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in unet.items())
    assert any(not torch.equal(v, model.controlnet.state_dict()[k]) for k, v in controlnet.items())
    assert model.bank is not None and model.bank.source["data"] == "training images" and model.bank.lesions

    images, boxes = model.sample_with_boxes(3, seed=7)
    assert images.shape == (3, 1, 32, 32) and torch.isfinite(images).all()
    assert len(boxes) == 3 and all(len(b) == 1 for b in boxes)
    for [[x0, y0, x1, y1]] in boxes:
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
    again, same_boxes = model.sample_with_boxes(2, seed=7)
    assert torch.allclose(again, images[:2], atol=1e-5) and same_boxes == boxes[:2]  # image k: seed and k only

    loaded = load_generator(tmp_path / "run" / "generator")
    assert isinstance(loaded, DiffUltra) and len(loaded.bank.lesions) == len(model.bank.lesions)
    reloaded, reloaded_boxes = loaded.sample_with_boxes(3, seed=7)
    assert torch.allclose(reloaded, images, atol=1e-5) and reloaded_boxes == boxes


def test_a_given_background_is_where_the_lesion_is_placed_and_requests_are_checked(lus, base_ldm, tmp_path):
    torch.manual_seed(0)
    model = DiffUltra(DiffUltraConfig(base_model=str(base_ldm), image_size=32, steps=4, strength=0.3))
    train(model, lus, "consolidation", TWO_STEPS, tmp_path / "run")
    negative = next(r for r in read_manifest(lus) if r.label == "normal")
    frame = load_grey(lus / negative.image)
    images, boxes = model.sample_with_boxes(2, seed=3, condition={"image": _png(frame), "size_bias": "large"})
    other = load_grey(lus / next(r for r in read_manifest(lus) if r.label == "normal" and r.image != negative.image).image)
    assert not torch.allclose(images, model.sample(2, seed=3, condition={"image": _png(other), "size_bias": "large"}))
    anatomy = placement_anatomy(frame, model.bank.typical_depth)
    for [[x0, y0, x1, y1]] in boxes:
        assert y0 >= anatomy.pleura_top(x0, x1) - 0.5 and anatomy.fan[y0:y1, x0:x1].mean() >= 0.9
    with pytest.raises(ValueError, match="size_bias"):
        model.sample(1, 0, {"size_bias": "huge"})
    with pytest.raises(ValueError, match="strength"):
        model.sample(1, 0, {"strength": 0})
    with pytest.raises(ValueError, match="base64"):
        model.sample(1, 0, {"image": "not a png"})
    with pytest.raises(ValueError, match="64×64"):
        model.sample(1, 0, {"image": _png(np.zeros((64, 64), dtype=np.uint8))})
    with pytest.raises(ValueError, match="mask"):
        model.sample(1, 0, {"mask": _png(frame)})


def test_a_diffultra_saved_when_it_inherited_the_ldm_config_still_loads(base_ldm, tmp_path):
    from sonogen.generators.diffultra import INHERITED_BEFORE

    model = DiffUltra(DiffUltraConfig(base_model=str(base_ldm), image_size=32, steps=2))
    model.save(tmp_path / "saved")
    described = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert not INHERITED_BEFORE & set(described["config"])
    described["config"].update(mode="controlnet", vae_channels=[32, 64, 128], lora_rank=0, control="mask")
    (tmp_path / "saved" / "config.json").write_text(json.dumps(described))
    loaded = load_generator(tmp_path / "saved")
    assert loaded.config == model.config
    assert all(torch.equal(value, loaded._weights()[key]) for key, value in model._weights().items())


def test_invalid_diffultra_configs_are_clear_errors(base_ldm):
    with pytest.raises(ValueError, match="base_model"):
        DiffUltraConfig()
    with pytest.raises(ValueError, match="condition"):
        DiffUltraConfig(base_model=str(base_ldm), condition="mask")
    with pytest.raises(ValueError, match="size_bias"):
        DiffUltraConfig(base_model=str(base_ldm), size_bias="small")
    with pytest.raises(ValueError, match=r"unknown DiffUltraConfig keys \['mode'\]"):  # it is a ControlNet, always
        config_from_dict(DiffUltraConfig, {"base_model": str(base_ldm), "mode": "fine-tune"})
    with pytest.raises(FileNotFoundError, match="lesion bank /nonexistent/bank is not a folder"):
        DiffUltra(DiffUltraConfig(base_model=str(base_ldm), image_size=32, bank="/nonexistent/bank"))
    with pytest.raises(ValueError, match="background_label"):
        DiffUltra(DiffUltraConfig(base_model=str(base_ldm), image_size=32,
                                  background_label="effusion")).training_labels(["consolidation", "normal"])


def test_train_command_builds_on_a_bank_registers_serves_boxes_and_gates_on_detection(lus, base_ldm, tmp_path,
                                                                                        monkeypatch):
    import os

    import requests
    import yaml
    from conftest import start_server, stop_server
    from typer.testing import CliRunner

    from sonogen.cli import app
    from sonogen.jobs import evaluate_targets, register_trained
    from sonogen.registry import load_registered_generator, model_card

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"train": {"diffultra": {
        "model": {"image_size": 32, "steps": 3},
        "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "eval_samples": 2, "precision": "fp32"}}}}))
    runner = CliRunner()
    assert runner.invoke(app, ["data", "lesion-bank", str(lus), "bank"]).exit_code == 0
    common = ["--data", str(lus), "--label", "consolidation", "--config", "tiny.yaml", "--dataset", "lus"]
    missing = runner.invoke(app, ["train", "diffultra", *common])
    assert missing.exit_code == 1 and "base_model" in missing.output
    result = runner.invoke(app, ["train", "diffultra", *common, "--base-model", str(base_ldm), "--bank", "bank",
                                 "--condition", "binary", "--no-register"])
    assert result.exit_code == 0, result.output
    loaded = load_generator(tmp_path / "models" / "diffultra-consolidation" / "generator")
    assert loaded.config.condition == "binary" and loaded.bank.source["data"] == str(lus)

    params = {"evaluate": {"samples": 6, "encoder_epochs": 1, "downstream": None, "detection_seeds": 2,
                           "detection_steps": 5},
              # a DiffUltra is built on the ldm family's code, never gated by its sets
              "gates": {"diffultra": {"min_detection_ap50_delta": -1.0}, "ldm": {"min_confidence": 2.0},
                        "ldm-controlnet": {"min_confidence": 2.0}}}
    [report] = evaluate_targets(["models/diffultra-consolidation"], lus, "pixels-16", params, tmp_path / "gates")
    assert set(report["detection"]) == {"real", "real+diffultra"}
    assert report["metrics"]["detection_ap50_delta"] == pytest.approx(
        report["detection"]["real+diffultra"]["ap50"]["mean"] - report["detection"]["real"]["ap50"]["mean"])
    assert [row["gate"] for row in report["gates"]] == ["min_detection_ap50_delta"] and report["passed"]
    assert "## Lesion detection" in (tmp_path / "gates" / "diffultra-consolidation" / "gate_report.md").read_text()
    registered = register_trained("models/diffultra-consolidation",
                                  gate_report=tmp_path / "gates" / "diffultra-consolidation")
    assert registered["version"] == "1"
    assert "### Lesion detection" in model_card("lus-diffultra-consolidation", "1")

    direct = load_registered_generator("models:/lus-diffultra-consolidation/1")
    images, boxes = direct.sample_with_boxes(2, 4, {"size_bias": "large"})
    expected = np.rint((images[:, 0].numpy() + 1) * 127.5).astype(np.uint8)
    process, url = start_server(tmp_path, os.environ["MLFLOW_TRACKING_URI"], "lus-diffultra-consolidation",
                                "--alias", "candidate")
    try:
        reply = requests.post(f"{url}/v1/models/lus-diffultra-consolidation:predict",
                              json={"instances": [{"n": 2, "seed": 4, "size_bias": "large"}]}, timeout=120)
        assert reply.status_code == 200, reply.text
        [prediction] = reply.json()["predictions"]
        served = [np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in prediction["images"]]
        assert np.array_equal(np.stack(served), expected) and prediction["boxes"] == boxes
        v2 = requests.post(f"{url}/v2/models/lus-diffultra-consolidation/infer", json={"inputs": [
            {"name": "n", "shape": [1], "datatype": "INT32", "data": [2]},
            {"name": "seed", "shape": [1], "datatype": "INT64", "data": [4]},
            {"name": "condition", "shape": [1], "datatype": "BYTES", "data": ['{"size_bias": "large"}']}]}, timeout=120)
        assert v2.status_code == 200, v2.text
        outputs = {o["name"]: o for o in v2.json()["outputs"]}
        assert outputs["boxes"]["shape"] == [2, 1, 4] and outputs["boxes"]["datatype"] == "INT32"
        assert np.array_equal(np.reshape(outputs["boxes"]["data"], (2, 1, 4)), np.array(boxes))
        refused = requests.post(f"{url}/v1/models/lus-diffultra-consolidation:predict",
                                json={"instances": [{"n": 1, "size_bias": "huge"}]}, timeout=60)
        assert refused.status_code == 400 and "size_bias" in refused.text
        sampled = runner.invoke(app, ["sample", "--url", url, "--model", "lus-diffultra-consolidation", "-n", "2",
                                      "--seed", "4", "--condition", '{"size_bias": "large"}', "--out", "sampled"])
        assert sampled.exit_code == 0, sampled.output
        rows = list(csv.DictReader((tmp_path / "sampled" / "manifest.csv").open()))
        assert [json.loads(row["boxes"]) for row in rows] == boxes
    finally:
        stop_server(process)

    generated = runner.invoke(app, ["generate", "--model", "models:/lus-diffultra-consolidation@candidate", "-n", "3",
                                    "--batch", "2", "--out", "synthetic"])
    assert generated.exit_code == 0, generated.output
    records = read_manifest(tmp_path / "synthetic")
    assert len(records) == 3 and all(len(r.boxes) == 1 for r in records)
