"""The layers of a run shared between two processes (`metrics/split.py`) give the report one
process gives: the same layers and figures, warnings and notes in the same order, the same
progress, the same errors; and a second process that dies leaves the result as it was.

Each analysis runs in a fresh interpreter (`ANALYZE` below): the split forks only where torch
is not imported, which the test process has imported. The runs are written here with torch;
bnwd reads their zip files without it. `SPLIT_MIN_BYTES` is set to 0 there, so that these
small runs are shared too. One run above it goes through the command line itself (`inspect`
and `check`), watched from /proc to see that it forked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import training_states, write_run

from bnwd_cli.metrics import kernels, split

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the split forks on Linux"),
    pytest.mark.skipif(not kernels.compiled(), reason="the split needs the compiled sweep"),
]

ANALYZE = r"""
import json, os, sys
from pathlib import Path
from bnwd_cli.metrics import dynamics, split
from bnwd_cli.render.dynamics import csv_layer_text, json_layer_text, render_pieces
from bnwd_cli.render.output import OutputFormat

folder, processes, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
renderer = {"json": json_layer_text, "csv": csv_layer_text, "none": None}[sys.argv[4]]
dynamics.SPLIT_MIN_BYTES = 0
parent = os.getpid()
forks = []
start = split.Fork.start.__func__

def counted(cls):
    fork = start(cls)
    if not fork.child:
        forks.append(fork.pid)
    return fork

split.Fork.start = classmethod(counted)
if mode == "crash":  # the second process dies before it sends anything
    share = dynamics._LayerAccumulator.share
    def dying(self, *args):
        if os.getpid() != parent:
            os._exit(3)
        return share(self, *args)
    dynamics._LayerAccumulator.share = dying
