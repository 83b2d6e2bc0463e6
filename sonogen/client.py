"""Python client of the sampling endpoint (KServe v1 protocol): ask a served generator for images and save
them with a manifest."""

from __future__ import annotations

import base64
import csv
from pathlib import Path
from typing import Any

from sonogen.data.manifest import encode_boxes
from sonogen.sampling import chunk_seed

MANIFEST_COLUMNS = ("image", "seed", "index", "model_name", "model_version", "label", "boxes", "mask", "precision")


def sample(url: str, model: str, n: int, seed: int = 0, label: str | None = None,
           condition: dict[str, Any] | None = None, token: str | None = None, per_request: int = 16,
           timeout_s: float = 300, precision: str | None = None) -> list[dict[str, Any]]:
    """``n`` images from ``url``'s ``model``: one dict per image with its ``png`` bytes, the ``seed`` and
    ``index`` that reproduce it, ``model_name``, ``model_version``, ``label``, ``boxes`` (its lesion boxes from
    families that place lesions, else ``[]``) and ``mask`` (its lesion mask's PNG bytes from families that draw
    masks, else None) and ``precision`` (what reproduces it). Large draws are split into requests of
    ``per_request`` images, request ``k`` with seed ``chunk_seed(seed, k)``. ``precision`` (fp32 or bf16)
    overrides the server's."""
    import requests

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    endpoint = f"{url.rstrip('/')}/v1/models/{model}:predict"
    images = []
    # one keep-alive connection, so one TLS handshake through an ingress, for all the requests of a draw
    with requests.Session() as session:
        for chunk, start in enumerate(range(0, n, per_request)):
            instance = {"n": min(per_request, n - start), "seed": chunk_seed(seed, chunk), "format": "png"}
            if label is not None:
                instance["label"] = label
            if condition:
                instance["condition"] = condition
            if precision is not None:
                instance["precision"] = precision
            try:
                response = session.post(endpoint, json={"instances": [instance]}, headers=headers, timeout=timeout_s)
            except requests.ConnectionError as err:
                raise ConnectionError(f"cannot reach the sampling endpoint {url}: {err}") from err
            if response.status_code >= 400:
                try:
                    message = response.json().get("error", response.text)
                except ValueError:
                    message = response.text
                raise ValueError(f"{endpoint} answered HTTP {response.status_code}: {message}")
            [prediction] = response.json()["predictions"]
            boxes, masks = prediction.get("boxes"), prediction.get("masks")
            for index, encoded in enumerate(prediction["images"]):
                images.append({"png": base64.b64decode(encoded), "seed": prediction["seed"], "index": index,
                               "model_name": prediction["model_name"], "model_version": prediction["model_version"],
                               "label": prediction["label"], "boxes": boxes[index] if boxes else [],
                               "mask": base64.b64decode(masks[index]) if masks else None,
                               "precision": prediction.get("precision", "fp32")})
    return images


def save_samples(images: list[dict[str, Any]], out: str | Path) -> Path:
    """Writes ``out/00000.png …`` (and their masks, ``out/masks/00000.png …``) and ``out/manifest.csv``; returns
    the manifest's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, image in enumerate(images):
        name = f"{number:05d}.png"
        (out / name).write_bytes(image["png"])
        mask = ""
        if image.get("mask") is not None:
            mask = f"masks/{name}"
            (out / "masks").mkdir(exist_ok=True)
            (out / mask).write_bytes(image["mask"])
        rows.append({**{k: image.get(k) for k in MANIFEST_COLUMNS[1:]}, "image": name,
                     "boxes": encode_boxes(image["boxes"]), "mask": mask})
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest
