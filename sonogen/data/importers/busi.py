"""BUSI breast ultrasound (Al-Dhabyani et al., 2020): ``<label>/<label> (N).png`` with ``_mask.png`` and
sometimes ``_mask_1.png``, ``_mask_2.png`` beside each image.

All masks of an image are merged, one box per connected lesion region is derived from the merged mask,
``normal`` images keep their (empty) mask as a known negative. BUSI has no patient ids: one image is one patient.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sonogen.data.frames import MAX_PIXELS, STILL_SUFFIXES, read_still
from sonogen.data.importers.common import walk
from sonogen.data.manifest import boxes_from_mask
from sonogen.data.pseudonyms import PseudonymKey
from sonogen.data.writer import DatasetWriter, Sample, SkipFile, slug

LABELS = ("benign", "malignant", "normal")
_MASK = re.compile(r"^(?P<stem>.+)_mask(_\d+)?$", re.IGNORECASE)


def import_busi(
    src: str | Path, out: str | Path, licence: str = "CC0-1.0", strict: bool = False, progress=None,
    key: PseudonymKey | None = None, max_pixels: int = MAX_PIXELS,
) -> dict:
    """``key``: anonymise names (patients, image names and origins become keyed pseudonyms)."""
    src = Path(src)
    folders = [src / label for label in LABELS if (src / label).is_dir()]
    if not folders:
        raise FileNotFoundError(f"{src} has none of the BUSI folders {', '.join(LABELS)}")
    images: dict[Path, list[Path]] = {}
    orphans: list[Path] = []
    others: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    for folder in folders:
        files, problems = walk(folder)
        unreadable += problems
        stems = {p.stem: p for p in files if not _MASK.match(p.stem)}
        for path in files:
            if path.suffix.lower() not in STILL_SUFFIXES:
                others.append(path)
            elif match := _MASK.match(path.stem):
                image = stems.get(match.group("stem"))
                (images.setdefault(image, []) if image else orphans).append(path)
            else:
                images.setdefault(path, [])
    with DatasetWriter(out, source="busi", strict=strict, key=key) as writer:
        for path, reason in unreadable:
            writer.skip(path.relative_to(src).as_posix(), reason)
        for path in others:
            writer.skip(path.relative_to(src).as_posix(), f"unknown file type {path.suffix!r}")
        for path in orphans:
            writer.skip(path.relative_to(src).as_posix(), "mask without an image")
        for image_path in progress(sorted(images)) if progress else sorted(images):
            relative = image_path.relative_to(src).as_posix()
            label = image_path.parent.name
            masks = images[image_path]

            def read(image_path=image_path, relative=relative, masks=masks, label=label) -> list[Sample]:
                image = read_still(image_path, max_pixels)
                if not masks:
                    raise SkipFile("no mask beside the image")
                merged = np.zeros(image.shape, dtype=bool)
                for mask_path in masks:
                    mask = read_still(mask_path, max_pixels)
                    if mask.shape != image.shape:
                        raise SkipFile(f"mask {mask_path.name} is {mask.shape}, image is {image.shape}")
                    merged |= mask > 127
                if label == "normal" and merged.any():
                    raise SkipFile("a normal image with a non-empty mask")
                return [Sample(image, f"{relative}#0", boxes_from_mask(merged), merged)]

            writer.add_file(
                relative,
                read,
                label=label,
                patient_id=f"busi-{slug(image_path.stem)}",
                licence=licence,
                companions=tuple(m.relative_to(src).as_posix() for m in masks),
            )
    return writer.report
