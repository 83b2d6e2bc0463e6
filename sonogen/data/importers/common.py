"""What every file-based importer shares: listing a source so that every path in it is accounted for, reading
stills or sampling videos, and the import loop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from sonogen.data.frames import MAX_PIXELS, STILL_SUFFIXES, VIDEO_SUFFIXES, read_still, read_video
from sonogen.data.pseudonyms import PseudonymKey
from sonogen.data.writer import DatasetWriter, Sample, SkipFile

# (label, patient id, licence), or the reason the file is skipped
Description = tuple[str, str, str] | str


def link_problem(path: Path) -> str | None:
    """Why a symbolic link cannot be read as a file (None for a link to a readable file, or no link)."""
    if not path.is_symlink():
        return None
    try:
        target = path.resolve(strict=True)
    except RuntimeError:
        return "symbolic link loop"
    except OSError:
        return "symbolic link to a missing file"
    if target.is_dir():
        return "symbolic link to a folder (not followed)"
    return None


def walk(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every path below ``folder``: the readable files (links to files followed), and the others with the reason
    they are not read (hidden files and folders, links that loop, dangle or point at folders)."""
    files: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    for root, folders, names in os.walk(folder, followlinks=False):
        here = Path(root)
        for name in sorted(folders):
            if name.startswith("."):
                unreadable.append((here / name, "hidden folder (not read)"))
            elif (here / name).is_symlink():
                unreadable.append((here / name, "symbolic link to a folder (not followed)"))
        folders[:] = sorted(f for f in folders if not f.startswith(".") and not (here / f).is_symlink())
        for name in sorted(names):
            path = here / name
            problem = "hidden file" if name.startswith(".") else link_problem(path)
            if problem is None and not path.is_file():
                problem = "not a regular file"
            (unreadable.append((path, problem)) if problem else files.append(path))
    return files, unreadable


def labelled_files(src: Path, layout: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files below ``src/<label>/`` and every other path of ``src`` with why it is not read; ``layout``
    names the expected layout in the error."""
    entries = sorted(src.iterdir()) if src.is_dir() else []
    labels = [p for p in entries if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")]
    if not labels:
        raise FileNotFoundError(f"{src} has no label sub-folders (expected {layout})")
    files: list[Path] = []
    unreadable = [(p, "hidden" if p.name.startswith(".") else "not inside a label folder")
                  for p in entries if p not in labels]
    for folder in labels:
        found, problems = walk(folder)
        files += found
        unreadable += problems
    return files, unreadable


def read_media(path: Path, origin: str, fps: float, max_pixels: int = MAX_PIXELS) -> list[Sample]:
    suffix = path.suffix.lower()
    if suffix in STILL_SUFFIXES:
        return [Sample(read_still(path, max_pixels), f"{origin}#0")]
    if suffix in VIDEO_SUFFIXES:
        return [Sample(frame, f"{origin}#{index}") for index, frame in read_video(path, fps, max_pixels)]
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
    unreadable: list[tuple[Path, str]] = (),
    key: PseudonymKey | None = None,
    max_pixels: int = MAX_PIXELS,
) -> dict:
    """Imports ``files`` (and reports the ``unreadable`` paths); ``boxes`` maps a sample's origin
    (``relative/path#frame``) to its boxes. With a pseudonym ``key`` no source name reaches the dataset."""
    with DatasetWriter(out, source=source, strict=strict, key=key) as writer:
        for path, reason in unreadable:
            writer.skip(path.relative_to(src).as_posix(), reason)
        for path in progress(files) if progress else files:
            relative = path.relative_to(src).as_posix()
            description = describe(path)
            if isinstance(description, str):
                writer.skip(relative, description)
                continue
            label, patient_id, licence = description

            def read(path=path, relative=relative) -> list[Sample]:
                samples = read_media(path, relative, fps, max_pixels)
                for sample in samples:
                    sample.boxes = (boxes or {}).get(sample.origin, [])
                    check_boxes(sample.boxes, sample.image.shape)
                return samples

            writer.add_file(relative, read, label=label, patient_id=patient_id, licence=licence)
    return writer.report
