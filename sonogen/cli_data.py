"""The ``sonogen data`` commands: synthesise, import and prepare ultrasound datasets, and build lesion banks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sonogen.cli_common import console, progress, user_errors

data_app = typer.Typer(help="Create, import and prepare ultrasound datasets.", no_args_is_help=True)
import_app = typer.Typer(
    help="Import a source into the sonogen dataset format (grey PNG frames + manifest.csv + import_report.json).",
    no_args_is_help=True,
)
data_app.add_typer(import_app, name="import")

Strict = Annotated[bool, typer.Option("--strict", help="Fail if any file is skipped; nothing is written then.")]
Fps = Annotated[float, typer.Option(min=0.01, help="Frames sampled per second of video.")]
Licence = Annotated[str, typer.Option(help="Licence recorded for every imported image.")]
KeyFile = Annotated[Path | None, typer.Option(
    help="File holding the secret pseudonym key (hex); default: $SONOGEN_PSEUDONYM_KEY.")]
NewKey = Annotated[Path | None, typer.Option(
    help="Create a new 256-bit pseudonym key in this file (mode 0600, outside the dataset) and use it.")]
Anonymise = Annotated[bool, typer.Option(
    "--anonymise-names", help="Keyed pseudonyms for patients, image names and origins: no source file name "
                              "reaches the dataset (needs a pseudonym key).")]
MaxPixels = Annotated[int, typer.Option(min=1, help="Largest frame accepted, in pixels (read from the header, "
                                                    "before decoding).")]


def _key(key_file: Path | None, new_key: Path | None, out: Path, needed: bool):
    """The pseudonym key the options name (a new one with ``new_key``); None when not ``needed``."""
    from sonogen.data.pseudonyms import create_key, require_key

    if new_key is not None:
        if key_file is not None:
            raise ValueError("--new-pseudonym-key and --pseudonym-key-file exclude each other")
        key = create_key(new_key, out)
        console.print(f"created pseudonym key {key.key_id} in {new_key}: keep it secret and keep it (the same key "
                      f"gives the same pseudonyms when the dataset grows)")
        return key
    return require_key(key_file) if needed else None


def _print_import(report: dict, out: Path) -> None:
    table = Table(title=f"{report['source']} → {out}")
    table.add_column("label")
    table.add_column("images", justify="right")
    for label, count in report["images_per_label"].items():
        table.add_row(label, str(count))
    console.print(table)
    console.print(
        f"files seen {report['files_seen']} = imported {report['files_imported']} + skipped "
        f"{report['files_skipped']}; {report['images']} images from {report['patients']} patients; "
        f"pseudonyms {report['pseudonyms'].split(':')[0]}"
    )
    for flag, count in report.get("flagged", {}).items():
        console.print(f"[yellow]flagged[/yellow] {count} images {flag} (prepare --burned-in drop|blank)")
    for skip in report["skipped"]:
        console.print(f"[yellow]skipped[/yellow] {skip['file']}: {skip['reason']}")


@data_app.command("phantom")
@user_errors
def phantom_command(
    out: Annotated[Path, typer.Argument(help="Output dataset folder.")],
    patients: Annotated[int, typer.Option(min=1, help="Number of simulated patients.")] = 24,
    frames_per_patient: Annotated[int, typer.Option(min=1, help="Frames per patient.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same images.")] = 0,
    consolidation_fraction: Annotated[float, typer.Option(min=0, max=1, help="Share of ill patients.")] = 0.5,
):
    """Simulate lung-ultrasound frames (normal and consolidation) with exact boxes and masks."""
    from sonogen.data.phantom import generate

    report = generate(out, patients, frames_per_patient, seed, consolidation_fraction, progress("simulating"))
    _print_import(report, out)


@import_app.command("pocus")
@user_errors
def import_pocus_command(
    src: Annotated[Path, typer.Argument(help="Root of the POCUS repository (holds data/).")],
    out: Annotated[Path, typer.Argument(help="Output dataset folder.")],
    fps: Fps = 3.0,
    strict: Strict = False,
    anonymise_names: Anonymise = False,
    pseudonym_key_file: KeyFile = None,
    new_pseudonym_key: NewKey = None,
    max_pixels: MaxPixels = 16_000_000,
):
    """POCUS lung ultrasound: convex stills and videos, labels from file names, licences from the metadata."""
    from sonogen.data.importers import import_pocus

    key = _key(pseudonym_key_file, new_pseudonym_key, out, anonymise_names)
    _print_import(import_pocus(src, out, fps=fps, strict=strict, progress=progress("importing"), key=key,
                               max_pixels=max_pixels), out)


@import_app.command("busi")
@user_errors
def import_busi_command(
    src: Annotated[Path, typer.Argument(help="BUSI folder holding benign/, malignant/, normal/.")],
    out: Annotated[Path, typer.Argument(help="Output dataset folder.")],
    licence: Licence = "CC0-1.0",
    strict: Strict = False,
    anonymise_names: Anonymise = False,
    pseudonym_key_file: KeyFile = None,
    new_pseudonym_key: NewKey = None,
    max_pixels: MaxPixels = 16_000_000,
):
    """BUSI breast ultrasound: masks merged per image, boxes derived from them."""
    from sonogen.data.importers import import_busi

    key = _key(pseudonym_key_file, new_pseudonym_key, out, anonymise_names)
    _print_import(import_busi(src, out, licence=licence, strict=strict, progress=progress("importing"), key=key,
                              max_pixels=max_pixels), out)


@import_app.command("folder")
@user_errors
def import_folder_command(
    src: Annotated[Path, typer.Argument(help="Folder with one sub-folder per label.")],
    out: Annotated[Path, typer.Argument(help="Output dataset folder.")],
    boxes: Annotated[
        Path | None, typer.Option(help="CSV with image,x0,y0,x1,y1[,frame][,patient_id], one row per box.")
    ] = None,
    fps: Fps = 3.0,
    source: Annotated[str | None, typer.Option(help="Source name (default: the folder name).")] = None,
    licence: Licence = "unknown",
    strict: Strict = False,
    anonymise_names: Anonymise = False,
    pseudonym_key_file: KeyFile = None,
    new_pseudonym_key: NewKey = None,
    max_pixels: MaxPixels = 16_000_000,
):
    """A plain folder of stills and videos, SRC/<label>/<file>."""
    from sonogen.data.importers import import_folder

    key = _key(pseudonym_key_file, new_pseudonym_key, out, anonymise_names)
    report = import_folder(src, out, boxes_csv=boxes, fps=fps, source=source, licence=licence, strict=strict,
                           progress=progress("importing"), key=key, max_pixels=max_pixels)
    _print_import(report, out)


@import_app.command("dicom")
@user_errors
def import_dicom_command(
    src: Annotated[Path, typer.Argument(help="Folder with one sub-folder per label, holding DICOM files.")],
    out: Annotated[Path, typer.Argument(help="Output dataset folder.")],
    fps: Fps = 3.0,
    source: Annotated[str | None, typer.Option(help="Source name (default: the folder name).")] = None,
    licence: Licence = "unknown",
    strict: Strict = False,
    pseudonym_key_file: KeyFile = None,
    new_pseudonym_key: NewKey = None,
    allow_burned_in: Annotated[bool, typer.Option(
        "--allow-burned-in", help="Import frames with burned-in annotation, flagged for prepare --burned-in.")]
    = False,
    max_pixels: MaxPixels = 16_000_000,
):
    """Ultrasound DICOM: keyed pseudonyms only; no name, date or file name leaves the source (docs/privacy.md)."""
    from sonogen.data.importers import import_dicom

    key = _key(pseudonym_key_file, new_pseudonym_key, out, needed=True)
    report = import_dicom(src, out, key, fps=fps, source=source, licence=licence, strict=strict,
                          progress=progress("importing"), allow_burned_in=allow_burned_in, max_pixels=max_pixels)
    _print_import(report, out)


@data_app.command("locate")
@user_errors
def locate_command(
    src: Annotated[Path, typer.Argument(help="The source folder that was imported.")],
    digest: Annotated[str, typer.Argument(help="A keyed digest from a manifest's origin or a report (before '#').")],
    pseudonym_key_file: KeyFile = None,
):
    """Find the source file behind an anonymised origin; only the holder of the key can."""
    from sonogen.data.importers.common import walk
    from sonogen.data.pseudonyms import require_key

    key = require_key(pseudonym_key_file)
    digest = digest.split("#")[0]
    files, _ = walk(src)
    found = [path for path in files if key.digest("path", path.relative_to(src).as_posix()) == digest]
    if not found:
        raise FileNotFoundError(f"no file under {src} has the digest {digest} with key {key.key_id}")
    for path in found:
        print(path)


@data_app.command("prepare")
@user_errors
def prepare_command(
    raw: Annotated[Path, typer.Argument(help="An imported dataset folder.")],
    out: Annotated[Path, typer.Argument(help="Output prepared dataset folder.")],
    size: Annotated[int, typer.Option(min=8, help="Side of the square output images, in pixels.")] = 256,
    split: Annotated[str, typer.Option(help="Train,val,test fractions of patients.")] = "0.7,0.15,0.15",
    seed: Annotated[int, typer.Option(help="Seed of the patient-level split.")] = 0,
    stratify: Annotated[
        bool,
        typer.Option(
            "--stratify/--hash",
            help="Stratified quotas per label (balanced, but patients may move when new ones are added) or "
            "per-patient hashing (stable when patients are added).",
        ),
    ] = False,
    burned_in: Annotated[str, typer.Option(
        help="Frames flagged with burned-in annotation: drop them, or blank (keep them; everything outside the "
             "scan area is blanked, as in every frame).")] = "drop",
    licences: Annotated[list[str] | None, typer.Option(
        "--licences", help="Keep only images under these licences (repeatable, e.g. --licences 'CC BY 4.0').")]
    = None,
):
    """Crop to the scan area, blank text, resize and pad, and split by patient."""
    from sonogen.data.prepare import prepare

    report = prepare(raw, out, size=size, split=split, seed=seed, stratify=stratify, progress=progress("preparing"),
                     burned_in=burned_in, licences=licences)
    table = Table(title=f"{raw} → {out} ({size}×{size})")
    for column in ("split", "patients", "images", "images per label", "patients per label"):
        table.add_column(column)
    for name, entry in report["splits"].items():
        table.add_row(
            name,
            str(entry["patients"]),
            str(entry["images"]),
            ", ".join(f"{k} {v}" for k, v in entry["images_per_label"].items()),
            ", ".join(f"{k} {v}" for k, v in entry["patients_per_label"].items()),
        )
    console.print(table)
    console.print(
        f"{report['images']} images, {report['patients']} patients, "
        f"{len(report['patients_in_several_splits'])} patients in more than one split"
    )
    labels = {label for entry in report["splits"].values() for label in entry["images_per_label"]}
    for name, entry in report["splits"].items():
        if missing := sorted(labels - set(entry["images_per_label"])):
            console.print(f"[yellow]warning:[/yellow] split {name} has no {', '.join(missing)} images")
    kept = report["licences"]
    console.print(f"licences: {', '.join(f'{k} {v}' for k, v in kept['kept'].items())}; commercial use of models "
                  f"trained on them: {kept['commercial_use']}"
                  + (f"; left out: {', '.join(f'{k} {v}' for k, v in kept['excluded'].items())}" if kept['excluded']
                     else ""))
    if report["burned_in"]["flagged"]:
        console.print(f"burned-in annotation: {report['burned_in']['flagged']} flagged images, "
                      f"{report['burned_in']['dropped']} dropped")
    for skip in report["skipped"]:
        console.print(f"[yellow]skipped[/yellow] {skip['image']}: {skip['reason']}")


@data_app.command("lesion-bank")
@user_errors
def lesion_bank_command(
    data: Annotated[Path, typer.Argument(help="Prepared dataset folder with lesion boxes.")],
    out: Annotated[Path, typer.Argument(help="Output folder of the bank (lesions.json + structures.npy).")],
    label: Annotated[str, typer.Option(help="The lesion label whose boxes go into the bank.")] = "consolidation",
    split: Annotated[str, typer.Option(help="Split to build from (the real training split by default).")] = "train",
    structure_size: Annotated[int, typer.Option(min=4, help="Side of the stored structure maps, px.")] = 32,
    bandwidth: Annotated[float, typer.Option(min=1e-3, help="Kernel bandwidth of the position prior.")] = 0.05,
    dataset: Annotated[str | None, typer.Option(help="Dataset name for MLflow (default: data folder name).")] = None,
):
    """Build DiffUltra's Lesion-anatomy Bank (fan, pleura, lesion structures, position prior) and log it to MLflow."""
    from sonogen.jobs import build_lesion_bank

    info = build_lesion_bank(data, out, label, split, structure_size, bandwidth, dataset)
    stats = info["statistics"]
    console.print(f"lesion bank of {stats['lesions']} {label} boxes from {stats['patients']} patients "
                  f"({len(info['skipped'])} images without a pleural line skipped): {out}; "
                  f"{stats['large_fraction']:.0%} large (area ≥ {stats['large_area']:.4f} of the image); "
                  f"MLflow run {info['run_id']}")
    for skipped in info["skipped"][:5]:
        console.print(f"  skipped {skipped['image']}: {skipped['reason']}")
