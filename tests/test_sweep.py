"""The compiled sweep (`bnwd_cli/metrics/_sweep.c`) against float64 references computed here.

The C function is called directly, on geometries that cut its 256-element blocks and the
threads' rectangles at odd places, so an off-by-one in the block loop or the row offsets shows.
The end-to-end check that `bnwd inspect` reads torch zip and safetensors runs without importing
torch is here too: that is what makes the fast path fast.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from bnwd_cli.checkpoints.arrays import BFLOAT16, widened
from bnwd_cli.metrics import kernels

pytestmark = pytest.mark.skipif(not kernels.compiled(), reason="the C sweep is not built here")

GEOMETRIES = [(1, 1), (1, 511), (1, 513), (3, 1025), (7, 9), (64, 27), (2, 4096)]


def reference_sums(b: np.ndarray, a: np.ndarray | None, d: np.ndarray | None) -> np.ndarray:
    """|b|^2, |a|^2, |d|^2, <d,a> per row in float64 (d = b - a, or <d,b> for a given d)."""
    b64 = widened(b).astype(np.float64)
    out = np.zeros((6, b.shape[0]))
    out[0] = (b64 * b64).sum(1)
    if a is not None:
        a64 = widened(a).astype(np.float64)
        diff = b64 - a64
        out[1] = (a64 * a64).sum(1)
        out[2] = (diff * diff).sum(1)
        out[3] = (diff * a64).sum(1)
    elif d is not None:
        out[2] = (d * d).sum(1)
        out[3] = (d * b64).sum(1)
    return out


def call(rows: int, cols: int, item: tuple[int, int, int, int], *args: object) -> np.ndarray:
    assert kernels._compiled is not None
    out = np.zeros((6, rows))
    kernels._compiled.row_sums(out, rows, cols, *item, *args)
    return out


@pytest.mark.parametrize(("rows", "cols"), GEOMETRIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pair_sums_match_float64_reference(rows: int, cols: int, dtype: type) -> None:
    rng = np.random.default_rng(rows * 1000 + cols)
    a = rng.standard_normal((rows, cols)).astype(dtype)
    b = (a + 1e-3 * rng.standard_normal((rows, cols))).astype(dtype)
    kind = kernels._kind(a)
    got = call(rows, cols, (0, rows, 0, cols), b, kind, a, kind, None, None)
    np.testing.assert_allclose(got[:4], reference_sums(b, a, None)[:4], rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize(("rows", "cols"), GEOMETRIES)
def test_rectangles_add_up_to_the_whole(rows: int, cols: int) -> None:
    """Cutting the tensor as the threads do (rows, or columns of one row) changes nothing."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((rows, cols)).astype(np.float32)
    b = (a * 1.01).astype(np.float32)
    whole = call(rows, cols, (0, rows, 0, cols), b, 0, a, 0, None, None)
    pieces = sum(
        call(rows, cols, item, b, 0, a, 0, None, None) for item in kernels._split(rows, cols, 3)
    )
    np.testing.assert_allclose(pieces, whole, rtol=1e-13)


def test_bfloat16_is_widened_exactly() -> None:
    rng = np.random.default_rng(3)
    values = rng.standard_normal((5, 700)).astype(np.float32)
    # bfloat16: the upper 16 bits of a float32 (truncated here, exactly representable)
    raw = (values.view(np.uint32) >> 16).astype(np.uint16)
    b = raw.view(BFLOAT16)
    a = np.roll(raw, 1, axis=1).view(BFLOAT16)
    got = call(5, 700, (0, 5, 0, 700), b, 2, a, 2, None, None)
    np.testing.assert_allclose(got[:4], reference_sums(b, a, None)[:4], rtol=1e-12)


