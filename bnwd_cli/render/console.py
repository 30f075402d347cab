"""The consoles: data on stdout, everything else (progress, warnings, errors) on stderr.

Rich drops colour and animation by itself when the stream is not a terminal, so piped output
stays plain text. Tables are rendered into a string first (`text_console` / `rendered_text`),
then written by `render.output.emit`, so a failed run never prints half a table.

Rich is imported only when something is styled: a line on a stderr that is no terminal is
written as the plain text Rich would write there (importing Rich took about 20 ms of the
0.15 s start-up of `bnwd inspect --format json`; docs/performance.md).
"""

from __future__ import annotations

import io
import os
import sys
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


@cache
def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def plain_stderr() -> bool:
    """Whether stderr shows no styling: not a terminal, and no colour forced (Rich's rules)."""
    if os.environ.get("FORCE_COLOR") or os.environ.get("TTY_COMPATIBLE", "") in ("1", "true"):
        return False
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return True


def text_console(width: int) -> Console:
    """A console that renders plain text (no colour, no terminal codes) at a fixed width."""
    from rich.console import Console

    return Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)


def rendered_text(console: Console) -> str:
    """What a `text_console` holds, without the padding Rich leaves at line ends."""
    assert isinstance(console.file, io.StringIO)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"


def say_line(label: str, style: str, text: str, *, style_text: bool = False) -> None:
    """`label: text` on stderr, the label (or the whole line) in `style` on a terminal (the
    text is shown as written, never read as markup)."""
    if plain_stderr():
        print(f"{label}: {text}", file=sys.stderr)
        return
    from rich.markup import escape

    line = (
        f"[{style}]{label}: {escape(text)}[/]"
        if style_text
        else f"[{style}]{label}:[/] {escape(text)}"
    )
    stderr_console().print(line, highlight=False, soft_wrap=True)


def say_warning(text: str) -> None:
    """One warning line on stderr."""
    say_line("warning", "yellow", text)


def say_note(text: str) -> None:
    say_line("note", "dim", text, style_text=True)
