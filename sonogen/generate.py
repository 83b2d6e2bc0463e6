"""Large synthetic datasets from a registered generator, written as a sonogen dataset (``images/`` +
``manifest.csv``, with each image's lesion boxes from families that place lesions) to a folder or an ``s3://`` prefix.

Work goes in chunks of ``batch`` images; chunk ``k`` is drawn with ``chunk_seed(seed, k)``, so every image is
reproducible from its manifest row. A rerun of the same command skips the chunks already written, and a rerun
with other settings into the same place is refused rather than mixed in. A local output can be ``dvc add``-ed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sonogen.data.manifest import MANIFEST, Record
from sonogen.sampling import chunk_seed, png_bytes

PLAN = "generate.json"


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


def generate_dataset(model_uri: str, n: int, out: str, seed: int = 0, batch: int = 64,
                     condition: dict[str, Any] | None = None, progress=None) -> dict:
    """Writes ``n`` images of ``model_uri`` to ``out``; returns a summary (written, skipped chunks, manifest)."""
    from sonogen.registry import model_name_of
    from sonogen.backends import load_backend

    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be at least 1, got n={n}, batch={batch}")
    backend = load_backend(model_uri)
    if backend is None:
        raise ValueError(f"{model_uri} is not in the registry")
    name = model_name_of(model_uri)
    label = (condition or {}).get("label", backend.label)
    plan = {"model_name": name, "model_version": backend.version, "family": backend.family, "label": label,
            "n": n, "seed": seed, "batch": batch, "condition": condition or {}}
    destination = Destination(out)
    if PLAN in destination.existing:
        previous = json.loads(destination.read(PLAN))
        if previous != plan:
            raise ValueError(f"{out} holds a generation with other settings ({previous}); choose another --out")
    else:
        destination.write(PLAN, (json.dumps(plan, indent=2) + "\n").encode())
    chunks = [(k, start, min(batch, n - start)) for k, start in enumerate(range(0, n, batch))]
    records, skipped = [], 0
    for k, start, size in (progress or iter)(chunks):
        names = [f"images/{start + i:07d}.png" for i in range(size)]
        # families that place lesions keep each chunk's boxes beside its images, written last: a chunk counts as
        # done only once its boxes are there too
        boxes_name = [f"boxes/{start:07d}.json"] if backend.places_lesions else []
        if all(done in destination.existing for done in names + boxes_name):
            skipped += 1
            pngs = [destination.read(image_name) for image_name in names]
            boxes = json.loads(destination.read(boxes_name[0])) if boxes_name else None
        else:
            images, boxes = backend.draw(size, chunk_seed(seed, k), condition)
            pngs = [png_bytes(image) for image in images]
            for image_name, data in zip(names, pngs):
                destination.write(image_name, data)
            if boxes_name:
                destination.write(boxes_name[0], json.dumps(boxes).encode())
        for i, (image_name, data) in enumerate(zip(names, pngs)):
            records.append(Record(
                image=image_name, patient_id=f"synthetic-{name}-v{backend.version}", source=f"{name}@v{backend.version}",
                label=label, split="train", boxes=boxes[i] if boxes else [],
                origin=f"seed={chunk_seed(seed, k)};index={i}",
                licence="synthetic: see the model card", sha256=hashlib.sha256(data).hexdigest(),
            ))
    destination.write(MANIFEST, _manifest_bytes(records))
    return {"out": out, "images": n, "chunks": len(chunks), "skipped_chunks": skipped, **plan}


def _manifest_bytes(records: list[Record]) -> bytes:
    import tempfile

    from sonogen.data.manifest import write_manifest

    with tempfile.TemporaryDirectory() as tmp:
        return write_manifest(tmp, records).read_bytes()