def test_adam_step_formula_matches_torch_order_of_operations() -> None:
    rng = np.random.default_rng(11)
    rows, cols = 4, 1000
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    m = (1e-3 * rng.standard_normal((rows, cols))).astype(np.float32)
    v = (1e-6 * rng.random((rows, cols))).astype(np.float32)
    lr, wd, beta1, beta2, eps, t = 1e-3, 0.05, 0.9, 0.999, 1e-8, 37
    c1, rc2 = 1 - beta1**t, math.sqrt(1 - beta2**t)
    scale = -lr / (1 - lr * wd)
    w64 = w.astype(np.float64)
    m64, v64 = m.astype(np.float64), v.astype(np.float64)
    step = scale * ((m64 / c1) / (np.sqrt(v64) / rc2 + eps) + wd * w64)
    spec = (kernels.ADAM, m, 0, v, 0, scale, c1, rc2, eps, wd)
    got = call(rows, cols, (0, rows, 0, cols), w, 0, None, 0, None, spec)
    np.testing.assert_allclose(got[4], (step * step).sum(1), rtol=1e-12)
    np.testing.assert_allclose(got[5], (step * w64).sum(1), rtol=1e-12)
    as_main = call(rows, cols, (0, rows, 0, cols), w, 0, None, 0, spec, None)
    np.testing.assert_allclose(as_main[:4], reference_sums(w, None, step)[:4], rtol=1e-12)


def test_short_buffers_and_bad_blocks_are_refused() -> None:
    b = np.zeros(10, dtype=np.float32)
    with pytest.raises(ValueError, match="shorter"):
        call(2, 10, (0, 2, 0, 10), b, 0, None, 0, None, None)
    with pytest.raises(ValueError, match="outside"):
        call(1, 10, (0, 1, 0, 11), b, 0, None, 0, None, None)
    with pytest.raises(ValueError, match="kind"):
        call(1, 10, (0, 1, 0, 10), b, 7, None, 0, None, None)


def test_compiled_and_numpy_sweeps_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    a = rng.standard_normal((300, 2000)).astype(np.float32)  # above PARALLEL_MIN: split
    b = (a + 1e-6 * rng.standard_normal(a.shape)).astype(np.float32)
    fast = kernels.tensor_stats(b, a, per_row=True)
    monkeypatch.setenv("BNWD_NO_COMPILED", "1")
    slow = kernels.tensor_stats(b, a, per_row=True)
    assert fast.diff_norm == pytest.approx(slow.diff_norm, rel=1e-12)
    assert fast.angle == pytest.approx(slow.angle, rel=1e-9)
    assert fast.row_angles is not None and slow.row_angles is not None
    np.testing.assert_allclose(fast.row_angles, slow.row_angles, rtol=1e-9)


# ---------------------------------------------------------------- figures from the sums
# `figure_terms` and `finite_rms` replace the numpy figures of a window (`_row_figures`) and
# promise the same values bit for bit; the numpy code is itself checked against float64
# references in test_window.py, and here once more against vectors whose angles are known.

FIGURE_ROWS = [2, 7, 8, 9, 16, 127, 128, 129, 136, 257, 1000, 2049]
"""Around numpy's pairwise summation: below 8 terms a plain loop, up to 128 eight partial
sums, above that halves cut at multiples of 8."""


def window_sums_like(rng: np.random.Generator, count: int, rows: int) -> np.ndarray:
    """Sums (pairs x 6 x rows) as a window of slowly moving rows would give them."""
    out = np.empty((count, 6, rows))
    out[:, 0] = np.abs(rng.standard_normal((count, rows))) + 0.5
    out[:, 1] = out[:, 0] * (1 + 0.01 * rng.standard_normal((count, rows)))
    out[:, 3] = 0.01 * rng.standard_normal((count, rows)) * out[:, 0]
    out[:, 2] = out[:, 3] ** 2 / out[:, 1] + 1e-4 * np.abs(rng.standard_normal((count, rows)))
    out[:, 4] = 1e-4 * np.abs(rng.standard_normal((count, rows)))
    out[:, 5] = 0.01 * rng.standard_normal((count, rows)) * out[:, 0]
    return out


