"""The compiled sweep (`bnwd_cli/metrics/_sweep.c`) against float64 references computed here.

The C function is called directly, on geometries that cut its 512-element blocks and the
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
