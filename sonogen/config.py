"""Typed configs from YAML and command lines: every key known to the dataclass, every value of its field's type.

A typo or a wrong type must not pass silently: the error names the key, what it expected and the valid keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (as YAML or JSON gives it: lists for tuples) fits ``annotation``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or isinstance(annotation, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True  # a type this check does not know: the dataclass's own validation decides


def _describe(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def config_from_dict(config_class: type, values: dict[str, Any]) -> Any:
    """Builds a config dataclass, rejecting unknown keys and values of the wrong type by name."""
    hints = typing.get_type_hints(config_class)
    names = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} keys {unknown}; valid keys: {sorted(names)}")
    for key, value in values.items():
        if not _matches(value, hints[key]):
            raise ValueError(f"{config_class.__name__}.{key}: expected {_describe(hints[key])}, got {value!r}")
    return config_class(**values)


def parse_assignments(assignments: list[str], what: str = "--set") -> dict[str, Any]:
    """``["steps=25", "labels=[a, b]"]`` as ``{"steps": 25, "labels": ["a", "b"]}``: values read as YAML."""
    values = {}
    for assignment in assignments:
        key, equals, text = assignment.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"{what} {assignment!r}: write KEY=VALUE, e.g. {what} steps=25")
        try:
            values[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"{what} {assignment!r}: the value is not YAML ({err.problem})") from None
    return values
