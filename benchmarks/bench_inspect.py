"""Benchmark `bnwd inspect` against reading the bytes and against the obvious user script.

Issue 6 targets (2-core machine, page cache warm, all contenders measured in one run):
  * `bnwd inspect` takes at most 1.5x the time of `cat`-ing every checkpoint file to /dev/null,
    for torch zip files and for safetensors files;
  * it is at least 3x faster than the obvious script (`torch.load` each whole file, then loop over
    the state dict computing norms and differences with torch);
  * its peak resident memory is at most one checkpoint + 300 MB, and flat in the number of
    checkpoints once bnwd's window of checkpoints is full (10 vs 40; 5 is shown too).

The script writes a synthetic run in each format under --data (outside the repository):

  torch/all/step_NNNNNN.pt             torch.save({"model", "optimizer", "step", "epoch"}),
                                       ResNet-50 state dict + SGD-momentum (or Adam) state
  safetensors/all/step_NNNNNN.safetensors   the same weights, step in the header metadata

with ResNet-50 tensor shapes (bottlenecks [3, 4, 6, 3], BN with running stats, fc 2048x1000:
25.6M parameters, 102 MB of float32 weights per checkpoint). `--params` scales the channel widths
for a smaller (or larger) model. The timed run (`--checkpoints`, default 20) and the memory runs
(`--memory-checkpoints`, default 5, 10 and 40) are folders of hard links to the first N files of
`all/`, so the data is written once (12 GB with the defaults; kept for the next run, `--clean`
deletes it). A fourth process, not a contender, is timed with them: `sweep_floor.py`, bnwd's own
reading and sweeping of every tensor with nothing computed from the sums and no output, which
bounds what work on the rest (the figures, the records, the output) can gain (README,
Performance). Each process runs on its own and they take turns; the files are read once untimed
before every run, and a run counts only if every page of its files was in the page cache before
and after it (`mincore`), else it is timed again. Wall time is the median of `--repeat` runs;
CPU time (user + system: the work done, however it is spread over the cores) comes from `wait4`
(`ru_utime`, `ru_stime`, which count the processes bnwd forks and waits for), peak RSS from
`ru_maxrss` or, where bnwd forked a second process (bnwd_cli/metrics/split.py), the sum of the
peaks of both (`measure`). The memory runs (as many rounds as the timed run, the largest peak of
each) also give the cost of each further checkpoint ((T40 - T5) / 35), which separates
throughput from the fixed start-up cost. The share of the files' page cache in 2 MiB folios is
printed too: with the files read back from disk in small folios, `cat` takes up to twice as long
(docs/performance.md).

    .venv/bin/python benchmarks/bench_inspect.py                 # full run: 1.5 min, 4-5 the first time
    .venv/bin/python benchmarks/bench_inspect.py --optimizer adam --formats torch \\
        --memory-checkpoints 5,20 --data /work/bench-data/adam    # Adam state (3 tensors/param)
    .venv/bin/python benchmarks/bench_inspect.py --params 2e6 --checkpoints 5 \\
        --memory-checkpoints 3,6 --repeat 1 --clean                # smoke test, under a minute

Exit status 1 when a target is missed (the table says which), 0 otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bnwd_cli.metrics.kernels import WINDOW

RESNET50_PARAMS = 25_557_032
FORMATS = ("torch", "safetensors")
MB = 1_000_000


def resnet50_shapes(width: float = 1.0) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of torchvision's ResNet-50, channel widths scaled by `width`."""

    def ch(c: int) -> int:
        return max(1, round(c * width))

    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{suffix}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    stem = ch(64)
    shapes["conv1.weight"] = (stem, 3, 7, 7)
    bn("bn1", stem)
    inplanes = stem
    for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        width_c, out_c = ch(planes), ch(planes * 4)
        for block in range(blocks):
            p = f"layer{stage + 1}.{block}"
            shapes[f"{p}.conv1.weight"] = (width_c, inplanes, 1, 1)
            bn(f"{p}.bn1", width_c)
            shapes[f"{p}.conv2.weight"] = (width_c, width_c, 3, 3)
            bn(f"{p}.bn2", width_c)
            shapes[f"{p}.conv3.weight"] = (out_c, width_c, 1, 1)
            bn(f"{p}.bn3", out_c)
            if block == 0:
                shapes[f"{p}.downsample.0.weight"] = (out_c, inplanes, 1, 1)
                bn(f"{p}.downsample.1", out_c)
            inplanes = out_c
    shapes["fc.weight"] = (1000, inplanes)
    shapes["fc.bias"] = (1000,)
    return shapes


