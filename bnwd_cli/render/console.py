"""The consoles: data on stdout, everything else (progress, warnings, errors) on stderr.

Rich drops colour and animation by itself when the stream is not a terminal, so piped output
stays plain text. Tables are rendered into a string first (`text_console` / `rendered_text`),
then written by `render.output.emit`, so a failed run never prints half a table.
"""

from __future__ import annotations

import io
from functools import cache

from rich.console import Console


@cache
def stderr_console() -> Console:
    return Console(stderr=True)


def text_console(width: int) -> Console:
    """A console that renders plain text (no colour, no terminal codes) at a fixed width."""
    return Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)


def rendered_text(console: Console) -> str:
    """What a `text_console` holds, without the padding Rich leaves at line ends."""
    assert isinstance(console.file, io.StringIO)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"


def say_warning(text: str) -> None:
    """One warning line on stderr (the text is shown as written, never read as markup)."""
    from rich.markup import escape

    stderr_console().print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


def say_note(text: str) -> None:
    from rich.markup import escape

    stderr_console().print(f"[dim]note: {escape(text)}[/]", highlight=False, soft_wrap=True)
