"""Two-sample statistics between real and generated feature sets, vectorised over all pairs."""

from __future__ import annotations

import torch


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.double(), b.double()).pow(2)


def kernel_mmd(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """Squared maximum mean discrepancy with a Gaussian kernel ``exp(-|x - y|^2 / s)``.

    Gretton et al., "A kernel two-sample test", JMLR 13 (2012), eq. 3 (biased) and lemma 6 (unbiased). The
    bandwidth ``s`` is the mean squared distance between distinct real samples, as in the US-DCGAN evaluation
    code of Yu et al. ``biased`` is the form that paper reports (diagonals included); ``unbiased`` drops them.
    """
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("kernel MMD needs at least two real and two generated samples")
    d_rr, d_ff, d_rf = _squared_distances(real, real), _squared_distances(fake, fake), _squared_distances(real, fake)
    m, n = len(real), len(fake)
    bandwidth = d_rr.sum() / (m * (m - 1))
    if bandwidth <= 0:
        raise ValueError("all real samples are identical: the kernel bandwidth is zero")
    k_rr, k_ff, k_rf = (torch.exp(-d / bandwidth) for d in (d_rr, d_ff, d_rf))
    biased = k_rr.mean() + k_ff.mean() - 2 * k_rf.mean()
    unbiased = (
        (k_rr.sum() - k_rr.diagonal().sum()) / (m * (m - 1))
        + (k_ff.sum() - k_ff.diagonal().sum()) / (n * (n - 1))
        - 2 * k_rf.mean()
    )
    return {"biased": float(biased), "unbiased": float(unbiased), "bandwidth": float(bandwidth)}


def one_nn_accuracy(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """Leave-one-out accuracy of a 1-nearest-neighbour classifier telling real from generated samples.

    Lopez-Paz & Oquab, "Revisiting classifier two-sample tests", ICLR 2017; Xu et al., "An empirical study on
    evaluation metrics of GANs", 2018. 0.5 is ideal; near 1 the sets are separable; near 0 generated samples sit
    on top of real ones (copying).
    """
    if len(real) < 1 or len(fake) < 1 or len(real) + len(fake) < 3:
        raise ValueError("1-NN accuracy needs at least one real and one generated sample, three in all")
    pooled = torch.cat([real, fake]).double()
    is_real = torch.cat([torch.ones(len(real), dtype=torch.bool), torch.zeros(len(fake), dtype=torch.bool)])
    distances = torch.cdist(pooled, pooled)
    distances.fill_diagonal_(float("inf"))
    correct = is_real[distances.argmin(dim=1)] == is_real
    return {
        "overall": float(correct.double().mean()),
        "real": float(correct[is_real].double().mean()),
        "synthetic": float(correct[~is_real].double().mean()),
    }
