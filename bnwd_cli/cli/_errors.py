"""Turns whatever left a command into an exit code and, for errors, one line on stderr."""

from __future__ import annotations

import os
import sys
import traceback

import typer

from bnwd_cli.errors import BnwdError

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


def _say(message: str) -> None:
    from bnwd_cli.render.console import say_line

    # escaped: paths and values like `runs/[lr=0.1]` or `bnwd-cli[plot]` are text, not markup
    say_line("error", "bold red", message)


def exit_code_for(exc: BaseException) -> int:
    """Map an exception that escaped a command to its exit code, printing a one-line message."""
    if type(exc).__name__ == "Exit" and hasattr(exc, "exit_code"):
        # typer.Exit (Click's Exit in older Typer releases, its own class in newer ones)
        return int(exc.exit_code)
    if isinstance(exc, SystemExit):
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_BAD_INPUT)
    from bnwd_cli.render.output import ReaderGone

    if isinstance(exc, ReaderGone):
        # the reader of stdout went away (`bnwd inspect RUN | head`): end quietly, as a command
        # killed by SIGPIPE does (`emit` raises it; a BrokenPipeError never gets here, Typer
        # turns it into exit code 1 first)
        return EXIT_BROKEN_PIPE
    if isinstance(exc, typer.Abort | KeyboardInterrupt):
        _say("interrupted")
        return 130
    if hasattr(exc, "show") and hasattr(exc, "exit_code"):
        # Click's usage errors (vendored inside newer Typer) format themselves, usage line included.
        exc.show(file=sys.stderr)
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
