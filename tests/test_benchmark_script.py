"""`benchmarks/bench_inspect.py` (issue 6's deliverable) runs end to end at a tiny size and
prints what it promises. No timing is asserted: only that every contender ran, that bnwd's
relative steps agree with the obvious script's, and that the memory table and the page-cache
report are there.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_inspect.py"


@pytest.mark.skipif(sys.platform != "linux", reason="cat, mincore and /proc are Linux's")
def test_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--params", "2e5", "--checkpoints", "3",
            "--memory-checkpoints", "2,4", "--repeat", "1", "--data", str(tmp_path / "data"),
            "--clean",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    # exit 1 is expected: at this size start-up dominates and the speed targets are missed
    assert done.returncode in (0, 1), done.stderr
    out = done.stdout
    for fmt in ("torch", "safetensors"):
        for contender in ("raw read (cat)", "obvious script", "| bnwd |", "floor: bnwd reading"):
            row = next(
                line
                for line in out.splitlines()
                if line.startswith(f"| {fmt} |") and contender in line
            )
            cells = [c.strip() for c in row.strip("|").split("|")]
            wall, cpu, rss = float(cells[3]), float(cells[6]), float(cells[7])
            assert rss > 0
            if contender != "raw read (cat)":  # cat of a few MB rounds to 0.00 s
                assert wall > 0 and cpu > 0
        assert re.search(rf"^{fmt}: bnwd used [\d.]+ CPU-s", out, re.M)
        assert re.search(rf"^{fmt}: bnwd's reading and sweeping alone .* take [\d.]+ s", out, re.M)
        start = re.search(
            rf"^{fmt}: starting Python and importing numpy, .* takes ([\d.]+) s", out, re.M
        )
        assert start is not None and float(start.group(1)) > 0
        assert re.search(rf"^\| {fmt} \| 4 \| ", out, re.M)  # the memory table, 4 checkpoints
        agreement = re.search(rf"{fmt}: largest relative difference .*: ([\d.e+-]+)", done.stderr)
        assert agreement is not None and float(agreement.group(1)) < 1e-3
    assert re.search(r"^page cache: at least [\d.]+% of the files resident", out, re.M)
    assert not (tmp_path / "data").exists()  # --clean


AB_SCRIPT = SCRIPT.parent / "ab_inspect.py"
RUN = SCRIPT.parent.parent / "sample_checkpoints" / "sgd_wd_all"


def run_ab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(AB_SCRIPT), *args, str(RUN), "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def timings(out: str) -> dict[str, float]:
    found = re.findall(r"^([AB]) .*: wall ([\d.]+) s, CPU ([\d.]+) s$", out, re.M)
    assert [name for name, _, _ in found] == ["A", "B"], out
    return {name: float(wall) for name, wall, _ in found}


def test_ab_script_times_both_versions_and_finds_them_identical() -> None:
    done = run_ab("worktree", "worktree")
    assert done.returncode == 0, done.stderr
    assert all(wall > 0 for wall in timings(done.stdout).values())
    assert "reports: identical" in done.stdout
    assert re.search(r"^page cache: at least [\d.]+% of the files resident", done.stdout, re.M)


def test_ab_script_tells_different_reports(tmp_path: Path) -> None:
    # a copy of bnwd that calls itself another version: the same figures, another report
    shutil.copytree(SCRIPT.parent.parent / "bnwd_cli", tmp_path / "bnwd_cli")
    version = tmp_path / "bnwd_cli" / "_version.py"
    version.write_text(
        re.sub(r'__version__ = "[^"]*"', '__version__ = "0.0.0+ab"', version.read_text())
    )
    done = run_ab("worktree", str(tmp_path))
    assert done.returncode == 1, done.stderr
    timings(done.stdout)
    assert "reports: DIFFERENT (first at .bnwd_version: '0.1.0' against '0.0.0+ab')" in done.stdout


def benchmark_module(name: str) -> Any:
    """A script of benchmarks/ imported as a module (they import one another by name)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_ab_script_says_how_reports_differ(tmp_path: Path) -> None:
    difference = benchmark_module("ab_inspect").difference
    a, b = tmp_path / "a.json", tmp_path / "b.json"

    def differ(x: object, y: object) -> str:
        a.write_text(json.dumps(x))
        b.write_text(json.dumps(y))
        return difference(a, b)

    layer = {"name": "fc.weight", "points": [{"norm": 2.0, "step": 1}, {"norm": 3.0, "step": 2}]}
    moved = {"name": "fc.weight", "points": [{"norm": 2.0, "step": 1}, {"norm": 3.3, "step": 2}]}
    assert differ([layer], [moved]) == (
        "numbers only: largest relative difference 9.1e-02, at [0].points[1].norm"
    )
    assert differ([layer, layer], [layer]) == "first at the top level: 2 against 1 items"
    assert differ({"a": 1, "b": 2}, {"a": 1, "c": 2}) == "first at the top level: keys ['b', 'c']"
    renamed = {**moved, "name": "fc.bias"}
    assert differ([layer], [renamed]) == "first at [0].name: 'fc.weight' against 'fc.bias'"
    assert differ({"x": 1.0}, {"x": -1.0}) == "first at .x: 1.0 against -1.0"  # a sign is news
    assert differ({"x": 1}, {"x": 1.0}) == "the same values, written differently"


