"""A plain image folder: ``SRC/<label>/<file>``, stills or videos, with an optional CSV of boxes.

The boxes CSV has columns ``image`` (path relative to SRC), ``x0, y0, x1, y1`` and optionally ``frame``
(0 for stills) and ``patient_id``; one row per box. Files without a ``patient_id`` are their own patient.
"""

from __future__ import annotations

import csv
from pathlib import Path

from sonogen.data.frames import MAX_PIXELS, STILL_SUFFIXES, VIDEO_SUFFIXES
from sonogen.data.importers.common import import_files, labelled_files
from sonogen.data.pseudonyms import PseudonymKey
from sonogen.data.writer import slug


def read_boxes_csv(path: Path) -> tuple[dict[str, list[list[int]]], dict[str, str]]:
    boxes: dict[str, list[list[int]]] = {}
    patients: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"image", "x0", "y0", "x1", "y1"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                box = [int(float(row[k])) for k in ("x0", "y0", "x1", "y1")]
                frame = int(row.get("frame") or 0)
            except ValueError as err:
                raise ValueError(f"{path}:{line}: {err}") from err
            boxes.setdefault(f"{row['image']}#{frame}", []).append(box)
            if row.get("patient_id"):
                patients[row["image"]] = row["patient_id"]
    return boxes, patients


def import_folder(
    src: str | Path,
    out: str | Path,
    boxes_csv: str | Path | None = None,
    fps: float = 3.0,
    source: str | None = None,
    licence: str = "unknown",
    strict: bool = False,
    progress=None,
    key: PseudonymKey | None = None,
    max_pixels: int = MAX_PIXELS,
) -> dict:
    """``key``: anonymise names (patients, image names and origins become keyed pseudonyms)."""
    src = Path(src)
    files, unreadable = labelled_files(src, "SRC/<label>/<image>")
    boxes, patients = read_boxes_csv(Path(boxes_csv)) if boxes_csv else ({}, {})
    source = source or src.name

    def describe(path: Path):
        if path.suffix.lower() not in STILL_SUFFIXES | VIDEO_SUFFIXES:
            return f"unknown file type {path.suffix!r}"
        relative = path.relative_to(src).as_posix()
        label = path.relative_to(src).parts[0]
        return label, patients.get(relative) or f"{slug(source)}-{slug(relative)}", licence

    return import_files(src, files, out, source=source, describe=describe, fps=fps, strict=strict,
                        progress=progress, boxes=boxes, unreadable=unreadable, key=key, max_pixels=max_pixels)
