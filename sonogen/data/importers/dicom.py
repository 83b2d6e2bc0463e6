"""Ultrasound DICOM, single- and multi-frame: ``SRC/<label>/**/*.dcm`` (or any file with a DICOM preamble).

Nothing from the DICOM header reaches the manifest except a salted hash of PatientID (the patient grouping key)
and the frame timing used for sampling: no names, dates, institution or device tags leave the importer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from sonogen.data.frames import FrameSampler, to_grey
from sonogen.data.importers.common import labelled_files
from sonogen.data.writer import DatasetWriter, Sample, SkipFile

PSEUDONYM_SALT = "sonogen-dicom-v1"


def pseudonym(patient_id: str) -> str:
    digest = hashlib.sha256(f"{PSEUDONYM_SALT}:{patient_id}".encode()).hexdigest()[:16]
    return f"dcm-{digest}"


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


def import_dicom(
    src: str | Path,
    out: str | Path,
    fps: float = 3.0,
    source: str | None = None,
    licence: str = "unknown",
    strict: bool = False,
    progress=None,
) -> dict:
    import pydicom
    from pydicom.errors import InvalidDicomError

    src = Path(src)
    files = labelled_files(src, "SRC/<label>/<file>.dcm")
    source = source or src.name
    writer = DatasetWriter(out, source=source, strict=strict)
    for path in progress(files) if progress else files:
        relative = path.relative_to(src).as_posix()
        if path.stat().st_size == 0:
            writer.skip(relative, "empty file")
            continue
        try:
            ds = pydicom.dcmread(path, force=path.suffix.lower() == ".dcm")
            patient = str(getattr(ds, "PatientID", "") or "")
        except (InvalidDicomError, OSError, EOFError, ValueError) as err:
            writer.skip(relative, f"not a readable DICOM file: {type(err).__name__}: {err}")
            continue

        def read(ds=ds, relative=relative) -> list[Sample]:
            if "PixelData" not in ds:
                raise SkipFile("DICOM has no pixel data")
            frames = grey_frames(ds)
            picks = sample_indices(len(frames), frame_interval_s(ds), fps)
            return [Sample(frames[i], f"{relative}#{i}") for i in picks]

        # without a PatientID each file is its own patient, keyed by its path
        writer.add_file(
            relative,
            read,
            label=path.relative_to(src).parts[0],
            patient_id=pseudonym(patient or f"file:{source}/{relative}"),
            licence=licence,
        )
    return writer.close()
