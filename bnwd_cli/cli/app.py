"""The Typer application: option parsing, one call into the core, rendering, exit codes.

Nothing here imports torch at module level: `bnwd --help` and `bnwd --version` must answer
fast. Each command lives in its own module and imports the core inside its function.

Exit codes (shared/STYLE.md): 0 success / gate passed, 1 gate failed (or verdicts disagree),
2 bad usage or unreadable input, 3 internal error.
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from bnwd_cli._version import __version__

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class _BnwdGroup(TyperGroup):
    """Routes every way out of a command through one exit-code mapping.

    Overriding `main` (rather than wrapping the console script) means `typer.testing.CliRunner`
    sees exactly the exit codes and messages a user sees.
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        from bnwd_cli.cli import _errors

        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except BaseException as exc:  # every path out of the CLI goes through one mapping
            sys.exit(_errors.exit_code_for(exc))
        sys.exit(result if isinstance(result, int) else EXIT_OK)


app = typer.Typer(
    name="bnwd",
    cls=_BnwdGroup,
    help=(
        "Training-dynamics analyzer for PyTorch: shows, per layer, what weight decay and the "
        "optimizer really did to normalized (scale-invariant) weights, read from the checkpoints "
        "a run already saved."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"bnwd {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """bnwd: what weight decay really does to your normalized layers."""


def main() -> None:
    """Console-script entry point.

    Two things a one-shot process can skip: the cyclic garbage collector running every 700
    allocations while the checkpoints' pickles and the report's points are built (125 times,
    25 ms, in a 20-checkpoint ResNet-50 analysis, freeing nothing: bnwd makes no reference
    cycles there; it still runs every 100,000 allocations), and the interpreter's
    teardown, which frees the report object by object, finalizes every module and joins the
    idle sweep threads. Measured on `bnwd inspect` of 20 ResNet-50 checkpoints (torch files):
    0.98 s -> 0.94 s with either, 0.92 s with both (medians of 7). Output is flushed first; a
    profiler or coverage measurement gets the normal exit (`_watched`), as it writes its data
    then. And Typer is given only the command that runs (`_command_named`).
    """
    import gc
    import os

    gc.set_threshold(100_000, 50, 100)
    _limit_blas_threads(sys.argv[1:], os.environ)
    registered = app.registered_commands
    app.registered_commands = _command_named(sys.argv[1:], registered)
    try:
        app()
    except SystemExit as exc:
        if not isinstance(exc.code, int | None) or _watched():
            raise  # (a message as the code: Python prints it)
        _exit_now(exc.code or 0)
    finally:
        app.registered_commands = registered


def _command_named(args: list[str], registered: list[Any]) -> list[Any]:
    """The registered command the first argument names, alone; else all of them.

    On every call Typer makes a click command of each registered command, from its signature
    and type hints: 7 ms of the 10 ms between `main` and the start of `bnwd inspect`, for the
    five commands, most of it on four that are not run. A command's own help and errors do
    not mention the others; `bnwd --help`, a misspelt command and `--version` (first
    arguments that name no command) get the whole group.
    """
    if args:
        named = [c for c in registered if (c.name or c.callback.__name__) == args[0]]
        if named:
            return named
    return registered


BLAS_FREE_COMMANDS = frozenset({"inspect", "check", "plot"})
"""Commands that do no linear algebra: their arithmetic is bnwd's own sweep."""


def _limit_blas_threads(args: list[str], environ: MutableMapping[str, str]) -> None:
    """Keep numpy's OpenBLAS from starting a thread per core for commands that never call it.

    OpenBLAS starts a thread per further core when numpy is imported, and each spins before it
    sleeps: `import numpy` then idling 0.5 s takes 0.17 CPU-s on 2 cores, 0.07 with one thread;
    in `bnwd inspect` of 20 ResNet-50 checkpoints (safetensors) the spinning thread had 10% of
    the samples, competing with the sweep's second thread. Set before numpy is imported
    (OpenBLAS reads it when it loads); a value the user set is kept. `verify-invariance` and
    `suggest-groups` keep the default: their work is running the model, whose BLAS may be an
    OpenBLAS too (`inspect --model` runs it only once, on one example input).
    """
    if args and args[0] in BLAS_FREE_COMMANDS:
        environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _watched() -> bool:
    """A profiler or coverage measurement is running: it writes its data at a normal exit
    (coverage on Python 3.12+ may use sys.monitoring, which leaves no trace function)."""
    return bool(sys.getprofile() or sys.gettrace() or "coverage" in sys.modules)


def _exit_now(code: int) -> None:
    """Flush stdout and stderr and end the process without the interpreter's teardown."""
    import contextlib
    import os

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone (`| head`), a closed stream
            stream.flush()
    os._exit(code)


# Each command module adds its command to `app` on import (kept last: they import `app`).
from bnwd_cli.cli import (  # noqa: E402
    check_cmd,
    inspect_cmd,
    plot_cmd,
    suggest_cmd,
    verify_cmd,
)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_GATE_FAILED",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "app",
    "check_cmd",
    "inspect_cmd",
    "main",
    "plot_cmd",
    "suggest_cmd",
    "verify_cmd",
]
