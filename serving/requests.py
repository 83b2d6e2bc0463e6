"""Sampling requests, validated field by field: every rejection is a 400 that names the field at fault."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kserve import InferRequest
from kserve.errors import InvalidInput

FORMATS = ("png",)
FIELDS = ("n", "seed", "label", "condition", "format")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingRequest:
    n: int
    seed: int
    condition: dict[str, Any] = field(default_factory=dict)
    format: str = "png"


def _integer(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidInput(f"{name}: must be between {low} and {high}, got {value}")
    return value


def parse_request(body: Any, backend, max_n: int, where: str = "request") -> SamplingRequest:
    """``{"n": 8, "seed": 123, "label": "consolidation", "condition": {...}, "format": "png"}``; the family's
    condition keys (``prompt``, ``mask``, ``steps`` …) may also be given beside ``n``, as ``label`` is."""
    fields = [*FIELDS, *sorted(backend.conditions - set(FIELDS))]
    if not isinstance(body, dict):
        raise InvalidInput(f"{where}: expected an object with {', '.join(fields)}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise InvalidInput(f"{where}.{unknown[0]}: unknown field; the fields are {', '.join(fields)}")
    n = _integer(body.get("n", 1), f"{where}.n", 1, max_n)
    seed = _integer(body.get("seed", 0), f"{where}.seed", 0, MAX_SEED)
    condition = body.get("condition") or {}
    if not isinstance(condition, dict):
        raise InvalidInput(f"{where}.condition: expected an object")
    condition = {**condition, **{key: body[key] for key in {"label", *backend.conditions} if key in body}}
    unsupported = sorted(set(condition) - backend.conditions)
    if unsupported:
        raise InvalidInput(f"{where}.condition.{unsupported[0]}: the {backend.family} family takes no such "
                           f"condition; it takes {sorted(backend.conditions)}")
    if "label" in condition and condition["label"] not in backend.labels:
        raise InvalidInput(f"{where}.label: this model generates {' or '.join(map(repr, backend.labels))} images, "
                           f"not {condition['label']!r}")
    fmt = body.get("format", "png")
    if fmt not in FORMATS:
        raise InvalidInput(f"{where}.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    return SamplingRequest(n, seed, condition, fmt)


def parse_v2_request(request: InferRequest, backend, max_n: int) -> SamplingRequest:
    """v2 inputs: ``n`` and ``seed`` (integer tensors of shape [1]), optional ``label`` and ``condition`` (BYTES,
    shape [1]; the condition as a JSON object)."""
    body: dict[str, Any] = {}
    for tensor in request.inputs:
        name = f"inputs.{tensor.name}"
        if tensor.name not in ("n", "seed", "label", "condition"):
            raise InvalidInput(f"{name}: unknown input; the inputs are n, seed, label, condition")
        if list(tensor.shape) != [1]:
            raise InvalidInput(f"{name}: expected shape [1], got {list(tensor.shape)}")
        if tensor.name in ("label", "condition"):
            if tensor.datatype != "BYTES":
                raise InvalidInput(f"{name}: expected datatype BYTES, got {tensor.datatype}")
            value = tensor.data[0]
            value = value.decode() if isinstance(value, bytes) else value
            if tensor.name == "condition":
                try:
                    value = json.loads(value)
                except (TypeError, ValueError):
                    raise InvalidInput(f"{name}: expected a JSON object") from None
            body[tensor.name] = value
        else:
            if not (tensor.datatype.startswith("INT") or tensor.datatype.startswith("UINT")):
                raise InvalidInput(f"{name}: expected an integer datatype, got {tensor.datatype}")
            body[tensor.name] = tensor.data[0]
    if "n" not in body:
        raise InvalidInput("inputs.n: required")
    return parse_request(body, backend, max_n, "inputs")