def count_params(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(
        math.prod(s)
        for n, s in shapes.items()
        if not n.endswith(("running_mean", "running_var")) and not n.endswith("num_batches_tracked")
    )


def shapes_for(params: float) -> dict[str, tuple[int, ...]]:
    """ResNet-50 shapes whose parameter count is close to `params` (most are quadratic in width)."""
    width = math.sqrt(params / RESNET50_PARAMS)
    for _ in range(20):
        got = count_params(resnet50_shapes(width))
        if abs(got - params) / params < 0.01:
            break
        width *= math.sqrt(params / got)
    return resnet50_shapes(width)


# ----------------------------------------------------------------------------- data generation


def generate(root: Path, shapes: dict[str, tuple[int, ...]], count: int, optimizer: str) -> None:
    """Write `count` checkpoints of a synthetic run in both formats (skipped if already there)."""
    import torch
    from safetensors.torch import save_file

    stamp = root / "spec.json"
    spec = {"shapes": len(shapes), "params": count_params(shapes), "count": count, "opt": optimizer}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        print(f"reusing the synthetic runs in {root}", file=sys.stderr)
        return
    shutil.rmtree(root, ignore_errors=True)
    (root / "torch" / "all").mkdir(parents=True)
    (root / "safetensors" / "all").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    params: dict[str, torch.nn.Parameter] = {}
    buffers: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            buffers[name] = torch.zeros((), dtype=torch.int64)
        elif name.endswith("running_var"):
            buffers[name] = torch.ones(shape)
        elif name.endswith("running_mean"):
            buffers[name] = torch.zeros(shape)
        elif name.endswith(".bias"):
            params[name] = torch.nn.Parameter(torch.zeros(shape))
        elif len(shape) == 1:  # BN gamma
            params[name] = torch.nn.Parameter(torch.ones(shape))
        else:
            fan_in = math.prod(shape[1:])
            params[name] = torch.nn.Parameter(
                torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)
            )
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params.values(), lr=1e-3, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    started = time.perf_counter()
    for index in range(count):
        step = index * 100
        if index:
            for p in params.values():
                # gradient ~ 1/|w| scale: relative steps of 1e-3..1e-2, like real training
                p.grad = torch.randn(p.shape, generator=gen) * (p.detach().abs().mean() + 1e-3)
            opt.step()
            for name, buf in buffers.items():
                if name.endswith("num_batches_tracked"):
                    buf += 100
                else:
                    buf.mul_(0.9).add_(torch.rand(buf.shape, generator=gen) * 0.1)
        model = {n: (params[n].detach() if n in params else buffers[n]) for n in shapes}
        torch.save(
            {"model": model, "optimizer": opt.state_dict(), "step": step, "epoch": index},
            root / "torch" / "all" / f"step_{step:06d}.pt",
        )
        save_file(
            {n: t.contiguous() for n, t in model.items()},
            str(root / "safetensors" / "all" / f"step_{step:06d}.safetensors"),
            metadata={"step": str(step)},
        )
        print(
            f"\rgenerated {index + 1}/{count} checkpoints ({time.perf_counter() - started:.0f} s)",
            end="",
            file=sys.stderr,
        )
    print(file=sys.stderr)
    os.sync()
    stamp.write_text(json.dumps(spec))


def subset(root: Path, fmt: str, count: int) -> Path:
    """A folder of hard links to the first `count` checkpoints of `fmt`."""
    folder = root / fmt / f"run{count}"
    files = sorted((root / fmt / "all").iterdir())[:count]
    if folder.is_dir() and len(list(folder.iterdir())) == len(files):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for file in files:
        os.link(file, folder / file.name)
    return folder


# ----------------------------------------------------------------------------- contenders

