"""The Typer application: option parsing, one call into the core, rendering, exit codes.

Nothing here imports torch at module level: `bnwd --help` and `bnwd --version` must answer
fast. Each command lives in its own module and imports the core inside its function.

Exit codes (shared/STYLE.md): 0 success / gate passed, 1 gate failed (or verdicts disagree),
2 bad usage or unreadable input, 3 internal error.
"""

from __future__ import annotations

import sys
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
    """Console-script entry point."""
    app()


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
