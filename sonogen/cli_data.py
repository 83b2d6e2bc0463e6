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

Strict = Annotated[bool, typer.Option("--strict", help="Fail if any file is skipped (the report is still written).")]
Fps = Annotated[float, typer.Option(min=0.01, help="Frames sampled per second of video.")]
Licence = Annotated[str, typer.Option(help="Licence recorded for every imported image.")]


def _print_import(report: dict, out: Path) -> None:
    table = Table(title=f"{report['source']} → {out}")
    table.add_column("label")
    table.add_column("images", justify="right")
    for label, count in report["images_per_label"].items():
        table.add_row(label, str(count))
    console.print(table)
    console.print(
        f"files seen {report['files_seen']} = imported {report['files_imported']} + skipped "
        f"{report['files_skipped']}; {report['images']} images from {report['patients']} patients"
    )
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
):
    """POCUS lung ultrasound: convex stills and videos, labels from file names, licences from the metadata."""
    from sonogen.data.importers import import_pocus

    _print_import(import_pocus(src, out, fps=fps, strict=strict, progress=progress("importing")), out)


@import_app.command("busi")
@user_errors
def import_busi_command(
    src: Annotated[Path, typer.Argument(help="BUSI folder holding benign/, malignant/, normal/.")],
    out: Annotated[Path, typer.Argument(help="Output dataset folder.")],
    licence: Licence = "CC0-1.0",
    strict: Strict = False,
):
    """BUSI breast ultrasound: masks merged per image, boxes derived from them."""
    from sonogen.data.importers import import_busi

    _print_import(import_busi(src, out, licence=licence, strict=strict, progress=progress("importing")), out)


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
):
    """A plain folder of stills and videos, SRC/<label>/<file>."""
    from sonogen.data.importers import import_folder

    report = import_folder(
        src, out, boxes_csv=boxes, fps=fps, source=source, licence=licence, strict=strict,
        progress=progress("importing"),
    )
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
):
    """Single- and multi-frame ultrasound DICOM; only a pseudonymised patient id leaves the header."""
    from sonogen.data.importers import import_dicom

    report = import_dicom(
        src, out, fps=fps, source=source, licence=licence, strict=strict, progress=progress("importing")
    )
    _print_import(report, out)


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
):
    """Crop to the scan area, blank text, resize and pad, and split by patient."""
    from sonogen.data.prepare import prepare

    report = prepare(
        raw, out, size=size, split=split, seed=seed, stratify=stratify, progress=progress("preparing")
    )
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
