"""Latent diffusion on tiny random-initialised models: a Stable-Diffusion-shaped checkpoint (UNet, VAE, CLIP text
model and a BPE tokenizer written here) for fine-tuning and ControlNet, and a from-scratch LDM."""

import base64
import io
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sonogen.data import UltrasoundDataset
from sonogen.data.manifest import boxes_from_mask, mask_from_boxes, read_manifest, write_manifest
from sonogen.evaluation import evaluate_generator
from sonogen.gates import EvaluateConfig
from sonogen.generators import load_generator
from sonogen.generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig, decode_mask
from sonogen.generators.trainer import TrainConfig, held_out_images, train
from sonogen.metrics.features import pixel_extractor

TINY_SCRATCH = {"image_size": 32, "vae_channels": (8, 16), "unet_channels": (16, 32), "embedding_dim": 16,
                "vae_steps": 2, "steps": 3, "train_timesteps": 40}
TWO_STEPS = TrainConfig(epochs=1, batch_size=2, steps_per_epoch=2, eval_samples=2, precision="fp32")


def _write_tokenizer(folder):
    """A BPE tokenizer of CLIP's format: printable ASCII (which CLIP's byte map keeps as is), each character's
    end-of-word form, and two merges."""
    folder.mkdir(parents=True)
    symbols = [chr(code) for code in range(33, 127)]
    tokens = symbols + [s + "</w>" for s in symbols] + ["ul", "ul</w>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: k for k, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nu l\nu l</w>\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    return len(tokens)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A diffusers Stable Diffusion folder with the real architectures at toy widths."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-sd") / "sd"
    vocab = _write_tokenizer(folder.parent / "tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
                                        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(folder.parent / "tokenizer"),
                            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def unmasked(lus, tmp_path_factory):
    """The phantom without its masks, as a dataset annotated with boxes alone comes."""
    root = tmp_path_factory.mktemp("unmasked") / "lus"
    shutil.copytree(lus, root, ignore=shutil.ignore_patterns("masks"))
    write_manifest(root, [replace(record, mask="") for record in read_manifest(root)])
    return root


def _mask_png(mask: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray((mask * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before, module, only=lambda name: True) -> set[str]:
    return {k for k, v in module.state_dict().items() if only(k) and not torch.equal(before[k], v)}


def test_from_scratch_trains_autoencoder_then_latent_unet_and_reloads_to_the_same_images(lus, tmp_path):
    torch.manual_seed(0)
    model = LatentDiffusion(LatentDiffusionConfig(label="consolidation", **TINY_SCRATCH))
    vae, unet = _weights(model.vae), _weights(model.unet)
    train(model, lus, "consolidation", TrainConfig(epochs=2, batch_size=2, steps_per_epoch=2, eval_samples=2,
                                                   precision="fp32"), tmp_path / "run")
    assert model.config.labels == ("consolidation", "normal") and model.step == 4
    assert _changed(vae, model.vae) and _changed(unet, model.unet)  # two autoencoder steps, then two UNet steps
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert "loss_vae" in history[0] and "loss" in history[1] and history[1]["val_loss"] > 0
    assert 0.01 < model.vae.config.scaling_factor < 100

    folder = tmp_path / "run" / "generator"
    assert (folder / "pipeline" / "model_index.json").is_file() and (folder / "pipeline" / "unet").is_dir()
    loaded = load_generator(folder)
    for scheduler in ("dpmpp", "ddim"):
        condition = {"label": "normal", "scheduler": scheduler, "steps": 3}
        first = loaded.sample(2, seed=5, condition=condition)
        assert first.shape == (2, 1, 32, 32) and torch.isfinite(first).all()
        assert torch.equal(first, loaded.sample(2, seed=5, condition=condition))
        assert torch.allclose(first, model.sample(2, seed=5, condition=condition), atol=1e-5)
    assert not torch.equal(loaded.sample(1, 5, {"label": "normal"}), loaded.sample(1, 5, {"label": "consolidation"}))
    for scheduler in ("dpmpp", "dpmpp-sde", "ddpm"):  # an image depends on seed and position, its noise too
        condition = {"scheduler": scheduler, "steps": 3}
        assert torch.allclose(loaded.sample(2, 5, condition)[1], loaded.sample(3, 5, condition)[1], atol=1e-5)
    stochastic = {"scheduler": "dpmpp-sde", "steps": 3}
    assert not torch.allclose(loaded.sample(1, 5, stochastic), loaded.sample(1, 5, {"scheduler": "dpmpp", "steps": 3}))
    for scheduler in ("ddpm", "ddim", "dpmpp", "dpmpp-sde"):  # every sampler can run the whole training schedule
        full = loaded.sample(1, 0, {"scheduler": scheduler, "steps": loaded.config.train_timesteps})
        assert torch.isfinite(full).all()
    with pytest.raises(ValueError, match="prompt"):
        loaded.sample(1, 0, {"prompt": "lung ultrasound"})
    with pytest.raises(ValueError, match="steps"):
        loaded.sample(1, 0, {"steps": 5000})
    with pytest.raises(ValueError, match="guidance_scale"):
        loaded.sample(1, 0, {"guidance_scale": 99})
    with pytest.raises(ValueError, match="'effusion'"):
        loaded.sample(1, 0, {"label": "effusion"})


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_fine_tuning_a_stable_diffusion_checkpoint_in_full_or_with_lora(lus, tiny_sd, tmp_path, lora_rank):
    torch.manual_seed(0)
    config = LatentDiffusionConfig(label="consolidation", mode="fine-tune", base_model=str(tiny_sd), image_size=32,
                                   lora_rank=lora_rank, prompt_template="lung ultrasound, {label}", steps=3,
                                   gradient_checkpointing=bool(lora_rank), snr_gamma=5.0)
    model = LatentDiffusion(config)
    unet, vae, text = _weights(model.unet), _weights(model.vae), _weights(model.text_encoder)
    train(model, lus, "consolidation", TWO_STEPS, tmp_path / "run")
    changed = _changed(unet, model.unet)
    assert changed and not _changed(vae, model.vae) and not _changed(text, model.text_encoder)
    if lora_rank:
        assert all("lora_" in name for name in changed)
        assert (tmp_path / "run" / "generator" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    loaded = load_generator(tmp_path / "run" / "generator")
    prompt = {"prompt": "lung ultrasound, consolidation"}
    assert torch.allclose(loaded.sample(2, 3, prompt), model.sample(2, 3, prompt), atol=1e-5)
    assert not torch.equal(loaded.sample(1, 3, prompt), loaded.sample(1, 3, {"prompt": "ultrasound"}))


def test_a_base_checkpoint_in_pickle_files_is_refused_until_converted(tiny_sd, tmp_path):
    from diffusers import UNet2DConditionModel
    from typer.testing import CliRunner

    from sonogen.cli import app

    pickled = tmp_path / "sd"
    shutil.copytree(tiny_sd, pickled)
    shutil.rmtree(pickled / "unet")
    UNet2DConditionModel.from_pretrained(tiny_sd / "unet").save_pretrained(pickled / "unet", safe_serialization=False)
    assert [p.name for p in (pickled / "unet").glob("*.bin")] == ["diffusion_pytorch_model.bin"]
    config = LatentDiffusionConfig(label="consolidation", mode="fine-tune", base_model=str(pickled), image_size=32)
    with pytest.raises(ValueError, match=r"pickle weights.*sonogen convert-weights .*diffusion_pytorch_model.bin"):
        LatentDiffusion(config)
    result = CliRunner().invoke(app, ["convert-weights", str(pickled)])
    assert result.exit_code == 0 and "diffusion_pytorch_model.safetensors" in result.output
    converted = LatentDiffusion(config)
    assert torch.equal(_weights(converted.unet)["conv_in.weight"], _weights(LatentDiffusion(
        replace(config, base_model=str(tiny_sd))).unet)["conv_in.weight"])


def test_controlnet_on_masks_trains_only_the_controlnet_and_samples_with_and_without_a_mask(lus, tiny_sd, tmp_path):
    torch.manual_seed(0)
    config = LatentDiffusionConfig(label="consolidation", mode="controlnet", base_model=str(tiny_sd), image_size=32,
                                   steps=3)
    model = LatentDiffusion(config)
    unet, controlnet = _weights(model.unet), _weights(model.controlnet)
    train(model, lus, "consolidation", TWO_STEPS, tmp_path / "run")
    assert _changed(controlnet, model.controlnet) and not _changed(unet, model.unet)
    assert model._maps.sum() > 0  # the phantom's consolidation masks reached the batches
    held_out = json.loads((tmp_path / "run" / "history.json").read_text())[-1]
    assert held_out["val_loss"] > 0 and held_out["val_lesion_loss"] > 0
    assert "val_mask_loss_gain" not in held_out  # the val split's lesions are one patient's, all in one place

    loaded = load_generator(tmp_path / "run" / "generator")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[12:24, 8:20] = 1
    with_mask = loaded.sample(2, 7, {"mask": _mask_png(mask)})
    assert torch.equal(with_mask, loaded.sample(2, 7, {"mask": mask}))
    assert torch.allclose(with_mask, model.sample(2, 7, {"mask": mask}), atol=1e-5)
    assert not torch.equal(with_mask, loaded.sample(2, 7))  # without a mask: the base model alone
    other = mask.copy()
    other[:, :] = 0
    assert not torch.equal(with_mask, loaded.sample(2, 7, {"mask": other}))
    with pytest.raises(ValueError, match="32×32"):
        loaded.sample(1, 0, {"mask": _mask_png(np.zeros((16, 16), dtype=np.uint8))})
    with pytest.raises(ValueError, match="base64"):
        loaded.sample(1, 0, {"mask": "not a png"})

    boxes = LatentDiffusion(LatentDiffusionConfig(label="consolidation", mode="controlnet", control="boxes",
                                                  base_model=str(tmp_path / "run" / "generator"), image_size=32))
    train(boxes, lus, "consolidation", TWO_STEPS, tmp_path / "boxes")
    maps = boxes._maps[:, 0].numpy()
    assert set(np.unique(maps)) == {0, 1}
    for m in maps:  # filled rectangles: a lone box covers its whole extent
        if len(found := boxes_from_mask(m)) == 1:
            x0, y0, x1, y1 = found[0]
            assert m.sum() == (x1 - x0) * (y1 - y0)


def test_a_controlnet_on_masks_refuses_training_images_without_any(unmasked, tiny_sd, tmp_path):
    model = LatentDiffusion(LatentDiffusionConfig(label="consolidation", mode="controlnet", base_model=str(tiny_sd),
                                                  image_size=32))
    with pytest.raises(ValueError, match="control 'mask': the 12 training images have no lesion masks, .*; "
                                         "they have lesion boxes: train with --set control=boxes"):
        train(model, unmasked, "consolidation", TWO_STEPS, tmp_path / "run")
    assert not (tmp_path / "run" / "generator").exists()


def test_mask_adherence_without_test_masks_is_not_measured_and_fails_its_gate(unmasked, tiny_sd, tmp_path):
    model = LatentDiffusion(LatentDiffusionConfig(label="consolidation", mode="controlnet", base_model=str(tiny_sd),
                                                  image_size=32, steps=3))
    report = evaluate_generator(model, unmasked, pixel_extractor(), {"min_mask_dice": 0.0},
                                EvaluateConfig(samples=4, downstream=None, device="cpu"), tmp_path / "gates", "ldm")
    reason = "the test split has 0 image(s) with a lesion mask; 2 are needed"
    assert "mask_dice" not in report["metrics"] and report["not_measured"]["mask_dice"] == reason
    assert not report["passed"] and report["gates"][0]["note"] == f"not measured: {reason}"


def test_mask_adherence_asks_a_controlnet_on_boxes_for_each_test_lesion_s_boxes_filled(lus, tiny_sd, tmp_path,
                                                                                       monkeypatch):
    model = LatentDiffusion(LatentDiffusionConfig(label="consolidation", mode="controlnet", control="boxes",
                                                  base_model=str(tiny_sd), image_size=32, steps=3))
    asked, sample = [], model.sample

    def recorded(n, seed, condition=None):
        asked.extend([condition["mask"]] if condition and "mask" in condition else [])
        return sample(n, seed, condition)

    monkeypatch.setattr(model, "sample", recorded)
    report = evaluate_generator(model, lus, pixel_extractor(), {"min_mask_dice": 0.0},
                                EvaluateConfig(samples=4, downstream=None, device="cpu"), tmp_path / "gates", "ldm")
    test = UltrasoundDataset(lus, split="test", with_mask=True)
    lesions = [item for item in map(test.__getitem__, range(len(test))) if item["mask"].any()]
    assert report["metrics"]["mask_requests"] == len(asked) == len(lesions) == 3
    for request, item in zip(asked, lesions):
        assert np.array_equal(request, mask_from_boxes(item["boxes"].int().tolist(), 32, 32))
        assert not np.array_equal(request, item["mask"][0].numpy())  # the box, not the lesion's outline
    assert 0 <= report["metrics"]["mask_dice"] <= 1 and report["metrics"]["mask_dice_real"] > 0


def test_the_held_out_mask_gain_is_zero_for_a_controlnet_that_ignores_its_mask_and_signed_by_where_it_is_right(
        lus, tiny_sd):
    model = LatentDiffusion(LatentDiffusionConfig(label="consolidation", mode="controlnet", base_model=str(tiny_sd),
                                                  image_size=32))
    model.training_labels(["consolidation", "normal"])
    images, items = (held_out := held_out_images(lus, ["consolidation", "normal"]))
    assert len(items) == 6 and len({item["patient_id"] for item in items if item["mask"].sum() > 0}) == 1
    assert "val_mask_loss_gain" not in model.held_out_losses(*held_out)
    test = UltrasoundDataset(lus, split="test")
    items = items + [test[k] for k in range(len(test))]  # a second patient's lesions, elsewhere
    images = torch.stack([item["image"] for item in items])
    blind = model.held_out_losses(images, items)  # its zero convolutions: no condition changes anything yet
    assert blind["val_loss"] > 0 and blind["val_lesion_loss"] == blind["val_lesion_loss_other_mask"] > 0
    assert blind["val_mask_loss_gain"] == 0

    def predictor(right_at_its_mask: bool):
        def predict(noisy, timesteps, states, maps):  # 0 (the noise's mean) where right, 100 where wrong
            shown = F.adaptive_max_pool2d((maps > 0).float(), noisy.shape[-2:])
            return 100 * (1 - shown if right_at_its_mask else shown)
        return predict

    model._predict = predictor(right_at_its_mask=True)  # the lesion loss left is the noise's own, about 1 in 10^4
    assert model.held_out_losses(images, items)["val_mask_loss_gain"] > 0.99
    # wrong where told: the other patient's condition does better (not by 10^4: the two lesions overlap)
    model._predict = predictor(right_at_its_mask=False)
    assert model.held_out_losses(images, items)["val_mask_loss_gain"] < -0.1


def test_invalid_configs_and_masks_are_clear_errors():
    with pytest.raises(ValueError, match="base_model"):
        LatentDiffusionConfig(label="x", mode="fine-tune")
    with pytest.raises(ValueError, match="lora_rank"):
        LatentDiffusionConfig(label="x", lora_rank=4)
    with pytest.raises(ValueError, match="mode"):
        LatentDiffusionConfig(label="x", mode="dreambooth")
    with pytest.raises(ValueError, match="multiple"):
        LatentDiffusionConfig(label="x", image_size=36)
    with pytest.raises(FileNotFoundError, match="base model /nonexistent/sd is not a folder"):
        LatentDiffusion(LatentDiffusionConfig(label="x", mode="fine-tune", base_model="/nonexistent/sd"))
    mask = decode_mask(_mask_png(np.eye(8, dtype=np.uint8)), 8)
    assert torch.equal(mask, torch.eye(8))


def test_train_command_fine_tunes_registers_and_serves_prompts_and_masks(lus, tiny_sd, tmp_path, monkeypatch):
    import os

    import requests
    import yaml
    from conftest import start_server, stop_server
    from typer.testing import CliRunner

    from sonogen.cli import app
    from sonogen.registry import load_registered_generator, model_card, model_version

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tiny = {"model": {"image_size": 32, "steps": 3},
            "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "eval_samples": 2, "precision": "fp32"}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"train": {"ldm": tiny}}))
    licensed = {**tiny, "model": {**tiny["model"], "base_licence": "CreativeML Open RAIL-M"}}
    (tmp_path / "licensed.yaml").write_text(yaml.safe_dump({"train": {"ldm": licensed}}))
    runner = CliRunner()
    common = ["--data", str(lus), "--label", "consolidation", "--dataset", "lus"]
    missing = runner.invoke(app, ["train", "ldm", *common, "--config", "tiny.yaml", "--mode", "fine-tune"])
    assert missing.exit_code == 1 and "base_model" in missing.output
    lora = runner.invoke(app, ["train", "ldm", *common, "--config", "licensed.yaml", "--mode", "fine-tune",
                               "--base-model", str(tiny_sd), "--lora-rank", "4", "--out", "models/lora",
                               "--no-register"])
    assert lora.exit_code == 0, lora.output
    result = runner.invoke(app, ["train", "ldm", *common, "--config", "tiny.yaml", "--mode", "controlnet",
                                 "--base-model", "models/lora/generator", "--control", "mask"])
    assert result.exit_code == 0, result.output

    card = model_version("lus-ldm-consolidation", "1")
    assert card.tags["family"] == "ldm"
    direct = load_registered_generator("models:/lus-ldm-consolidation/1")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[10:22, 6:18] = 1
    condition = {"prompt": "lung ultrasound, consolidation", "mask": mask, "steps": 3, "scheduler": "ddim"}
    expected = np.rint((direct.sample(2, 4, condition)[:, 0].numpy() + 1) * 127.5).astype(np.uint8)

    process, url = start_server(tmp_path, os.environ["MLFLOW_TRACKING_URI"], "lus-ldm-consolidation",
                                "--alias", "candidate")
    try:
        endpoint = f"{url}/v1/models/lus-ldm-consolidation:predict"
        body = {"n": 2, "seed": 4, "prompt": "lung ultrasound, consolidation", "mask": _mask_png(mask), "steps": 3,
                "scheduler": "ddim"}
        reply = requests.post(endpoint, json={"instances": [body]}, timeout=120)
        assert reply.status_code == 200, reply.text
        [prediction] = reply.json()["predictions"]
        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in prediction["images"]]
        assert np.array_equal(np.stack(images), expected)
        for field, value, message in [("steps", 5000, "steps"), ("guidance_scale", -1, "guidance_scale"),
                                      ("scheduler", "euler", "scheduler"), ("mask", "xx", "base64"),
                                      ("label", "effusion", "label")]:
            refused = requests.post(endpoint, json={"instances": [{"n": 1, field: value}]}, timeout=60)
            assert refused.status_code == 400 and message in refused.text, (field, refused.text)
    finally:
        stop_server(process)
    text = model_card("lus-ldm-consolidation", "1")
    # the ControlNet keeps the licence and the name of the checkpoint its base ldm was fine-tuned from
    assert f"base checkpoint: `models/lora/generator` (on `{tiny_sd}`), licence: CreativeML Open RAIL-M" in text

    from sonogen.jobs import evaluate_targets

    params = {"evaluate": {"samples": 6, "encoder_epochs": 1,
                           "downstream": {"seeds": 3, "epochs": 1, "bootstrap": 100}},
              "gates": {"ldm": {"extractor": "us-encoder", "max_near_copy_fraction": 1.0},
                        "ldm-controlnet": {"min_mask_dice": 0.0}, "ldm-fine-tune": {"min_confidence": 2.0}}}
    [report] = evaluate_targets(["models/ldm-consolidation"], lus, None, params, tmp_path / "gates", "lus")
    assert report["family"] == "ldm" and report["gate_set"] == "ldm-controlnet" and report["samples"]["synthetic"] == 6
    assert {"fid", "kmmd", "near_copy_fraction", "auc_delta", "mask_dice", "mask_dice_real"} <= set(report["metrics"])
    assert [row["gate"] for row in report["gates"]] == ["max_near_copy_fraction", "min_mask_dice"]


def test_an_interrupted_from_scratch_run_resumes_to_the_same_weights_and_images(lus, tmp_path):
    config = TrainConfig(epochs=2, batch_size=2, steps_per_epoch=3, eval_samples=2, eval_every=2, precision="fp32")

    def stop_after_one_epoch(epochs):
        yield next(iter(epochs))
        raise KeyboardInterrupt

    def fresh() -> LatentDiffusion:
        torch.manual_seed(0)
        return LatentDiffusion(LatentDiffusionConfig(label="consolidation", **{**TINY_SCRATCH, "vae_steps": 2}))

    straight = fresh()
    train(straight, lus, "consolidation", config, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):  # stopped after the autoencoder and one UNet step
        train(fresh(), lus, "consolidation", config, tmp_path / "resumed", progress=stop_after_one_epoch)
    resumed = fresh()
    train(resumed, lus, "consolidation", config, tmp_path / "resumed", resume=True)
    assert resumed.step == straight.step == 6
    expected = straight._weights()
    assert expected.keys() == resumed._weights().keys() and any(k.startswith("ema.") for k in expected)
    assert all(torch.equal(expected[k], v) for k, v in resumed._weights().items())
    assert resumed.vae.config.scaling_factor == straight.vae.config.scaling_factor
    assert torch.equal(resumed.sample(2, 1), straight.sample(2, 1))
