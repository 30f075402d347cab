"""The one exception hierarchy of bnwd.

The core raises these; only the CLI turns them into exit codes (2 for anything the user can fix:
bad usage, unreadable input, a broken model file). Every message names the thing that is wrong
and, where there is one, what to do about it.
"""

from __future__ import annotations

from pathlib import Path


class BnwdError(Exception):
    """Base class: a problem the user can act on. The CLI prints it on one line and exits 2."""

    exit_code = 2


class UsageError(BnwdError):
    """An option, argument or configuration value is wrong."""


class CheckpointError(BnwdError):
    """A checkpoint file or folder cannot be read or does not hold what bnwd needs."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled objects that only full (code-executing) unpickling can rebuild."""


class ModelFileError(BnwdError):
    """The user's model file failed to import, build, or run on the example input."""


class ConfigError(UsageError):
    """A `[tool.bnwd.check]` table or `--config` file has an unknown key or a bad value."""
