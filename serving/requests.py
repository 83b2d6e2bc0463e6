"""Sampling requests, validated field by field: every rejection is a 400 that names the field at fault."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kserve import InferRequest
from kserve.errors import InvalidInput

FORMATS = ("png",)
FIELDS = ("n", "seed", "label", "condition", "format", "precision")
MAX_SEED = 2**63 - 1
MAX_DEPTH = 8  # of nested lists and objects in a request: a mask as rows of pixels needs 2 inside its condition


@dataclass(frozen=True)
class SamplingRequest:
    n: int
    seed: int
    condition: dict[str, Any] = field(default_factory=dict)
    format: str = "png"
    precision: str | None = None  # None: the server's


def _integer(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidInput(f"{name}: must be between {low} and {high}, got {value}")
    return value


def _check_depth(value: Any, where: str) -> None:
    """Refuses values nested deeper than ``MAX_DEPTH`` (walked without recursion, so no depth can overflow)."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (list, dict)):
            if depth >= MAX_DEPTH:
                raise InvalidInput(f"{where}: nested deeper than {MAX_DEPTH} levels")
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))


def parse_request(body: Any, backend, max_n: int, where: str = "request") -> SamplingRequest:
    """``{"n": 8, "seed": 123, "label": "consolidation", "condition": {...}, "format": "png"}``; the family's
    condition keys (``prompt``, ``mask``, ``steps`` …) may also be given beside ``n``, as ``label`` is."""
    fields = [*FIELDS, *sorted(backend.conditions - set(FIELDS))]
    if not isinstance(body, dict):
        raise InvalidInput(f"{where}: expected an object with {', '.join(fields)}")
    _check_depth(body, where)
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
    precision = body.get("precision")
    if precision is not None and precision not in backend.precisions:
        raise InvalidInput(f"{where}.precision: this model samples at {' or '.join(backend.precisions)} "
                           f"({backend.runtime}), not {precision!r}")
    return SamplingRequest(n, seed, condition, fmt, precision)


V2_INPUTS = ("n", "seed", "label", "condition", "precision")


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise InvalidInput(f"{name}: expected UTF-8 text") from None
    if not isinstance(value, str):
        raise InvalidInput(f"{name}: expected text, got {type(value).__name__}")
    return value


def json_object(text: str, name: str) -> Any:
    """``text`` parsed as JSON; any malformed or too deeply nested text is a 400 naming ``name``."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidInput(f"{name}: expected a JSON object") from None


def _flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise InvalidInput(f"{name}: expected true or false, got {value!r}")


def parse_v2_request(request: InferRequest, backend, max_n: int) -> SamplingRequest:
    """v2 inputs: ``n`` and ``seed`` (integer tensors of shape [1]), optional ``label``, ``condition`` and
    ``precision`` (BYTES, shape [1]; the condition as a JSON object); each input at most once, with exactly one
    value. Requested
    outputs are among ``outputs_of(backend)``."""
    body: dict[str, Any] = {}
    for tensor in request.inputs:
        name = f"inputs.{tensor.name}"
        if tensor.name not in V2_INPUTS:
            raise InvalidInput(f"{name}: unknown input; the inputs are {', '.join(V2_INPUTS)}")
        if tensor.name in body:
            raise InvalidInput(f"{name}: given twice")
        if list(tensor.shape) != [1]:
            raise InvalidInput(f"{name}: expected shape [1], got {list(tensor.shape)}")
        data = tensor.data
        if not isinstance(data, list) or len(data) != 1:
            raise InvalidInput(f"{name}: expected exactly one value (shape [1]), got "
                               f"{len(data) if isinstance(data, list) else type(data).__name__}")
        if tensor.name in ("label", "condition", "precision"):
            if tensor.datatype != "BYTES":
                raise InvalidInput(f"{name}: expected datatype BYTES, got {tensor.datatype}")
            value = _text(data[0], name)
            body[tensor.name] = json_object(value, name) if tensor.name == "condition" else value
        else:
            if not (tensor.datatype.startswith("INT") or tensor.datatype.startswith("UINT")):
                raise InvalidInput(f"{name}: expected an integer datatype, got {tensor.datatype}")
            body[tensor.name] = data[0]
    if "n" not in body:
        raise InvalidInput("inputs.n: required")
    outputs = outputs_of(backend)
    for k, output in enumerate(request.request_outputs or ()):
        if output.name not in outputs:
            raise InvalidInput(f"outputs[{k}].name: {output.name!r} is not an output of this model; "
                               f"the outputs are {', '.join(outputs)}")
        if output.parameters and "binary_data" in output.parameters:
            _flag(output.parameters["binary_data"], f"outputs[{k}].parameters.binary_data")
    if request.parameters and "binary_data_output" in request.parameters:
        _flag(request.parameters["binary_data_output"], "parameters.binary_data_output")
    return parse_request(body, backend, max_n, "inputs")


def outputs_of(backend) -> tuple[str, ...]:
    """The v2 outputs of a backend: ``images``, with ``boxes`` from families that place lesions and ``masks``
    from families that draw them."""
    return ("images", *(("boxes",) if backend.places_lesions else ()), *(("masks",) if backend.draws_masks else ()))
