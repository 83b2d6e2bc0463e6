"""The papers' downstream protocols as named presets (``evaluate.downstream.protocol``).

A protocol fixes how the downstream classifiers learn and are judged: which classes (the generator's label
against every other, or the paper's three classes), the augmentations, a random hyperparameter search and the
epoch kept on validation patients, the share of the label's real training images kept, and the metric the
verdict is taken on. What each paper did, and where we differ: ``docs/crossval.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRICS = ("auc", "balanced_accuracy")


@dataclass(frozen=True)
class Protocol:
    name: str
    source: str
    classes: tuple[str, ...] = ()  # empty: the generator's label against every other label
    augmentations: tuple[str, ...] = ("flip",)
    search_trials: int = 0  # random draws of (learning rate, width multiplier, dropout), chosen on validation
    select_on_validation: bool = False  # keep each classifier's epoch with the best validation metric
    metric: str = "auc"  # the verdict's: auc (label vs rest) or balanced_accuracy (over the classes)
    label_fraction: float = 1.0  # share of the label's real training images kept (the rest: synthetic)
    detection: bool = False  # the verdict on lesion detection AP50 (families that place lesions), not the classifiers
    segmentation: bool = False  # the verdict on lesion segmentation Dice (families that draw masks)

    @property
    def needs_validation(self) -> bool:
        return self.select_on_validation or self.search_trials > 0


PROTOCOLS = {p.name: p for p in (
    Protocol("default", "sonogen's quick check: label vs rest, flips, fixed epochs, AUC"),
    Protocol("yu2023", "Yu et al. 2023 (DCGAN, lung US): label vs rest, flip, gamma, blur and intensity "
             "augmentations, a random search on the validation patients keeping the best epoch, AUC",
             augmentations=("flip", "gamma", "blur", "intensity"), search_trials=4, select_on_validation=True),
    Protocol("zhang2023", "Zhang et al. 2023 (SinDDM / FewDDM, lung US): covid, pneumonia and normal, the "
             "label's real training images cut to 25 %, balanced accuracy and per-class F1",
             classes=("covid", "pneumonia", "normal"), metric="balanced_accuracy", label_fraction=0.25),
    Protocol("basarab2024", "Basarab et al. 2024 (LDM + ControlNet, BUSI): benign, malignant and normal, the "
             "label's AUC with and without synthetic images", classes=("benign", "malignant", "normal")),
    Protocol("diffultra2025", "DiffUltra (arXiv 2501.06356, lung US): lesion detectors trained on real boxes "
             "against real plus synthetic boxes, AP50 (and AP over IoU 0.5:0.95) on held-out patients",
             detection=True),
    Protocol("wen2026", "Wen et al. 2026 (lesion pairs, BUSI): U-Net segmenters trained on real image + mask pairs "
             "against real plus synthetic pairs, Dice (pixel F1) on the lesions of held-out patients",
             segmentation=True),
)}


def get_protocol(name: str, classes: list[str] | None = None) -> Protocol:
    """The preset ``name``, with ``classes`` in place of its own when given (a dataset naming them otherwise)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown downstream protocol {name!r}; write one of: {', '.join(PROTOCOLS)}")
    protocol = PROTOCOLS[name]
    if classes:
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"evaluate.downstream.classes needs two or more distinct labels, got {classes}")
        from dataclasses import replace

        protocol = replace(protocol, classes=tuple(classes))
    return protocol


def class_layout(protocol: Protocol, label: str, labels: list[str]) -> tuple[list[str], int]:
    """The classifier's classes and the index of ``label`` among them: the protocol's classes, or ``["not
    <label>", label]`` for label vs rest; ``labels`` are the dataset's, for the error when the label is not one."""
    if not protocol.classes:
        return [f"not {label}", label], 1
    if label not in protocol.classes:
        raise ValueError(f"protocol {protocol.name} classifies {', '.join(protocol.classes)}: {label!r} is not one "
                         f"of them; set evaluate.downstream.classes to the dataset's labels ({', '.join(labels)})")
    return list(protocol.classes), protocol.classes.index(label)


def class_targets(labels: list[str], classes: list[str], label: str) -> np.ndarray:
    """Each image's class index; -1 for images of no class (left out). Label vs rest: every other label is 0."""
    if classes == [f"not {label}", label]:
        return np.array([1 if name == label else 0 for name in labels], dtype=int)
    return np.array([classes.index(name) if name in classes else -1 for name in labels], dtype=int)


def search_space(trials: int, seed: int) -> list[dict]:
    """``trials`` hyperparameter draws (the first is the default network), the same for every arm of a seed."""
    rng = np.random.default_rng(seed)
    draws = [{"lr": 1e-3, "width_multiplier": 1.0, "dropout": 0.25}]
    while len(draws) < trials:
        draws.append({"lr": float(10 ** rng.uniform(-3.7, -2.5)),
                      "width_multiplier": float(rng.choice([0.5, 1.0, 2.0])),
                      "dropout": float(rng.choice([0.1, 0.25, 0.5]))})
    return draws[:max(trials, 1)]
