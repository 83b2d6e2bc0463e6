"""Sampling torch families in bf16, channels-last and compiled: the same seed gives the same images, in any company; bf16
images stay within a few grey levels of fp32's; a request can ask for fp32 from a bf16 server (and is never
batched with bf16 draws); an ONNX export samples at its own precision only; a generated set records its
precision, and a rerun at another precision is refused."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from kserve import InferInput, InferRequest
from kserve.errors import InvalidInput
from PIL import Image

from serving.predictor import SamplerModel
from sonogen.backends import load_backend
from sonogen.generators.dcgan import DCGAN, DCGANConfig
from conftest import NAME
from test_serving_families import build

# what a bf16 image may differ from the fp32 one by, in grey levels (bench/RESULTS.md: trained models)
MEAN_TOLERANCE, MAX_TOLERANCE = 1.0, 8


def saved(family: str, folder):
    if family == "dcgan":
        torch.manual_seed(0)
        generator = DCGAN(DCGANConfig(label="consolidation", image_size=32, base_channels=8))
    else:
        generator = build(family)
    return str(generator.eval_mode().save(folder / family))


@pytest.mark.parametrize("family", ["dcgan", "fewddm", "sinddmpool", "ldm"])
def test_bf16_images_repeat_with_the_seed_and_stay_near_fp32_s(family, tmp_path):
    folder = saved(family, tmp_path)
    fp32, bf16 = load_backend(folder), load_backend(folder, precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    exact = fp32.images(6, 3)
    reduced = bf16.images(6, 3)
    assert np.array_equal(bf16.images(6, 3), reduced)  # the same seed, the same bf16 images
    assert np.array_equal(bf16.images(2, 3), reduced[:2])  # in any company
    difference = np.abs(reduced.astype(int) - exact.astype(int))
    assert difference.max() >= 1  # the networks did run in bf16: some pixels move
    assert difference.mean() <= MEAN_TOLERANCE and difference.max() <= MAX_TOLERANCE, (difference.mean(),
                                                                                      difference.max())
    assert np.array_equal(bf16.draw(6, 3, precision="fp32")[0], exact)  # fp32 asked of a bf16 backend
    nhwc = load_backend(folder, channels_last=True)
    assert np.abs(nhwc.images(6, 3).astype(int) - exact.astype(int)).max() <= 1  # the same images, NHWC
    if family == "dcgan":  # compiling takes a while on a CPU: one family shows it
        compiled = load_backend(folder, compile=True)
        assert np.abs(compiled.images(6, 3).astype(int) - exact.astype(int)).max() <= 1
        assert np.array_equal(compiled.images(6, 3), compiled.images(6, 3))
    with pytest.raises(ValueError, match="fp32 or bf16"):
        bf16.draw(1, 0, precision="fp16")


def pngs(prediction: dict) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in prediction["images"]])


def test_a_bf16_server_answers_fp32_requests_apart_and_says_which_precision_it_drew(tmp_path):
    folder = saved("ldm", tmp_path)
    model = SamplerModel("ldm", folder, max_n=16, max_batch=16, precision="bf16")
    assert model.load() and model.backend.precision == "bf16"
    calls: list[str] = []
    run = model.batcher._run
    model.batcher._run = lambda draws, condition, precision: calls.append(precision) or run(draws, condition,
                                                                                           precision)

    async def requests():
        v2 = InferRequest(model_name="ldm", infer_inputs=[
            InferInput("n", [1], "INT64", [2]), InferInput("seed", [1], "INT64", [5]),
            InferInput("precision", [1], "BYTES", ["fp32"])])
        return await asyncio.gather(model.predict({"instances": [{"n": 2, "seed": 3}]}),
                                    model.predict({"instances": [{"n": 2, "seed": 4, "precision": "fp32"}]}),
                                    model.predict(v2))

    default, asked, v2 = asyncio.run(requests())
    exact, reduced = load_backend(folder), load_backend(folder, precision="bf16")
    assert default["predictions"][0]["precision"] == "bf16"
    assert np.abs(pngs(default["predictions"][0]).astype(int) - reduced.images(2, 3)).max() <= 1
    assert asked["predictions"][0]["precision"] == "fp32"
    assert np.abs(pngs(asked["predictions"][0]).astype(int) - exact.images(2, 4)).max() <= 1
    assert v2.parameters["precision"] == "fp32"
    assert np.abs(v2.outputs[0].as_numpy().astype(int) - exact.images(2, 5)).max() <= 1
    assert sorted(calls) == ["bf16", "fp32"]  # the two fp32 requests together, never with the bf16 one

    with pytest.raises(InvalidInput, match=r"instances\[0\]\.precision: this model samples at fp32 or bf16"):
        asyncio.run(model.predict({"instances": [{"n": 1, "precision": "int4"}]}))


def test_an_onnx_export_samples_at_its_own_precision_only(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    backend = load_backend(f"models:/{NAME}/1")
    assert backend.runtime.startswith("onnxruntime") and backend.precisions == ("fp32",)
    model = SamplerModel(NAME, f"models:/{NAME}/1")
    assert model.load()
    with pytest.raises(InvalidInput, match=r"instances\[0\]\.precision: this model samples at fp32 \(onnxruntime"):
        asyncio.run(model.predict({"instances": [{"n": 1, "precision": "bf16"}]}))
    with pytest.raises(ValueError, match="samples at fp32"):
        load_backend(f"models:/{NAME}/1", precision="bf16")


def test_a_generated_set_records_its_precision_and_a_rerun_at_another_is_refused(tmp_path):
    import json

    from sonogen.generate import generate_dataset

    folder = saved("dcgan", tmp_path)
    out = tmp_path / "set"
    generate_dataset(folder, 4, str(out), seed=1, batch=2, precision="bf16")
    assert json.loads((out / "generate.json").read_text())["precision"] == "bf16"
    drawn = np.stack([np.asarray(Image.open(path)) for path in sorted((out / "images").glob("*.png"))])
    again = load_backend(folder, precision="bf16")
    from sonogen.sampling import chunk_seed
    assert np.array_equal(drawn[:2], again.images(2, chunk_seed(1, 0)))
    with pytest.raises(ValueError, match="other settings"):
        generate_dataset(folder, 4, str(out), seed=1, batch=2)
    generate_dataset(folder, 4, str(tmp_path / "fp32"), seed=1, batch=2)
    assert "precision" not in json.loads((tmp_path / "fp32" / "generate.json").read_text())
