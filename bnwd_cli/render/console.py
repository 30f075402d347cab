"""The two consoles: data on stdout, everything else (progress, warnings, errors) on stderr.

Rich drops colour and animation by itself when the stream is not a terminal, so piped output
stays plain text.
"""

from __future__ import annotations

from functools import cache

from rich.console import Console


@cache
def stderr_console() -> Console:
    return Console(stderr=True)


def stdout_console(width: int | None = None) -> Console:
    return Console(width=width, soft_wrap=False)
