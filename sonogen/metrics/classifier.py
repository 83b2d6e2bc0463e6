"""The reduced-VGG ultrasound classifier.

Yu et al. judge their consolidation GAN with a VGG-style classifier trained on real frames; ours is that
network cut to the size of the data a team has (four 3×3 conv blocks, global pooling, one linear layer). It
serves three gates: the mean P(label) it gives synthetic images (confidence), its pooled penultimate
activations as the ``us-encoder`` feature extractor, and the downstream-usefulness experiment, where the same
network is retrained on real and synthetic mixtures.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG = "classifier.json"
WEIGHTS = "classifier.safetensors"


@dataclass
class ClassifierConfig:
    classes: list[str]
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    dropout: float = 0.25
    epochs: int = 25  # at 12, some seeds stayed at chance on a few hundred phantom frames
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    augmentations: list[str] = field(default_factory=lambda: ["flip"])  # augment.AUGMENTATIONS

    def __post_init__(self):
        from sonogen.metrics.augment import AUGMENTATIONS

        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"a classifier needs at least two distinct classes, got {self.classes}")
        if not self.widths or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("widths must be non-empty; epochs and batch_size at least 1")
        if unknown := sorted(set(self.augmentations) - set(AUGMENTATIONS)):
            raise ValueError(f"unknown augmentations {unknown}; known: {', '.join(AUGMENTATIONS)}")


class ReducedVGG(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        blocks, channels = [], 1
        for width in config.widths:
            # GroupNorm, not BatchNorm: with a few hundred images the running statistics BatchNorm uses at
            # inference never settle, and an eval-mode classifier then answers one class for everything
            blocks += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.GroupNorm(min(8, width), width),
                       nn.ReLU(True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(channels, len(config.classes))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate activations ``(N, widths[-1])``: the ``us-encoder`` features."""
        return self.features(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(images)))


def train_classifier(images: torch.Tensor, targets: torch.Tensor, config: ClassifierConfig,
                     device: str | torch.device = "cpu",
                     validate: Callable[[ReducedVGG], float] | None = None) -> ReducedVGG:
    """Fits on ``images`` ``(N, 1, H, W)`` in [-1, 1] with class indices ``targets``, batches moved to ``device``;
    deterministic per seed on the CPU. With ``validate`` (model → score, higher is better, read after every
    epoch) the best epoch's weights are returned, and ``model.selected`` says which epoch and its score.

    The loss weighs classes by inverse frequency, because rare findings are the point of the platform and an
    unweighted classifier learns to ignore them. The default augmentation is horizontal flips only: a mirrored
    lung scan is still a plausible scan, a rotated or rescaled one is not; protocols add intensity changes.
    """
    from sonogen.metrics.augment import Augmenter

    if len(images) != len(targets) or len(images) < 2:
        raise ValueError(f"need at least two images with one target each, got {len(images)} and {len(targets)}")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # weight init and dropout
    device = torch.device(device)
    # channels-last on the CPU: its pooling and normalisation run vectorised over channels, a third less time
    # per step at 223 px (bench/classifier_speed.py); not measured on a GPU, so GPUs keep the default layout
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    model = ReducedVGG(config).to(device, memory_format=layout)
    augment = Augmenter(config.augmentations, config.seed)
    counts = torch.bincount(targets, minlength=len(config.classes)).double()
    weights = torch.where(counts > 0, counts.sum() / (len(config.classes) * counts.clamp(min=1)), 0).float().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    best: tuple[float, int, dict] | None = None
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), config.batch_size):
            batch = order[start : start + config.batch_size]
            x = augment(images[batch], generator).to(device).contiguous(memory_format=layout)
            loss = F.cross_entropy(model(x), targets[batch].to(device), weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if validate is not None:
            score = validate(model)
            if best is None or score > best[0]:
                best = (score, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
    if best is not None:
        model.load_state_dict(best[2])
        model.selected = {"epoch": best[1], "score": best[0]}
    # back to the default layout, so the model predicts exactly as it does once saved and loaded
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def _batched(model: ReducedVGG, fn, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``fn`` over ``images`` in batches on the model's device, results on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([fn(images[i : i + batch_size].to(device).float()).cpu()
                      for i in range(0, len(images), batch_size)])


def predict_proba(model: ReducedVGG, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(N, C)`` in the order of ``model.config.classes``."""
    return _batched(model, lambda x: model(x).softmax(dim=1), images)


def embed(model: ReducedVGG, images: torch.Tensor) -> torch.Tensor:
    return _batched(model, model.embed, images)


def save_classifier(model: ReducedVGG, folder: str | Path, extra: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps({"config": asdict(model.config), **(extra or {})}, indent=2) + "\n")
    return folder


def load_classifier(folder: str | Path) -> tuple[ReducedVGG, dict]:
    """The classifier saved in ``folder`` and the extra fields saved with it."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder / CONFIG} not found: not a saved sonogen classifier")
    described = json.loads((folder / CONFIG).read_text())
    model = ReducedVGG(ClassifierConfig(**described.pop("config")))
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.eval(), described
