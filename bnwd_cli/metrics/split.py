"""The layers of a large run shared between two processes.

Past the compiled sweep, most of an analysis is Python run layer by layer and window by window
(the figures from the sums, the points, the optimizer's settings), and a Python process runs
on one core at a time: while it works out a layer the other cores wait. So `analyze_run`, once
it has read the first checkpoint and knows the layers, can fork: the parent takes the first
layers of the state dict, the child the rest (`shares`: about half the work each), each with
half the threads, and both read every checkpoint (discovery is done before the fork and
shared). Each process finishes its layers and, when the command writes JSON or CSV, renders
them too; the child sends what it found (`LayerShare`, pickled: this process's own data
through its own pipe) and ends; the parent puts the layers back in their order.
Measured on 2 cores, 20 ResNet-50 checkpoints: see `analyze_run` and docs/performance.md.

Nothing here may change a result: the shares are computed by the same code as one process,
warnings come out in the same order (`window_warnings`), and whenever the child does not
deliver (an error in its share, a crash, a signal) the parent kills it and the whole analysis
is run again in one process, which raises what one process raises.

A fork is made only where it is safe: on Linux, with the compiled sweep, with no other thread
running in this process and torch not imported (its thread pools would be copied half-held).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

SPLIT_MIN_BYTES = 32 << 20
"""A run is shared only when the layers of one checkpoint hold at least this many bytes: a fork
and the results' trip through a pipe cost a few milliseconds, which a small run would not win
back. (A ResNet-50 checkpoint with its momentum holds 205 MB.)"""


class SplitFailedError(Exception):
    """The two processes did not complete their shares: analyze in one process instead."""


@dataclass
class LayerShare:
    """What the child found for one of its layers, as the parent needs it."""

    dynamics: Any
    """The layer's `LayerDynamics`."""
    notes: list[str]
    no_step: dict[str, str]
    window_warnings: dict[int, list[str]]
    """The layer's warnings, by the window they came from (to be merged in one process's
    order: window by window, layer by layer)."""
    text: str | None = None
    """The layer rendered for the report (`analyze_run(render_layer=)`), if asked for."""


def auto_processes() -> int:
    """How many processes share a run by default: BNWD_PROCESSES, else 2 where the machine has
    at least 2 cores and is Linux, 1 otherwise (`can_fork` has the last word)."""
    setting = os.environ.get("BNWD_PROCESSES", "")
    if setting.isdigit() and int(setting) > 0:
        return min(int(setting), 2)
    return 2 if sys.platform.startswith("linux") and available_cores() >= 2 else 1


def can_fork() -> bool:
    """Whether forking now leaves the child nothing half-held: Linux (macOS's system libraries
    are not safe to use in a forked child that does not exec, which is why Python's own
    multiprocessing spawns there), no other thread in this process, torch not imported."""
    return (
        hasattr(os, "fork")
        and sys.platform.startswith("linux")
        and threading.active_count() == 1
        and "torch" not in sys.modules
    )


LAYER_COST_BYTES = 1 << 18
"""The Python of one layer (its figures, points and text), counted as this many bytes swept,
when cutting the layers in two. Set where the two processes of the 20-checkpoint ResNet-50
runs finished closest together: within 0.02 s for safetensors and 0.02-0.07 s for torch files,
the parent last (384 KiB, one layer further over, had the child last by 0.02 and 0.03 s). The
bytes count the optimizer state a sweep reads with each weight (`swept_bytes`): counting the
weights alone, the child of the torch run, which holds the largest layers and their momentum,
finished 0.07-0.13 s after the parent."""


def shares(sizes: Mapping[str, int]) -> tuple[set[str], set[str]]:
    """The parent's and the child's layers: `sizes` (bytes per checkpoint, in the state dict's
    order) cut in two runs of consecutive layers that cost about the same (sweeping their bytes
    and the Python of each layer). Consecutive, because the layers of a state dict lie in that
    order in the files, and reading a tensor maps its neighbours too (up to a 2 MiB folio):
    layers dealt out one by one by size balanced the work as well, but had each process map
    much of the other's pages (peak memory 224 + 167 MB for the safetensors run, 113 + 147 MB
    cut in two runs, 170 MB in one process)."""
    names = list(sizes)
    if len(names) < 2:
        raise ValueError("two processes need at least two layers")
    costs = [sizes[name] + LAYER_COST_BYTES for name in names]
    half, total, cut = sum(costs) / 2, 0, 0
    while cut < len(names) - 1 and total + costs[cut] / 2 < half:
        total += costs[cut]
        cut += 1
    cut = max(cut, 1)
    return set(names[:cut]), set(names[cut:])


def available_cores() -> int:
    """The cores this process may run on (its affinity where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Fork:
    """One end of the split: the child (`child` True) or the parent holding its pid."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd
        self.child = pid == 0

    @classmethod
    def start(cls) -> Fork:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends the child at once
            return cls(0, write)
        os.close(write)
        return cls(pid, read)

    def send(self, found: dict[str, LayerShare]) -> NoReturn:
        """(Child) hand the shares to the parent and end, with no clean-up: the parent owns
        the output, and the interpreter's teardown would only free what the exit frees."""
        try:
            data = pickle.dumps(found, protocol=pickle.HIGHEST_PROTOCOL)
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
            code = 0
        except BaseException:
            code = 1
        os._exit(code)

    def fail(self) -> NoReturn:
        """(Child) end without a result: the parent will analyze in one process."""
        os._exit(1)

    def receive(self) -> dict[str, LayerShare]:
        """(Parent) the child's shares; SplitFailedError if it ended without them."""
        chunks = []
        try:
            while chunk := os.read(self.fd, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(self.fd)
            self.fd = -1
            _, status = os.waitpid(self.pid, 0)
            self.pid = -1
        if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
            raise SplitFailedError(f"the layers' second process ended with status {status}")
        try:
            found = pickle.loads(b"".join(chunks))
        except Exception as exc:
            raise SplitFailedError(f"the layers' second process sent no result ({exc})") from exc
        if not isinstance(found, dict):
            raise SplitFailedError("the layers' second process sent no result")
        return found

    def abandon(self) -> None:
        """(Parent) end the child and reap it, if `receive` has not."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = -1
