"""The floor under `bnwd inspect`: its reading and sweeping of the bytes, and nothing else.

    .venv/bin/python benchmarks/sweep_floor.py CKPT_DIR

Runs bnwd's own analysis of CKPT_DIR (the same discovery, readers, windows, compiled sweep,
optimizer-step inputs and page release, in as many processes as `bnwd` would use) with
everything computed from the sweep's sums taken out: no per-row figures, no points, no
per-layer summaries, no audit, no output. What is left is what any analysis that reads every
tensor of every checkpoint in float64 has to do, with Python and numpy started: it is a lower
bound on `bnwd inspect`'s time, not a contender.
`bench_inspect.py` times it next to `cat` and bnwd, so that each run of the benchmark shows
how much of bnwd's time the bytes themselves take on the machine it runs on.

Only for measuring: the replacements below are made in this process, never in bnwd.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Any


class _Swept(Exception):  # noqa: N818 (a signal that the sweeps are done, not an error)
    """Every window has been swept: the analysis would now summarize the layers."""


def sweep_only(folder: Path, processes: int = 1) -> None:
    """bnwd's analysis of `folder` up to the summaries of its layers, with nothing computed
    from the sums of its sweeps, in `processes` processes as `bnwd` would (metrics/split.py).
    Raises what the analysis raises (a checkpoint it cannot read)."""
    from bnwd_cli.metrics import dynamics, kernels
    from bnwd_cli.metrics.split import LayerShare

    def no_figures(out, chain, extras, release=None):
        return [None] * out.shape[0]

    def no_record(self, *args, **kwargs):
        self.points.append(None)  # (a layer with points is swept from the checkpoint before)

    def no_summary(self, *args):
        return LayerShare(None, [], {}, {})  # (what a second process sends back)

    def stop(*args, **kwargs):
        raise _Swept

    replaced: list[tuple[Any, str, Any]] = [
        (kernels, "_window_figures", no_figures),
        (dynamics._LayerAccumulator, "_record", no_record),
        (dynamics._LayerAccumulator, "share", no_summary),
        (dynamics, "audit_run", stop),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in replaced]
    for owner, name, value in replaced:
        setattr(owner, name, value)
    try:
        dynamics.analyze_run(folder, dynamics.InspectOptions(processes=processes))
    except _Swept:
        return
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)
    raise AssertionError("the analysis ended without summarizing its layers")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    # as `bnwd`'s entry point does (cli/app.py: main); set before numpy is imported
    gc.set_threshold(100_000, 50, 100)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from bnwd_cli.metrics.split import auto_processes

    sweep_only(Path(sys.argv[1]), auto_processes())
    sys.stdout.flush()
    os._exit(0)  # as `bnwd` ends (cli/app.py: _exit_now)