# What a user would write instead of bnwd: load each whole file, loop over the state dict.
OBVIOUS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from safetensors.torch import load_file

    files = sorted(Path(sys.argv[1]).iterdir())
    results, previous = {}, None
    for file in files:
        if file.suffix == ".safetensors":
            weights = load_file(file)
        else:
            weights = torch.load(file, map_location="cpu", weights_only=True)["model"]
        for name, w in weights.items():
            if not w.is_floating_point():
                continue
            row = {"norm": w.norm().item()}
            if previous is not None:
                p = previous[name]
                row["relative_step"] = ((w - p).norm() / p.norm()).item()
                row["cosine"] = (torch.dot(w.flatten(), p.flatten()) / (w.norm() * p.norm())).item()
            results.setdefault(name, []).append(row)
        previous = weights
    Path(sys.argv[2]).write_text(json.dumps(results))
    """
)


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_rss_mb: float
    cpu_seconds: float = 0.0
    """User + system time of the process (both cores together): the work, however it is
    spread over the cores. Wall time can never go below cpu_seconds / cores."""


def measure(command: list[str], cwd: Path | None = None) -> Measurement:
    """Wall time and peak resident memory of one command (its output goes to /dev/null).

    bnwd may fork a second process for a large run (bnwd_cli/metrics/split.py), which
    `ru_maxrss` does not add in (the kernel keeps the largest of a process and its children).
    So the peak of every process of the command is also read from /proc while it runs
    (`VmHWM`, every 5 ms), and the peak reported is the larger of `ru_maxrss` and the sum of
    those peaks: an upper bound of the memory used at once, as pages shared between the
    processes are counted in each."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    peaks: dict[int, int] = {}
    done = threading.Event()
    watcher = threading.Thread(target=_watch_peaks, args=(process.pid, peaks, done), daemon=True)
    watcher.start()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.stderr is not None
    err = process.stderr.read().decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{err}")
    # ru_maxrss and VmHWM are in KiB on Linux
    peak_kib = max(usage.ru_maxrss, sum(peaks.values()))
    return Measurement(seconds, peak_kib * 1.024 / 1000, usage.ru_utime + usage.ru_stime)


def _watch_peaks(pid: int, peaks: dict[int, int], done: threading.Event) -> None:
    """Until `done`: the peak RSS (VmHWM, KiB) of `pid` and of every process under it."""
    while not done.wait(0.005):
        pending = [pid]
        while pending:
            current = pending.pop()
            try:
                status = Path(f"/proc/{current}/status").read_text()
                children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            except OSError:  # gone, or not Linux
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peaks[current] = max(peaks.get(current, 0), int(line.split()[1]))
            pending.extend(int(child) for child in children)


WARM = 0.999
"""A timed run counts when at least this fraction of the files' pages was in the page cache
just before it and just after it."""


@dataclass
class CacheLog:
    """What the page cache did around the timed runs."""

    coldest: float = 1.0
    """The smallest resident fraction seen before or after a run that was kept."""
    repeated: int = 0
    """Runs timed again because pages were evicted around them."""


def interleaved(
    commands: dict[str, list[str]], files: list[Path], repeat: int, log: CacheLog
) -> dict[str, Measurement]:
    """Median wall time and largest peak RSS of each command over `repeat` rounds.

    Contenders take turns (load from other processes drifts), and the files are read once,
    untimed, before every run: this VM reclaims page cache it sees as cold (kdamond), so
    "warm" has to be re-established each time. A run around which pages were evicted (they
    were read from disk, by `cat` or by bnwd) is timed again, up to twice.
    """
    runs: dict[str, list[Measurement]] = {name: [] for name in commands}
    for _ in range(repeat):
        for name, command in commands.items():
            runs[name].append(timed_warm(command, files, log))
    return {
        name: Measurement(
            statistics.median(r.seconds for r in found),
            max(r.peak_rss_mb for r in found),
            statistics.median(r.cpu_seconds for r in found),
        )
        for name, found in runs.items()
    }


FLOOR_SCRIPT = Path(__file__).resolve().parent / "sweep_floor.py"
FLOOR_LABEL = "floor: bnwd reading and sweeping only"
"""`sweep_floor.py`: bnwd's analysis with nothing computed from its sweeps and no output."""


def bnwd_command(folder: Path, output: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "bnwd_cli", "inspect", str(folder),
        "--format", "json", "-o", str(output), *extra,
    ]  # fmt: skip


def warm(files: list[Path]) -> None:
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


