"""What every ``sonogen`` command shares: the console, progress bars, time-stamped log lines, one-line errors."""

from __future__ import annotations

import functools
import time
from datetime import datetime
from typing import Callable, Iterable, Iterator, TypeVar

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


Item = TypeVar("Item")
LOG_EVERY_S = 30.0  # outside a terminal, a progress line at least this often while items are done


def _logged(items: Iterable[Item], description: str) -> Iterator[Item]:
    """``items``, with a time-stamped ``description: k/N`` line now and then and one at the end."""
    items = list(items)
    last = time.monotonic()
    for done, item in enumerate(items):
        if time.monotonic() - last >= LOG_EVERY_S:
            log(f"{description}: {done}/{len(items)}")
            last = time.monotonic()
        yield item
    log(f"{description}: {len(items)}/{len(items)} done")


def progress(description: str) -> Callable:
    """A progress bar in a terminal; elsewhere (a log file, CI, a pod) time-stamped lines, which a bar would not
    leave behind."""
    if console.is_terminal:
        return functools.partial(track, description=description, console=console, transient=True)
    return functools.partial(_logged, description=description)


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
