"""The loop every file-based importer shares: classify, read stills or sample videos, account for every file."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from sonogen.data.frames import STILL_SUFFIXES, VIDEO_SUFFIXES, read_still, read_video
from sonogen.data.writer import DatasetWriter, Sample, SkipFile

# (label, patient id, licence), or the reason the file is skipped
Description = tuple[str, str, str] | str


def labelled_files(src: Path, layout: str) -> list[Path]:
    """Every visible file below ``src/<label>/``; ``layout`` names the expected layout in the error."""
    labels = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")) if src.is_dir() else []
    if not labels:
        raise FileNotFoundError(f"{src} has no label sub-folders (expected {layout})")
    return sorted(p for folder in labels for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_media(path: Path, origin: str, fps: float) -> list[Sample]:
    suffix = path.suffix.lower()
    if suffix in STILL_SUFFIXES:
        return [Sample(read_still(path), f"{origin}#0")]
    if suffix in VIDEO_SUFFIXES:
        return [Sample(frame, f"{origin}#{index}") for index, frame in read_video(path, fps)]
    raise SkipFile(f"unknown file type {path.suffix!r}")


def check_boxes(boxes: list[list[int]], shape: tuple[int, ...]) -> None:
    height, width = shape[:2]
    for x0, y0, x1, y1 in boxes:
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise SkipFile(f"box {[x0, y0, x1, y1]} is empty or outside the {width}x{height} image")


def import_files(
    src: Path,
    files: list[Path],
    out: str | Path,
    *,
    source: str,
    describe: Callable[[Path], Description],
    fps: float,
    strict: bool,
    progress=None,
    boxes: dict[str, list[list[int]]] | None = None,
) -> dict:
    """Imports ``files``; ``boxes`` maps a sample's origin (``relative/path#frame``) to its boxes."""
    writer = DatasetWriter(out, source=source, strict=strict)
    for path in progress(files) if progress else files:
        relative = path.relative_to(src).as_posix()
        description = describe(path)
        if isinstance(description, str):
            writer.skip(relative, description)
            continue
        label, patient_id, licence = description

        def read(path=path, relative=relative) -> list[Sample]:
            samples = read_media(path, relative, fps)
            for sample in samples:
                sample.boxes = (boxes or {}).get(sample.origin, [])
                check_boxes(sample.boxes, sample.image.shape)
            return samples

        writer.add_file(relative, read, label=label, patient_id=patient_id, licence=licence)
    return writer.close()
