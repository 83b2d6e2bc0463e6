"""Writes an imported dataset: one call per source file, every file accounted for in ``import_report.json``.

A dataset is written into a staging folder beside the target and renamed into place only when the whole import
succeeded: a failed, ``--strict`` or interrupted (even SIGKILLed) import leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sonogen.data.manifest import MANIFEST, SYNTHETIC_PATIENT, Box, Record, file_sha256, save_png, write_manifest
from sonogen.data.pseudonyms import PseudonymKey

IMPORT_REPORT = "import_report.json"
PREPARE_REPORT = "prepare_report.json"
STAGING, REPLACED = "staging", "replaced"  # the hidden siblings ``.<name>.staging-*`` and ``.<name>.replaced-*``


class SkipFile(Exception):
    """A source file that cannot be imported; the message says why."""


class StrictImportError(RuntimeError):
    """Raised by ``--strict`` imports when any file was skipped."""


@dataclass
class Sample:
    image: np.ndarray
    origin: str  # ``relative/path#frame``
    boxes: list[Box] = field(default_factory=list)
    mask: np.ndarray | None = None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def check_replaceable(out: Path) -> None:
    """Refuses a non-empty folder that is not a sonogen dataset: writing there would delete someone's files."""
    owned = (MANIFEST, IMPORT_REPORT, PREPARE_REPORT)
    if out.exists() and any(out.iterdir()) and not any((out / name).exists() for name in owned):
        raise FileExistsError(f"{out} is not empty and is not a sonogen dataset; choose another folder")


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """An empty folder beside ``out`` to write a dataset into; when the block ends without an error it replaces
    ``out`` (nothing, or an earlier sonogen dataset), otherwise it is removed and ``out`` stays as it was."""
    out = Path(out)
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in out.parent.glob(f".{out.name}.*-*"):  # of runs that were killed: never the dataset itself
        if leftover.name.split("-")[0] in (f".{out.name}.{STAGING}", f".{out.name}.{REPLACED}"):
            shutil.rmtree(leftover, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.{STAGING}-", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():  # two renames on one file system; a crash between them leaves the old dataset beside it
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.{REPLACED}-", dir=out.parent))
        os.replace(out, old / "dataset")
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)