def timed_warm(
    command: list[str], files: list[Path], log: CacheLog, cwd: Path | None = None
) -> Measurement:
    """`measure(command)` with every page of `files` in the page cache before and after."""
    for attempt in range(3):
        warm(files)
        before = resident_fraction(files)
        if before < WARM:
            warm(files)
            before = resident_fraction(files)
        found = measure(command, cwd)
        after = resident_fraction(files)
        if min(before, after) >= WARM or attempt == 2:
            log.coldest = min(log.coldest, before, after)
            return found
        log.repeated += 1
    raise AssertionError("unreachable")


POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python 3.12 names it


def huge_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' bytes whose page cache is in 2 MiB folios, which map with one
    page-table entry (a map of each file populated, then `FilePmdMapped` of /proc/self/smaps).
    Both `cat` and bnwd slow down when the cache is in small folios (the files were evicted and
    read back), `cat` the more: it copies page by page. None where Linux does not tell."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return None
    total = huge_kb = 0
    maps = []
    try:
        for path in files:
            size = path.stat().st_size
            if size == 0:
                continue
            with path.open("rb") as handle:
                m = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            maps.append(m)
            m.madvise(POPULATE_READ)
            total += size
        names = {str(p.resolve()) for p in files}
        current = False
        for line in smaps.read_text().splitlines():
            if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                current = line.split()[-1] in names
            elif current and line.startswith("FilePmdMapped:"):
                huge_kb += int(line.split()[1])
    finally:
        for m in maps:
            m.close()
    return huge_kb * 1024 / total if total else None


