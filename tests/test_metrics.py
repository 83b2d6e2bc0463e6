"""Metric implementations against independent references: loops, closed forms."""

import itertools
import math

import numpy as np
import pytest
import torch

from sonogen.metrics import kernel_mmd, one_nn_accuracy
from sonogen.metrics.frechet import fid, frechet_distance, sifid


def _loop_mmd(x, y):
    pairs_xx = [(a, b) for a, b in itertools.product(range(len(x)), repeat=2)]
    sq = lambda a, b: float(((a - b) ** 2).sum())  # noqa: E731
    bandwidth = sum(sq(x[a], x[b]) for a, b in pairs_xx if a != b) / (len(x) * (len(x) - 1))
    k = lambda a, b: math.exp(-sq(a, b) / bandwidth)  # noqa: E731
    kxx = [[k(a, b) for b in x] for a in x]
    kyy = [[k(a, b) for b in y] for a in y]
    kxy = [[k(a, b) for b in y] for a in x]
    m, n = len(x), len(y)
    biased = sum(map(sum, kxx)) / m**2 + sum(map(sum, kyy)) / n**2 - 2 * sum(map(sum, kxy)) / (m * n)
    unbiased = ((sum(map(sum, kxx)) - sum(kxx[i][i] for i in range(m))) / (m * (m - 1))
                + (sum(map(sum, kyy)) - sum(kyy[i][i] for i in range(n))) / (n * (n - 1))
                - 2 * sum(map(sum, kxy)) / (m * n))
    return biased, unbiased


def _loop_one_nn(x, y):
    pooled = [(v, True) for v in x] + [(v, False) for v in y]
    correct = []
    for i, (v, label) in enumerate(pooled):
        distances = [(float(((v - w) ** 2).sum()), j) for j, (w, _) in enumerate(pooled) if j != i]
        correct.append(pooled[min(distances)[1]][1] == label)
    real, fake = correct[: len(x)], correct[len(x):]
    return sum(correct) / len(correct), sum(real) / len(real), sum(fake) / len(fake)


@pytest.mark.parametrize("seed", range(3))
def test_kernel_mmd_matches_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(9, 5, generator=g), torch.randn(7, 5, generator=g) + 0.5
    result = kernel_mmd(x, y)
    biased, unbiased = _loop_mmd(x.double(), y.double())
    assert result["biased"] == pytest.approx(biased, rel=1e-9)
    assert result["unbiased"] == pytest.approx(unbiased, rel=1e-9, abs=1e-12)


def test_kernel_mmd_separates_and_rejects_degenerate_input():
    g = torch.Generator().manual_seed(0)
    same = kernel_mmd(torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g))
    apart = kernel_mmd(torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g) + 3)
    assert abs(same["unbiased"]) < 0.02 < apart["unbiased"]
    with pytest.raises(ValueError, match="identical"):
        kernel_mmd(torch.ones(3, 2), torch.randn(3, 2))


@pytest.mark.parametrize("seed", range(3))
def test_one_nn_matches_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(11, 3, generator=g), torch.randn(8, 3, generator=g) + 0.7
    result = one_nn_accuracy(x, y)
    overall, real, fake = _loop_one_nn(x.double(), y.double())
    assert (result["overall"], result["real"], result["synthetic"]) == pytest.approx((overall, real, fake))


def test_one_nn_detects_copies_and_separation():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    assert one_nn_accuracy(x, x + 1e-6)["overall"] == 0.0  # each sample's neighbour is its copy
    assert one_nn_accuracy(x, x + 100)["overall"] == 1.0


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    a, b = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))  # rotating both covariances keeps them commuting
    assert frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(closed, rel=1e-6)
    samples1 = rng.multivariate_normal(mu1, np.diag(a), 40000)
    samples2 = rng.multivariate_normal(mu2, np.diag(b), 40000)
    assert fid(samples1, samples2) == pytest.approx(closed, rel=0.03, abs=0.02)


def test_fid_survives_singular_covariances():
    rng = np.random.default_rng(1)
    value = fid(rng.normal(size=(5, 32)), rng.normal(size=(5, 32)))  # fewer samples than dimensions
    assert np.isfinite(value) and value > 0


def test_sifid_is_zero_for_the_same_image_and_grows_with_change():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(8, 16, 16))
    assert sifid(real, real) == pytest.approx(0, abs=1e-6)
    assert sifid(real, real + 0.5) > sifid(real, real + 0.1) > 0
    with pytest.raises(ValueError, match="same C"):
        sifid(real, real[:4])


def test_a_memorising_generator_is_all_near_copies_and_noise_is_not():
    from sonogen.metrics.memorisation import closest_pairs, memorisation

    g = torch.Generator().manual_seed(3)
    train = torch.rand(40, 1, 16, 16, generator=g) * 2 - 1
    holdout = torch.rand(10, 1, 16, 16, generator=g) * 2 - 1
    copies = train[torch.randint(0, 40, (20,), generator=g)] + 0.001 * torch.randn(20, 1, 16, 16, generator=g)
    noise = torch.rand(20, 1, 16, 16, generator=g) * 2 - 1
    flat = lambda t: t.flatten(1)  # noqa: E731
    copied = memorisation(flat(train), flat(copies), flat(holdout))
    fresh = memorisation(flat(train), flat(noise), flat(holdout))
    assert copied["near_copy_fraction"] == 1.0 and copied["median_ratio"] < 0.01
    assert fresh["near_copy_fraction"] == 0.0 and 0.8 < fresh["median_ratio"] < 1.2
    sheet = closest_pairs(copies, train, copied, k=4)
    assert sheet.shape == (2 * 16 + 6, 4 * 18 + 2) and sheet.dtype == np.uint8
    top, bottom = sheet[2:18, 2:18].astype(int), sheet[20:36, 2:18].astype(int)
    assert np.abs(top - bottom).max() <= 1, "each copy sits above the training image it copies"
