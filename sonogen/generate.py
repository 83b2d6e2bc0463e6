"""Large synthetic datasets from a registered generator, written as a sonogen dataset (``images/`` +
``manifest.csv``, with each image's lesion boxes from families that place lesions) to a folder or an ``s3://`` prefix.

Work goes in chunks of ``batch`` images; chunk ``k`` is drawn with ``chunk_seed(seed, k)``, so every image is
reproducible from its manifest row, and the set does not depend on how the work is split: with ``shards`` K, worker
``shard`` i draws the chunks k ≡ i (mod K) into the same place and writes its part of the manifest, and
``merge_shards`` joins the parts into ``manifest.csv`` (the ``sonogen-generate`` pipeline: a task per shard, then
the merge). A rerun skips the chunks already written, and a rerun with other settings into the same place is
refused rather than mixed in. A local output can be ``dvc add``-ed.

Each synthetic image is a patient of its own, ``synthetic-<model>-v<version>-s<seed>-<index>``; real imports refuse
that prefix, so a synthetic set mixed with real data splits by patient without a collision.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sonogen.data.manifest import MANIFEST, SYNTHETIC_PATIENT, Record, boxes_from_mask, read_manifest
from sonogen.sampling import chunk_seed, png_bytes

PLAN = "generate.json"
SHARD_MANIFESTS = "shards"  # shards/<i>-of-<K>.csv: each worker's part of manifest.csv


def shard_manifest(shard: int, shards: int) -> str:
    return f"{SHARD_MANIFESTS}/{shard:04d}-of-{shards:04d}.csv"


class Destination:
    """A local folder or an S3 prefix (boto3: endpoint and credentials from the usual AWS_* settings)."""

    def __init__(self, out: str):
        self.s3 = None
        if out.startswith("s3://"):
            import boto3

            self.bucket, _, prefix = out.removeprefix("s3://").partition("/")
            self.prefix = prefix.strip("/")
            self.s3 = boto3.client("s3")
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            self.existing = {o["Key"].removeprefix(self._key("")) for p in pages for o in p.get("Contents", [])}
        else:
            self.root = Path(out)
            self.root.mkdir(parents=True, exist_ok=True)
            self.existing = {str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()}

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def write(self, name: str, data: bytes) -> None:
        if self.s3 is not None:
            self.s3.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
        else:
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_bytes(data)
            os.replace(path.with_suffix(".tmp"), path)  # a crash never leaves half a file under the real name
        self.existing.add(name)

    def read(self, name: str) -> bytes:
        if self.s3 is not None:
            return self.s3.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        return (self.root / name).read_bytes()


def check_condition(condition: dict[str, Any], conditions: frozenset[str], labels: tuple[str, ...]) -> None:
    """The condition keys and label the model takes (the family checks the values as it draws)."""
    if not isinstance(condition, dict):
        raise ValueError(f"--condition must be a JSON object, got {condition!r}")
    if unknown := sorted(set(condition) - set(conditions)):
        raise ValueError(f"--condition: this model does not take {unknown}; it takes {sorted(conditions)}")
    if "label" in condition and condition["label"] not in labels:
        raise ValueError(f"--condition: label {condition['label']!r} is not one of {list(labels)}")


def condition_of(text: str) -> dict[str, Any]:
    """The ``--condition`` JSON text as a dict (its keys are checked against the model by ``check_condition``)."""
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValueError(f"--condition: not JSON ({err})") from None


def condition_folder_of(text: str | None) -> tuple[str, str] | None:
    """``(key, folder)`` of ``--condition-folder KEY=FOLDER`` (None for none)."""
    if not text:
        return None
    key, sep, folder = text.partition("=")
    if not sep or not key or not folder:
        raise ValueError(f"--condition-folder takes KEY=FOLDER (e.g. mask=masks/), got {text!r}")
    return key, folder


def condition_files(key: str, folder: str | Path) -> tuple[list[Path], dict[str, Any]]:
    """The PNGs of ``folder`` (a local folder, or an object-store prefix such as ``s3://…``, fetched first), sorted,
    drawn with one image each as ``condition[key]`` (image j takes file j mod their count), and how the plan
    records them (their digest, not where they were)."""
    from sonogen.tracking import local_folder

    files = sorted(local_folder(str(folder), f"--condition-folder {key}:").glob("*.png"))
    if not files:
        raise ValueError(f"--condition-folder {key}={folder}: no PNG files there")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return files, {"key": key, "files": len(files), "sha256": digest.hexdigest()}


def _draw_each(backend, key: str, files: list[Path], first: int, size: int, seed: int,
               condition: dict[str, Any]) -> tuple[Any, list | None]:
    """Images ``first`` … ``first + size - 1`` drawn one by one, image j with seed ``chunk_seed(seed, j)`` and file
    j mod the files' count as ``condition[key]`` (a base64 PNG, as a request sends it)."""
    import base64

    images, boxes = [], []
    for j in range(first, first + size):
        path = files[j % len(files)]
        drawn, drawn_boxes = backend.draw(1, chunk_seed(seed, j),
                                          {**condition, key: base64.b64encode(path.read_bytes()).decode()})
        images.append(drawn[0])
        boxes.append(drawn_boxes[0] if drawn_boxes else None)
    return np.stack(images), None if boxes[0] is None else boxes


def generate_dataset(model_uri: str, n: int, out: str, seed: int = 0, batch: int = 64,
                     condition: dict[str, Any] | None = None, progress=None, shards: int = 1, shard: int = 0,
                     per_image: tuple[str, str | Path] | None = None, precision: str | None = None,
                     channels_last: bool = False, compile: bool = False, draw_ahead: int | None = None) -> dict:
    """Writes the images of ``model_uri`` that are this shard's (all of the ``n`` with one shard) to ``out``, and
    the manifest (one shard) or this shard's part of it; returns a summary (written, skipped chunks).

    ``per_image`` ``(key, folder)``: each image is drawn alone with its own file of the folder as that condition
    (a ControlNet's ``mask``, DiffUltra's background ``image``); masks are copied beside the images, into the
    manifest's ``mask`` column, so the set is image + mask pairs. Families that draw masks write theirs there too,
    with their boxes in the manifest. ``precision`` (torch families: fp32 or bf16; default: the model's, fp32 or
    an ONNX export's own) is one of the set's settings; ``channels_last``, ``compile`` and ``draw_ahead`` (chunks
    drawn at once; default 2 on a GPU, where one's latents are made on the CPU while another's run, else 1) change
    only the speed."""
    from sonogen.registry import model_name_of
    from sonogen.backends import load_backend

    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be at least 1, got n={n}, batch={batch}")
    if shards < 1 or not 0 <= shard < shards:
        raise ValueError(f"--shard must be from 0 to --shards − 1 ({shards - 1}), got {shard}")
    condition = dict(condition or {})
    backend = load_backend(model_uri, precision, channels_last, compile)
    if backend is None:
        raise ValueError(f"{model_uri} is not in the registry")
    files: list[Path] = []
    if per_image:
        files, recorded = condition_files(*per_image)
    check_condition({**condition, **({per_image[0]: ""} if per_image else {})}, backend.conditions, backend.labels)
    name = model_name_of(model_uri)
    label = condition.get("label", backend.label)
    plan = {"model_name": name, "model_version": backend.version, "family": backend.family, "label": label,
            "n": n, "seed": seed, "batch": batch, "condition": condition,
            **({"condition_files": recorded} if per_image else {}),
            **({"precision": backend.precision} if backend.precision != "fp32" else {})}
    destination = Destination(out)
    if PLAN in destination.existing:
        previous = json.loads(destination.read(PLAN))
        if previous != plan:
            raise ValueError(f"{out} holds a generation with other settings ({previous}); choose another --out")
    else:
        destination.write(PLAN, (json.dumps(plan, indent=2) + "\n").encode())
    chunks = [(k, start, min(batch, n - start)) for k, start in enumerate(range(0, n, batch)) if k % shards == shard]

    def files_of(start: int, size: int) -> tuple[list[str], list[str], list[str]]:
        """A chunk's image, boxes and mask files. Families that place lesions keep each chunk's boxes beside its
        images, written last: a chunk counts as done only once its boxes are there too."""
        return ([f"images/{start + i:07d}.png" for i in range(size)],
                [f"boxes/{start:07d}.json"] if backend.places_lesions else [],
                [f"masks/{start + i:07d}.png" for i in range(size)]
                if backend.draws_masks or (per_image and per_image[0] == "mask") else [])

    def finish(k: int, start: int, size: int, drawn: tuple | None, used: list[str]) -> list[Record]:
        """Chunk k's files (encoded and written unless ``drawn`` is None: already there) and manifest rows."""
        names, boxes_name, masks = files_of(start, size)
        if drawn is None:
            pngs = [destination.read(image_name) for image_name in names]
            boxes = json.loads(destination.read(boxes_name[0])) if boxes_name else None
            if backend.draws_masks:
                boxes = [boxes_from_mask(_mask_of(destination.read(mask_name))) for mask_name in masks]
        else:
            images, boxes = drawn
            pngs = list(encoders.map(png_bytes, images))
            if backend.draws_masks:  # drawn with the images: 255 on the lesion, and its boxes in the manifest
                mask_pngs = list(encoders.map(png_bytes, [mask.astype(np.uint8) * 255 for mask in boxes]))
                for mask_name, mask_png in zip(masks, mask_pngs):  # the masks first: the images mark a chunk done
                    destination.write(mask_name, mask_png)
                boxes = [boxes_from_mask(mask) for mask in boxes]
            elif masks:  # a ControlNet's requested masks (image j took file j mod their count): image + mask pairs
                for i, mask_name in enumerate(masks):
                    destination.write(mask_name, files[(start + i) % len(files)].read_bytes())
            for image_name, data in zip(names, pngs):
                destination.write(image_name, data)
            if boxes_name:
                destination.write(boxes_name[0], json.dumps(boxes).encode())
        rows = []
        for i, (image_name, data) in enumerate(zip(names, pngs)):
            origin = (f"seed={chunk_seed(seed, start + i)};index=0;{per_image[0]}={used[i]}" if per_image
                      else f"seed={chunk_seed(seed, k)};index={i}")
            rows.append(Record(
                image=image_name, patient_id=f"{SYNTHETIC_PATIENT}{name}-v{backend.version}-s{seed}-{start + i:07d}",
                source=f"{name}@v{backend.version}", label=label, split="train", boxes=boxes[i] if boxes else [],
                mask=masks[i] if masks else "", origin=origin,
                licence="synthetic: see the model card", sha256=hashlib.sha256(data).hexdigest(),
            ))
        return rows

    def draw(k: int, start: int, size: int) -> tuple:
        if per_image:
            return _draw_each(backend, per_image[0], files, start, size, seed, condition)
        return backend.draw(size, chunk_seed(seed, k), condition)

    # one chunk is encoded and written (PNGs on all cores) while the next are drawn: on a GPU the encoding would
    # otherwise take most of the time. Compiled networks are drawn one chunk at a time (compiling is not threadsafe).
    ahead = draw_ahead or (2 if backend.runtime.startswith("torch:cuda") and not compile else 1)
    drawing: deque = deque()  # (k, start, size, the draw's future or None when the chunk is there already)
    finished: list[Future] = []
    skipped = 0

    def hand_over() -> None:
        k, start, size, future = drawing.popleft()
        used = [files[(start + i) % len(files)].name for i in range(size)] if per_image else []
        drawn = None if future is None else future.result()  # images and boxes (or masks)
        if finished:
            finished[-1].result()  # the previous chunk is written before this one is handed over
        finished.append(writer.submit(finish, k, start, size, drawn, used))

    with ThreadPoolExecutor(os.cpu_count() or 1) as encoders, ThreadPoolExecutor(1) as writer, \
            ThreadPoolExecutor(ahead) as drawers:
        for k, start, size in (progress or iter)(chunks):
            there = all(done in destination.existing for part in files_of(start, size) for done in part)
            skipped += int(there)
            drawing.append((k, start, size, None if there else drawers.submit(draw, k, start, size)))
            if len(drawing) >= ahead:
                hand_over()
        while drawing:
            hand_over()
        records = [record for future in finished for record in future.result()]
    destination.write(MANIFEST if shards == 1 else shard_manifest(shard, shards), _manifest_bytes(records))
    return {"out": out, "images": len(records), "chunks": len(chunks), "skipped_chunks": skipped,
            "shard": shard, "shards": shards, **plan}


def merge_shards(out: str, shards: int) -> dict:
    """Joins the ``shards`` workers' manifest parts in ``out`` into ``manifest.csv``, once every part is there and
    together they hold the plan's ``n`` images."""
    destination = Destination(out)
    if PLAN not in destination.existing:
        raise ValueError(f"{out} holds no generation ({PLAN} is missing)")
    plan = json.loads(destination.read(PLAN))
    missing = [k for k in range(shards) if shard_manifest(k, shards) not in destination.existing]
    if missing:
        raise ValueError(f"{out}: shard(s) {missing} of {shards} have not finished; run them, then merge again")
    import tempfile

    records = []
    for k in range(shards):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / MANIFEST).write_bytes(destination.read(shard_manifest(k, shards)))
            records += read_manifest(tmp)
    records.sort(key=lambda record: record.image)
    if len(records) != plan["n"] or len({r.image for r in records}) != plan["n"]:
        raise ValueError(f"{out}: the {shards} shards hold {len(records)} images, not the {plan['n']} planned")
    destination.write(MANIFEST, _manifest_bytes(records))
    return {"out": out, "images": len(records), "shards": shards, **plan}


def _manifest_bytes(records: list[Record]) -> bytes:
    import tempfile

    from sonogen.data.manifest import write_manifest

    with tempfile.TemporaryDirectory() as tmp:
        return write_manifest(tmp, records).read_bytes()


def _mask_of(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return (np.asarray(image.convert("L")) > 127).astype(np.uint8)
