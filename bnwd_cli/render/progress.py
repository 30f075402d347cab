"""A transient progress bar on stderr (silent when stderr is not a terminal)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from bnwd_cli.render.console import plain_stderr, stderr_console


def _silent(done: int, total: int, label: str) -> None:
    """No progress to show (stderr is no terminal)."""


@contextmanager
def checkpoint_progress(description: str) -> Iterator[Callable[[int, int, str], None]]:
    if plain_stderr():
        yield _silent
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = stderr_console()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[label]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
        auto_refresh=False,
    )
    task = progress.add_task(description, total=None, label="")

    def update(done: int, total: int, label: str) -> None:
        # redrawn here, by the caller, not by a refresh thread: the analysis forks a process to
        # share the layers of a large run (metrics/split.py), which it does only while this
        # process runs no other thread
        progress.update(task, completed=done, total=total, label=label, refresh=True)

    with progress:
        yield update
