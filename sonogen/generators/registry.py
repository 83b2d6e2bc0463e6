"""Named registry of generator families: ``get_generator("dcgan")``."""

from __future__ import annotations

from sonogen.generators.base import Generator

_FAMILIES: dict[str, type[Generator]] = {}


def register_family(cls: type[Generator]) -> type[Generator]:
    if "-" in cls.family:  # gate sets name a family's variants "<family>-<variant>"
        raise ValueError(f"generator family names have no '-': {cls.family!r}")
    if cls.family in _FAMILIES and _FAMILIES[cls.family] is not cls:
        raise ValueError(f"generator family {cls.family!r} is already registered")
    _FAMILIES[cls.family] = cls
    return cls


def families() -> list[str]:
    return sorted(_FAMILIES)


def get_generator(name: str) -> type[Generator]:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown generator family {name!r}; known families: {', '.join(families())}") from None
