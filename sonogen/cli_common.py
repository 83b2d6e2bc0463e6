"""What every ``sonogen`` command shares: the console, progress bars, time-stamped log lines, one-line errors."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Callable

import typer
from rich.console import Console
from rich.progress import track
from rich.text import Text

from sonogen.data.writer import StrictImportError

console = Console(stderr=True, soft_wrap=True)


def log(message: str) -> None:
    """A time-stamped progress line, unwrapped in a terminal and in a log file alike (``console.log`` pads and
    wraps to 80 columns where there is no terminal); the message is plain text, never markup."""
    console.print(Text.assemble((f"{datetime.now():%H:%M:%S}", "dim"), " ", message))


def progress(description: str) -> Callable:
    return functools.partial(track, description=description, console=console, transient=True)


def user_errors(command: Callable) -> Callable:
    """Turns the library's expected errors into a one-line message and exit code 1, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (FileNotFoundError, FileExistsError, ValueError, ConnectionError, StrictImportError) as err:
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(1) from err

    return wrapper
