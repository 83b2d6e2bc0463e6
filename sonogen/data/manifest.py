"""The on-disk dataset contract every stage reads.

A dataset is a folder with ``images/`` (single-channel 8-bit PNG), optional ``masks/`` and ``manifest.csv``.
An *imported* (raw) dataset keeps each source's own image size and has an empty ``split``; a *prepared* dataset
has every image at the same size and a ``train``/``val``/``test`` split per patient.

Boxes are ``[x0, y0, x1, y1]`` in pixels of the stored image, with ``x1``/``y1`` exclusive (the box of a
single pixel at (3, 5) is ``[3, 5, 4, 6]``). A non-empty ``mask`` means the pixel annotation is known; an
all-black mask is a known negative.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image

MANIFEST = "manifest.csv"
SPLITS = ("train", "val", "test")

Box = list[int]


@dataclass
class Record:
    image: str
    patient_id: str
    source: str
    label: str
    split: str = ""
    boxes: list[Box] = field(default_factory=list)
    mask: str = ""
    origin: str = ""
    licence: str = ""
    sha256: str = ""
    flags: str = ""  # space-separated notes prepare acts on, e.g. "burned_in_annotation"


COLUMNS = tuple(f.name for f in fields(Record))
OPTIONAL_COLUMNS = ("flags",)  # manifests written before these columns existed still read
BURNED_IN = "burned_in_annotation"
SYNTHETIC_PATIENT = "synthetic-"  # the patient ids of generated images start so; real imports may not


def image_id(image_path: str) -> str:
    """A manifest image's short id: its file name without ``.png`` (names may hold other dots)."""
    return Path(image_path).name.removesuffix(".png")


def encode_boxes(boxes: list[Box]) -> str:
    """The ``boxes`` column: a JSON list of ``[x0, y0, x1, y1]``, ``[]`` when there are none."""
    return json.dumps([[int(v) for v in box] for box in boxes])


def _encode(record: Record) -> dict[str, str]:
    return {**asdict(record), "boxes": encode_boxes(record.boxes)}


def _decode(row: dict[str, str], where: str) -> Record:
    missing = [c for c in COLUMNS if c not in row and c not in OPTIONAL_COLUMNS]
    if missing:
        raise ValueError(f"{where}: manifest lacks columns {missing}")
    values = {c: row.get(c) or "" for c in COLUMNS}
    try:
        boxes = json.loads(values["boxes"] or "[]")
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: boxes is not JSON: {values['boxes']!r}") from err
    if not all(isinstance(b, list) and len(b) == 4 for b in boxes):
        raise ValueError(f"{where}: boxes must be a list of [x0, y0, x1, y1], got {values['boxes']!r}")
    values["boxes"] = [[int(v) for v in b] for b in boxes]
    return Record(**values)


def read_manifest(root: str | Path) -> list[Record]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {root} a sonogen dataset folder?")
    with path.open(newline="", encoding="utf-8") as f:
        return [_decode(row, f"{path}:{n + 2}") for n, row in enumerate(csv.DictReader(f))]


def write_manifest(root: str | Path, records: list[Record]) -> Path:
    path = Path(root) / MANIFEST
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(_encode(r) for r in records)
    tmp.replace(path)
    return path


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_png(array: np.ndarray, path: Path) -> None:
    """Writes a 2-D uint8 array as a single-channel 8-bit PNG."""
    if array.ndim != 2 or array.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 array, got {array.dtype} {array.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="L").save(path, optimize=False)


def load_grey(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode != "L":
            raise ValueError(f"{path}: expected a single-channel 8-bit image, got mode {im.mode}")
        return np.asarray(im).copy()


def mask_from_boxes(boxes: list[Box], height: int, width: int) -> np.ndarray:
    """The filled boxes as a binary ``(height, width)`` uint8 mask (1 inside any box)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, int(y0)) : int(y1), max(0, int(x0)) : int(x1)] = 1
    return mask


def boxes_from_mask(mask: np.ndarray, min_pixels: int = 1) -> list[Box]:
    """One box per 8-connected component of a binary mask, components smaller than ``min_pixels`` ignored."""
    from scipy import ndimage

    labelled, count = ndimage.label(mask > 0, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for index, region in enumerate(ndimage.find_objects(labelled), start=1):
        if region is None or (labelled[region] == index).sum() < min_pixels:
            continue
        ys, xs = region
        boxes.append([xs.start, ys.start, xs.stop, ys.stop])
    return sorted(boxes)