class DatasetWriter:
    """Collects the samples of each source file and writes the dataset; used as a context manager, it publishes
    the dataset at ``out`` when the block ends and leaves ``out`` untouched if anything failed.

    A file's samples are written only once the whole file was read, so a file that fails half-way leaves no
    partial frames behind; it is reported as skipped instead. With a pseudonym ``key`` nothing of the source's
    names reaches the dataset: patients become keyed pseudonyms, images ``<pseudonym>-<counter>.png``, origins and
    the report's file names keyed digests of the source paths.
    """

    def __init__(self, out: str | Path, source: str, strict: bool = False, key: PseudonymKey | None = None):
        self.out = Path(out)
        self.source = source
        self.strict = strict
        self.key = key
        self.records: list[Record] = []
        self.files_seen = 0
        self.files_imported = 0
        self.skipped: list[dict[str, str]] = []
        self.report: dict | None = None
        self._per_patient: Counter[str] = Counter()
        self._stage = None

    def __enter__(self) -> DatasetWriter:
        self._stage = staged_folder(self.out)
        self.root = self._stage.__enter__()
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if kind is None:
            try:
                self._finish()
            except BaseException as failure:
                self._stage.__exit__(type(failure), failure, failure.__traceback__)  # removes the staging folder
                raise
        return self._stage.__exit__(kind, error, trace)

    def _file_name(self, file: str) -> str:
        return self.key.digest("path", file) if self.key else file

    def _reason(self, file: str, reason: str) -> str:
        if not self.key:
            return reason
        for text in sorted({file, Path(file).name, Path(file).stem}, key=len, reverse=True):
            reason = reason.replace(text, self._file_name(file))
        return reason

    def add_file(
        self,
        file: str,
        read: Callable[[], list[Sample]],
        *,
        label: str,
        patient_id: str,
        licence: str,
        companions: tuple[str, ...] = (),
        flags: str = "",
    ) -> int:
        """Reads one source file through ``read`` and stores its samples; returns how many were stored.

        ``companions`` are files read together with it (its masks): imported or skipped with it, counted apiece.
        """
        if patient_id.startswith(SYNTHETIC_PATIENT):
            raise ValueError(f"{file}: patient id {patient_id!r} starts with {SYNTHETIC_PATIENT!r}, which marks "
                             f"generated images; import with --anonymise-names (keyed pseudonyms) or rename the patient")
        self.files_seen += 1 + len(companions)
        try:
            samples = read()
            if not samples:
                raise SkipFile("no decodable frames")
        except Exception as err:  # a decoder's own error: the file is reported, the import goes on
            reason = str(err) if isinstance(err, SkipFile) else f"unreadable: {type(err).__name__}: {err}"
            self.skipped.append({"file": self._file_name(file), "reason": self._reason(file, reason)})
            self.skipped += [{"file": self._file_name(c), "reason": f"belongs to skipped {self._file_name(file)}"}
                             for c in companions]
            return 0
        if self.key:
            patient_id = f"pid-{self.key.digest('patient', patient_id)}"
        for sample in samples:
            self._store(sample, file, label=label, patient_id=patient_id, licence=licence, flags=flags)
        self.files_imported += 1 + len(companions)
        return len(samples)

    def skip(self, file: str, reason: str) -> None:
        """Reports a file that is not imported."""
        self.files_seen += 1
        self.skipped.append({"file": self._file_name(file), "reason": self._reason(file, reason)})

    def _store(self, sample: Sample, file: str, *, label: str, patient_id: str, licence: str, flags: str) -> None:
        origin = sample.origin
        if self.key:
            origin = f"{self._file_name(file)}#{sample.origin.rsplit('#', 1)[-1]}"
            name = f"{patient_id}-{self._per_patient[patient_id]:05d}"
            self._per_patient[patient_id] += 1
        else:
            name = slug(origin)
        image_path = self.root / "images" / f"{name}.png"
        if image_path.exists():
            raise ValueError(f"two samples map to the same file name {image_path.name}")
        save_png(sample.image, image_path)
        mask = ""
        if sample.mask is not None:
            if sample.mask.shape != sample.image.shape:
                raise ValueError(f"{origin}: mask {sample.mask.shape} != image {sample.image.shape}")
            mask = f"masks/{name}.png"
            save_png(np.where(sample.mask > 0, 255, 0).astype(np.uint8), self.root / mask)
        self.records.append(Record(
            image=f"images/{name}.png", patient_id=patient_id, source=self.source, label=label,
            boxes=[list(map(int, b)) for b in sample.boxes], mask=mask, origin=origin, licence=licence,
            sha256=file_sha256(image_path), flags=flags,
        ))

    def _finish(self) -> None:
        report = {
            "source": self.source,
            "files_seen": self.files_seen,
            "files_imported": self.files_imported,
            "files_skipped": len(self.skipped),
            "images": len(self.records),
            "images_per_label": dict(sorted(Counter(r.label for r in self.records).items())),
            "patients": len({r.patient_id for r in self.records}),
            "pseudonyms": (f"keyed: HMAC-SHA-256 of patient ids and source paths under key {self.key.key_id}"
                           if self.key else "none: patient ids and names come from the source"),
            "flagged": dict(sorted(Counter(f for r in self.records for f in r.flags.split()).items())),
            "skipped": self.skipped,
        }
        assert report["files_seen"] == report["files_imported"] + report["files_skipped"]
        if self.strict and self.skipped:
            reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in self.skipped)
            raise StrictImportError(f"--strict: {len(self.skipped)} file(s) skipped, nothing written to "
                                    f"{self.out} ({reasons})")
        (self.root / IMPORT_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        write_manifest(self.root, sorted(self.records, key=lambda r: r.image))
        self.report = report
