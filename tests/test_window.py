"""The window sweep (`kernels.window_stats`, `_sweep.window_sums`) against references computed here.

- `window_sums` called directly, on geometries that cut its 256-element blocks at odd places,
  against per-row float64 sums written out in numpy (pairs, a missing first tensor, rectangles,
  bfloat16 / float64 inputs, linear and Adam step specs, the arguments it must refuse);
- `window_stats` against the `tensor_stats` of each pair it stands for, field by field, with and
  without a previous checkpoint and optimizer steps, including the pairs that leave the batched
  figures for `_stats_from_sums` (NaN/Inf, pure rescalings and flips, a derived previous weight
  that may cancel, zero tensors) and the inputs the compiled sweep does not take;
- the sweep in pieces (`PIECE_BYTES`) and the `release` callback, which must see every byte of
  every input (pair by pair too); two worker threads against one; the numpy fallback against the
  compiled path;
- a relative step of 1e-7 between float32 checkpoints inside a window, against exact integer
  arithmetic on the float32 values.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bnwd_cli.checkpoints.arrays import BFLOAT16, widened
from bnwd_cli.metrics import kernels
from bnwd_cli.metrics.kernels import (
    ADAM,
    LINEAR,
    StepFormula,
    TensorStats,
    tensor_stats,
    window_stats,
)
from bnwd_cli.metrics.optimizer import OptimizerFamily, ParamHyper
from bnwd_cli.metrics.updates import plan_step

needs_compiled = pytest.mark.skipif(not kernels.compiled(), reason="the C sweep is not built here")

Spec = tuple[Any, ...]

# ----------------------------------------------------------------------------- helpers


def bf16(values: np.ndarray) -> np.ndarray:
    """`values` as bfloat16 (the upper 16 bits of their float32, truncated: exact)."""
    raw = (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return raw.view(BFLOAT16)


def f64(t: np.ndarray) -> np.ndarray:
    return widened(t).astype(np.float64)


def walk(shape: tuple[int, ...], count: int, seed: int, relative: float = 1e-2) -> list[np.ndarray]:
    """`count` float32 checkpoints of a random walk, each step about `relative` of the weight."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    found = []
    for _ in range(count):
        w = w + relative * rng.standard_normal(shape)
        found.append(w.astype(np.float32))
    return found


