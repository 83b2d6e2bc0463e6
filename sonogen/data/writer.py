"""Writes an imported dataset: one call per source file, every file accounted for in ``import_report.json``."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sonogen.data.manifest import MANIFEST, Box, Record, file_sha256, save_png, write_manifest

IMPORT_REPORT = "import_report.json"
PREPARE_REPORT = "prepare_report.json"


class SkipFile(Exception):
    """A source file that cannot be imported; the message says why."""


class StrictImportError(RuntimeError):
    """Raised by ``--strict`` imports when any file was skipped."""


@dataclass
class Sample:
    image: np.ndarray
    origin: str
    boxes: list[Box] = field(default_factory=list)
    mask: np.ndarray | None = None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


class DatasetWriter:
    """Collects the samples of each source file and writes the dataset folder when closed.

    A file's samples are written only once the whole file was read, so a file that fails half-way leaves no
    partial frames behind; it is reported as skipped instead.
    """

    def __init__(self, out: str | Path, source: str, strict: bool = False):
        self.out = Path(out)
        self.source = source
        self.strict = strict
        self.records: list[Record] = []
        self.files_seen = 0
        self.files_imported = 0
        self.skipped: list[dict[str, str]] = []
        reset_dataset_folder(self.out)

    def add_file(
        self,
        file: str,
        read: Callable[[], list[Sample]],
        *,
        label: str,
        patient_id: str,
        licence: str,
        companions: tuple[str, ...] = (),
    ) -> int:
        """Reads one source file through ``read`` and stores its samples; returns how many were stored.

        ``companions`` are files read together with it (its masks): imported or skipped with it, counted apiece.
        """
        self.files_seen += 1 + len(companions)
        try:
            samples = read()
            if not samples:
                raise SkipFile("no decodable frames")
        except Exception as err:  # a decoder's own error: the file is reported, the import goes on
            reason = str(err) if isinstance(err, SkipFile) else f"unreadable: {type(err).__name__}: {err}"
            self.skipped.append({"file": file, "reason": reason})
            self.skipped += [{"file": c, "reason": f"belongs to skipped {file}"} for c in companions]
            return 0
        for sample in samples:
            self._store(sample, label=label, patient_id=patient_id, licence=licence)
        self.files_imported += 1 + len(companions)
        return len(samples)

    def skip(self, file: str, reason: str) -> None:
        """Reports a file that is not imported."""
        self.files_seen += 1
        self.skipped.append({"file": file, "reason": reason})

    def _store(self, sample: Sample, *, label: str, patient_id: str, licence: str) -> None:
        name = slug(sample.origin)
        image_path = self.out / "images" / f"{name}.png"
        if image_path.exists():
            raise ValueError(f"two samples map to the same file name {image_path.name}")
        save_png(sample.image, image_path)
        mask = ""
        if sample.mask is not None:
            if sample.mask.shape != sample.image.shape:
                raise ValueError(f"{sample.origin}: mask {sample.mask.shape} != image {sample.image.shape}")
            mask = f"masks/{name}.png"
            save_png(np.where(sample.mask > 0, 255, 0).astype(np.uint8), self.out / mask)
        self.records.append(
            Record(
                image=f"images/{name}.png",
                patient_id=patient_id,
                source=self.source,
                label=label,
                boxes=[list(map(int, b)) for b in sample.boxes],
                mask=mask,
                origin=sample.origin,
                licence=licence,
                sha256=file_sha256(image_path),
            )
        )

    def close(self) -> dict:
        report = {
            "source": self.source,
            "files_seen": self.files_seen,
            "files_imported": self.files_imported,
            "files_skipped": len(self.skipped),
            "images": len(self.records),
            "images_per_label": dict(sorted(Counter(r.label for r in self.records).items())),
            "patients": len({r.patient_id for r in self.records}),
            "skipped": self.skipped,
        }
        assert report["files_seen"] == report["files_imported"] + report["files_skipped"]
        (self.out / IMPORT_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        if self.strict and self.skipped:
            reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in self.skipped)
            raise StrictImportError(f"--strict: {len(self.skipped)} file(s) skipped ({reasons})")
        write_manifest(self.out, sorted(self.records, key=lambda r: r.image))
        return report


def reset_dataset_folder(out: Path) -> None:
    """Empties a previous sonogen dataset at ``out``; refuses to write into any other non-empty folder."""
    owned = (MANIFEST, IMPORT_REPORT, PREPARE_REPORT)
    if out.exists() and any(out.iterdir()):
        if not any((out / name).exists() for name in owned):
            raise FileExistsError(f"{out} is not empty and is not a sonogen dataset; choose another folder")
        for name in ("images", "masks"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in owned:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
