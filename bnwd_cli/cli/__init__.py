"""The command-line layer. `main` is the console-script entry point."""

from bnwd_cli.cli.app import main

__all__ = ["main"]
