"""``sonogen reader-study``: create a blinded real-vs-synthetic study of a registered version, serve it to
readers, report their scores to the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sonogen.cli_common import console, user_errors

reader_app = typer.Typer(help="Blinded reader studies: can clinicians tell a generator's images from real ones?",
                         no_args_is_help=True)


@reader_app.command("create")
@user_errors
def create_command(
    model: Annotated[str, typer.Option(help="Registered version, models:/NAME@ALIAS or models:/NAME/VERSION.")],
    real: Annotated[Path, typer.Option(help="Prepared dataset whose test images of the model's label are the real "
                                            "half.")],
    out: Annotated[Path, typer.Option(help="New folder for the study.")],
    n: Annotated[int, typer.Option("-n", "--n", min=2, help="Images in all, half real.")] = 50,
    reader: Annotated[list[str] | None, typer.Option(help="A reader's name (repeat for each); one link each.")]
    = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the synthetic draw and the choice of real images.")] = 0,
):
    """Draw the study: real and synthetic images shuffled under random names, the key kept apart in private/."""
    from sonogen.reader_study import create_study

    created = create_study(model, real, n, out, reader or ["reader1"], seed)
    console.print(f"study of {created['model_name']} v{created['model_version']}: {created['images']} images "
                  f"({created['real']} real) in {out}/; the key is in {out}/private/ (keep it from the readers)")
    for name, token in created["tokens"].items():
        console.print(f"{name}: /r/{token}")


@reader_app.command("serve")
@user_errors
def serve_command(
    study: Annotated[Path, typer.Argument(help="The study folder.")],
    host: Annotated[str, typer.Option(help="Interface to bind; other machines need 0.0.0.0.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8090,
):
    """The study's page: each reader opens http://HOST:PORT/r/TOKEN (the links `create` printed)."""
    from sonogen.reader_app import serve
    from sonogen.reader_study import Study

    readers = Study(study).tokens
    console.print(f"reader study on http://{host}:{port}/r/TOKEN for {', '.join(readers)}")
    serve(study, host, port)


@reader_app.command("report")
@user_errors
def report_command(
    study: Annotated[Path, typer.Argument(help="The study folder.")],
    register: Annotated[bool, typer.Option(help="Log the report to the model version's run and card.")] = True,
):
    """Per reader and pooled: accuracy at spotting synthetic images (95% interval), sensitivity, specificity,
    realism of real and synthetic images, agreement between readers."""
    from sonogen.reader_study import record_in_registry, report, report_lines

    result = report(study)
    for line in report_lines(result):
        console.print(line)
    if register:
        record_in_registry(result, study)
        console.print(f"logged to {result['model_name']} version {result['model_version']} (run and model card)")
