"""From an imported dataset to a prepared one: scan region only, grey, one size, patient-level splits."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from sonogen.data.licences import allowed, commercial_use_of
from sonogen.data.manifest import (BURNED_IN, Record, file_sha256, load_grey, read_manifest, save_png,
                                   write_manifest)
from sonogen.data.splits import assign_splits, parse_fractions, split_summary
from sonogen.data.writer import IMPORT_REPORT, PREPARE_REPORT, staged_folder

SCAN_THRESHOLD = 12  # grey level above which a pixel counts as echo rather than the screen's black background


def scan_region(frames: np.ndarray) -> np.ndarray:
    """The scanner's image area (the fan of a convex probe, the rectangle of a linear one) as a bool mask.

    Uses the brightest value each pixel takes over all frames of one recording, so a region that is dark in
    one frame (an effusion) still belongs to the scan area; then the largest bright component, filled to its
    convex hull. Annotations and text not touching the scan area fall outside it.
    """
    projection = ndimage.median_filter(frames.max(axis=0), size=3)
    bright = ndimage.binary_closing(projection > SCAN_THRESHOLD, structure=np.ones((5, 5)), iterations=1)
    labelled, count = ndimage.label(bright)
    if count == 0:
        return np.zeros(projection.shape, dtype=bool)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    component = labelled == sizes.argmax()
    ys, xs = np.nonzero(component)
    try:
        hull = ConvexHull(np.column_stack([xs, ys]))
    except QhullError:  # a line or a few pixels: nothing to fill
        return component
    canvas = Image.new("1", (projection.shape[1], projection.shape[0]), 0)
    points = [(float(xs[i]), float(ys[i])) for i in hull.vertices]
    ImageDraw.Draw(canvas).polygon(points, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool) | component


@dataclass(frozen=True)
class Geometry:
    """Crop ``[top:bottom, left:right]``, scale, then pad by ``(pad_x, pad_y)`` into a ``size`` square."""

    left: int
    top: int
    right: int
    bottom: int
    scale: float
    pad_x: int
    pad_y: int
    size: int

    @classmethod
    def fit(cls, region: np.ndarray, size: int) -> Geometry:
        ys, xs = np.nonzero(region)
        left, top, right, bottom = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        scale = size / max(right - left, bottom - top)
        width, height = cls._scaled(right - left, scale, size), cls._scaled(bottom - top, scale, size)
        return cls(int(left), int(top), int(right), int(bottom), scale, (size - width) // 2, (size - height) // 2, size)

    @staticmethod
    def _scaled(length: int, scale: float, size: int) -> int:
        return min(size, max(1, round(length * scale)))

    def apply(self, array: np.ndarray, resample: Image.Resampling) -> np.ndarray:
        crop = Image.fromarray(array[self.top : self.bottom, self.left : self.right])
        width = self._scaled(self.right - self.left, self.scale, self.size)
        height = self._scaled(self.bottom - self.top, self.scale, self.size)
        out = np.zeros((self.size, self.size), dtype=np.uint8)
        out[self.pad_y : self.pad_y + height, self.pad_x : self.pad_x + width] = np.asarray(
            crop.resize((width, height), resample)
        )
        return out

    def box(self, box: list[int]) -> list[int] | None:
        """The box in prepared pixels, rounded outwards and clipped; None when nothing of it is left."""
        x0, y0, x1, y1 = box
        nx0 = max(0, math.floor((x0 - self.left) * self.scale + self.pad_x))
        ny0 = max(0, math.floor((y0 - self.top) * self.scale + self.pad_y))
        nx1 = min(self.size, math.ceil((x1 - self.left) * self.scale + self.pad_x))
        ny1 = min(self.size, math.ceil((y1 - self.top) * self.scale + self.pad_y))
        return [nx0, ny0, nx1, ny1] if nx1 > nx0 and ny1 > ny0 else None


def _pseudonyms(raw: Path) -> str:
    """How the imported dataset's patient ids were made, as its import report says (carried to model cards)."""
    try:
        return json.loads((raw / IMPORT_REPORT).read_text()).get("pseudonyms", "unknown")
    except (OSError, ValueError):
        return "unknown (no import report)"


def recording_of(record: Record) -> str:
    return record.origin.rsplit("#", 1)[0] or record.image