def adam_values(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    m = (1e-3 * rng.standard_normal(shape)).astype(np.float32)
    v = (1e-6 * rng.random(shape) + 1e-9).astype(np.float32)
    return m, v


SGD_HYPER = ParamHyper(lr=0.1, weight_decay=5e-4, group=0, momentum=0.9, dampening=0.0)
ADAM_HYPER = ParamHyper(lr=1e-3, weight_decay=0.05, group=0, betas=(0.9, 0.999), eps=1e-8)


def sgd_step(w: np.ndarray, rng: np.random.Generator, per_row: bool) -> StepFormula:
    """The heavy-ball SGD step `plan_step` builds from a random momentum buffer."""
    state = {"momentum_buffer": (1e-3 * rng.standard_normal(w.shape)).astype(np.float32)}
    plan = plan_step(w, state, SGD_HYPER, OptimizerFamily.SGD_MOMENTUM, per_row=per_row)
    assert plan is not None and plan.fill.kind == LINEAR
    return plan.fill


def adamw_step(w: np.ndarray, rng: np.random.Generator, per_row: bool) -> StepFormula:
    """The AdamW step `plan_step` builds from random moments."""
    m, v = adam_values(rng, w.shape)
    state: dict[str, object] = {"step": 40.0, "exp_avg": m, "exp_avg_sq": v}
    plan = plan_step(w, state, ADAM_HYPER, OptimizerFamily.ADAMW, per_row=per_row)
    assert plan is not None and plan.fill.kind == ADAM and plan.fill.decay > 0
    return plan.fill


def step_f64(step: StepFormula, w: np.ndarray) -> np.ndarray:
    """The step written out in float64 (numpy, in torch.optim.Adam's order of operations)."""
    x = f64(step.x)
    if step.kind == LINEAR:
        return step.scale * x
    assert step.y is not None
    u = (x / step.c1) / (np.sqrt(f64(step.y)) / step.rc2 + step.eps)
    return step.scale * (u + step.decay * f64(w))


class Spy:
    """Counts the calls of some functions of `kernels` (the paths a computation took)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
        self.calls: Counter[str] = Counter()
        for name in names:
            monkeypatch.setattr(kernels, name, self._wrap(name, getattr(kernels, name)))

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return original(*args, **kwargs)

        return wrapper


# ----------------------------------------------------------------------------- comparisons

FLOAT_FIELDS = (
    "norm",
    "sum_sq",
    "diff_norm",
    "angle",
    "angular_update",
    "previous_sum_sq",
    "row_norm_min",
    "row_norm_max",
    "row_norm_cv",
)
ARRAY_FIELDS = ("row_norms", "row_angles", "row_sq")


def assert_same_stats(got: TensorStats, want: TensorStats, where: str, rel: float = 1e-12) -> None:
    """Every figure of `got` equals `want`'s: None where it is None, NaN where it is NaN, else to
    `rel` (plus 1e-15 absolute for angles: an angle computed as zero may come out 1e-17)."""
    assert got.nonfinite == want.nonfinite, where
    for name in FLOAT_FIELDS:
        x, y = getattr(got, name), getattr(want, name)
        if y is None:
            assert x is None, f"{where}: {name} = {x}, expected None"
            continue
        assert x is not None, f"{where}: {name} is None, expected {y}"
        if math.isnan(y):
            assert math.isnan(x), f"{where}: {name} = {x}, expected NaN"
            continue
        tiny = 1e-15 if "angle" in name or "update" in name else 0.0
        assert x == pytest.approx(y, rel=rel, abs=tiny), f"{where}: {name}"
    for name in ARRAY_FIELDS:
        xs, ys = getattr(got, name), getattr(want, name)
        if ys is None:
            assert xs is None, f"{where}: {name} should be None"
            continue
        assert xs is not None and xs.shape == ys.shape, f"{where}: {name}"
        tiny = 1e-15 if name == "row_angles" else 0.0
        np.testing.assert_allclose(xs, ys, rtol=rel, atol=tiny, err_msg=f"{where}: {name}")
    if want.step_stats is None:
        assert got.step_stats is None, f"{where}: unexpected step_stats"
    else:
        assert got.step_stats is not None, f"{where}: step_stats missing"
        assert_same_stats(got.step_stats, want.step_stats, f"{where} (step)", rel)


def by_pairs(
    tensors: Sequence[np.ndarray],
    previous: np.ndarray | None,
    per_row: bool,
    steps: Sequence[StepFormula | None] | None = None,
) -> list[TensorStats]:
    """What `window_stats` stands for: one `tensor_stats` per consecutive pair."""
    chain = [previous, *tensors]
    step_list = list(steps) if steps is not None else [None] * len(tensors)
    return [
        tensor_stats(chain[k + 1], chain[k], per_row=per_row, with_step=step_list[k])
        for k in range(len(tensors))
    ]


def assert_same_windows(
    got: Sequence[TensorStats], want: Sequence[TensorStats], rel: float = 1e-12
) -> None:
    assert len(got) == len(want)
    for k, (x, y) in enumerate(zip(got, want, strict=True)):
        assert_same_stats(x, y, f"pair {k}", rel)


# ----------------------------------------------------------------------------- window_sums


def window_call(
    rows: int,
    cols: int,
    item: tuple[int, int, int, int],
    tensors: Sequence[np.ndarray | None],
    kinds: Sequence[int] | None = None,
    extras: Sequence[Spec | None] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """`_sweep.window_sums` on fresh zeros (or added to `out`): pairs x 6 x rows."""
    assert kernels._compiled is not None
    n = len(tensors) - 1
    if kinds is None:
        kinds = [kernels._kind(t) or 0 for t in tensors]
    if extras is None:
        extras = [None] * n
    if out is None:
        out = np.zeros((n, 6, rows))
    kernels._compiled.window_sums(
        out, rows, cols, *item, tuple(tensors), tuple(kinds), tuple(extras)
    )
    return out


def reference_window(
    tensors: Sequence[np.ndarray | None], steps: Sequence[np.ndarray | None] | None = None
) -> np.ndarray:
    """|b|^2, |a|^2, |b-a|^2, <b-a,a>, |e|^2, <e,b> per row in float64 for each consecutive
    pair (a, b) of `tensors` (rows layout), e the pair's float64 step (or none)."""
    wide = [None if t is None else f64(t) for t in tensors]
    n = len(tensors) - 1
    rows = next(t for t in wide if t is not None).shape[0]
    out = np.zeros((n, 6, rows))
    for k in range(n):
        a, b = wide[k], wide[k + 1]
        assert b is not None
        out[k, 0] = (b * b).sum(1)
        if a is not None:
            d = b - a
            out[k, 1] = (a * a).sum(1)
            out[k, 2] = (d * d).sum(1)
            out[k, 3] = (d * a).sum(1)
        e = None if steps is None else steps[k]
        if e is not None:
            out[k, 4] = (e * e).sum(1)
            out[k, 5] = (e * b).sum(1)
    return out


def assert_sums_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-12) -> None:
    """Sums of squares to `rel`; the dot products <d,a> and <e,b>, which may cancel, to `rel`
    of the Cauchy-Schwarz bound |d||a| (|e||b|)."""
    assert got.shape == want.shape
    scale = np.abs(want).copy()
    scale[:, 3] = np.sqrt(want[:, 2] * want[:, 1])
    scale[:, 5] = np.sqrt(want[:, 4] * want[:, 0])
    excess = np.abs(got - want) - rel * scale
    assert (excess <= 0).all(), (
        f"worst excess {excess.max()} at {np.unravel_index(excess.argmax(), excess.shape)}"
    )


GEOMETRIES = [(1, 1), (1, 37), (1, 1031), (5, 513), (7, 9), (3, 1537), (16, 27)]


@needs_compiled
@pytest.mark.parametrize(("rows", "cols"), GEOMETRIES)
@pytest.mark.parametrize("n", [1, 2, 5, 64])
def test_window_sums_match_float64_reference(rows: int, cols: int, n: int) -> None:
    rng = np.random.default_rng(rows * 10_000 + cols * 10 + n)
    chain = walk((rows, cols), n + 1, seed=int(rng.integers(1 << 30)))
    got = window_call(rows, cols, (0, rows, 0, cols), chain)
    assert_sums_close(got, reference_window(chain))
    assert not got[:, 4:].any()  # no step specs: no step sums


@needs_compiled
@pytest.mark.parametrize(("rows", "cols"), [(1, 1031), (6, 77)])
def test_window_sums_without_a_first_tensor(rows: int, cols: int) -> None:
    chain = walk((rows, cols), 3, seed=4)
    got = window_call(rows, cols, (0, rows, 0, cols), [None, *chain])
    want = reference_window([None, *chain])
    assert_sums_close(got, want)
    assert (got[0, 0] > 0).all()
    assert not got[0, 1:].any()  # pair 0 has |b|^2 only
    # pairs 1 and 2 are the pairs of the chain itself
    np.testing.assert_allclose(
        got[1:], window_call(rows, cols, (0, rows, 0, cols), chain), rtol=1e-15
    )


