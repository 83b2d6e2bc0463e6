"""SinDDM / FewDDM: the pyramid rules, the noising process at each scale, training, determinism, the few-image
draw, and the product path (train command → registry → served by the torch predictor → gated)."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from conftest import start_server, stop_server
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sonogen.cli import app
from sonogen.evaluation import evaluate_generator
from sonogen.export import export_to_onnx
from sonogen.gates import EvaluateConfig
from sonogen.generators import load_generator
from sonogen.generators.base import CHECKPOINT_METADATA, config_from_dict
from sonogen.generators.multiscale_scheduler import MultiScaleScheduler, cosine_alphas_cumprod
from sonogen.generators.sinddm import (FewDDM, FewDDMConfig, MultiScaleDDMConfig, MultiScaleDenoiser, SinDDM,
                                      build_pyramid, image_id, scale_sizes)
from sonogen.generators.trainer import TrainConfig, train
from sonogen.metrics.features import pixel_extractor

TINY = {"coarsest_area": 100, "coarsest_side": (8, 12), "timesteps": 20, "channels": 16}


@pytest.mark.parametrize("shape", [(256, 256), (200, 400), (480, 640), (600, 300), (90, 120)])
def test_pyramid_sizes_follow_the_sinddm_rules(shape):
    config = MultiScaleDDMConfig(label="x")
    sizes = scale_sizes(*shape, config)
    (h0, w0), (h, w) = sizes[0], sizes[-1]
    assert h * w <= 50_000 and abs(h / w - shape[0] / shape[1]) < 0.02  # area limit, aspect kept
    if min(shape) > 55:
        assert 42 <= min(h0, w0) <= 55 and min(h0, w0) == min(max(round(math.sqrt(3110 * min(h, w) / max(h, w))),
                                                                   42), 55)
        ratios = [sizes[k + 1][0] / sizes[k][0] for k in range(len(sizes) - 1)]
        assert max(ratios) - min(ratios) < 0.05 and all(1.2 < r < 1.7 for r in ratios)  # one refitted factor
        assert abs(math.log(ratios[0] / 1.411)) < math.log(1.411) / 2
    assert [len(scale_sizes(*s, config)) for s in [(256, 256), (40, 40)]] == [5, 1]
    assert scale_sizes(256, 256, config) == [(55, 55), (78, 78), (111, 111), (157, 157), (223, 223)]


def test_the_cpu_recipe_starts_at_about_the_denoisers_receptive_field():
    x = torch.randn(1, 1, 80, 80, requires_grad=True)
    MultiScaleDenoiser(channels=16)(x, torch.tensor([5]), 0)[0, 0, 40, 40].backward()
    rows, cols = (x.grad[0, 0] != 0).nonzero().T
    receptive_field = int(rows.max() - rows.min() + 1)
    assert receptive_field == int(cols.max() - cols.min() + 1) == 33
    # the coarsest scale decides the layout; near the receptive field it keeps one whole fan (bench/RESULTS.md)
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    config = config_from_dict(MultiScaleDDMConfig, {"label": "x", **params["train"]["sinddm"]["model"]})
    coarsest_sides = [min(scale_sizes(*shape, config)[0]) for shape in [(256, 256), (480, 640), (600, 300)]]
    assert all(abs(side - receptive_field) <= 4 for side in coarsest_sides), coarsest_sides


def test_noising_at_each_scale_matches_its_definition():
    scheduler = MultiScaleScheduler(100, blur_gaps=[0.3, 0.1])
    a = torch.tensor(cosine_alphas_cumprod(100))
    x0 = torch.linspace(-1, 1, 2 * 16).reshape(2, 1, 4, 4)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 57])
    expected = a[t].sqrt().float().view(-1, 1, 1, 1) * x0 + (1 - a[t]).sqrt().float().view(-1, 1, 1, 1) * noise
    assert torch.allclose(scheduler.add_noise(x0, noise, t), expected, atol=1e-6)
    sigma = np.sqrt(1 - a.numpy()) / np.sqrt(a.numpy())
    for scale, gap in [(1, 0.3), (2, 0.1)]:
        steps = scheduler.train_timesteps(scale)
        assert sigma[steps] > gap and sigma[steps - 1] <= gap  # the first step noisier than the blur gap
        gammas = scheduler.gammas(scale)
        assert torch.allclose(gammas, torch.tensor(np.minimum(sigma / gap, 1)))
        blurred = torch.zeros_like(x0)
        mixed = scheduler.training_target(x0, blurred, t, scale)
        assert torch.allclose(mixed, (1 - gammas[t].float()).view(-1, 1, 1, 1) * x0)
        assert scheduler.gammas(scale, clamp=True).max() <= 0.55
    assert scheduler.train_timesteps(0) == 100 and scheduler.train_timesteps(2) < scheduler.train_timesteps(1)
    # the exact noise at t = 0 gives back the clean image, at scale 0 and (with the blur mix undone) above
    for scale in (0, 1):
        scheduler.set_timesteps(scale)
        zero = torch.zeros(2, dtype=torch.long)
        blurred = torch.zeros_like(x0) if scale else None
        target = scheduler.training_target(x0, blurred, zero, scale) if scale else x0
        out = scheduler.step(noise, 0, scheduler.add_noise(target, noise, zero), blurred=blurred)
        assert torch.allclose(out.prev_sample, x0.clamp(-1, 1), atol=1e-4)
    with pytest.raises(ValueError, match="blurred"):
        scheduler.step(noise, 3, x0)
    # a strength below 1 starts a scale that share of its steps up (the caller noises what it starts from)
    assert scheduler.start_timestep(1, 1.0) == scheduler.train_timesteps(1) - 1
    assert scheduler.start_timestep(1, 0.5) == round(scheduler.train_timesteps(1) / 2) - 1
    assert scheduler.start_timestep(0, 0.5) == 49 and scheduler.start_timestep(2, 1e-6) == 0
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="strength"):
            scheduler.set_timesteps(1, bad)


def smooth_image() -> torch.Tensor:
    return torch.linspace(-1, 1, 32)[None, None, :, None].expand(1, 1, 32, 32) * torch.cos(
        torch.linspace(0, 6, 32))[None, None, None, :]


def test_training_steps_reduce_the_loss_on_a_fixed_image():
    torch.manual_seed(0)
    model = SinDDM(MultiScaleDDMConfig(label="x", images=("a",), **TINY))
    image = smooth_image()
    model.begin_training(image, total_steps=150)
    scheduler = model.scheduler()

    def fixed_loss() -> float:  # the same noise and steps before and after training
        generator = torch.Generator().manual_seed(1)
        losses = []
        with torch.no_grad():
            for scale, (clean, blurred) in enumerate(model._pyramids[0]):
                t = torch.randint(0, scheduler.train_timesteps(scale), (16,), generator=generator)
                noise = torch.randn(16, *clean.shape, generator=generator)
                target = scheduler.training_target(clean.expand(16, -1, -1, -1), None if blurred is None else
                                                   blurred.expand(16, -1, -1, -1), t, scale)
                losses.append((model.denoiser(scheduler.add_noise(target, noise, t), t, scale) - noise).abs().mean())
        return float(torch.stack(losses).mean())

    before = fixed_loss()
    for batch in model.training_batches(image, 8, 150, torch.Generator().manual_seed(0)):
        model.train_step(batch)
    assert model.step == 150 and fixed_loss() < 0.8 * before
    assert model.learning_rate() == pytest.approx(1e-3 * 0.5**6)  # every milestone passed


def trained_on_a_smooth_image() -> SinDDM:
    torch.manual_seed(0)
    model = SinDDM(MultiScaleDDMConfig(label="x", images=("a",), **TINY))
    image = smooth_image()
    model.begin_training(image, total_steps=150)
    for batch in model.training_batches(image, 8, 150, torch.Generator().manual_seed(0)):
        model.train_step(batch)
    return model


def test_a_lower_refine_strength_keeps_more_of_the_coarsest_scales_layout():
    model = trained_on_a_smooth_image()

    def change_after_the_coarsest_scale() -> float:  # how far the finer scales move the coarsest scale's layout
        coarsest, *_, finest = model.scale_samples(8, seed=2)
        shrunk = torch.nn.functional.interpolate(finest, size=coarsest.shape[-2:], mode="bilinear", antialias=True)
        return float((shrunk - coarsest).abs().mean())

    starting_at_the_top = change_after_the_coarsest_scale()
    model.config.refine_strength = 0.5
    assert change_after_the_coarsest_scale() < 0.9 * starting_at_the_top
    with pytest.raises(ValueError, match="refine_strength"):
        MultiScaleDDMConfig(label="x", refine_strength=0)


def test_a_lower_layout_strength_starts_the_coarsest_scale_from_the_training_images_own(tmp_path):
    model = trained_on_a_smooth_image()
    layout = model._pyramids[0][0][0]

    def distance_to_the_layout() -> float:
        coarsest = next(model.scale_samples(8, seed=2))
        return float((coarsest - layout).abs().mean())

    from_noise = distance_to_the_layout()
    model.config.layout_strength = 0.3
    assert distance_to_the_layout() < 0.7 * from_noise
    samples = model.sample(4, seed=2)
    assert not torch.equal(samples[0], samples[1])
    folder = model.save(tmp_path / "g")
    assert torch.equal(load_generator(folder).sample(4, seed=2), samples)  # the layout is saved with the weights
    assert load_generator(folder).sample(2, 2, {"size": [24, 48]}).shape == (2, 1, 24, 48)

    weights = load_file(str(folder / "weights.safetensors"))  # as saved before the layouts were
    del weights["layouts"]
    save_file(weights, str(folder / "weights.safetensors"))
    older = load_generator(folder)
    with pytest.raises(ValueError, match="coarsest scale"):
        older.sample(1, 0)
    older.config.layout_strength = 1.0
    assert older.sample(1, 0).shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="layout_per_source"):
        FewDDM(FewDDMConfig(label="x", max_images=2, layout_strength=0.5, **TINY))
    with pytest.raises(ValueError, match="layout_strength"):
        MultiScaleDDMConfig(label="x", layout_strength=1.5)


def test_fewddm_starts_each_samples_coarsest_scale_from_the_source_it_drew():
    torch.manual_seed(0)
    model = FewDDM(FewDDMConfig(label="x", images=("left", "right"), max_images=2, layout_per_source=True,
                                layout_strength=0.1, **TINY))
    left = torch.linspace(1, -1, 32)[None, None, None, :].expand(1, 1, 32, 32)
    model.begin_training(torch.cat([left, left.flip(-1)]), total_steps=1)  # untrained: only the start shows
    coarsest, drawn = next(model.scale_samples(16, seed=3)), model.layout_sources(16, seed=3)
    nearest = torch.stack([(coarsest - layout).abs().mean(dim=(1, 2, 3)) for layout in model.layouts]).argmin(dim=0)
    assert sorted(set(drawn.tolist())) == [0, 1] and torch.equal(nearest, drawn)


def test_a_sampling_loop_is_not_exported_to_onnx(tmp_path):
    model = SinDDM(MultiScaleDDMConfig(label="x", images=("a",), **TINY))
    for precision in ("fp32", "int8"):
        with pytest.raises(ValueError, match="no .*sampling network to export; serve it on torch"):
            export_to_onnx(model, tmp_path / "sinddm.onnx", precision)


def test_same_seed_same_samples_in_any_batch_and_after_save_load(tmp_path):
    torch.manual_seed(0)
    model = SinDDM(MultiScaleDDMConfig(label="x", images=("a",), **TINY))
    model.begin_training(torch.rand(1, 1, 32, 32) * 2 - 1, total_steps=10)
    first = model.sample(3, seed=5)
    # a smaller request draws the same noise; kernels may round differently at another batch size
    assert first.shape == (3, 1, 32, 32) and torch.allclose(first[:2], model.sample(2, seed=5), atol=1e-5)
    assert not torch.equal(first, model.sample(3, seed=6)) and not torch.equal(first[0], first[1])
    loaded = load_generator(model.save(tmp_path / "g"))
    assert torch.equal(loaded.sample(3, seed=5), first) and loaded.config.blur_gaps == model.config.blur_gaps
    assert loaded.sample(2, 5, {"size": [24, 48], "label": "x"}).shape == (2, 1, 24, 48)  # retargeting
    for bad in ({"size": [4, 32]}, {"size": [32, 80]}, {"size": "big"}, {"label": "y"}, {"mask": 1}):
        with pytest.raises(ValueError):
            loaded.sample(1, 0, bad)


def test_fewddm_draws_every_image_of_its_set_from_different_patients(lus, tmp_path):
    torch.manual_seed(0)
    model = FewDDM(FewDDMConfig(label="normal", **TINY))
    summary = train(model, lus, "normal", TrainConfig(epochs=1, batch_size=4, steps_per_epoch=40, eval_samples=4),
                    tmp_path / "few")
    assert len(model.config.images) == 3 and summary["train_images"] == 3 and model.step == 40
    from sonogen.data import UltrasoundDataset

    records = {r.image: r.patient_id for r in UltrasoundDataset(lus, split="train", labels=["normal"]).records}
    assert len({records[image] for image in model.config.images}) == min(3, len(set(records.values())))
    seen = set()
    for batch in model.training_batches(None, 2, 60, torch.Generator().manual_seed(0)):
        matches = [k for k, pyramid in enumerate(model._pyramids) if torch.equal(pyramid[batch.scale][0],
                                                                                  batch.clean[0])]
        assert len(matches) == 1 and torch.equal(batch.clean[0], batch.clean[1])  # one image per batch
        seen.add(matches[0])
    assert seen == {0, 1, 2}
    with pytest.raises(ValueError, match="layout_per_source"):  # the paper's model is not told its sources
        model.sample(1, 0, {"source": 0})
    # the report counts samples per source in the order the generator names them, not the manifest's
    config = EvaluateConfig(samples=8, few_image_samples=6, downstream=None)
    counts = evaluate_generator(model, lus, pixel_extractor(), {}, config, tmp_path / "g", "few")[
        "samples_nearest_each_source"]
    model.config.images = model.config.images[::-1]  # same samples: this model is not told its sources
    report = evaluate_generator(model, lus, pixel_extractor(), {}, config, tmp_path / "gates", "few")
    assert sum(counts) == 6 and counts != counts[::-1] and report["samples_nearest_each_source"] == counts[::-1]
    assert report["source_images"] == [image_id(image) for image in model.config.images]
    markdown = (tmp_path / "gates" / "gate_report.md").read_text()
    assert f"{image_id(model.config.images[0])} {report['samples_nearest_each_source'][0]}," in markdown
    model.config.images = ("images/not-in-this-dataset.png",) + model.config.images[1:]
    with pytest.raises(ValueError, match="not-in-this-dataset"):
        evaluate_generator(model, lus, pixel_extractor(), {}, config, tmp_path / "gates", "few")


def test_fewddm_told_the_source_gives_each_sample_the_layout_it_drew(tmp_path):
    torch.manual_seed(0)
    config = FewDDMConfig(label="x", images=("left", "right"), max_images=2, layout_per_source=True,
                          **{**TINY, "coarsest_area": 144, "coarsest_side": (12, 12)})
    model = FewDDM(config)
    left = torch.linspace(1, -1, 12)[None, None, None, :].expand(1, 1, 12, 12)  # bright on the left
    images = torch.cat([left, left.flip(-1)])
    model.begin_training(images, total_steps=400)
    assert len(model.sample_sizes()) == 1  # one scale: the layout is all there is
    for batch in model.training_batches(images, 8, 400, torch.Generator().manual_seed(0)):
        model.train_step(batch)
    samples, drawn = model.sample(16, seed=3), model.layout_sources(16, seed=3)
    nearest = torch.stack([(samples - image).abs().mean(dim=(1, 2, 3)) for image in images]).argmin(dim=0)
    assert sorted(set(drawn.tolist())) == [0, 1] and torch.equal(nearest, drawn)
    assert torch.equal(model.layout_sources(5, seed=3), drawn[:5])  # a sample's draw depends on its position only
    loaded = load_generator(model.save(tmp_path / "g"))
    assert torch.equal(loaded.sample(16, seed=3), samples)
    for source in (1, "right"):  # a request may ask for one source's layout, by index or id
        told = loaded.sample(4, seed=3, condition={"source": source})
        assert ((told - images[1]).abs().mean(dim=(1, 2, 3)) < (told - images[0]).abs().mean(dim=(1, 2, 3))).all()
    for bad in (2, -1, True, "up", 1.0):
        with pytest.raises(ValueError):
            loaded.sample(1, 0, {"source": bad})
    with pytest.raises(ValueError, match="several images"):
        FewDDM(FewDDMConfig(label="x", max_images=1, layout_per_source=True, **TINY))


def test_fewddm_told_its_sources_trains_the_coarsest_scale_once_per_source():
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shares = {}
    for told in (False, True):
        model = FewDDM(FewDDMConfig(label="x", images=("a", "b", "c"), max_images=3, layout_per_source=told, **TINY))
        model.begin_training(images, total_steps=3000)
        weights = [model.scheduler().train_timesteps(s) for s in range(len(model.sample_sizes()))]
        scales = [b.scale for b in model.training_batches(images, 1, 3000, torch.Generator().manual_seed(1))]
        shares[told] = scales.count(0) / len(scales)
        expected = weights[0] * (3 if told else 1)
        assert len(weights) > 2 and shares[told] == pytest.approx(expected / (expected + sum(weights[1:])), abs=0.03)
    assert shares[True] > shares[False] + 0.1


def test_an_image_is_named_by_its_file_name_even_with_dots_in_it():
    from sonogen.jobs import generator_name

    paths = ["images/Pneu.JPG_0.png", "images/Pneu.JPG_1.png"]
    model = SinDDM(MultiScaleDDMConfig(label="pneumonia", images=("Pneu.JPG_1",), **TINY))
    assert model.select_training_images(paths, ["p0", "p1"]) == [1]
    assert generator_name("sinddm", "pneumonia", {"images": ["Pneu.JPG_1"]}) == "sinddm-pneumonia-Pneu.JPG_1"
    with pytest.raises(ValueError, match=r"--set images=\[ID\]"):
        SinDDM(MultiScaleDDMConfig(label="pneumonia", **TINY)).select_training_images(paths, ["p0", "p1"])


def test_train_command_registers_serves_and_gates_one_image_model(lus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"train": {"sinddm": {
        # max_area below the 32 px images: samples come out smaller than the data, as at 256 px on real data
        "model": {**TINY, "coarsest_side": [8, 12], "max_area": 600},
        "train": {"epochs": 2, "steps_per_epoch": 10, "batch_size": 4, "eval_samples": 4}}}}))
    runner = CliRunner()
    missing = runner.invoke(app, ["train", "sinddm", "--data", str(lus), "--label", "consolidation",
                                  "--config", "tiny.yaml"])
    assert missing.exit_code == 1 and "--set images=[ID]" in missing.output
    from sonogen.data import UltrasoundDataset

    image = UltrasoundDataset(lus, split="train", labels=["consolidation"]).records[0].image
    stem = image.split("/")[-1][:-4]
    result = runner.invoke(app, ["train", "sinddm", "--data", str(lus), "--label", "consolidation", "--config",
                                 "tiny.yaml", "--image", stem, "--dataset", "lus"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "models" / f"sinddm-consolidation-{stem}"
    assert (folder / "generator" / "config.json").is_file() and "ssim_to_train" in result.output

    from sonogen.registry import load_registered_generator, model_version
    from sonogen.backends import load_backend

    assert model_version("lus-sinddm-consolidation", "1").tags["training_images"] == image
    backend = load_backend("models:/lus-sinddm-consolidation@candidate")
    assert backend.runtime == "torch:cpu" and backend.conditions == {"label", "size"}
    served = backend.images(2, 9, {"size": (24, 40)})
    assert served.shape == (2, 24, 40) and served.dtype == np.uint8
    direct = load_registered_generator("models:/lus-sinddm-consolidation/1").sample(2, 9, {"size": (24, 40)})
    assert np.array_equal(served, np.rint((direct[:, 0].numpy() + 1) * 127.5).astype(np.uint8))

    process, url = start_server(tmp_path, os.environ["MLFLOW_TRACKING_URI"], "lus-sinddm-consolidation",
                                "--alias", "candidate")
    try:
        endpoint = f"{url}/v2/models/lus-sinddm-consolidation/infer"
        body = {"inputs": [{"name": "n", "shape": [1], "datatype": "INT32", "data": [2]},
                           {"name": "seed", "shape": [1], "datatype": "INT64", "data": [9]},
                           {"name": "condition", "shape": [1], "datatype": "BYTES",
                            "data": [json.dumps({"size": [24, 40]})]}]}
        reply = requests.post(endpoint, json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        [tensor] = reply.json()["outputs"]
        assert tensor["shape"] == [2, 24, 40] and np.array_equal(np.array(tensor["data"], np.uint8).reshape(2, 24, 40),
                                                                 served)
        refused = requests.post(f"{url}/v1/models/lus-sinddm-consolidation:predict", timeout=60,
                                json={"instances": [{"n": 1, "seed": 9, "condition": {"size": [24, 4000]}}]})
        assert refused.status_code == 400 and "condition" in refused.text and "size" in refused.text
    finally:
        stop_server(process)

    from sonogen.jobs import evaluate_targets

    params = {"evaluate": {"samples": 8, "few_image_samples": 6, "encoder_epochs": 2,
                           "downstream": {"seeds": 3, "epochs": 2, "bootstrap": 100,
                                          "real_positive_fraction": {"sinddm": 0.25}}},
              "gates": {"sinddm": {"extractor": "us-encoder", "max_ssim_to_train": 0.99, "max_sifid": 1e6,
                                   "max_sifid_ratio": 1e6, "min_scan_iou_to_train": 0.0}}}
    with monkeypatch.context() as elsewhere:
        elsewhere.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
        with pytest.raises(ValueError, match="set MLFLOW_TRACKING_URI to the store it was trained with"):
            evaluate_targets([str(folder)], lus, None, params, tmp_path / "gates", "lus")
    [report] = evaluate_targets([str(folder)], lus, None, params, tmp_path / "gates", "lus")
    metrics = report["metrics"]
    assert report["samples"]["synthetic"] == 6
    assert {"sifid", "sifid_ratio", "ssim_to_train", "scan_iou_to_train", "auc_delta"} <= set(metrics)
    downstream = report["downstream"]
    assert downstream["train_real_positives"] == max(1, round(0.25 * report["samples"]["real_train"]))
    [written] = (tmp_path / "gates").rglob("gate_report.md")
    patients = downstream["test_patients_per_class"]
    assert (f"{downstream['train_real_positives']} real positives (the training split's cut to 25%)" in
            written.read_text().partition("## Downstream classifier")[2])
    assert f"({patients['positive']} positive, {patients['negative']} of the other classes)" in written.read_text()
    assert [row["gate"] for row in report["gates"]] == ["max_ssim_to_train", "max_sifid", "max_sifid_ratio",
                                                           "min_scan_iou_to_train"]


def test_train_command_learns_fewddm_from_max_images_of_the_label(lus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"train": {"fewddm": {
        "model": {**TINY, "max_images": 3, "layout_per_source": True},  # --max-images overrides the 3
        "train": {"epochs": 1, "steps_per_epoch": 6, "batch_size": 4, "eval_samples": 2}}}}))
    runner = CliRunner()
    args = ["train", "fewddm", "--data", str(lus), "--label", "normal", "--config", "tiny.yaml", "--dataset", "lus"]
    result = runner.invoke(app, args + ["--max-images", "2"])
    assert result.exit_code == 0, result.output
    from sonogen.data import UltrasoundDataset
    from sonogen.registry import model_version

    patients = {r.image: r.patient_id for r in UltrasoundDataset(lus, split="train", labels=["normal"]).records}
    model = load_generator(tmp_path / "models" / "fewddm-normal" / "generator")
    images = model.config.images
    assert model.config.max_images == 2 and len(set(images)) == 2 and set(images) <= set(patients)
    assert len({patients[image] for image in images}) == min(2, len(set(patients.values())))
    assert model.layouts.shape[0] == 2 and model_version("lus-fewddm-normal", "1").tags["training_images"] == \
        ",".join(images)
    assert model.sample(1, 0, {"source": 1}).shape[0] == 1
    with pytest.raises(ValueError, match="source"):  # the source vector has the K images' entries only
        model.sample(1, 0, {"source": 2})
    named = runner.invoke(app, args + ["--max-images", "1", "--image", images[0], "--image", images[1]])
    assert named.exit_code == 1 and "max_images" in named.output


def test_an_interrupted_run_resumes_to_the_same_weights(lus, tmp_path):
    config = TrainConfig(epochs=2, batch_size=4, steps_per_epoch=5, eval_samples=2, eval_every=2)

    def stop_after_one_epoch(epochs):
        yield next(iter(epochs))
        raise KeyboardInterrupt

    def fresh() -> SinDDM:
        torch.manual_seed(0)
        return SinDDM(MultiScaleDDMConfig(label="normal", images=("images/phantom-p0000_0.png",), **TINY))

    straight = fresh()
    train(straight, lus, "normal", config, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), lus, "normal", config, tmp_path / "resumed", progress=stop_after_one_epoch)
    checkpoint = str(tmp_path / "resumed" / "checkpoint.safetensors")
    with safe_open(checkpoint, framework="pt") as f:
        metadata = f.metadata()
    saved = json.loads(metadata[CHECKPOINT_METADATA])
    del saved["describe"]["config"]["layout_per_source"]  # as written before that field existed: its default applies
    save_file(load_file(checkpoint), checkpoint, metadata={CHECKPOINT_METADATA: json.dumps(saved)})
    resumed = fresh()
    train(resumed, lus, "normal", config, tmp_path / "resumed", resume=True)
    assert resumed.step == straight.step == 10
    expected = straight._weights()
    assert all(torch.equal(expected[k], v) for k, v in resumed._weights().items())
