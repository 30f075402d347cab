"""Time `bnwd inspect` of two versions side by side, interleaved: is a change faster?

This machine's speed moves by 10% or more from one day to the next (starting Python and importing
numpy alone took 0.08 s one day, 0.09-0.11 s another), more than most changes to bnwd gain or lose:
comparing a run of `bench_inspect.py` with one from another day measures the machine. This script
runs two versions of bnwd on the same checkpoint folder, taking turns (A B, B A, A B, ...), with
the folder read into the page cache before every run and timed again if pages were evicted around
it (as `bench_inspect.py` does), and prints each version's median wall time and CPU time (user +
system), their ratio, and whether their JSON reports are identical; if not, where they first
differ, or, when only numbers moved (a summation done in another order moves the last digits),
the largest relative difference.

A version is a git revision of this repository (exported with `git archive`, its compiled sweep
built, or copied from the working tree when its `_sweep.c` is the same), the word `worktree`
(the working tree as it is), or a folder holding a `bnwd_cli` package.

    .venv/bin/python benchmarks/ab_inspect.py HEAD~1 worktree .bench/torch/run20
    .venv/bin/python benchmarks/ab_inspect.py HEAD~3 HEAD .bench/safetensors/run20 --runs 15

Exit status 1 when the two reports differ, 0 otherwise.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inspect import CacheLog, Measurement, timed_warm

REPO = Path(__file__).resolve().parent.parent
SWEEP = Path("bnwd_cli/metrics/_sweep.c")


def prepare(version: str, where: Path) -> Path:
    """A folder whose `bnwd_cli` is `version`, ready to run with `python -m bnwd_cli`."""
    if version == "worktree":
        shutil.copytree(REPO / "bnwd_cli", where / "bnwd_cli", ignore=_no_bytecode)
        _compile(where)
        return where
    given = Path(version)
    if (given / "bnwd_cli").is_dir():
        return given
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", version, "bnwd_cli", "setup.py", "pyproject.toml",
         "README.md"],
        capture_output=True, check=False,
    )  # fmt: skip
    if archive.returncode != 0:
        raise SystemExit(f"{version}: not a revision of {REPO} ({archive.stderr.decode().strip()})")
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    built = sorted((REPO / SWEEP.parent).glob("_sweep*.so"))
    if built and filecmp.cmp(REPO / SWEEP, where / SWEEP, shallow=False):
        shutil.copy2(built[0], where / SWEEP.parent)  # the same C source: the same extension
    else:
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
            cwd=where, capture_output=True, check=True,
        )  # fmt: skip
    _compile(where)
    return where


def _no_bytecode(_folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__"]


def _compile(where: Path) -> None:
    """Write the bytecode first, as an install does (a run must not spend its time compiling)."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(where / "bnwd_cli")],
        stdout=subprocess.DEVNULL, check=True,
    )  # fmt: skip


def inspect_command(folder: Path, output: Path, extra: list[str]) -> list[str]:
    """`bnwd inspect` as `python -m bnwd_cli`: run in a version's folder, its `bnwd_cli` comes
    first on sys.path."""
    return [
        sys.executable, "-m", "bnwd_cli", "inspect", str(folder.resolve()),
        "--format", "json", "-o", str(output), *extra,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="the version to compare against (a revision, worktree, a folder)")
    parser.add_argument("b", help="the version measured (a revision, worktree, a folder)")
    parser.add_argument("folder", type=Path, help="a checkpoint folder to inspect")
    parser.add_argument("--runs", type=int, default=9, help="timed runs of each version")
    parser.add_argument("--bnwd-arg", action="append", default=[], help="extra bnwd argument")
    args = parser.parse_args(argv)
    files = sorted(p for p in args.folder.rglob("*") if p.is_file())
    if not files:
        parser.error(f"{args.folder}: no files")
    with tempfile.TemporaryDirectory(prefix="bnwd-ab-") as tmp:
        scratch = Path(tmp)
        versions = {"A": args.a, "B": args.b}
        trees = {}
        for name, version in versions.items():
            (scratch / name).mkdir()
            trees[name] = prepare(version, scratch / name)
        runs: dict[str, list[Measurement]] = {"A": [], "B": []}
        cache = CacheLog()
        for i in range(args.runs):
            for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                command = inspect_command(args.folder, scratch / f"{name}.json", args.bnwd_arg)
                runs[name].append(timed_warm(command, files, cache, cwd=trees[name]))
        same = filecmp.cmp(scratch / "A.json", scratch / "B.json", shallow=False)
        how = "" if same else difference(scratch / "A.json", scratch / "B.json")
    wall = {name: statistics.median(r.seconds for r in found) for name, found in runs.items()}
    cpu = {name: statistics.median(r.cpu_seconds for r in found) for name, found in runs.items()}
    print(f"bnwd inspect {args.folder}, median of {args.runs} runs each, interleaved")
    for name in ("A", "B"):
        print(f"{name} {versions[name]}: wall {wall[name]:.3f} s, CPU {cpu[name]:.3f} s")
    print(f"B / A: wall {wall['B'] / wall['A']:.3f}, CPU {cpu['B'] / cpu['A']:.3f}")
    print(
        f"page cache: at least {100 * cache.coldest:.2f}% of the files resident around every "
        f"timed run; {cache.repeated} run(s) timed again after pages were evicted"
    )
    print("reports: identical" if same else f"reports: DIFFERENT ({how})")
    return 0 if same else 1


def difference(a: Path, b: Path) -> str:
    """How two JSON reports differ: where first, or, when only their floating-point numbers do,
    by how much at most (a change in the order of a summation moves the last digits)."""
    worst: list[tuple[float, str]] = [(0.0, "")]

    def first(x: object, y: object, where: str) -> str | None:
        if isinstance(x, dict) and isinstance(y, dict):
            if list(x) != list(y):
                return f"{where or 'the top level'}: keys {sorted(set(x) ^ set(y))}"
            return next((d for k in x if (d := first(x[k], y[k], f"{where}.{k}"))), None)
        if isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                return f"{where or 'the top level'}: {len(x)} against {len(y)} items"
            pairs = enumerate(zip(x, y, strict=True))
            return next((d for i, (u, v) in pairs if (d := first(u, v, f"{where}[{i}]"))), None)
        if type(x) is float and type(y) is float and x != y and x * y > 0:
            worst.append((abs(x - y) / max(abs(x), abs(y)), where))
            return None
        return None if x == y else f"{where}: {x!r} against {y!r}"

    found = first(json.loads(a.read_text()), json.loads(b.read_text()), "")
    if found is not None:
        return f"first at {found}"
    rel, where = max(worst)
    if not where:
        return "the same values, written differently"
    return f"numbers only: largest relative difference {rel:.1e}, at {where}"


if __name__ == "__main__":
    sys.exit(main())
