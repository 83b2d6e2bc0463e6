"""Keeping a GAN's best epoch, as Yu et al. picked theirs: by realism readings taken while it trains.

A GAN's last epoch is not its best (it can drift into copying or collapse), so families that say so
(``Generator.keeps_best_epoch``) are read every ``eval_every`` epochs on a few hundred samples in a feature space
(the dataset's us-encoder when one is registered, else downsampled pixels): kernel MMD to the real training images,
leave-one-out 1-NN accuracy, the us-encoder classifier's confidence in the label, and the samples' MS-SSIM
diversity against the real images'. The kept epoch has the lowest kMMD among the epochs that neither copy (1-NN
accuracy ≥ ``min_1nn``), lose the label (confidence ≥ ``min_confidence``, where it is read) nor collapse (diversity
ratio ≤ ``max_diversity_ratio``); if none qualifies, the lowest kMMD overall, and the reason says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from sonogen.metrics import kernel_mmd, one_nn_accuracy
from sonogen.metrics.similarity import mean_pairwise_ms_ssim

MONITOR_SEED = 4321  # fixed latents: every epoch is read on the same draws
BEST = "best.json"
BEST_DIR = "best"


@dataclass
class Monitor:
    """A feature space to read samples in: ``features`` (images → vectors), optionally ``confidence`` (images →
    P(label) each), named ``name`` (the extractor's id)."""

    name: str
    features: Callable[[torch.Tensor], torch.Tensor]
    confidence: Callable[[torch.Tensor], torch.Tensor] | None = None
    samples: int = 256
    min_1nn: float = 0.2
    min_confidence: float = 0.5
    max_diversity_ratio: float = 1.5  # samples' mean pairwise MS-SSIM over the real images': collapse raises it

    def read(self, generator, real: torch.Tensor) -> dict[str, float]:
        samples = torch.cat([generator.sample(min(64, self.samples - start), MONITOR_SEED + start)
                             for start in range(0, self.samples, 64)])
        real = real[: self.samples]
        real_f, fake_f = self.features(real), self.features(samples)
        readings = {"kmmd": kernel_mmd(real_f, fake_f)["biased"], "one_nn_acc": one_nn_accuracy(real_f, fake_f)["overall"]}
        if self.confidence is not None:
            readings["confidence"] = float(self.confidence(samples).mean())
        readings["diversity_ratio"] = mean_pairwise_ms_ssim(samples) / max(mean_pairwise_ms_ssim(real), 1e-6)
        return readings

    def qualifies(self, readings: dict[str, float]) -> bool:
        return (readings["one_nn_acc"] >= self.min_1nn and readings.get("confidence", 1.0) >= self.min_confidence
                and readings.get("diversity_ratio", 0.0) <= self.max_diversity_ratio)


@dataclass
class BestEpoch:
    """The best epoch so far and why; saved as ``best.json`` beside the checkpoint, so a resumed run keeps it."""

    monitor: str = ""
    epoch: int = 0
    readings: dict[str, float] = field(default_factory=dict)
    qualified: bool = False
    reason: str = ""

    def offer(self, monitor: Monitor, epoch: int, readings: dict[str, float]) -> bool:
        """Takes ``epoch`` if it beats the best so far; True when it does."""
        qualified = monitor.qualifies(readings)
        better = (not self.epoch or (qualified, -readings["kmmd"]) > (self.qualified, -self.readings["kmmd"]))
        if better:
            self.monitor, self.epoch, self.readings, self.qualified = monitor.name, epoch, dict(readings), qualified
            shown = ", ".join(f"{key} {value:.4g}" for key, value in readings.items())
            rule = (f"1-NN accuracy ≥ {monitor.min_1nn:g}"
                    + (f", confidence ≥ {monitor.min_confidence:g}" if "confidence" in readings else "")
                    + (f" and diversity ratio ≤ {monitor.max_diversity_ratio:g}" if "diversity_ratio" in readings
                       else ""))
            self.reason = (f"epoch {epoch} ({shown} on {monitor.samples} samples, {monitor.name}): the lowest kMMD "
                           + (f"among the epochs with {rule}" if qualified else f"of all epochs; none had {rule}"))
        return better

    def save(self, folder: Path) -> None:
        (folder / BEST).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> BestEpoch:
        path = folder / BEST
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()