def huge_fraction_in_child(files: list[Path]) -> float | None:
    """`huge_fraction` in a process of its own: mapping the files in this one would raise the
    peak RSS every later child reports (see `main`)."""
    done = subprocess.run(
        [sys.executable, __file__, "--folio-fraction", *map(str, files)],
        capture_output=True,
        text=True,
        check=True,
    )
    text = done.stdout.strip()
    return None if text == "None" else float(text)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def resident_fraction(files: list[Path]) -> float:
    """Fraction of the files' pages in the page cache (mincore on a fresh read-only map)."""
    import numpy as np

    page = mmap.PAGESIZE
    total = resident = 0
    for path in files:
        size = path.stat().st_size
        if size == 0:
            continue
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
            pages = -(-size // page)
            vec = (ctypes.c_ubyte * pages)()
            view = np.frombuffer(m, dtype=np.uint8, count=1)
            address = view.__array_interface__["data"][0]
            if _libc.mincore(ctypes.c_void_p(address), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
            del view
            resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
            total += pages
    return resident / total if total else 1.0


def check_agreement(bnwd_json: Path, obvious_json: Path) -> float:
    """Largest relative disagreement on relative steps (the obvious script works in float32)."""
    report = json.loads(bnwd_json.read_text())
    obvious = json.loads(obvious_json.read_text())
    worst = 0.0
    for layer in report["layers"]:
        rows = obvious.get(layer["name"])
        if rows is None:
            continue
        for point, row in zip(layer["points"], rows, strict=True):
            ours, theirs = point.get("relative_step"), row.get("relative_step")
            if ours is not None and theirs is not None and theirs > 1e-30:
                worst = max(worst, abs(ours - theirs) / theirs)
    return worst


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(__file__).resolve().parent.parent / ".bench",
        help="where the synthetic runs are written (default: .bench/ in the repository, git-ignored)",
    )
    parser.add_argument("--params", type=float, default=RESNET50_PARAMS)
    parser.add_argument("--checkpoints", type=int, default=20, help="checkpoints in the timed run")
    parser.add_argument(
        "--memory-checkpoints",
        default="5,10,40",
        help="run lengths for memory (the window of bnwd's sweep is full from 9 on)",
    )
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contender (median)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--bnwd-arg", action="append", default=[], help="extra bnwd argument")
    parser.add_argument("--clean", action="store_true", help="delete --data when done")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folio-fraction", nargs="+", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.folio_fraction:
        print(huge_fraction(args.folio_fraction))
        return 0

    memory_counts = sorted(int(c) for c in args.memory_checkpoints.split(","))
    formats = [f for f in args.formats.split(",") if f]
    shapes = shapes_for(args.params)
    count = max(args.checkpoints, *memory_counts)
    print(
        f"model: ResNet-50 shapes, {count_params(shapes) / 1e6:.1f}M parameters, "
        f"{len(shapes)} tensors; optimizer state: {args.optimizer}; {count} checkpoints",
        file=sys.stderr,
    )
    if args.generate_only:
        generate(args.data, shapes, count, args.optimizer)
        return 0
    # Generated in a child: this process must stay small, because a child's ru_maxrss starts
    # from the RSS of the process that spawned it (Linux carries it across fork and exec).
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--generate-only",
            *(argv if argv is not None else sys.argv[1:]),
        ],
        check=True,
    )
    # Time bnwd as installed: a regular install has bytecode; an editable one under
    # PYTHONDONTWRITEBYTECODE would compile every module on every run (about 60 ms).
    import bnwd_cli

    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(Path(bnwd_cli.__file__).parent)], check=True
    )
    scratch = Path(tempfile.mkdtemp(prefix="bnwd-bench-"))
    script = scratch / "obvious.py"
    script.write_text(OBVIOUS_SCRIPT)
    failures: list[str] = []
    lines: list[str] = []
    floors: list[str] = []
    cache = CacheLog()
    load_before = os.getloadavg()[0]
    try:
        lines.append(
            f"ResNet-50-shaped run ({count_params(shapes) / 1e6:.1f}M float32 parameters, "
            f"{args.optimizer} state in the torch files), {args.checkpoints} checkpoints; "
            f"median of {args.repeat} runs, page cache warm, {os.cpu_count()} cores"
        )
        lines.append("")
        lines.append(
            "| format | data | contender | wall s | x raw read | obvious / this | CPU s "
            "| peak RSS MB |"
        )
        lines.append("|---|---|---|---:|---:|---:|---:|---:|")
        for fmt in formats:
            folder = subset(args.data, fmt, args.checkpoints)
            files = sorted(folder.iterdir())
            one_mb = max(f.stat().st_size for f in files) / MB
            out_json = scratch / f"{fmt}.json"
            obvious_json = scratch / f"{fmt}-obvious.json"
            timed = interleaved(
                {
                    "raw": ["cat", *map(str, files)],
                    "obvious": [sys.executable, str(script), str(folder), str(obvious_json)],
                    "bnwd": bnwd_command(folder, out_json, args.bnwd_arg),
                    "floor": [sys.executable, str(FLOOR_SCRIPT), str(folder)],
                    "numpy": [sys.executable, "-c", "import numpy"],
                },
                files,
                args.repeat,
                cache,
            )
            raw, obvious, ours = timed["raw"], timed["obvious"], timed["bnwd"]
            start, floor = timed["numpy"], timed["floor"]
            huge = huge_fraction_in_child(files)
            if huge is not None:
                floors.append(
                    f"{fmt}: {100 * huge:.0f}% of the files' page cache in 2 MiB folios "
                    "(the rest in smaller ones: slower to copy and to map, for cat and bnwd)"
                )
            disagreement = check_agreement(out_json, obvious_json)
            data = f"{len(files)} x {one_mb:.0f} MB"
            for label, m in (
                ("raw read (cat)", raw),
                ("obvious script", obvious),
                ("bnwd", ours),
                (FLOOR_LABEL, floor),
            ):
                lines.append(
                    f"| {fmt} | {data} | {label} | {m.seconds:.2f} | {m.seconds / raw.seconds:.2f} "
                    f"| {obvious.seconds / m.seconds:.2f} | {m.cpu_seconds:.2f} "
                    f"| {m.peak_rss_mb:.0f} |"
                )
            if ours.seconds > 1.5 * raw.seconds:
                failures.append(f"{fmt}: bnwd {ours.seconds / raw.seconds:.2f}x raw read (> 1.5x)")
            if obvious.seconds < 3 * ours.seconds:
                failures.append(f"{fmt}: only {obvious.seconds / ours.seconds:.2f}x the obvious")
            if disagreement > 1e-3:
                failures.append(
                    f"{fmt}: relative steps differ from the obvious script's by {disagreement:.1e}"
                )
            cores = os.cpu_count() or 1
            floors.append(
                f"{fmt}: bnwd used {ours.cpu_seconds:.2f} CPU-s; spread perfectly over {cores} "
                f"cores that work takes at least {ours.cpu_seconds / cores:.2f} s "
                f"({ours.cpu_seconds / cores / raw.seconds:.2f}x the raw read)"
            )
            floors.append(
                f"{fmt}: starting Python and importing numpy, nothing else, takes "
                f"{start.seconds:.2f} s ({start.seconds / raw.seconds:.2f}x the raw read)"
            )
            floors.append(
                f"{fmt}: bnwd's reading and sweeping alone (the floor row) take "
                f"{floor.seconds:.2f} s ({floor.seconds / raw.seconds:.2f}x the raw read); what "
                f"it computes from the sums and its output add {ours.seconds - floor.seconds:.2f} s"
            )
            lines_note = (
                f"{fmt}: largest relative difference of bnwd's relative steps from the (float32) "
                f"obvious script's: {disagreement:.1e}"
            )
            print(lines_note, file=sys.stderr)
        lines.append("")
        lines.extend(floors)
        lines.append("")
        lines.append(
            "| format | checkpoints | one checkpoint MB | bnwd peak RSS MB | budget MB "
            "| bnwd wall s | cat wall s |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        marginal: list[str] = []
        for fmt in formats:
            runs: list[tuple[int, Measurement, Measurement]] = []
            for n in memory_counts:
                folder = subset(args.data, fmt, n)
                files = sorted(folder.iterdir())
                one_mb = max(f.stat().st_size for f in files) / MB
                # as many rounds as the timed run: the largest peak and the median times (a
                # peak moves by 10-20 MB with the page cache's folios, in each of bnwd's
                # processes)
                both = interleaved(
                    {
                        "raw": ["cat", *map(str, files)],
                        "bnwd": bnwd_command(folder, scratch / "memory.json", args.bnwd_arg),
                    },
                    files,
                    args.repeat,
                    cache,
                )
                raw, m = both["raw"], both["bnwd"]
                runs.append((n, m, raw))
                lines.append(
                    f"| {fmt} | {n} | {one_mb:.0f} | {m.peak_rss_mb:.0f} | {one_mb + 300:.0f} "
                    f"| {m.seconds:.2f} | {raw.seconds:.2f} |"
                )
                if m.peak_rss_mb > one_mb + 300:
                    failures.append(f"{fmt}: peak RSS {m.peak_rss_mb:.0f} MB with {n} checkpoints")
            (n0, first, raw0), (n1, last, raw1) = runs[0], runs[-1]
            # bnwd holds a window of WINDOW checkpoints (and the one before) open: its memory
            # may grow until the window is full, and must not grow after that
            full = next(((n, m) for n, m, _ in runs if n > WINDOW), (n0, first))
            if last.peak_rss_mb > full[1].peak_rss_mb * 1.1 + 20:
                failures.append(
                    f"{fmt}: peak RSS grows with the run "
                    f"({full[1].peak_rss_mb:.0f} MB with {full[0]} -> "
                    f"{last.peak_rss_mb:.0f} MB with {n1})"
                )
            if n1 > n0:
                ours_each = (last.seconds - first.seconds) / (n1 - n0)
                raw_each = (raw1.seconds - raw0.seconds) / (n1 - n0)
                marginal.append(
                    f"{fmt}: each further checkpoint costs bnwd {1000 * ours_each:.0f} ms, "
                    f"cat {1000 * raw_each:.0f} ms ({ours_each / raw_each:.1f}x); fixed cost "
                    f"(start-up, imports, rendering) {first.seconds - n0 * ours_each:.2f} s"
                )
        lines.append("")
        lines.extend(marginal)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if args.clean:
            shutil.rmtree(args.data, ignore_errors=True)
    load_after = os.getloadavg()[0]
    lines.append(f"load average before / after: {load_before:.2f} / {load_after:.2f}")
    lines.append(
        f"page cache: at least {100 * cache.coldest:.2f}% of the files resident before and after "
        f"every timed run; {cache.repeated} run(s) timed again after pages were evicted"
    )
    if cache.coldest < WARM:
        failures.append(
            f"page cache not warm ({100 * cache.coldest:.1f}% resident): timings unsure"
        )
    print("\n".join(lines))
    for failure in failures:
        print(f"MISSED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