def assert_bitwise_equal(got: object, want: object, where: str = "") -> None:
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.shape == want.shape, where
        same = (got.view(np.uint64) == want.view(np.uint64)) | (np.isnan(got) & np.isnan(want))
        assert same.all(), f"{where}: {got[~same][:3]} != {want[~same][:3]}"
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_bitwise_equal(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), where
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("rows", FIGURE_ROWS)
@pytest.mark.parametrize("with_step", [False, True])
@pytest.mark.parametrize("odd", ["none", "zeros", "nonfinite"])
def test_compiled_row_figures_equal_the_numpy_ones_bit_for_bit(
    rows: int, with_step: bool, odd: str
) -> None:
    rng = np.random.default_rng(rows * 10 + with_step)
    out = window_sums_like(rng, 8, rows)
    if odd == "zeros":  # zero rows, zero previous rows: undefined angles, NaN rms, mean 0
        out[rng.random(out.shape) < 0.1] = 0.0
        out[2, 0] = 0.0
    elif odd == "nonfinite":  # NaN, infinities, negative (cancelled) sums
        mask = rng.random(out.shape) < 0.05
        out[mask] = rng.choice([np.nan, np.inf, -np.inf, -1.0, 1e300], size=int(mask.sum()))
    with np.errstate(all="ignore"):
        want = kernels._row_figures(out.copy(), with_step)
    got = kernels._compiled_row_figures(out.copy(), with_step)
    assert_bitwise_equal(got, want)
    if odd == "none":  # the fast path is not taken trivially: something to compare
        assert all(isinstance(v, float) for v in got[4])


def test_compiled_row_figures_match_angles_known_from_the_vectors() -> None:
    """Rows rotated by known angles, their sums from the vectors in float64: the figures give
    those angles back, and the norms' spread and rms agree with numpy on the vectors."""
    rng = np.random.default_rng(11)
    count, rows, cols = 4, 50, 64
    angles = rng.uniform(1e-7, 1.0, size=(count, rows))
    a = rng.standard_normal((count, rows, cols))
    ortho = rng.standard_normal((count, rows, cols))
    ortho -= (ortho * a).sum(-1, keepdims=True) / (a * a).sum(-1, keepdims=True) * a
    ortho *= np.linalg.norm(a, axis=-1, keepdims=True) / np.linalg.norm(
        ortho, axis=-1, keepdims=True
    )
    b = np.cos(angles)[..., None] * a + np.sin(angles)[..., None] * ortho
    d = b - a
    out = np.zeros((count, 6, rows))
    out[:, 0] = (b * b).sum(-1)
    out[:, 1] = (a * a).sum(-1)
    out[:, 2] = (d * d).sum(-1)
    out[:, 3] = (d * a).sum(-1)
    norms, summaries, got, redo, rms = kernels._compiled_row_figures(out, False)
    assert not any(redo)  # pure rotations of at most 1 rad: the sums give them fully accurate
    np.testing.assert_allclose(got, angles, rtol=1e-8)
    row_norms = np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(norms, row_norms, rtol=1e-14)
    for k in range(count):
        lo, hi, cv = summaries[k]
        assert lo == pytest.approx(row_norms[k].min(), rel=1e-14)
        assert hi == pytest.approx(row_norms[k].max(), rel=1e-14)
        assert cv == pytest.approx(row_norms[k].std() / row_norms[k].mean(), rel=1e-12)
        assert rms[k] == pytest.approx(math.sqrt(float(np.mean(angles[k] ** 2))), rel=1e-8)