def test_ab_script_runs_a_git_revision() -> None:
    repo = SCRIPT.parent.parent
    if subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True
    ).returncode:
        pytest.skip("not a git checkout")
    done = run_ab("HEAD", "worktree")
    assert done.returncode in (0, 1), done.stderr  # 1 where the working tree changed the output
    assert "A HEAD: wall" in done.stdout
    timings(done.stdout)


FLOOR_SCRIPT = SCRIPT.parent / "sweep_floor.py"


def _swept_pieces(run: Path, floor: bool) -> list[tuple]:
    """Every piece of every window sweep of `run`: its rectangle and the checkpoints' arrays."""
    from bnwd_cli.metrics import dynamics, kernels

    sweep_floor = benchmark_module("sweep_floor")
    seen: list[tuple] = []
    sweep = kernels._window_piece

    def spy(out, piece, rows, cols, chain, kinds, specs, workers):  # type: ignore[no-untyped-def]
        seen.append(
            (piece, rows, cols, tuple(None if t is None else t.shape for t in chain), len(specs),
             sum(s is not None for s in specs), sum(t.nbytes for t in chain if t is not None))
        )  # fmt: skip
        return sweep(out, piece, rows, cols, chain, kinds, specs, workers)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "_window_piece", spy)
        if floor:
            sweep_floor.sweep_only(run)
        else:
            dynamics.analyze_run(run)
    return seen


def test_the_floor_sweeps_what_bnwd_sweeps() -> None:
    """The floor (benchmarks/sweep_floor.py) reads every tensor bnwd's analysis reads, in the
    same windows and pieces, with the same optimizer-step inputs; and it leaves bnwd as it was."""
    from bnwd_cli.metrics import dynamics, kernels

    figures, record = kernels._window_figures, dynamics._LayerAccumulator._record
    full = _swept_pieces(RUN, floor=False)
    floor = _swept_pieces(RUN, floor=True)
    assert len(sorted(RUN.glob("*.pt"))) > kernels.WINDOW + 1  # windows that chain
    assert floor == full
    assert any(with_step for *_, with_step, _ in full)  # the optimizer's state was swept too
    assert any(shapes[0] is not None for _, _, _, shapes, *_ in full)  # so was the previous one
    assert (kernels._window_figures, dynamics._LayerAccumulator._record) == (figures, record)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the split forks on Linux")
def test_the_floor_shares_a_run_between_two_processes_as_bnwd_does() -> None:
    """With two processes the floor forks as bnwd does and both complete their shares: a share
    that failed would be analyzed again in one process, and the floor would time that."""
    from bnwd_cli.metrics import kernels

    if not kernels.compiled():
        pytest.skip("the split needs the compiled sweep")
    code = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(FLOOR_SCRIPT.parent)!r})
import sweep_floor
from bnwd_cli.metrics import dynamics, split
dynamics.SPLIT_MIN_BYTES = 0
analyses, forks = [], []
analyze, start = dynamics._analyze, split.Fork.start.__func__
def counted(path, options, *rest):
    analyses.append(options.processes)
    return analyze(path, options, *rest)
def forked(cls):
    fork = start(cls)
    forks.append(fork.child)
    return fork
dynamics._analyze, split.Fork.start = counted, classmethod(forked)
sweep_floor.sweep_only(Path(sys.argv[1]), 2)
print(analyses, forks)
"""
    done = subprocess.run(
        [sys.executable, "-c", code, str(RUN)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "[2] [False]"  # one analysis, shared: no second try


def test_the_floor_script_runs_as_the_benchmark_runs_it() -> None:
    done = subprocess.run(
        [sys.executable, str(FLOOR_SCRIPT), str(RUN)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    usage = subprocess.run(
        [sys.executable, str(FLOOR_SCRIPT)], capture_output=True, text=True, check=False
    )
    assert usage.returncode == 1 and "sweep_floor.py CKPT_DIR" in usage.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_peak_memory_adds_up_the_processes_of_a_command() -> None:
    """bnwd may fork (metrics/split.py): the benchmark's peak is the sum of both processes'
    peaks, where `ru_maxrss` alone gives the larger one. Measured from a fresh interpreter:
    a child's `ru_maxrss` starts from the RSS of the process that started it (this one's)."""
    hold = (
        "import os, sys, time\n"
        "pid = os.fork() if sys.argv[1] == 'fork' else 1\n"
        "block = bytearray(b'x') * ((150 if pid == 0 else 100) << 20)\n"
        "time.sleep(0.3)\n"
        "if pid == 0:\n"
        "    os._exit(0)\n"
        "if pid != 1:\n"
        "    os.waitpid(pid, 0)\n"
    )
    measuring = (
        "import sys\n"
        f"sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
        "from bench_inspect import measure\n"
        "print(measure([sys.executable, '-c', sys.argv[1], sys.argv[2]]).peak_rss_mb)\n"
    )

    def peak(how: str) -> float:
        done = subprocess.run(
            [sys.executable, "-c", measuring, hold, how],
            capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        return float(done.stdout)

    assert peak("fork") > 250 * 1.048  # 150 + 100 MiB, and the interpreters
    assert 100 * 1.048 < peak("alone") < 150 * 1.048  # no child: the one process's peak