@needs_compiled
@pytest.mark.parametrize(("rows", "cols"), [(9, 1100), (1, 5000)])
def test_window_sums_of_rectangles_add_up_to_the_whole(rows: int, cols: int) -> None:
    chain = walk((rows, cols), 4, seed=rows + cols)
    whole = window_call(rows, cols, (0, rows, 0, cols), chain)
    if rows > 1:
        cuts = [0, 2, 3, rows]
        parts = [
            window_call(rows, cols, (r0, r1, 0, cols), chain) for r0, r1 in itertools.pairwise(cuts)
        ]
        for (r0, r1), part in zip(itertools.pairwise(cuts), parts, strict=True):
            assert not np.delete(part, np.s_[r0:r1], axis=2).any()  # only its own rows
        # each row is summed the same way whatever rows are around it
        np.testing.assert_array_equal(sum(parts), whole)
        inner = window_call(rows, cols, (4, 5, 7, 1003), chain)  # an odd piece of one row
        sub = [t[4:5, 7:1003] for t in chain]
        assert_sums_close(inner[:, :, 4:5], reference_window(sub))
        assert not np.delete(inner, 4, axis=2).any()
    else:
        cuts = [0, 1, 600, 1537, 4099, cols]  # cutting the 256-element blocks off their grid
        total = np.zeros_like(whole)
        for c0, c1 in itertools.pairwise(cuts):
            window_call(rows, cols, (0, 1, c0, c1), chain, out=total)  # sums are added to out
        np.testing.assert_allclose(total, whole, rtol=1e-13)
        assert_sums_close(total, reference_window(chain))
    again = window_call(rows, cols, (0, rows, 0, cols), chain, out=whole.copy())
    np.testing.assert_array_equal(again, 2 * whole)  # added, not written over


@needs_compiled
def test_window_sums_of_files_mapped_read_only(tmp_path: Path) -> None:
    """The sweep maps a mapped file's pages in before it reads them (MADV_POPULATE_READ): the
    sums are those of the file's values, for a whole tensor and for a piece of it."""
    rows, cols = 64, 1031  # 264 KB a checkpoint: above the size the sweep maps in at once
    chain = walk((rows, cols), 4, seed=17)
    path = tmp_path / "run.bin"
    path.write_bytes(b"".join(t.tobytes() for t in chain))
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=(4, rows, cols))
    views = [mapped[k] for k in range(4)]
    assert_sums_close(window_call(rows, cols, (0, rows, 0, cols), views), reference_window(chain))
    part = window_call(rows, cols, (5, 40, 0, cols), views)
    assert_sums_close(part[:, :, 5:40], reference_window([t[5:40] for t in chain]))
    assert not part[:, :, :5].any() and not part[:, :, 40:].any()


GUARDED_SWEEP = """
import ctypes, mmap, sys
import numpy as np
from bnwd_cli.metrics import kernels

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
page = mmap.PAGESIZE
kept = []

def guarded(values):
    # `values` as the last bytes before a page that may not be read (PROT_NONE)
    raw = np.ascontiguousarray(values).tobytes()
    span = -(-len(raw) // page) * page
    region = mmap.mmap(-1, span + page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert libc.mprotect(base + span, page, 0) == 0, ctypes.get_errno()
    region[span - len(raw) : span] = raw
    kept.append(region)
    view = np.frombuffer(region, dtype=values.dtype, count=values.size, offset=span - len(raw))
    return view.reshape(values.shape)

rows, cols, n = int(sys.argv[1]), int(sys.argv[2]), 3
rng = np.random.default_rng(rows + cols)
chain = [rng.standard_normal((rows, cols)).astype(np.float32) for _ in range(n + 1)]
x = rng.standard_normal((rows, cols)).astype(np.float32)
m, v = rng.standard_normal((rows, cols)), rng.random((rows, cols)) + 0.1
specs = (
    (kernels.LINEAR, guarded(x), 0, None, 0, -0.1, 1.0, 1.0, 0.0, 0.0),
    None,
    (kernels.ADAM, guarded(m), 1, guarded(v), 1, -1e-3, 0.5, 0.9, 1e-8, 0.01),
)
tensors = tuple(guarded(t) for t in chain)
out = np.zeros((n, 6, rows))
for r0, r1, c0, c1 in [(0, rows, 0, cols), (rows - 1, rows, cols // 3, cols)]:
    kernels._compiled.window_sums(out, rows, cols, r0, r1, c0, c1, tensors, (0,) * (n + 1), specs)
print(float(out.sum()))
"""