@pytest.mark.parametrize("n", [1, 5, 8, 9, 100, 128, 129, 135, 136, 300, 1031])
def test_finite_rms_adds_up_like_numpy(n: int) -> None:
    """The root-mean-square of the finite values, summed as numpy's pairwise summation does
    (bit for bit), with NaN and infinities left out of both the sum and the count."""
    assert kernels._compiled is not None
    rng = np.random.default_rng(n)
    values = rng.standard_normal((2, n)) * 10.0 ** rng.integers(-8, 8, size=(2, n))
    values[1, rng.random(n) < 0.2] = np.inf
    values[1, 0] = np.nan
    got = np.empty(2)
    kernels._compiled.finite_rms(values, 2, n, got)
    for k in range(2):
        finite = np.isfinite(values[k])
        squares = np.square(np.where(finite, values[k], 0.0))
        want = np.sqrt(squares.sum() / finite.sum()) if finite.any() else np.nan
        assert_bitwise_equal(float(got[k]), float(want), f"row {k}")
    nothing = np.full((1, n), np.nan)
    kernels._compiled.finite_rms(nothing, 1, n, got)
    assert math.isnan(got[0])


def test_figure_functions_refuse_short_buffers() -> None:
    assert kernels._compiled is not None
    out, terms, norms, summary = (
        np.zeros((2, 6, 5)),
        np.empty((2, 2, 5)),
        np.empty((2, 5)),
        np.empty((2, 6)),
    )
    kernels._compiled.figure_terms(out, 2, 5, False, terms, norms, summary)
    with pytest.raises(ValueError, match="shorter"):
        kernels._compiled.figure_terms(out, 2, 5, True, terms, norms, summary)  # step: 2x terms
    with pytest.raises(ValueError, match="shorter"):
        kernels._compiled.figure_terms(out, 3, 5, False, terms, norms, summary)
    with pytest.raises(ValueError, match="shorter"):
        kernels._compiled.finite_rms(norms, 3, 5, np.empty(3))


def test_window_stats_are_the_same_without_the_compiled_figures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A build of the sweep without the figure functions (an older one) takes the numpy
    figures: the same TensorStats."""
    rng = np.random.default_rng(3)
    tensors = [rng.standard_normal((40, 30)).astype(np.float32)]
    for _ in range(5):
        tensors.append((tensors[-1] + 0.01 * rng.standard_normal((40, 30))).astype(np.float32))
    steps = [
        kernels.StepFormula(
            kernels.LINEAR, (0.01 * rng.standard_normal((40, 30))).astype(np.float32)
        )
        for _ in range(5)
    ]
    fast = kernels.window_stats(tensors[1:], tensors[0], per_row=True, steps=steps)
    monkeypatch.setattr(kernels, "_has_row_figures", False)
    slow = kernels.window_stats(tensors[1:], tensors[0], per_row=True, steps=steps)
    for f, s in zip(fast, slow, strict=True):
        for stats, other in ((f, s), (f.step_stats, s.step_stats)):
            assert stats is not None and other is not None
            assert (stats.angular_update, stats.row_norm_cv, stats.angle) == (
                other.angular_update,
                other.row_norm_cv,
                other.angle,
            )
            np.testing.assert_array_equal(stats.row_angles, other.row_angles)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_inspect_reads_a_run_without_importing_torch(tmp_path: Path, fmt: str) -> None:
    import torch

    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    for step in range(3):
        conv = conv + np.float32(0.01) * rng.standard_normal(conv.shape).astype(np.float32)
        weights = {
            "conv.weight": conv,
            "bn.weight": np.ones(8, np.float32),
            "bn.bias": np.zeros(8, np.float32),
            "bn.running_mean": np.zeros(8, np.float32),
            "bn.running_var": np.ones(8, np.float32),
        }
        if fmt == "safetensors":
            save_file(weights, str(run / f"step_{step}.safetensors"), {"step": str(step)})
        else:
            model = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
            torch.save({"model": model, "step": step}, run / f"step_{step}.pt")
    code = (
        "import sys\n"
        "from bnwd_cli.cli.app import main\n"
        f"sys.argv = ['bnwd', 'inspect', {str(run)!r}, '--format', 'csv']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        # start-up: Rich only for a terminal, and no pydantic (typer < 0.29, pyproject.toml)
        "assert 'rich' not in sys.modules, 'rich was imported for piped output'\n"
        "assert 'pydantic' not in sys.modules, 'pydantic was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "conv.weight" in done.stdout