calls = []
out = {}
try:
    report = dynamics.analyze_run(
        folder, dynamics.InspectOptions(processes=processes),
        progress=lambda done, total, label: calls.append([done, total, label]),
        render_layer=renderer,
    )
    texts = report.prerendered.texts if report.prerendered else ()
    out["prerendered"] = sum(text is not None for text in texts)
    out["layers"] = len(report.layers)
    out["json"] = "".join(render_pieces(report, OutputFormat.JSON))
    out["csv"] = "".join(render_pieces(report, OutputFormat.CSV))
    out["warnings"] = list(report.warnings)
    out["notes"] = list(report.notes)
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
out["forks"] = len(forks)
out["progress"] = calls
out["pid"] = os.getpid()
print(json.dumps(out))
"""


def analyze(folder: Path, processes: int, mode: str = "plain", renderer: str = "none") -> dict:
    """`renderer`: the layers' text each process makes as it finishes them (json, csv, none)."""
    done = subprocess.run(
        [sys.executable, "-c", ANALYZE, str(folder), str(processes), mode, renderer],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch" not in done.stderr
    return json.loads(done.stdout)


def run_with_nans(folder: Path) -> Path:
    """12 checkpoints (two windows) with SGD state; NaN in every weight at two checkpoints, one
    in each window, so that layers of both processes warn in both windows."""
    states = training_states(12, seed=3)
    for k in (2, 10):
        for name, value in states[k].items():
            if value.is_floating_point() and value.dim() >= 1 and "running" not in name:
                value.view(-1)[0] = float("nan")
    write_run(folder, states, lr=0.1)
    return folder


def test_two_processes_report_what_one_does(tmp_path: Path) -> None:
    folder = run_with_nans(tmp_path / "run")
    one, two = analyze(folder, 1), analyze(folder, 2)
    assert (one["forks"], two["forks"]) == (0, 1)
    assert two["json"] == one["json"]
    assert two["csv"] == one["csv"]
    assert two["warnings"] == one["warnings"]
    assert two["notes"] == one["notes"]
    assert two["progress"] == one["progress"]  # shown by the first process only
    # the warnings come window by window, layer by layer, from both processes' layers
    nan_warnings = [w for w in one["warnings"] if "NaN/Inf" in w]
    labels = [w.split(":")[0] for w in nan_warnings]
    assert labels == sorted(labels, key=lambda label: int(label.split("_")[1].split(".")[0]))
    assert len({w.split("'")[1] for w in nan_warnings}) >= 4
    # each process renders its own layers, and the texts join to the same report
    for renderer in ("json", "csv"):
        rendered = analyze(folder, 2, renderer=renderer)
        assert rendered["forks"] == 1 and rendered["prerendered"] == rendered["layers"] > 4
        assert rendered["json"] == one["json"] and rendered["csv"] == one["csv"]
        assert analyze(folder, 1, renderer=renderer)["prerendered"] == 0  # nothing to share


@pytest.mark.parametrize("sample", ["sgd_wd_all", "sgd_no_conv_wd"])
def test_the_bundled_runs_in_two_processes(sample: str) -> None:
    folder = Path(__file__).resolve().parent.parent / "sample_checkpoints" / sample
    one, two = analyze(folder, 1), analyze(folder, 2)
    assert (one["forks"], two["forks"]) == (0, 1)
    assert two["json"] == one["json"] and two["csv"] == one["csv"]


@pytest.mark.parametrize("which", ["first", "second"])
def test_an_error_in_either_process_is_the_error_of_one(tmp_path: Path, which: str) -> None:
    """A layer missing from a later checkpoint, in the first process's share or in the
    second's: the analysis ends with the error one process gives."""
    states = training_states(12, seed=4)
    params = {
        name: value.numel() * value.element_size()
        for name, value in states[0].items()
        if value.is_floating_point() and "running" not in name
    }
    first, second = split.shares(params)
    gone = next(name for name in params if name in (first if which == "first" else second))
    del states[9][gone]
    folder = tmp_path / "run"
    write_run(folder, states, lr=0.1)
    one, two = analyze(folder, 1), analyze(folder, 2)
    assert "architecture changed" in one["error"] and gone in one["error"]
    assert two["error"] == one["error"]
    assert two["forks"] == 1


def test_a_second_process_that_dies_changes_nothing(tmp_path: Path) -> None:
    folder = run_with_nans(tmp_path / "run")
    one, crashed = analyze(folder, 1), analyze(folder, 2, mode="crash", renderer="json")
    assert crashed["forks"] == 1  # it did fork, and then analyzed in one process
    assert crashed["prerendered"] == 0
    assert crashed["json"] == one["json"]
    assert crashed["warnings"] == one["warnings"]
    # the progress started over for the analysis in one process
    assert crashed["progress"][-len(one["progress"]) :] == one["progress"]


def test_small_runs_and_unsafe_processes_are_not_shared(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    write_run(folder, training_states(3), lr=0.1)
    script = ANALYZE.replace("dynamics.SPLIT_MIN_BYTES = 0", "")
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder), "2", "plain", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    found = json.loads(done.stdout)
    assert found["forks"] == 0  # far below SPLIT_MIN_BYTES
    assert found["prerendered"] == 0 and found["layers"] > 0  # rendered when written
    assert not split.can_fork()  # this process has imported torch


def test_no_fork_beside_another_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch")  # as if this process had not imported it
    assert split.can_fork() == (threading.active_count() == 1)
    blocker = threading.Event()
    thread = threading.Thread(target=blocker.wait)
    thread.start()
    try:
        assert not split.can_fork()  # its locks could be copied into the child held
    finally:
        blocker.set()
        thread.join()


def test_shares_cut_the_layers_in_two_runs_of_equal_work(monkeypatch: pytest.MonkeyPatch) -> None:
    mb = 1 << 20
    monkeypatch.setattr(split, "LAYER_COST_BYTES", mb // 4)
    sizes = {"a": mb, "b": mb, "c": 4 * mb, "d": 1024}
    # work: a 1.25, b 1.25, c 4.25, d 0.25 MB-equivalents (a layer counts 256 KiB): 7 in all
    assert split.shares(sizes) == ({"a", "b"}, {"c", "d"})
    many = {f"bn{i}": 4096 for i in range(10)} | {"fc": 8 * mb}
    first, second = split.shares(many)
    assert second == {"fc"} and len(first) == 10  # ten small layers against one large one
    assert split.shares({"x": 100 * mb, "y": 1}) == ({"x"}, {"y"})  # neither share is empty
    assert split.shares({"x": 1, "y": 100 * mb}) == ({"x"}, {"y"})
    for sizes_ in (sizes, many):
        first, second = split.shares(sizes_)
        names = list(sizes_)
        assert first == set(names[: len(first)])  # a run from the start, the rest after it
        assert first | second == set(names) and not first & second
    with pytest.raises(ValueError):
        split.shares({"only": mb})


def test_auto_processes_and_shared_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNWD_PROCESSES", "1")
    assert split.auto_processes() == 1
    monkeypatch.setenv("BNWD_PROCESSES", "7")
    assert split.auto_processes() == 2  # more than two processes is not built
    monkeypatch.setenv("BNWD_PROCESSES", "zero")
    cores = len(__import__("os").sched_getaffinity(0))
    assert split.auto_processes() == (2 if cores >= 2 else 1)
    monkeypatch.delenv("BNWD_THREADS", raising=False)
    try:
        kernels.share_cores(2)
        assert kernels._workers(True) == max(1, kernels._CORES // 2)
        assert kernels._workers(False) == 1
    finally:
        kernels.share_cores(1)
    assert kernels._workers(True) == kernels._CORES


def test_the_results_trip_through_the_pipe_intact() -> None:
    """What the second process sends is unpickled in the first: frozen dataclasses with slots
    and numpy floats must come back equal."""
    import pickle

    from bnwd_cli.metrics.dynamics import LayerPoint

    point = LayerPoint(
        checkpoint=1, step=100, norm=float(np.float64(1.5)), nonfinite=0,
        relative_step=1e-9, angular_update=None,
    )  # fmt: skip
    share = split.LayerShare(("dynamics", point), ["a note"], {"why": "step_1"}, {0: ["w"]})
    again = pickle.loads(pickle.dumps(share, protocol=pickle.HIGHEST_PROTOCOL))
    assert again == share and again.dynamics[1] == point


def large_run(folder: Path, checkpoints: int = 3) -> Path:
    """Convolutions of 512 x 512 x 3 x 3 with BatchNorm after each: 38 MB of weights per
    checkpoint, above `SPLIT_MIN_BYTES`, so that `bnwd` shares it without being told."""
    generator = torch.Generator().manual_seed(7)
    state: dict[str, torch.Tensor] = {}
    for i in range(4):
        state[f"conv{i}.weight"] = torch.randn(512, 512, 3, 3, generator=generator) * 0.05
        state[f"bn{i}.weight"] = torch.ones(512)
        state[f"bn{i}.bias"] = torch.zeros(512)
        state[f"bn{i}.running_mean"] = torch.zeros(512)
        state[f"bn{i}.running_var"] = torch.ones(512)
        state[f"bn{i}.num_batches_tracked"] = torch.tensor(0)
    states = [state]
    for _ in range(checkpoints - 1):
        states.append(
            {
                n: v + 0.01 * torch.randn(v.shape, generator=generator) if v.dim() else v + 1
                for n, v in states[-1].items()
            }
        )
    write_run(folder, states, fmt="safetensors")
    assert sum(v.numel() * 4 for v in state.values() if v.dim()) > split.SPLIT_MIN_BYTES
    return folder


def bnwd_watched(*args: str, processes: str | None) -> tuple[subprocess.CompletedProcess, int]:
    """`bnwd` run as a user runs it, and the most processes it had at once (it and its
    children, polled from /proc). Its output goes to files: a full pipe would stop it."""
    import contextlib
    import os
    import tempfile
    import time

    env = dict(os.environ)
    env.pop("BNWD_PROCESSES", None)
    if processes is not None:
        env["BNWD_PROCESSES"] = processes
    command = [sys.executable, "-m", "bnwd_cli", *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        most = 1
        children = Path(f"/proc/{child.pid}/task/{child.pid}/children")
        while child.poll() is None:
            with contextlib.suppress(OSError):
                most = max(most, 1 + len(children.read_text().split()))
            time.sleep(0.001)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(command, child.returncode, out.read(), err.read())
    return done, most


@pytest.mark.skipif(
    len(__import__("os").sched_getaffinity(0)) < 2, reason="a run is shared on 2 cores or more"
)
def test_the_command_line_shares_a_large_run_and_reports_the_same(tmp_path: Path) -> None:
    folder = large_run(tmp_path / "run")
    one, one_count = bnwd_watched("inspect", str(folder), "--format", "json", processes="1")
    two, two_count = bnwd_watched("inspect", str(folder), "--format", "json", processes=None)
    assert one.returncode == two.returncode == 0, two.stderr
    assert (one_count, two_count) == (1, 2)  # the default forks for this run
    assert two.stdout == one.stdout and two.stderr == one.stderr
    assert json.loads(two.stdout)["layers"]
    csv_one, _ = bnwd_watched("inspect", str(folder), "--format", "csv", processes="1")
    csv_two, count = bnwd_watched("inspect", str(folder), "--format", "csv", processes=None)
    assert count == 2 and csv_two.returncode == 0
    assert csv_two.stdout == csv_one.stdout and csv_two.stdout.count("\n") > 4
    check_one, _ = bnwd_watched("check", str(folder), processes="1")
    check_two, count = bnwd_watched("check", str(folder), processes=None)
    assert count == 2
    assert (check_two.returncode, check_two.stdout) == (check_one.returncode, check_one.stdout)


def test_prerendered_texts_are_used_only_by_the_renderer_that_made_them() -> None:
    """A layer's text made ahead replaces that layer's part of the report in its own format,
    and nowhere else (a CSV text never ends up in JSON, nor the other way)."""
    from dataclasses import replace

    from bnwd_cli.metrics.dynamics import InspectOptions, Prerendered, analyze_run
    from bnwd_cli.render.dynamics import csv_layer_text, json_layer_text, render_pieces
    from bnwd_cli.render.output import OutputFormat

    folder = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "sgd_wd_all"
    report = analyze_run(folder, InspectOptions(processes=1))
    assert report.prerendered is None
    plain = {f: "".join(render_pieces(report, f)) for f in (OutputFormat.JSON, OutputFormat.CSV)}
    count = len(report.layers)
    for renderer, fmt, other in (
        (json_layer_text, OutputFormat.JSON, OutputFormat.CSV),
        (csv_layer_text, OutputFormat.CSV, OutputFormat.JSON),
    ):
        texts = [renderer(layer, report.checkpoints) for layer in report.layers]
        same = replace(report, prerendered=Prerendered(renderer, tuple(texts)))
        assert "".join(render_pieces(same, fmt)) == plain[fmt]
        marked = replace(
            report, prerendered=Prerendered(renderer, ("MARK",) + (None,) * (count - 1))
        )
        assert "".join(render_pieces(marked, fmt)).count("MARK") == 1
        assert "".join(render_pieces(marked, other)) == plain[other]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_cut_counts_the_optimizer_state_each_sweep_reads(
    tmp_path: Path, optimizer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`swept_bytes`, which the cut weighs the layers by, is what a sweep of the layer reads
    per checkpoint: the weight and the state its implied step comes from (a momentum buffer,
    Adam's two moments), as `plan_step` picks them from the state itself."""
    from test_audit import write_run as train

    from bnwd_cli.metrics import dynamics

    train(tmp_path, optimizer)
    seen: list[tuple[int, int, int]] = []
    add_window = dynamics._LayerAccumulator.add_window

    def spy(self, window, previous, options, family, warnings):  # type: ignore[no-untyped-def]
        for visit in window:
            tensor = self._tensor(visit.checkpoint)
            hyper = visit.snapshot.per_param.get(self.verdict.name)
            inputs = dynamics._step_inputs(visit.checkpoint, visit.snapshot, hyper, options)
            plan = self._plan(tensor, visit.snapshot, inputs, family)
            state = 0
            if plan is not None:
                state = plan.fill.x.nbytes + (plan.fill.y.nbytes if plan.fill.y is not None else 0)
            seen.append((self.swept_bytes(visit), tensor.nbytes + state, tensor.nbytes))
        return add_window(self, window, previous, options, family, warnings)

    monkeypatch.setattr(dynamics._LayerAccumulator, "add_window", spy)
    dynamics.analyze_run(tmp_path)
    assert seen and all(estimate == read for estimate, read, _ in seen)
    copies = {read // weight for _, read, weight in seen}
    assert copies == {2 if optimizer == "sgd" else 3}
