"""Where rendered text goes: stdout, or a file written atomically.

Commands hand their rendered text here once the analysis is done, so a failed run never leaves
half a file behind and stdout only ever carries the requested data. Long reports come in pieces
(a layer at a time), so that their text is never held whole.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path

from bnwd_cli.errors import UsageError

SCHEMA_VERSION = 1
"""Version of every JSON document bnwd writes; bumped on any incompatible change."""


class OutputFormat(StrEnum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"
    MARKDOWN = "markdown"


def write_atomically(path: Path, text: str | Iterable[str]) -> None:
    """Write `text` (or its pieces) to `path` through a temporary file in the same folder and a
    rename: `path` is left as it was if anything fails before the end."""
    folder = path.parent if str(path.parent) else Path()
    if not folder.is_dir():
        raise UsageError(f"--output {path}: folder {folder} does not exist")
    if path.is_dir():
        raise UsageError(f"--output {path}: is a folder; name a file")
    import tempfile  # (here: most commands write to stdout)

    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        # the user's path, not a bug in bnwd: exit 2 with the reason
        raise UsageError(f"--output {path}: cannot write there ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.writelines(_pieces(text))
        # mkstemp makes the file private (0600); give it the mode a plain `open` would: the
        # replaced file's, or what the umask allows
        Path(tmp).chmod(_mode_for(path))
        Path(tmp).replace(path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"--output {path}: cannot write there ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """Permission bits for a file written at `path`: those of the file it replaces, else
    0666 less the process's umask (as `open` would create it)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask: read from /proc on Linux (4.7+), which leaves it alone; elsewhere
    set and restored, which a thread creating a file at that instant could see."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


class ReaderGone(Exception):  # noqa: N818 (an event, not an error of the user's)
    """The reader of stdout closed it before the data was written (`bnwd inspect RUN | head`).
    The CLI ends quietly with exit code 141, as a command killed by SIGPIPE does."""


def _pieces(text: str | Iterable[str]) -> Iterable[str]:
    return (text,) if isinstance(text, str) else text


def emit(text: str | Iterable[str], output: Path | None) -> None:
    """Send rendered data (a text, or its pieces in order) to `output`, or to stdout when no
    file was asked for; stdout's ends with a newline."""
    if output is None:
        try:
            last = ""
            for piece in _pieces(text):
                if piece:
                    sys.stdout.write(piece)
                    last = piece
            if last and not last.endswith("\n"):
                sys.stdout.write("\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # not an OSError any more: Typer would turn that into exit code 1, "gate failed"
            raise ReaderGone from None
    else:
        write_atomically(output, text)
