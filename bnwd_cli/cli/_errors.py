"""Turns whatever left a command into an exit code and, for errors, one line on stderr."""

from __future__ import annotations

import os
import sys
import traceback

import typer
from typer.exceptions import TyperException

from bnwd_cli.errors import BnwdError

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


def _say(message: str) -> None:
    from bnwd_cli.render.console import stderr_console

    stderr_console().print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def exit_code_for(exc: BaseException) -> int:
    """Map an exception that escaped a command to its exit code, printing a one-line message."""
    if isinstance(exc, typer.Exit):
        return int(exc.exit_code)
    if isinstance(exc, SystemExit):
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_BAD_INPUT)
    if isinstance(exc, typer.Abort | KeyboardInterrupt):
        _say("interrupted")
        return 130
    if isinstance(exc, TyperException):
        # Usage errors from Typer's Click layer format themselves (with the usage line).
        exc.show(file=sys.stderr)  # type: ignore[attr-defined]
        return EXIT_BAD_INPUT
    if isinstance(exc, BnwdError):
        _say(str(exc))
        return exc.exit_code
    if isinstance(exc, MemoryError):
        _say("out of memory; try --layers to analyze fewer layers")
        return EXIT_INTERNAL
    # A bug in bnwd, not in the user's input: never pass it off as "gate failed".
    _say(f"internal error ({type(exc).__name__}: {exc}). This is a bug in bnwd; please report it.")
    if os.environ.get("BNWD_DEBUG"):
        traceback.print_exception(exc, file=sys.stderr)
    return EXIT_INTERNAL
