"""The public POCUS lung-ultrasound repository (Born et al., 2021), in its own folder layout.

Labels come from the file-name prefix; licence and patient id from ``data/dataset_metadata.csv`` when present.
Patients are grouped conservatively: files sharing a metadata patient id, or a series token in their names
(``..._set2_vid1`` and ``..._set2_vid4``, ``pat1Image_...``, ``case3_clip...``), are one patient, so frames
of one person can never land in two splits.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from sonogen.data.frames import MAX_PIXELS, STILL_SUFFIXES, VIDEO_SUFFIXES
from sonogen.data.importers.common import import_files, walk
from sonogen.data.pseudonyms import PseudonymKey

LABELS = {"cov": "covid", "pneu": "pneumonia", "vir": "viral", "reg": "normal"}
FOLDERS = ("data/pocus_images/convex", "data/pocus_videos/convex")
METADATA = "data/dataset_metadata.csv"
_PREFIX = re.compile(r"^(cov|pneu|vir|reg)(?=[-_ +])", re.IGNORECASE)
_SERIES = re.compile(r"(set|pat|case)(\d+)", re.IGNORECASE)


def label_of(name: str) -> str | None:
    match = _PREFIX.match(name)
    return LABELS[match.group(1).lower()] if match else None


def series_of(stem: str) -> str | None:
    """The recording series a file name belongs to, label words removed (``liftl_pneu_case3_clip4`` → ``liftl_case3``)."""
    rest = _PREFIX.sub("", stem).lstrip("-_ +").lower()
    match = _SERIES.search(rest)
    if not match:
        return None
    words = [w for w in re.split(r"[-_ +]+", rest[: match.start()]) if w and w not in LABELS]
    words = [re.sub(rf"^({'|'.join(LABELS)})", "", w) or w for w in words]
    return "_".join(words + [match.group(0)])


def read_metadata(src: Path) -> dict[str, dict[str, str]]:
    path = src / METADATA
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        return {row["Filename"].strip(): row for row in csv.DictReader(f) if row.get("Filename")}


def _metadata_patient(row: dict[str, str]) -> str | None:
    """``s<source>-id<patient>``: the metadata numbers patients within each source (id 40 of one site is not id 40
    of another), so the source is part of the identity."""
    pid = (row.get("Patient ID / Name") or "").strip()
    return f"s{(row.get('Source ID') or '').strip() or 'unknown'}-id{pid}" if pid else None


def group_patients(stems: list[str], metadata: dict[str, dict[str, str]]) -> dict[str, str]:
    """Maps each file stem to a patient id: connected components over shared metadata ids and name series."""
    parent = {stem: stem for stem in stems}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    first_with: dict[str, str] = {}
    for stem in stems:
        keys = []
        if pid := _metadata_patient(metadata.get(stem, {})):
            keys.append(f"id:{pid}")
        if series := series_of(stem):
            keys.append(f"series:{series}")
        for key in keys:
            if key in first_with:
                parent[find(stem)] = find(first_with[key])
            else:
                first_with[key] = stem
    members: dict[str, list[str]] = {}
    for stem in stems:
        members.setdefault(find(stem), []).append(stem)
    ids = {}
    for group in members.values():
        pids = sorted({p for s in group if (p := _metadata_patient(metadata.get(s, {})))}, key=lambda p: (len(p), p))
        name = f"pocus-{pids[0]}" if pids else f"pocus-{min(group)}"
        for stem in group:
            ids[stem] = re.sub(r"[^A-Za-z0-9.-]+", "-", name)
    return ids


def import_pocus(src: str | Path, out: str | Path, fps: float = 3.0, strict: bool = False, progress=None,
                 key: PseudonymKey | None = None, max_pixels: int = MAX_PIXELS) -> dict:
    """The convex stills and videos; ``key``: anonymise names (patients, image names and origins become keyed
    pseudonyms)."""
    src = Path(src)
    folders = [src / f for f in FOLDERS if (src / f).is_dir()]
    if not folders:
        raise FileNotFoundError(f"{src} has none of {', '.join(FOLDERS)}: is it the POCUS repository root?")
    files, unreadable = [], []
    for folder in folders:
        found, problems = walk(folder)
        files += found
        unreadable += problems
    metadata = read_metadata(src)
    patients = group_patients([p.stem for p in files], metadata)

    def describe(path: Path) -> tuple[str, str, str] | str:
        label = label_of(path.name)
        if label is None:
            return "file name has no label prefix (Cov, Pneu, Vir, Reg)"
        if path.suffix.lower() not in STILL_SUFFIXES | VIDEO_SUFFIXES:
            return f"unknown file type {path.suffix!r}"
        licence = metadata.get(path.stem, {}).get("License", "").strip() or "unknown"
        return label, patients[path.stem], licence

    return import_files(src, files, out, source="pocus", describe=describe, fps=fps, strict=strict, progress=progress,
                        unreadable=unreadable, key=key, max_pixels=max_pixels)