@needs_compiled
@pytest.mark.skipif(sys.platform != "linux", reason="mprotect through ctypes")
@pytest.mark.parametrize(("rows", "cols"), [(3, 1031), (1, 256), (40, 300)])
def test_window_sums_read_nothing_past_their_inputs(rows: int, cols: int) -> None:
    """Every input ends where an unreadable page begins: a sweep that read (or prefetched with a
    load) past the last element of a piece would die of SIGSEGV. In a child process, so that the
    crash is a failed test."""
    done = subprocess.run(
        [sys.executable, "-c", GUARDED_SWEEP, str(rows), str(cols)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert math.isfinite(float(done.stdout))


@needs_compiled
def test_window_sums_take_bfloat16_and_float64() -> None:
    rows, cols = 4, 1201
    rng = np.random.default_rng(12)
    values = walk((rows, cols), 4, seed=3)
    halves = [bf16(v) for v in values]
    got = window_call(rows, cols, (0, rows, 0, cols), halves, [2] * 4)
    assert_sums_close(got, reference_window(halves))
    doubles = [v.astype(np.float64) + 1e-9 * rng.standard_normal((rows, cols)) for v in values]
    got = window_call(rows, cols, (0, rows, 0, cols), doubles, [1] * 4)
    assert_sums_close(got, reference_window(doubles))
    # kinds may differ along the window (a checkpoint saved in another dtype)
    mixed: list[np.ndarray | None] = [halves[0], values[1], doubles[2], halves[3]]
    got = window_call(rows, cols, (0, rows, 0, cols), mixed, [2, 0, 1, 2])
    assert_sums_close(got, reference_window(mixed))


@needs_compiled
@pytest.mark.parametrize(("rows", "cols"), [(1, 2049), (5, 333)])
def test_window_sums_of_linear_and_adam_steps(rows: int, cols: int) -> None:
    rng = np.random.default_rng(rows + cols)
    chain = walk((rows, cols), 4, seed=9)  # 3 pairs
    x = (1e-3 * rng.standard_normal((rows, cols))).astype(np.float32)
    m, v = adam_values(rng, (rows, cols))
    lr, wd, beta1, beta2, eps, t = 1e-3, 0.05, 0.9, 0.999, 1e-8, 37
    c1, rc2 = 1 - beta1**t, math.sqrt(1 - beta2**t)
    scale = -lr / (1 - lr * wd)
    linear: Spec = (LINEAR, x, 0, None, 0, -0.1, 1.0, 1.0, 0.0, 0.0)
    adam: Spec = (ADAM, m, 0, v, 0, scale, c1, rc2, eps, wd)
    adam_bf16: Spec = (ADAM, bf16(m), 2, v.astype(np.float64), 1, -lr, c1, rc2, eps, 0.0)
    b2 = f64(chain[2])  # the current weight of pair 1 (AdamW's decay term)
    m64, v64 = f64(m), f64(v)
    expected_steps = [
        -0.1 * f64(x),
        scale * ((m64 / c1) / (np.sqrt(v64) / rc2 + eps) + wd * b2),
        -lr * ((f64(bf16(m)) / c1) / (np.sqrt(v64) / rc2 + eps)),
    ]
    got = window_call(rows, cols, (0, rows, 0, cols), chain, extras=[linear, adam, adam_bf16])
    assert_sums_close(got, reference_window(chain, expected_steps))
    assert (got[:, 4] > 0).all()
    # a step spec on one pair only; the first tensor missing
    tail: list[np.ndarray | None] = [None, chain[1], chain[2]]
    got = window_call(rows, cols, (0, rows, 0, cols), tail, extras=[None, adam])
    want = reference_window(tail, [None, expected_steps[1]])
    assert_sums_close(got, want)
    assert not got[0, 4:].any()


@needs_compiled
def test_window_sums_refuse_bad_arguments() -> None:
    rows, cols = 2, 10
    t = np.zeros((rows, cols), dtype=np.float32)

    def call(*args: Any) -> None:
        assert kernels._compiled is not None
        kernels._compiled.window_sums(*args)

    def out(n: int) -> np.ndarray:
        return np.zeros((n, 6, rows))

    whole = (rows, cols, 0, rows, 0, cols)
    many = 65  # pairs: one more than MAX_WINDOW
    assert kernels.WINDOW_MAX == 64
    with pytest.raises(ValueError, match="need 2 to 65 tensors"):
        call(out(many), *whole, (t,) * (many + 1), (0,) * (many + 1), (None,) * many)
    call(out(64), *whole, (t,) * 65, (0,) * 65, (None,) * 64)  # the largest window is taken
    with pytest.raises(ValueError, match="need 2"):
        call(out(1), *whole, (t,), (0,), ())  # no pair at all
    with pytest.raises(ValueError, match="kinds"):
        call(out(2), *whole, (t, t, t), (0, 0), (None, None))
    with pytest.raises(ValueError, match="step spec"):
        call(out(2), *whole, (t, t, t), (0, 0, 0), (None,))
    with pytest.raises(ValueError, match="only the first tensor may be None"):
        call(out(2), *whole, (t, None, t), (0, 0, 0), (None, None))
    with pytest.raises(ValueError, match="shorter"):  # a tensor's buffer
        call(out(2), *whole, (t, t[:1], t), (0, 0, 0), (None, None))
    with pytest.raises(ValueError, match="shorter"):  # float32 read as float64: half the size
        call(out(2), *whole, (t, t, t), (0, 1, 0), (None, None))
    with pytest.raises(ValueError, match="shorter"):  # out
        call(np.zeros((1, 6, rows)), *whole, (t, t, t), (0, 0, 0), (None, None))
    with pytest.raises(ValueError, match="shorter"):  # a step's x
        short: Spec = (LINEAR, t[:1], 0, None, 0, 1.0, 1.0, 1.0, 0.0, 0.0)
        call(out(1), *whole, (t, t), (0, 0), (short,))
    with pytest.raises(ValueError, match="kind"):
        call(out(1), *whole, (t, t), (0, 7), (None,))
    with pytest.raises(ValueError, match="step kind"):
        bad: Spec = (3, t, 0, None, 0, 1.0, 1.0, 1.0, 0.0, 0.0)
        call(out(1), *whole, (t, t), (0, 0), (bad,))
    for rect in [(0, 3, 0, cols), (0, rows, 0, cols + 1), (1, 0, 0, cols), (0, rows, -1, 5)]:
        with pytest.raises(ValueError, match="outside"):
            call(out(1), rows, cols, *rect, (t, t), (0, 0), (None,))


# ----------------------------------------------------------------------------- window_stats


@pytest.fixture(params=["compiled", "numpy"])
def sweep(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with the compiled sweep, then with the numpy one (BNWD_NO_COMPILED=1)."""
    if request.param == "numpy":
        monkeypatch.setenv("BNWD_NO_COMPILED", "1")
    else:
        monkeypatch.delenv("BNWD_NO_COMPILED", raising=False)
        if not kernels.compiled():
            pytest.skip("the compiled sweep (bnwd_cli/metrics/_sweep*.so) is not built here")
    assert kernels.compiled() == (request.param == "compiled")
    return str(request.param)


SHAPE = (12, 6, 5)
CASES = ["plain", "sgd", "adam", "formula", "nonfinite", "rescale", "tiny", "zero"]


def window_case(
    case: str, per_row: bool
) -> tuple[list[np.ndarray], np.ndarray, list[StepFormula | None]]:
    """Five checkpoints, the one before them and the optimizer steps, as `case` says."""
    rng = np.random.default_rng(CASES.index(case))
    *chain, last = walk(SHAPE, 6, seed=CASES.index(case) + 100)
    before, tensors = chain[0], [*chain[1:], last]
    steps: list[StepFormula | None] = [None] * 5
    if case == "nonfinite":
        tensors[1] = tensors[1].copy()
        tensors[1][3, 2, 1] = np.nan
        tensors[3] = tensors[3].copy()
        tensors[3][0, 0, 0] = np.inf
    elif case == "rescale":
        tensors[1] = tensors[0] * np.float32(2.0)  # exact: no turn at all
        tensors[2] = tensors[1] * np.float32(-0.25)  # flipped (and shorter than the step)
        # one row rescaled but for a turn of a few 1e-8 (by one ulp each), the others turn
        doubled = tensors[3][0] * np.float32(2.0)
        up = rng.random(doubled.shape) < 0.5
        tensors[4] = tensors[4].copy()
        tensors[4][0] = np.where(
            up,
            np.nextafter(doubled, np.float32(np.inf)),
            np.nextafter(doubled, np.float32(-np.inf)),
        )
    elif case == "tiny":
        tensors[1] = tensors[1] * np.float32(1e-4)  # next to a much larger weight, both ways
    elif case == "zero":
        tensors[2] = np.zeros(SHAPE, np.float32)
        before = np.zeros(SHAPE, np.float32)
    if case in ("sgd", "nonfinite", "zero"):
        steps = [sgd_step(t, rng, per_row) if k != 3 else None for k, t in enumerate(tensors)]
    elif case == "adam":
        steps = [adamw_step(t, rng, per_row) for t in tensors]
    elif case == "formula":
        m, v = adam_values(rng, SHAPE)
        steps = [
            StepFormula(LINEAR, 1e-3 * rng.standard_normal(SHAPE)),  # float64 x
            StepFormula(ADAM, bf16(m), v, scale=-1e-3, c1=0.5, rc2=0.2, eps=1e-8),
            None,
            StepFormula(LINEAR, bf16(rng.standard_normal(SHAPE)), scale=-0.01),
            StepFormula(ADAM, m, v.astype(np.float64), scale=-2e-3, c1=0.9, rc2=0.7, decay=0.1),
        ]
    elif case == "rescale":
        steps[3] = StepFormula(LINEAR, 0.5 * tensors[3].astype(np.float64))  # a radial step
        x = 1e-2 * rng.standard_normal(SHAPE)
        # radial in one row, but for a turn of a few 1e-9 (b - x exact in float64)
        x[5] = 0.25 * tensors[0][5] + rng.integers(-8, 9, SHAPE[1:]) * 2.0**-30
        steps[0] = StepFormula(LINEAR, x)
        steps[4] = sgd_step(tensors[4], rng, per_row)
    elif case == "tiny":
        for k in (0, 2, 4):  # steps from a previous weight 1e-4 of the current one
            slack = 1e-4 * rng.standard_normal(SHAPE)
            steps[k] = StepFormula(LINEAR, tensors[k].astype(np.float64) - slack)
        x = 1e-3 * rng.standard_normal(SHAPE)
        # and in one row only: a previous row 1e-4 of the current one, half of it across
        x[2] = tensors[3][2] - 1e-4 * (tensors[3][2] + rng.standard_normal(SHAPE[1:]))
        steps[3] = StepFormula(LINEAR, x)
    return tensors, before, steps


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_previous", [True, False], ids=["previous", "first"])
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "whole"])
def test_window_equals_tensor_stats_pair_by_pair(
    case: str, with_previous: bool, per_row: bool, sweep: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors, before, steps = window_case(case, per_row)
    previous = before if with_previous else None
    spy = Spy(
        monkeypatch, "_window_figures", "_window_by_pairs", "_pair_from_sums", "_stats_from_sums"
    )
    got = window_stats(tensors, previous, per_row=per_row, steps=steps)
    paths = dict(spy.calls)
    want = by_pairs(tensors, previous, per_row, steps)
    assert_same_windows(got, want)
    # the test ran the path it is meant for
    if sweep == "compiled":
        assert paths.get("_window_figures") == 1 and not paths.get("_window_by_pairs")
        fallbacks = paths.get("_pair_from_sums", 0) + paths.get("_stats_from_sums", 0)
        if case in ("plain", "sgd", "adam", "formula"):
            assert fallbacks == 0  # all figures batched
        elif case in ("nonfinite", "rescale", "tiny"):
            assert fallbacks > 0
    else:
        assert paths.get("_window_by_pairs") == 1 and not paths.get("_window_figures")
    # and a few figures against what they must be, whatever computes them
    if with_previous:
        b, a = f64(tensors[0]), f64(before)
        assert got[0].diff_norm == pytest.approx(float(np.linalg.norm(b - a)), rel=1e-12)
        assert got[0].previous_sum_sq == pytest.approx(float(np.square(a).sum()), rel=1e-12)
    else:
        assert got[0].diff_norm is None and got[0].angle is None
    assert got[4].norm == pytest.approx(float(np.linalg.norm(f64(tensors[4]))), rel=1e-12)
    rows = SHAPE[0] if per_row else 1
    for k, stats in enumerate(got):
        assert (stats.row_norms is not None) == per_row
        assert stats.row_sq is not None and stats.row_sq.shape == (rows,)
        step = steps[k]
        if step is not None and case != "nonfinite":
            assert stats.step_stats is not None
            e = step_f64(step, tensors[k])
            assert stats.step_stats.diff_norm == pytest.approx(float(np.linalg.norm(e)), rel=1e-9)
            p = f64(tensors[k]) - e  # the previous weight the step implies
            assert stats.step_stats.previous_sum_sq == pytest.approx(
                float(np.square(p).sum()), rel=1e-9
            )
    if case == "nonfinite":
        assert [s.nonfinite for s in got] == [0, 1, 0, 1, 0]
        assert math.isnan(got[1].norm) and math.isnan(got[3].norm)
    elif case == "rescale":
        assert got[1].angle == pytest.approx(0.0, abs=1e-12)
        assert got[2].angle == pytest.approx(math.pi, rel=1e-12)
        step_stats = got[3].step_stats
        assert step_stats is not None and step_stats.angle == pytest.approx(0.0, abs=1e-12)
        if per_row:
            assert got[1].row_angles is not None and got[2].row_angles is not None
            np.testing.assert_allclose(got[1].row_angles, 0.0, atol=1e-12)
            np.testing.assert_allclose(got[2].row_angles, math.pi, rtol=1e-12)
            first = got[0].step_stats
            assert got[4].row_angles is not None
            assert first is not None and first.row_angles is not None
            # the rows the sums cannot give (their turn would drown), against exact integers
            turn = exact_pair(tensors[3][0], tensors[4][0])[1]
            assert 1e-9 < turn < 1e-6
            assert got[4].row_angles[0] == pytest.approx(turn, rel=1e-6)
            assert got[4].row_angles[1] > 1e-3  # the other rows turn
            step = steps[0]
            assert step is not None
            b5 = f64(tensors[0][5])
            step_turn = exact_pair(b5 - f64(step.x)[5], b5)[1]
            assert 1e-10 < step_turn < 1e-6
            assert first.row_angles[5] == pytest.approx(step_turn, rel=1e-6)
            assert first.row_angles[1] > 1e-4
    elif case == "zero":
        assert got[2].norm == 0.0
        assert got[2].angle is not None and math.isnan(got[2].angle)
        assert got[3].angle is not None and math.isnan(got[3].angle)  # from a zero weight
        if per_row:
            assert got[2].row_norm_cv is None and got[2].row_norm_max == 0.0
            assert got[2].angular_update is None  # no row has an angle
        if with_previous:
            assert got[0].angle is not None and math.isnan(got[0].angle)


def test_window_empty_and_mismatched_inputs() -> None:
    assert window_stats([], None, per_row=True) == []
    a, b = walk((4, 5), 2, seed=1)
    with pytest.raises(ValueError, match="steps"):
        window_stats([a, b], None, per_row=True, steps=[None])
    with pytest.raises(ValueError, match="shapes differ"):
        window_stats([a, b.reshape(5, 4)], None, per_row=True)
    with pytest.raises(ValueError, match="shapes differ"):
        window_stats([a, b], b.reshape(20), per_row=True)


@pytest.mark.parametrize("kind", ["float16", "transposed", "long window", "int"])
def test_inputs_of_other_kinds_give_the_pair_figures(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = kernels.WINDOW_MAX + 2 if kind == "long window" else 4
    tensors = walk((6, 40), count, seed=5)
    if kind == "float16":
        tensors = [t.astype(np.float16) for t in tensors]
    elif kind == "transposed":
        tensors[1] = np.ascontiguousarray(tensors[1].T).T  # same values, not C-contiguous
    elif kind == "int":
        tensors = [(100 * t).astype(np.int32) for t in tensors]
    spy = Spy(monkeypatch, "_window_by_pairs")
    got = window_stats(tensors[1:], tensors[0], per_row=True)
    # integers are measured as float64, which the compiled sweep takes
    assert spy.calls["_window_by_pairs"] == (0 if kind == "int" and kernels.compiled() else 1)
    assert_same_windows(got, by_pairs(tensors[1:], tensors[0], per_row=True))
    b, a = f64(tensors[2]), f64(tensors[1])
    assert got[1].diff_norm == pytest.approx(float(np.linalg.norm(b - a)), rel=1e-12)


@pytest.mark.parametrize("which", ["linear x float16", "linear x transposed", "adam y float16"])
def test_steps_of_other_kinds_give_the_pair_figures(
    which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step the compiled sweep cannot take (its x or its Adam y of a dtype it does not read,
    or not C-contiguous) sends the window to the pair-by-pair path, with the same figures."""
    tensors = walk((6, 40), 4, seed=9)
    rng = np.random.default_rng(9)
    x = 1e-3 * rng.standard_normal((6, 40)).astype(np.float32)
    m, v = rng.standard_normal((6, 40)).astype(np.float32), rng.random((6, 40)).astype(np.float32)
    odd: StepFormula
    if which == "linear x float16":
        odd = StepFormula(LINEAR, x.astype(np.float16), scale=-0.5)
    elif which == "linear x transposed":
        odd = StepFormula(LINEAR, np.ascontiguousarray(x.T).T, scale=-0.5)
    else:
        odd = StepFormula(ADAM, m, v.astype(np.float16), scale=-1e-3, c1=0.5, rc2=0.2, eps=1e-8)
    steps: list[StepFormula | None] = [StepFormula(LINEAR, x, scale=-0.5), odd, None]
    spy = Spy(monkeypatch, "_window_by_pairs")
    got = window_stats(tensors[1:], tensors[0], per_row=True, steps=steps)
    assert spy.calls["_window_by_pairs"] == 1
    assert_same_windows(got, by_pairs(tensors[1:], tensors[0], per_row=True, steps=steps))
    step = got[1].step_stats
    assert step is not None
    b = f64(tensors[2])
    d = odd.evaluate(b)  # the step in float64, as the optimizer formula gives it
    assert step.diff_norm == pytest.approx(float(np.linalg.norm(d)), rel=1e-12)


# ----------------------------------------------------------------------------- pieces


def byte_range(t: np.ndarray) -> tuple[int, int]:
    assert t.flags.c_contiguous
    start = int(t.__array_interface__["data"][0])
    return start, start + t.nbytes


def uncovered(target: tuple[int, int], ranges: Sequence[tuple[int, int]]) -> int:
    """Bytes of `target` that no range in `ranges` covers."""
    lo, hi = target
    pos, missing = lo, 0
    for start, end in sorted(r for r in ranges if r[1] > lo and r[0] < hi):
        if start > pos:
            missing += start - pos
        pos = max(pos, end)
    return missing + max(0, hi - pos)


def assert_release_covers(
    released: Sequence[tuple[np.ndarray | None, ...]], inputs: Sequence[np.ndarray]
) -> None:
    """The arrays handed to `release` cover every byte of every input, and nothing else."""
    ranges = [byte_range(arr) for arrays in released for arr in arrays if arr is not None]
    for t in inputs:
        assert uncovered(byte_range(t), ranges) == 0
    bounds = [byte_range(t) for t in inputs]
    for start, end in ranges:
        assert any(lo <= start and end <= hi for lo, hi in bounds)


def step_inputs(steps: Sequence[StepFormula | None]) -> Iterator[np.ndarray]:
    for s in steps:
        if s is not None:
            yield s.x
            if s.kind == ADAM:
                assert s.y is not None
                yield s.y


@needs_compiled
@pytest.mark.parametrize(
    ("shape", "per_row", "pieces"),
    [((64, 100), True, 64), ((40, 1250), False, 400), ((3, 5000), True, 3)],
    ids=["many-rows", "one-long-row", "rows-longer-than-a-piece"],
)
def test_pieces_give_the_same_figures_and_release_every_byte(
    shape: tuple[int, int], per_row: bool, pieces: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BNWD_NO_COMPILED", raising=False)
    rng = np.random.default_rng(shape[1])
    before, *tensors = walk(shape, 5, seed=21)
    steps: list[StepFormula | None] = [
        sgd_step(tensors[0], rng, per_row),
        None,
        adamw_step(tensors[2], rng, per_row),
        StepFormula(LINEAR, bf16(rng.standard_normal(shape)), scale=-1e-3),
    ]
    whole = window_stats(tensors, before, per_row=per_row, steps=steps)
    released: list[tuple[np.ndarray, ...]] = []
    monkeypatch.setattr(kernels, "PIECE_BYTES", 4096)

    def release(*arrays: np.ndarray) -> None:
        released.append(arrays)

    pieced = window_stats(tensors, before, per_row=per_row, steps=steps, release=release)
    inputs = [before, *tensors, *step_inputs(steps)]
    assert len(released) >= pieces  # (a piece holds whole rows where there are several)
    # whole rows are summed the same way in any piece; pieces of one row add up in another order
    assert_same_windows(pieced, whole, rel=1e-13)
    assert_same_windows(pieced, by_pairs(tensors, before, per_row, steps))
    assert all(len(arrays) == len(inputs) for arrays in released)
    assert_release_covers(released, inputs)


@pytest.mark.parametrize("with_previous", [True, False], ids=["previous", "first"])
def test_release_covers_every_input_pair_by_pair(
    with_previous: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the compiled sweep the window goes pair by pair; it releases all the same."""
    monkeypatch.setenv("BNWD_NO_COMPILED", "1")
    rng = np.random.default_rng(61)
    before, *tensors = walk((16, 40), 4, seed=60)
    steps: list[StepFormula | None] = [
        None,
        sgd_step(tensors[1], rng, True),
        adamw_step(tensors[2], rng, True),
    ]
    released: list[tuple[np.ndarray | None, ...]] = []

    def release(*arrays: np.ndarray | None) -> None:
        released.append(arrays)

    previous = before if with_previous else None
    got = window_stats(tensors, previous, per_row=True, steps=steps, release=release)
    assert_same_windows(got, by_pairs(tensors, previous, True, steps))
    inputs = [*tensors, *step_inputs(steps)] + ([before] if with_previous else [])
    assert_release_covers(released, inputs)


# ----------------------------------------------------------------------------- threads


@needs_compiled
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "whole"])
@pytest.mark.parametrize("pairs", [1, 3], ids=["rows-split", "checkpoints-split"])
def test_two_threads_give_the_same_figures_as_one(
    per_row: bool, pairs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One pair: the threads share its rows (or the columns of its one row); several: each
    thread takes a run of consecutive checkpoints."""
    monkeypatch.delenv("BNWD_NO_COMPILED", raising=False)
    shape = (600, 512)
    assert shape[0] * shape[1] >= kernels.PARALLEL_MIN
    rng = np.random.default_rng(31)
    before, *tensors = walk(shape, pairs + 1, seed=30, relative=1e-4)
    steps: list[StepFormula | None] = [sgd_step(tensors[0], rng, per_row), None, None][:pairs]
    if pairs == 3:
        steps[2] = adamw_step(tensors[2], rng, per_row)
    submitted = Counter[int]()
    original = kernels._executor

    class Counting:
        def __init__(self, workers: int) -> None:
            self.pool = original(workers)

        def submit(self, *args: Any) -> Any:
            submitted[0] += 1
            return self.pool.submit(*args)

    monkeypatch.setattr(kernels, "_executor", Counting)
    monkeypatch.setenv("BNWD_THREADS", "1")
    one = window_stats(tensors, before, per_row=per_row, steps=steps)
    assert submitted[0] == 0
    monkeypatch.setenv("BNWD_THREADS", "2")
    two = window_stats(tensors, before, per_row=per_row, steps=steps)
    assert submitted[0] > 0  # the second thread had a share
    assert_same_windows(two, one)
    if pairs > 1:  # whole pairs per thread: the very same sums
        assert [(s.norm, s.diff_norm, s.angle) for s in two] == [
            (s.norm, s.diff_norm, s.angle) for s in one
        ]
    b, a = f64(tensors[-1]), f64(tensors[-2] if pairs > 1 else before)
    assert two[-1].diff_norm == pytest.approx(float(np.linalg.norm(b - a)), rel=1e-12)


# ----------------------------------------------------------------------------- numpy fallback


@needs_compiled
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "whole"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_numpy_fallback_gives_the_compiled_figures(
    per_row: bool, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BNWD_NO_COMPILED", raising=False)
    rng = np.random.default_rng(41)
    before, *tensors = walk((48, 300), 5, seed=40, relative=1e-3)
    if dtype == "bfloat16":
        before, tensors = bf16(before), [bf16(t) for t in tensors]
    steps: list[StepFormula | None] = [
        sgd_step(tensors[0], rng, per_row),
        adamw_step(tensors[1], rng, per_row),
        None,
        sgd_step(tensors[3], rng, per_row),
    ]
    spy = Spy(monkeypatch, "_window_figures", "_window_by_pairs")
    fast = window_stats(tensors, before, per_row=per_row, steps=steps)
    assert spy.calls == Counter({"_window_figures": 1})
    monkeypatch.setenv("BNWD_NO_COMPILED", "1")
    assert not kernels.compiled()
    slow = window_stats(tensors, before, per_row=per_row, steps=steps)
    assert spy.calls["_window_by_pairs"] == 1 and spy.calls["_window_figures"] == 1
    assert_same_windows(fast, slow, rel=1e-11)
    slow_first = window_stats(tensors, None, per_row=per_row, steps=steps)
    monkeypatch.delenv("BNWD_NO_COMPILED")
    fast_first = window_stats(tensors, None, per_row=per_row, steps=steps)
    assert_same_windows(fast_first, slow_first, rel=1e-11)


# ----------------------------------------------------------------------------- accuracy


def exact_ints(values: np.ndarray) -> list[int]:
    """`values` (float32, or float64 not far below 1) times 2^149: integers, exactly."""
    scaled = [math.ldexp(float(x), 149) for x in values.ravel()]
    assert all(v.is_integer() for v in scaled)
    return [int(v) for v in scaled]


def exact_pair(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """|b - a| and the angle between vectors a and b, from exact integers (`exact_ints`):
    atan2(across, along) scaled by |a| is atan2(sqrt(|d|^2 |a|^2 - <d,a>^2), |a|^2 + <d,a>)."""
    ints_a, ints_b = exact_ints(a), exact_ints(b)
    diffs = [y - x for x, y in zip(ints_a, ints_b, strict=True)]
    aa = sum(x * x for x in ints_a)
    dd = sum(d * d for d in diffs)
    da = sum(d * x for d, x in zip(diffs, ints_a, strict=True))
    across = math.isqrt(dd * aa - da * da)
    return math.ldexp(math.sqrt(dd), -149), math.atan2(float(across), float(aa + da))


@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "whole"])
def test_a_relative_step_of_1e7_inside_a_window_is_measured_accurately(
    per_row: bool, sweep: str
) -> None:
    rng = np.random.default_rng(51)
    shape = (8, 512)
    before, a, c = walk(shape, 3, seed=50)
    # every element moved by one ulp, up or down: exact in float32, |b - a| / |a| about 1e-7
    up = rng.random(shape) < 0.5
    b = np.where(up, np.nextafter(a, np.float32(np.inf)), np.nextafter(a, np.float32(-np.inf)))
    assert b.dtype == np.float32
    step = b - a  # one ulp each: exact in float32 too
    np.testing.assert_array_equal(step.astype(np.float64), f64(b) - f64(a))
    diff, angle = exact_pair(a, b)
    relative = diff / float(np.linalg.norm(f64(a)))
    assert 3e-8 < relative < 3e-7
    steps: list[StepFormula | None] = [None, StepFormula(LINEAR, step), None]
    got = window_stats([a, b, c], before, per_row=per_row, steps=steps)
    pair = got[1]
    # well inside 1e-6: float64 sums of exact products are good to about 1e-15 here
    assert pair.diff_norm == pytest.approx(diff, rel=1e-9)
    assert pair.angle == pytest.approx(angle, rel=1e-9)
    # the same step given as the optimizer's: a = b - step, measured from b alone
    assert pair.step_stats is not None
    assert pair.step_stats.diff_norm == pytest.approx(diff, rel=1e-9)
    assert pair.step_stats.angle == pytest.approx(angle, rel=1e-9)
    if per_row:
        expected = [exact_pair(a[r], b[r])[1] for r in range(shape[0])]
        assert pair.row_angles is not None and pair.step_stats.row_angles is not None
        np.testing.assert_allclose(pair.row_angles, expected, rtol=1e-9)
        np.testing.assert_allclose(pair.step_stats.row_angles, expected, rtol=1e-9)
        rms = math.sqrt(sum(x * x for x in expected) / len(expected))
        assert pair.angular_update == pytest.approx(rms, rel=1e-9)
    else:
        assert pair.angular_update == pytest.approx(angle, rel=1e-9)
    # the neighbours are not disturbed by the tiny pair between them
    for k, (x, y) in enumerate([(before, a), (b, c)]):
        d_ref, angle_ref = exact_pair(x, y)
        stats = got[2 * k]
        assert stats.diff_norm == pytest.approx(d_ref, rel=1e-12)
        assert stats.angle == pytest.approx(angle_ref, rel=1e-10)
