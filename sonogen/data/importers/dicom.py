"""Ultrasound DICOM, single- and multi-frame: ``SRC/<label>/**/*.dcm`` (or any file with a DICOM preamble).

What leaves a file (docs/privacy.md; DICOM PS3.15 Annex E): the pixels, a keyed pseudonym of PatientID (the
patient grouping key) and the frame timing used for sampling. Image names and origins are keyed digests, never
the file's name. Frames with burned-in annotation (BurnedInAnnotation YES, or no such tag on a modality that burns
text in by default) are skipped unless asked for, and then flagged for ``prepare``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sonogen.data.frames import MAX_PIXELS, FrameSampler, check_pixels, to_grey
from sonogen.data.importers.common import labelled_files
from sonogen.data.manifest import BURNED_IN
from sonogen.data.pseudonyms import PseudonymKey
from sonogen.data.writer import DatasetWriter, Sample, SkipFile

BURNS_IN_BY_DEFAULT = frozenset({"US", "SC"})  # ultrasound and secondary capture: text drawn into the image
FRAMES_PER_FILE = 64  # a file may decode to at most this many --max-pixels frames (a cine of 300 1-Mpx frames)


def burned_in(ds) -> str | None:
    """Why the frames may carry burned-in text (names, dates), or None."""
    value = str(getattr(ds, "BurnedInAnnotation", "") or "").strip().upper()
    modality = str(getattr(ds, "Modality", "") or "").strip().upper()
    if value == "YES":
        return "BurnedInAnnotation is YES"
    if not value and modality in BURNS_IN_BY_DEFAULT:
        return f"no BurnedInAnnotation on a {modality} image ({modality} burns annotation in by default)"
    return None


def check_size(ds, max_pixels: int) -> None:
    """Refuses frames, or a whole file, larger than the limits, from the header (before any decoding)."""
    rows, columns = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    check_pixels(columns, rows, max_pixels)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames * rows * columns > FRAMES_PER_FILE * max_pixels:
        raise SkipFile(f"{frames} frames of {columns}x{rows}: over {FRAMES_PER_FILE} × --max-pixels "
                       f"({FRAMES_PER_FILE * max_pixels / 1e6:g} Mpx) in one file")


def frame_interval_s(ds) -> float | None:
    """Seconds between frames from FrameTime (ms), CineRate or RecommendedDisplayFrameRate, if present."""
    if float(getattr(ds, "FrameTime", 0) or 0) > 0:
        return float(ds.FrameTime) / 1000.0
    for tag in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = float(getattr(ds, tag, 0) or 0)
        if rate > 0:
            return 1.0 / rate
    return None


def grey_frames(ds) -> np.ndarray:
    """All frames as uint8 grey, ``(frames, height, width)``, honouring the photometric interpretation."""
    from pydicom.pixels import apply_color_lut, convert_color_space

    pixels = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    elif photometric.startswith("YBR"):
        pixels = convert_color_space(pixels, photometric, "RGB")
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2")
    if frames == 1:
        pixels = pixels[None]
    if pixels.ndim != (4 if colour else 3):
        raise SkipFile(f"unexpected pixel array shape {pixels.shape} for {frames} frame(s), {photometric}")
    if photometric == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return np.stack([to_grey(frame) for frame in pixels])


def sample_indices(count: int, interval_s: float | None, fps: float) -> list[int]:
    """Frame indices at ``fps`` per second of acquisition time; every frame when timing is unknown."""
    if interval_s is None:
        return list(range(count))
    sampler = FrameSampler(fps)
    return [index for index in range(count) if sampler.keep(index * interval_s)]


def read_header(path: Path):
    """The dataset of a DICOM file (pixel data still encoded), or SkipFile saying what the file is instead."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if path.stat().st_size == 0:
        raise SkipFile("empty file")
    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() == ".dcm")
    except InvalidDicomError:
        raise SkipFile("not a DICOM file (no DICM preamble)") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, KeyError) as err:
        raise SkipFile(f"not a readable DICOM file: {type(err).__name__}") from None
    if not any(tag in ds for tag in ("SOPClassUID", "Modality", "PixelData")):
        raise SkipFile("not a DICOM file (no DICOM data elements)")
    return ds


def import_dicom(
    src: str | Path,
    out: str | Path,
    key: PseudonymKey,
    fps: float = 3.0,
    source: str | None = None,
    licence: str = "unknown",
    strict: bool = False,
    progress=None,
    allow_burned_in: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> dict:
    """Imports ``SRC/<label>/**`` DICOM files; ``key`` makes the pseudonyms (``sonogen.data.pseudonyms``)."""
    if not isinstance(key, PseudonymKey):
        raise ValueError("DICOM imports need a pseudonym key (sonogen.data.pseudonyms.require_key)")
    src = Path(src)
    files, unreadable = labelled_files(src, "SRC/<label>/<file>.dcm")
    source = source or src.name
    with DatasetWriter(out, source=source, strict=strict, key=key) as writer:
        for path, reason in unreadable:
            writer.skip(path.relative_to(src).as_posix(), reason)
        for path in progress(files) if progress else files:
            relative = path.relative_to(src).as_posix()
            try:
                ds = read_header(path)
                check_size(ds, max_pixels)
                annotated = burned_in(ds)
                if annotated and not allow_burned_in:
                    raise SkipFile(f"{annotated}: names or dates may be drawn into the pixels (--allow-burned-in "
                                   f"imports it flagged, for prepare to drop or blank)")
            except SkipFile as skip:
                writer.skip(relative, str(skip))
                continue

            def read(ds=ds, relative=relative) -> list[Sample]:
                if "PixelData" not in ds:
                    raise SkipFile("DICOM file without pixel data (not an image)")
                frames = grey_frames(ds)
                picks = sample_indices(len(frames), frame_interval_s(ds), fps)
                return [Sample(frames[i], f"{relative}#{i}") for i in picks]

            # without a PatientID each file is its own patient, keyed by its path
            patient = str(getattr(ds, "PatientID", "") or "") or f"file:{source}/{relative}"
            writer.add_file(relative, read, label=path.relative_to(src).parts[0], patient_id=patient,
                            licence=licence, flags=BURNED_IN if annotated else "")
    return writer.report
