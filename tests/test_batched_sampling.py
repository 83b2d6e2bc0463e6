"""Cross-request batching of torch families: several draws (n, seed) that share a condition are drawn in one call
(`Generator.sample_draws`), each image as it is alone; the server's DrawBatcher groups concurrent requests so."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from serving.batching import DrawBatcher
from sonogen.generators.dcgan import DCGAN, DCGANConfig
from sonogen.generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from sonogen.generators.sinddm import MultiScaleDDMConfig, SinDDM


def tiny(family: str):
    torch.manual_seed(0)
    if family == "dcgan":
        return DCGAN(DCGANConfig(label="x", image_size=32, base_channels=4))
    if family == "ldm":
        return LatentDiffusion(LatentDiffusionConfig(label="a", labels=("a", "b"), image_size=32, vae_channels=(8, 16),
                                                     unet_channels=(16, 32), embedding_dim=16, steps=3,
                                                     train_timesteps=40))
    model = SinDDM(MultiScaleDDMConfig(label="x", images=("a",), coarsest_area=100, coarsest_side=(8, 12),
                                       timesteps=20, channels=16))
    model.begin_training(torch.linspace(-1, 1, 32)[None, None, :, None].expand(1, 1, 32, 32), total_steps=1)
    return model


@pytest.mark.parametrize("family, condition", [("dcgan", {}), ("ldm", {"label": "b", "steps": 2}), ("sinddm", {})])
def test_draws_in_one_call_are_the_images_each_draw_gives_alone(family, condition):
    model = tiny(family).eval_mode()
    alone = torch.cat([model.sample(2, 5, condition), model.sample(3, 7, condition), model.sample(1, 5, condition)])
    together, boxes = model.sample_draws([(2, 5), (3, 7), (1, 5)], condition)
    assert boxes is None and together.shape == alone.shape == (6, 1, 32, 32)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(together[0], together[5], rtol=0, atol=1e-5)  # the image of seed 5, index 0
    assert not torch.allclose(together[0], together[2], rtol=0, atol=1e-5)  # another seed, another image


def test_bad_draws_and_conditions_are_refused_before_any_network_runs():
    model = tiny("dcgan")
    with pytest.raises(ValueError, match="n must be at least 1"):
        model.sample_draws([(2, 5), (0, 7)])
    with pytest.raises(ValueError, match="does not take the condition"):
        model.sample_draws([(2, 5)], {"prompt": "x"})


def test_concurrent_draws_with_one_condition_and_precision_share_a_call_and_others_keep_their_turn():
    calls = []

    def run(draws, condition, precision):
        calls.append((draws, condition, precision))
        time.sleep(0.02)
        return np.concatenate([np.full((n, 2, 2), seed, np.uint8) for n, seed in draws]), None

    batcher = DrawBatcher(run, max_batch=8)

    async def requests():
        return await asyncio.gather(batcher.run(2, 1, {}, "fp32"), batcher.run(3, 2, {}, "fp32"),
                                    batcher.run(2, 3, {"label": "b"}, "fp32"), batcher.run(1, 6, {}, "bf16"),
                                    batcher.run(4, 4, {}, "fp32"), batcher.run(9, 5, {}, "fp32"))

    results = asyncio.run(requests())
    assert calls == [([(2, 1), (3, 2)], {}, "fp32"), ([(2, 3)], {"label": "b"}, "fp32"), ([(1, 6)], {}, "bf16"),
                     ([(4, 4)], {}, "fp32"), ([(9, 5)], {}, "fp32")]
    for (images, boxes), (n, seed) in zip(results, [(2, 1), (3, 2), (2, 3), (1, 6), (4, 4), (9, 5)]):
        assert boxes is None and images.shape == (n, 2, 2) and (images == seed).all()


def test_a_failing_call_fails_each_request_in_it():
    def run(draws, condition, precision):
        raise ValueError("size: too large")

    batcher = DrawBatcher(run, max_batch=8)

    async def requests():
        return await asyncio.gather(batcher.run(1, 1, {}, "fp32"), batcher.run(1, 2, {}, "fp32"),
                                    return_exceptions=True)

    assert [str(result) for result in asyncio.run(requests())] == ["size: too large"] * 2
