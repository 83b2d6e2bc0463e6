"""Runs the POCUS, folder and DICOM importers and `prepare` on a real POCUS checkout; prints counts and timings.

    python bench/real_data.py ../shared/data/pocus /tmp/sonogen-real [--fps 3]

The folder importer reads the same files through a label-folder view (symlinks); the DICOM importer reads each
POCUS recording re-encoded as one multi-frame ultrasound DICOM of its sampled frames. All three must agree.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from sonogen.data.importers import import_dicom, import_folder, import_pocus
from sonogen.data.importers.pocus import FOLDERS, label_of
from sonogen.data.manifest import load_grey, read_manifest
from sonogen.data.prepare import prepare


def folder_view(src: Path, out: Path) -> None:
    for folder in FOLDERS:
        for path in sorted((src / folder).iterdir()):
            label = label_of(path.name) or "unlabelled"
            (out / label).mkdir(parents=True, exist_ok=True)
            (out / label / path.name).symlink_to(path.resolve())


def dicom_view(raw: Path, out: Path, fps: float) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    recordings: dict[str, list] = defaultdict(list)
    for record in read_manifest(raw):
        recordings[record.origin.rsplit("#", 1)[0]].append(record)
    for origin, records in recordings.items():
        frames = np.stack([load_grey(raw / r.image) for r in records])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out / records[0].label / (Path(origin).stem + ".dcm")
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, generate_uid(), "US"
        ds.PatientID = records[0].patient_id
        ds.FrameTime = 1000.0 / fps
        ds.set_pixel_data(frames if len(frames) > 1 else frames[0], "MONOCHROME2", 8)
        ds.save_as(path, enforce_file_format=True)


def timed(step: str, fn, timings: dict):
    start = time.perf_counter()
    result = fn()
    timings[step] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pocus", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--fps", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    timings: dict[str, float] = {}
    reports = {"pocus": timed("import pocus", lambda: import_pocus(args.pocus, args.work / "raw-pocus", args.fps),
                              timings)}
    folder_view(args.pocus, args.work / "folder-src")
    reports["folder"] = timed(
        "import folder", lambda: import_folder(args.work / "folder-src", args.work / "raw-folder", fps=args.fps),
        timings)
    dicom_view(args.work / "raw-pocus", args.work / "dicom-src", args.fps)
    reports["dicom"] = timed(
        "import dicom", lambda: import_dicom(args.work / "dicom-src", args.work / "raw-dicom", fps=args.fps),
        timings)
    for name, report in reports.items():
        print(f"## import {name}: {report['files_seen']} files seen = {report['files_imported']} imported + "
              f"{report['files_skipped']} skipped; {report['images']} images, {report['patients']} patients; "
              f"{timings['import ' + name]:.1f} s")
        print("images per label:", json.dumps(report["images_per_label"]))
        for skip in report["skipped"]:
            print(f"  skipped {skip['file']}: {skip['reason']}")
    for method in ("hash", "stratify"):
        out = args.work / f"prepared-{method}"
        report = timed(f"prepare {method}", lambda: prepare(args.work / "raw-pocus", out, size=args.size,
                                                            seed=0, stratify=method == "stratify"), timings)
        print(f"\n## prepare --{method} (pocus, {args.size} px, 0.7/0.15/0.15, seed 0): {report['images']} images, "
              f"{report['patients']} patients, patients in several splits: {len(report['patients_in_several_splits'])}"
              f", {timings['prepare ' + method]:.1f} s")
        print("| split | patients | images | images per label | patients per label |\n|---|---|---|---|---|")
        for split, entry in report["splits"].items():
            print(f"| {split} | {entry['patients']} | {entry['images']} | {json.dumps(entry['images_per_label'])} "
                  f"| {json.dumps(entry['patients_per_label'])} |")


if __name__ == "__main__":
    main()
