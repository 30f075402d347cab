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