def prepare(
    raw: str | Path,
    out: str | Path,
    size: int = 256,
    split: str | tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    stratify: bool = False,
    progress=None,
    burned_in: str = "drop",
    licences: list[str] | None = None,
) -> dict:
    """Writes the prepared dataset to ``out`` (staged beside it, so a failure leaves ``out`` as it was) and returns
    the report also saved as ``prepare_report.json``. Frames flagged with burned-in annotation (names and dates
    drawn into the pixels) are dropped, or with ``burned_in="blank"`` kept with everything outside their scan area
    blanked, as every frame is (text inside the scan area stays). With ``licences`` (an allow-list), images under
    any other licence are left out."""
    raw, out = Path(raw), Path(out)
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    if burned_in not in ("drop", "blank"):
        raise ValueError(f"burned_in must be drop or blank, got {burned_in!r}")
    fractions = parse_fractions(split)
    if raw.resolve() == out.resolve():
        raise ValueError("prepare writes a new dataset: OUT must differ from RAW")
    with staged_folder(out) as stage:
        return _prepare(raw, stage, size, fractions, seed, stratify, progress, burned_in, licences)


def _prepare(raw: Path, out: Path, size: int, fractions: tuple[float, float, float], seed: int, stratify: bool,
             progress, burned_in: str, licences: list[str] | None) -> dict:
    records = read_manifest(raw)
    images_in = len(records)
    excluded = Counter(r.licence or "unspecified" for r in records if licences and not allowed(r.licence, licences))
    if licences:
        records = [r for r in records if allowed(r.licence, licences)]
        if not records:
            raise ValueError(f"no image of {raw} is under the allowed licences {licences}; its licences: "
                             f"{sorted(excluded)}")
    flagged = [r for r in records if BURNED_IN in r.flags.split()]
    if burned_in == "drop":
        records = [r for r in records if BURNED_IN not in r.flags.split()]
    labels_of: dict[str, set[str]] = defaultdict(set)
    for record in records:
        labels_of[record.patient_id].add(record.label)
    split_of = assign_splits(labels_of, seed, fractions, stratify)
    recordings: dict[tuple[str, tuple[int, int]], list[Record]] = defaultdict(list)
    for record in records:
        with Image.open(raw / record.image) as im:  # reads the header only
            recordings[(recording_of(record), im.size)].append(record)

    prepared: list[Record] = []
    skipped: list[dict[str, str]] = []
    groups = list(recordings.values())
    for members in progress(groups) if progress else groups:
        group = [(record, load_grey(raw / record.image)) for record in members]
        region = scan_region(np.stack([image for _, image in group]))
        if not region.any():
            skipped += [{"image": r.image, "reason": "no scan region found (image is blank)"} for r, _ in group]
            continue
        geometry = Geometry.fit(region, size)
        for record, image in group:
            image_path = out / record.image
            save_png(geometry.apply(np.where(region, image, 0), Image.Resampling.LANCZOS), image_path)
            mask = ""
            if record.mask:
                mask = record.mask
                prepared_mask = geometry.apply(load_grey(raw / record.mask), Image.Resampling.NEAREST)
                save_png(np.where(prepared_mask > 127, 255, 0).astype(np.uint8), out / mask)
            boxes = [b for b in (geometry.box(box) for box in record.boxes) if b is not None]
            prepared.append(
                replace(
                    record,
                    split=split_of[record.patient_id],
                    boxes=boxes,
                    mask=mask,
                    sha256=file_sha256(image_path),
                )
            )
    write_manifest(out, sorted(prepared, key=lambda r: r.image))
    report = {
        "raw": str(raw),
        "size": size,
        "split_fractions": list(fractions),
        "seed": seed,
        "stratified": stratify,
        "images_in": images_in,
        "pseudonyms": _pseudonyms(raw),
        "licences": {"allowed": list(licences) if licences else "all", "excluded": dict(sorted(excluded.items())),
                     "kept": dict(sorted(Counter(r.licence or "unspecified" for r in prepared).items())),
                     "commercial_use": commercial_use_of(Counter(r.licence or "unspecified" for r in prepared))[0]},
        "burned_in": {"flagged": len(flagged), "handling": burned_in,
                      "dropped": len(flagged) if burned_in == "drop" else 0},
        "skipped": skipped,
        **split_summary(prepared),
    }
    (out / PREPARE_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
