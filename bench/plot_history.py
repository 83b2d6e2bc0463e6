"""Plots the per-epoch quality curves of a training run (its history.json) to a PNG.

    python bench/plot_history.py models/dcgan-consolidation/history.json curves.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(history_path: str, out: str) -> None:
    history = [h for h in json.loads(open(history_path).read()) if "kmmd" in h]
    epochs = [h["epoch"] for h in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [h["kmmd"] for h in history], marker="o", label="kMMD (biased)")
    left.plot(epochs, [h["kmmd_unbiased"] for h in history], marker=".", label="kMMD (unbiased)")
    left.set_xlabel("epoch")
    left.set_ylabel("kernel MMD² (pixels-16)")
    left.legend()
    right.plot(epochs, [h["one_nn_acc"] for h in history], marker="o", label="overall")
    right.plot(epochs, [h["one_nn_acc_real"] for h in history], label="real")
    right.plot(epochs, [h["one_nn_acc_synthetic"] for h in history], label="synthetic")
    right.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    right.set_xlabel("epoch")
    right.set_ylabel("1-NN leave-one-out accuracy")
    right.set_ylim(0, 1.05)
    right.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
