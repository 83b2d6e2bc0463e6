"""The named registry of generator families, and loading any saved generator by the family its folder names.

``get_generator("dcgan")`` is the family's class; a new family registers itself with ``@register_family`` and
needs nothing outside ``sonogen/generators/``: the platform asks every question through ``base.Generator``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sonogen.generators.base import CONFIG, FORMAT_VERSION, Generator

_FAMILIES: dict[str, type[Generator]] = {}


def register_family(cls: type[Generator]) -> type[Generator]:
    if "-" in cls.family:  # gate sets name a family's variants "<family>-<variant>"
        raise ValueError(f"generator family names have no '-': {cls.family!r}")
    if cls.family in _FAMILIES and _FAMILIES[cls.family] is not cls:
        raise ValueError(f"generator family {cls.family!r} is already registered")
    _FAMILIES[cls.family] = cls
    return cls


def unregister_family(name: str) -> None:
    """Forgets a family (one registered for a while, as a test's)."""
    _FAMILIES.pop(name, None)


def families() -> list[str]:
    return sorted(_FAMILIES)


def get_generator(name: str) -> type[Generator]:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown generator family {name!r}; known families: {', '.join(families())}") from None


def load_generator(folder: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Loads any saved generator, in eval mode; its family is read from ``config.json``."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder / CONFIG} not found: not a saved sonogen generator")
    described = json.loads((folder / CONFIG).read_text())
    if described.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder} has format version {described.get('format_version')}, expected {FORMAT_VERSION}")
    family = get_generator(described["family"])
    generator = family.from_folder(folder, family.saved_config(described["config"]))
    generator.step, generator.epoch = described["step"], described["epoch"]
    return generator.to(device).eval_mode()
