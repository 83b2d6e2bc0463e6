"""Every family without its own server test, served through the predictor's code path (`SamplerModel`: load,
v1 and v2 predict) from a saved tiny model, with concurrent requests drawn together and each answered with the
images the generator gives that seed alone. (DCGAN: test_serving.py, over HTTP with ONNX and torch; SinDDM:
test_sinddm.py; ldm: test_latent_diffusion.py; DiffUltra with its boxes: test_diffultra.py.)"""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from kserve import InferInput, InferRequest
from PIL import Image

from serving.predictor import SamplerModel
from sonogen.generators import to_uint8
from sonogen.generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from sonogen.generators.sinddm import FewDDM, FewDDMConfig, MultiScaleDDMConfig, SinDDM
from sonogen.generators.sinddm_pool import SinDDMPool

TINY = {"coarsest_area": 100, "coarsest_side": (8, 12), "timesteps": 20, "channels": 16}


def image(phase: float) -> torch.Tensor:
    return torch.linspace(-1, 1, 32)[None, None, :, None].expand(1, 1, 32, 32) * torch.cos(
        torch.linspace(phase, phase + 6, 32))[None, None, None, :]


def sinddm(name: str, phase: float) -> SinDDM:
    model = SinDDM(MultiScaleDDMConfig(label="consolidation", images=(name,), **TINY))
    model.begin_training(image(phase), total_steps=1)
    return model


def build(family: str):
    torch.manual_seed(0)
    if family == "fewddm":
        model = FewDDM(FewDDMConfig(label="consolidation", images=("a", "b"), max_images=2, **TINY))
        model.begin_training(torch.cat([image(0.0), image(1.0)]), total_steps=1)
        return model
    if family == "sinddmpool":
        return SinDDMPool.from_members([sinddm("a", 0.0), sinddm("b", 1.0)])
    return LatentDiffusion(LatentDiffusionConfig(label="consolidation", labels=("consolidation", "normal"),
                                                 image_size=32, vae_channels=(8, 16), unet_channels=(16, 32),
                                                 embedding_dim=16, steps=2, train_timesteps=40))


def v2(n: int, seed: int, label: str | None = None) -> InferRequest:
    inputs = [InferInput("n", [1], "INT64", [n]), InferInput("seed", [1], "INT64", [seed])]
    if label:
        inputs.append(InferInput("label", [1], "BYTES", [label]))
    return InferRequest(model_name="m", infer_inputs=inputs)


@pytest.mark.parametrize("family", ["fewddm", "sinddmpool", "ldm"])
def test_a_family_is_served_over_v1_and_v2_with_concurrent_requests_drawn_together(family, tmp_path):
    generator = build(family).eval_mode()
    folder = generator.save(tmp_path / "generator")
    model = SamplerModel(family, str(folder), max_n=16, max_batch=8)
    assert model.load() and model.backend.runtime == "torch:cpu"

    async def requests():
        v1 = model.predict({"instances": [{"n": 2, "seed": 3}, {"n": 3, "seed": 4}]})
        return await asyncio.gather(v1, model.predict(v2(2, 5)), model.predict(v2(1, 3, "consolidation")))

    v1, v2_five, v2_three = asyncio.run(requests())
    expected = {seed: to_uint8(generator.sample(n, seed)) for n, seed in ((2, 3), (3, 4), (2, 5))}
    for prediction, seed in zip(v1["predictions"], (3, 4)):
        served = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in prediction["images"]])
        assert prediction["seed"] == seed and np.abs(served.astype(int) - expected[seed]).max() <= 1
    [five] = v2_five.outputs
    assert five.name == "images" and np.abs(five.as_numpy().astype(int) - expected[5]).max() <= 1
    [three] = v2_three.outputs
    assert np.abs(three.as_numpy()[0].astype(int) - expected[3][0]).max() <= 1  # image 0 of seed 3, in any company
