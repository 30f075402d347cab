"""Reading checkpoints: finding them in a run folder, ordering them, and opening them lazily."""

from bnwd_cli.checkpoints.discover import (
    CheckpointProblem,
    OrderSource,
    RunCheckpoints,
    SkippedFile,
    discover_run,
)
from bnwd_cli.checkpoints.formats import CheckpointFormat
from bnwd_cli.checkpoints.reader import (
    CheckpointRef,
    OpenCheckpoint,
    open_checkpoint,
    read_state_dict,
)

__all__ = [
    "CheckpointFormat",
    "CheckpointProblem",
    "CheckpointRef",
    "OpenCheckpoint",
    "OrderSource",
    "RunCheckpoints",
    "SkippedFile",
    "discover_run",
    "open_checkpoint",
    "read_state_dict",
]
