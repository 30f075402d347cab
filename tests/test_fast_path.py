"""The fast path of the streaming pass against simple references.

- `metrics.kernels.tensor_stats` (blocked float64 sweeps, compiled and numpy, one and two
  threads) against a plain numpy computation in extended precision (`np.longdouble`), on random
  tensors of several dtypes and shapes, with relative steps down to 1e-9 (where a float32 pass
  would drown);
- the block-computed optimizer step of `metrics.updates` against `previous_weight`;
- the zero-copy readers of `checkpoints.mapped` (numpy views of a memory map) against
  `safetensors.torch.load_file` and `torch.load(weights_only=True)`, including non-contiguous
  tensors and the files they must refuse;
- `bnwd --help` / `--version` without importing torch.

No timings are asserted here; benchmarks/bench_inspect.py measures speed and memory.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bnwd_cli.checkpoints.arrays import dtype_name, from_torch, tag_of, widened
from bnwd_cli.checkpoints.mapped import (
    RELEASE_MIN,
    NotMappableError,
    SafetensorsFile,
    load_torch_zip,
    release_pages,
    strided_view,
)
from bnwd_cli.checkpoints.reader import SafetensorsSource
from bnwd_cli.checkpoints.safe_load import load_torch_file
from bnwd_cli.errors import CheckpointError, UnsafeCheckpointError
from bnwd_cli.metrics import kernels
from bnwd_cli.metrics.kernels import TensorStats, tensor_stats
from bnwd_cli.metrics.optimizer import OptimizerFamily, ParamHyper
from bnwd_cli.metrics.updates import (
    ImpliedStep,
    NoImpliedStep,
    implied_step,
    plan_step,
    previous_weight,
)

LONG = np.longdouble
EXTENDED = np.finfo(LONG).eps < 1e-18  # x86-64: 64-bit significand


# ----------------------------------------------------------------------------- reference


def reference(
    b: torch.Tensor, a: torch.Tensor, *, per_row: bool
) -> tuple[float, float, np.ndarray, np.ndarray, float]:
    """norm(b), |b - a|, row norms of b, per-row angles, whole angle; long double throughout.

    The angle uses the explicit projection `atan2(|d - (<d,a>/|a|^2) a|, <b,a>/|a|)`, whose
    cancellation is harmless at 64-bit precision for the cases below.
    """
    rows = b.shape[0] if per_row and b.dim() >= 2 else 1
    bl = b.double().numpy().astype(LONG).reshape(rows, -1)
    al = a.double().numpy().astype(LONG).reshape(rows, -1)
    d = bl - al

    def angle(x: np.ndarray, y: np.ndarray, step: np.ndarray) -> float:
        xx = np.sum(x * x)
        if xx == 0 or np.sum(y * y) == 0:
            return math.nan
        across = step - (np.sum(step * x) / xx) * x
        return float(np.arctan2(np.sqrt(np.sum(across * across)), np.sum(y * x) / np.sqrt(xx)))

    row_norms = np.sqrt(np.sum(bl * bl, axis=1))
    row_angles = np.array([angle(al[r], bl[r], d[r]) for r in range(rows)], dtype=np.float64)
    whole = angle(al.ravel(), bl.ravel(), d.ravel())
    return (
        float(np.sqrt(np.sum(bl * bl))),
        float(np.sqrt(np.sum(d * d))),
        row_norms.astype(np.float64),
        row_angles,
        whole,
    )


def nudged(a: torch.Tensor, relative: float, generator: torch.Generator) -> torch.Tensor:
    """`a` with a few elements set to powers of two and moved by one ulp, so that |b - a| / |a|
    is about `relative` (within the dtype's range) and exact in a's own dtype."""
    info = torch.finfo(a.dtype)
    bits = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}[a.dtype]
    b = a.clone()
    flat_a, flat_b = a.view(-1), b.view(-1)
    count = max(1, min(flat_a.numel() // 4, 64))
    index = torch.randperm(flat_a.numel(), generator=generator)[:count]
    per_element = relative * float(a.double().norm()) / math.sqrt(count)
    exponent = max(math.floor(math.log2(per_element)) + bits - 1, math.ceil(math.log2(info.tiny)))
    base = 2.0**exponent
    flat_a[index] = base
    flat_b[index] = base + 2.0 ** (exponent - bits + 1)
    return b


SHAPES = [
    ((1000,), False),  # BN-like vector
    ((64, 32, 3, 3), True),  # conv, per row
    ((48, 7), True),  # odd sizes
    ((512, 64, 3, 3), True),  # big enough for the two-thread split
    ((300, 2200), False),  # whole tensor: long rows split into blocks
    ((3, 40000), True),  # rows longer than a block
]


# ----------------------------------------------------------------------------- sweeps


class Sweep:
    """Which sweep a test asked for, and which ones actually ran (spied on)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.used: set[str] = set()

    def expect(self, *inputs: object) -> str:
        """The sweep that must have run for these inputs: the compiled one takes contiguous
        float32 / float64 / bfloat16 arrays, everything else goes through numpy."""
        if self.name == "numpy":
            return "numpy"
        takes = {torch.float32, torch.float64, torch.bfloat16}
        for t in inputs:
            if isinstance(t, torch.Tensor) and (t.dtype not in takes or not t.is_contiguous()):
                return "numpy"
        return "compiled"


@pytest.fixture(params=["compiled", "numpy"])
def sweep(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Sweep:
    """Run the test with the compiled sweep, then with the numpy one (BNWD_NO_COMPILED=1)."""
    chosen = Sweep(request.param)
    if request.param == "numpy":
        monkeypatch.setenv("BNWD_NO_COMPILED", "1")
    else:
        monkeypatch.delenv("BNWD_NO_COMPILED", raising=False)
        if not kernels.compiled():
            pytest.skip("the compiled sweep (bnwd_cli/metrics/_sweep*.so) is not built here")
    assert kernels.compiled() == (request.param == "compiled")
    original_numpy = kernels._sweep_numpy

    def spy_numpy(*args: object, **kwargs: object) -> np.ndarray:
        chosen.used.add("numpy")
        return original_numpy(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "_sweep_numpy", spy_numpy)
    if kernels._compiled is not None:
        original_compiled = kernels._compiled

        def spy_compiled(*args: object) -> object:
            chosen.used.add("compiled")
            return original_compiled.row_sums(*args)

        monkeypatch.setattr(kernels, "_compiled", SimpleNamespace(row_sums=spy_compiled))
    return chosen


@pytest.mark.skipif(not EXTENDED, reason="needs an extended-precision long double")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("shape", "per_row"), SHAPES)
@pytest.mark.parametrize("relative", [1e-2, 1e-6, 1e-9])
def test_fast_path_matches_extended_precision_reference(
    dtype: torch.dtype, shape: tuple[int, ...], per_row: bool, relative: float, sweep: Sweep
) -> None:
    g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, shape, relative)).encode()))
    a = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    if relative >= 1e-3:
        b = a.double() + relative * 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
        b = b.to(dtype)
    else:
        b = nudged(a, relative, g)  # modifies a too
    norm, diff, row_norms, row_angles, whole = reference(b, a, per_row=per_row)
    achieved = diff / float(a.double().norm())
    assert 0 < achieved < max(10 * relative, 1e-6)  # the case is what it says (float16: ~3e-7)
    stats = tensor_stats(b, a, per_row=per_row)
    assert sweep.used == {sweep.expect(a, b)}
    assert stats.norm == pytest.approx(norm, rel=1e-13)
    assert stats.diff_norm == pytest.approx(diff, rel=1e-12)
    assert stats.angle == pytest.approx(whole, rel=1e-9, abs=1e-15)
    if per_row and len(shape) >= 2:
        assert stats.row_norms is not None and stats.row_angles is not None
        assert stats.row_norms.dtype == np.float64 and stats.row_angles.dtype == np.float64
        np.testing.assert_allclose(stats.row_norms, row_norms, rtol=1e-13)
        got = stats.row_angles
        np.testing.assert_array_equal(np.isnan(got), np.isnan(row_angles))
        ok = ~np.isnan(row_angles)
        np.testing.assert_allclose(got[ok], row_angles[ok], rtol=1e-9, atol=1e-15)
    else:
        assert stats.row_norms is None
    # The textbook float32 computation cannot see the smallest of these steps at all.
    if achieved < 1e-8 and dtype is torch.float32:
        cos = torch.dot(a.reshape(-1), b.reshape(-1)) / (a.norm() * b.norm())
        assert abs(math.acos(min(1.0, float(cos))) - whole) > 0.5 * whole


def test_cached_previous_sums_and_step_mode_agree_with_the_plain_call(sweep: Sweep) -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(256, 128, 3, 3, generator=g)
    b = a + 1e-4 * torch.randn(a.shape, generator=g)
    plain = tensor_stats(b, a, per_row=True)
    first = tensor_stats(a, None, per_row=True)
    assert first.row_sq is not None
    cached = tensor_stats(b, a, per_row=True, previous_row_sq=first.row_sq)
    stepped = tensor_stats(b, None, per_row=True, step=b.double() - a.double())
    assert sweep.used == {sweep.expect(a, b)}
    for other in (cached, stepped):
        assert other.norm == pytest.approx(plain.norm, rel=1e-14)
        assert other.diff_norm == pytest.approx(plain.diff_norm, rel=1e-13)
        assert other.angle == pytest.approx(plain.angle, rel=1e-11)
        assert other.row_angles is not None and plain.row_angles is not None
        np.testing.assert_allclose(other.row_angles, plain.row_angles, rtol=1e-10)
    assert stepped.previous_sum_sq == pytest.approx(float(a.double().square().sum()), rel=1e-14)
    # and the plain call itself against a direct float64 computation
    b64, a64 = b.double().reshape(256, -1).numpy(), a.double().reshape(256, -1).numpy()
    assert plain.diff_norm == pytest.approx(float(np.linalg.norm(b64 - a64)), rel=1e-12)
    np.testing.assert_allclose(first.row_sq, np.square(a64).sum(axis=1), rtol=1e-13)


def test_step_mode_with_a_tiny_previous_weight_stays_accurate(sweep: Sweep) -> None:
    # |a|^2 derived from b and d cancels when a is much shorter than b: those rows are redone.
    g = torch.Generator().manual_seed(8)
    b = torch.randn(16, 50, dtype=torch.float64, generator=g)
    a = b.clone()
    a[:4] *= 1e-5  # four rows nearly vanish before the step
    a[4:] += 1e-3 * torch.randn(12, 50, dtype=torch.float64, generator=g)
    step = b - a
    a = b - step  # the previous weight the (rounded) step implies
    plain = tensor_stats(b, a, per_row=True)
    stepped = tensor_stats(b, None, per_row=True, step=step)
    assert sweep.used == {sweep.expect(a, b)}
    assert stepped.previous_sum_sq == pytest.approx(float((a * a).sum()), rel=1e-12)
    assert stepped.diff_norm == pytest.approx(plain.diff_norm, rel=1e-13)
    assert stepped.row_angles is not None and plain.row_angles is not None
    np.testing.assert_allclose(stepped.row_angles, plain.row_angles, rtol=1e-9)
    # and against the angles computed directly from the rows (long double, no kernels)
    expected = kernels_free_angles(a.numpy(), b.numpy())
    np.testing.assert_allclose(stepped.row_angles, expected, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "whole"])
def test_two_threads_give_the_same_figures(
    monkeypatch: pytest.MonkeyPatch, sweep: Sweep, per_row: bool
) -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(512, 256, 3, 3, generator=g)
    b = a + 1e-5 * torch.randn(a.shape, generator=g)
    assert b.numel() >= kernels.PARALLEL_MIN
    momentum = torch.randn(a.shape, generator=g) * 1e-3
    plan = plan_step(b, {"momentum_buffer": momentum}, hyper(OptimizerFamily.SGD_MOMENTUM),
                     OptimizerFamily.SGD_MOMENTUM, per_row=per_row)  # fmt: skip
    assert plan is not None

    def figures() -> list[TensorStats]:
        return [
            tensor_stats(b, a, per_row=per_row, with_step=plan.fill),
            tensor_stats(b, None, per_row=per_row, step=b.double() - a.double()),
        ]

    monkeypatch.setenv("BNWD_THREADS", "1")
    submitted: list[int] = []
    original_executor = kernels._executor

    def counting_executor(workers: int) -> object:
        submitted.append(workers)
        return original_executor(workers)

    monkeypatch.setattr(kernels, "_executor", counting_executor)
    single = figures()
    assert not submitted  # one thread: nothing handed to the pool
    monkeypatch.setenv("BNWD_THREADS", "2")
    double = figures()
    assert submitted and set(submitted) == {2}  # the tensor really was split
    assert sweep.used == {sweep.expect(a, b)}
    pairs = [(double[0], single[0]), (double[1], single[1])]
    assert double[0].step_stats is not None and single[0].step_stats is not None
    pairs.append((double[0].step_stats, single[0].step_stats))
    for got, expected in pairs:
        assert got.norm == pytest.approx(expected.norm, rel=1e-12)
        assert got.diff_norm == pytest.approx(expected.diff_norm, rel=1e-12)
        assert got.angle == pytest.approx(expected.angle, rel=1e-12)
        assert got.previous_sum_sq == pytest.approx(expected.previous_sum_sq, rel=1e-12)
        if per_row:
            for name in ("row_norms", "row_angles", "row_sq"):
                x, y = getattr(got, name), getattr(expected, name)
                assert x is not None and y is not None and x.shape == (512,)
                np.testing.assert_allclose(x, y, rtol=1e-12, err_msg=name)
        else:
            assert got.row_norms is None and got.row_angles is None
    # and neither is off: the whole-tensor figures against a direct float64 computation
    b64, a64 = b.double().numpy(), a.double().numpy()
    assert double[0].diff_norm == pytest.approx(float(np.linalg.norm(b64 - a64)), rel=1e-12)
    assert double[0].norm == pytest.approx(float(np.linalg.norm(b64)), rel=1e-12)


@pytest.mark.parametrize("family", [OptimizerFamily.SGD_MOMENTUM, OptimizerFamily.ADAMW])
def test_one_sweep_for_both_steps_equals_two(family: OptimizerFamily, sweep: Sweep) -> None:
    # The streaming pass measures the checkpoint-to-checkpoint step and the optimizer's last
    # step in one read of the weight; the figures must not depend on it.
    g = torch.Generator().manual_seed(23)
    w = torch.randn(128, 64, 3, 3, generator=g) * 0.05
    before = w + 1e-3 * torch.randn(w.shape, generator=g)
    if family.is_sgd:
        state: dict[str, object] = {"momentum_buffer": torch.randn(w.shape, generator=g) * 1e-3}
    else:
        state = {
            "step": torch.tensor(40.0),
            "exp_avg": torch.randn(w.shape, generator=g) * 1e-3,
            "exp_avg_sq": torch.rand(w.shape, generator=g) * 1e-6,
        }
    plan = plan_step(w, state, hyper(family), family, per_row=True)
    assert plan is not None
    both = tensor_stats(w, before, per_row=True, with_step=plan.fill)
    alone = tensor_stats(w, before, per_row=True)
    step_alone = tensor_stats(w, None, per_row=True, step=plan.fill)
    assert sweep.used == {sweep.expect(w, before)}
    assert both.step_stats is not None
    for got, expected in ((both, alone), (both.step_stats, step_alone)):
        assert got.diff_norm == pytest.approx(expected.diff_norm, rel=1e-14)
        assert got.angle == pytest.approx(expected.angle, rel=1e-12)
        assert got.row_angles is not None and expected.row_angles is not None
        np.testing.assert_allclose(got.row_angles, expected.row_angles, rtol=1e-12)
    first = tensor_stats(w, None, per_row=True, with_step=plan.fill)  # no previous checkpoint
    assert first.diff_norm is None and first.step_stats is not None
    assert first.step_stats.diff_norm == pytest.approx(step_alone.diff_norm, rel=1e-14)
    implied = implied_step(w, state, hyper(family), family, per_row=True)
    reused = implied_step(
        w, state, hyper(family), family, per_row=True, plan=plan, measured=both.step_stats
    )
    assert isinstance(implied, ImpliedStep) and isinstance(reused, ImpliedStep)
    assert reused.relative_update == pytest.approx(implied.relative_update, rel=1e-13)
    assert reused.angular_update == pytest.approx(implied.angular_update, rel=1e-12)
    # the step the formula measured against the step written out in float64 (torch)
    previous = previous_weight(w, state, hyper(family), family, per_row=True)
    assert not isinstance(previous, NoImpliedStep)
    direct = w.double().numpy() - previous[0]
    assert step_alone.diff_norm == pytest.approx(float(np.linalg.norm(direct)), rel=1e-9)


def test_radial_steps_take_the_explicit_path_and_stay_accurate(sweep: Sweep) -> None:
    # A step almost along the weight (a pure rescaling plus a tiny turn) is where the sums
    # alone would cancel; the kernel must notice and still give the turn to 1e-9.
    g = torch.Generator().manual_seed(9)
    a = torch.randn(32, 300, dtype=torch.float64, generator=g)
    turn = torch.randn(32, 300, dtype=torch.float64, generator=g)
    turn -= (turn * a).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True) * a
    b = 1.5 * a + 1e-7 * turn
    sums = kernels._row_sums(b.numpy(), a.numpy(), None, need_prev_sq=True)
    assert kernels._row_angles(sums)[1].all()
    stats = tensor_stats(b, a, per_row=True)
    assert sweep.used == {sweep.expect(a, b)}
    expected = torch.atan2(1e-7 * turn.norm(dim=1), 1.5 * a.norm(dim=1))
    assert stats.row_angles is not None
    np.testing.assert_allclose(stats.row_angles, expected.numpy(), rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["torch", "numpy"])
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "whole"])
def test_half_precision_inputs_give_the_float64_figures(
    dtype: torch.dtype, form: str, per_row: bool, sweep: Sweep
) -> None:
    # float16 and bfloat16 values are float64 values: the figures of a half-precision pair must
    # be those of the same values in float64, computed here without the kernels.
    g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, per_row)).encode()))
    a = (torch.randn(40, 8, 5, generator=g) * 0.05).to(dtype)
    b = (a.double() + 1e-2 * 0.05 * torch.randn(a.shape, generator=g, dtype=torch.float64)).to(
        dtype
    )
    assert not torch.equal(a, b)
    rows = 40 if per_row else 1
    b64 = b.double().numpy().reshape(rows, -1)
    a64 = a.double().numpy().reshape(rows, -1)
    d64 = b64 - a64  # exact: the step of two half-precision values fits a float64
    reference_angles = kernels_free_angles(a64, b64)

    if form == "torch":
        stats = tensor_stats(b, a, per_row=per_row)
    else:
        x, y = from_torch(b), from_torch(a)
        if dtype is torch.bfloat16:
            assert tag_of(x.dtype) == "bfloat16"  # raw bits under the tagged dtype
            np.testing.assert_array_equal(widened(x), b.float().numpy())
        stats = tensor_stats(x, y, per_row=per_row)
    assert sweep.used == {sweep.expect(a, b)}
    assert stats.norm == pytest.approx(math.sqrt(math.fsum((b64 * b64).ravel())), rel=1e-13)
    assert stats.diff_norm == pytest.approx(math.sqrt(math.fsum((d64 * d64).ravel())), rel=1e-12)
    whole = kernels_free_angles(a64.reshape(1, -1), b64.reshape(1, -1))[0]
    assert stats.angle == pytest.approx(whole, rel=1e-9)
    if per_row:
        assert stats.row_norms is not None and stats.row_angles is not None
        np.testing.assert_allclose(stats.row_norms, np.sqrt((b64 * b64).sum(axis=1)), rtol=1e-13)
        np.testing.assert_allclose(stats.row_angles, reference_angles, rtol=1e-9)
    else:
        assert stats.row_norms is None
    # the same values in float64 give the same figures
    same = tensor_stats(b.double(), a.double(), per_row=per_row)
    assert stats.diff_norm == pytest.approx(same.diff_norm, rel=1e-13)
    assert stats.angle == pytest.approx(same.angle, rel=1e-12)


def kernels_free_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row angle between rows of float64 `a` and `b`, by the explicit projection in long
    double (independent of `kernels`)."""
    al, bl = a.astype(LONG), b.astype(LONG)
    out = []
    for x, y in zip(al, bl, strict=True):
        across = (y - x) - (np.sum((y - x) * x) / np.sum(x * x)) * x
        along = np.sum(y * x) / np.sqrt(np.sum(x * x))
        out.append(float(np.arctan2(np.sqrt(np.sum(across * across)), along)))
    return np.array(out)


def test_integer_inputs_are_measured_as_float64() -> None:
    a = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    b = a + 1
    for x, y in ((b, a), (b.numpy(), a.numpy())):
        stats = tensor_stats(x, y, per_row=True)
        assert stats.diff_norm == pytest.approx(math.sqrt(12), rel=1e-15)
        assert stats.norm == pytest.approx(float(b.double().norm()), rel=1e-15)
        assert stats.row_norms is not None
        np.testing.assert_allclose(stats.row_norms, b.double().norm(dim=1).numpy(), rtol=1e-15)


# ----------------------------------------------------------------------------- implied steps


def hyper(family: OptimizerFamily) -> ParamHyper:
    if family.is_sgd:
        return ParamHyper(lr=0.1, weight_decay=5e-4, group=0, momentum=0.9, dampening=0.0)
    return ParamHyper(lr=1e-3, weight_decay=0.05, group=0, betas=(0.9, 0.999), eps=1e-8)


@pytest.mark.parametrize(
    "family",
    [
        OptimizerFamily.SGD_MOMENTUM,
        OptimizerFamily.ADAMW,
        OptimizerFamily.ADAM,
        OptimizerFamily.ADAM_OR_ADAMW,
    ],
)
@pytest.mark.parametrize("per_row", [True, False])
def test_block_computed_step_matches_previous_weight(
    family: OptimizerFamily, per_row: bool, sweep: Sweep
) -> None:
    g = torch.Generator().manual_seed(17)
    w = torch.randn(96, 40, 3, 3, generator=g) * 0.05
    if family.is_sgd:
        state: dict[str, object] = {"momentum_buffer": torch.randn(w.shape, generator=g) * 1e-3}
    else:
        state = {
            "step": torch.tensor(250.0),
            "exp_avg": torch.randn(w.shape, generator=g) * 1e-3,
            "exp_avg_sq": torch.rand(w.shape, generator=g) * 1e-6,
        }
    fast = implied_step(w, state, hyper(family), family, per_row=per_row)
    assert sweep.used == {sweep.expect(w)}  # the step formula evaluated in the sweep
    before = previous_weight(w, state, hyper(family), family, per_row=per_row)
    assert isinstance(fast, ImpliedStep) and not isinstance(before, NoImpliedStep)
    previous, exact, _, count = before
    assert isinstance(previous, np.ndarray) and previous.dtype == np.float64
    assert previous.shape == tuple(w.shape)
    slow = tensor_stats(w, previous, per_row=per_row)
    previous_norm = float(np.sqrt(np.square(previous).sum()))
    assert slow.diff_norm is not None
    assert fast.relative_update == pytest.approx(slow.diff_norm / previous_norm, rel=1e-10)
    assert fast.exact == exact and fast.optimizer_step == count
    if per_row:
        assert slow.row_angles is not None
        rms = float(np.sqrt(np.square(slow.row_angles).mean()))
        assert fast.angular_update == pytest.approx(rms, rel=1e-9)
    else:
        assert fast.angular_update == pytest.approx(slow.angle, rel=1e-9)


# ----------------------------------------------------------------------------- safetensors


def _torch_dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _assert_array_equals_tensor(got: object, tensor: torch.Tensor, what: object = "") -> None:
    """`got` is the numpy array holding `tensor`: same dtype, shape, values (bit for bit)."""
    assert isinstance(got, np.ndarray), (what, type(got))
    tensor = tensor.detach()
    assert dtype_name(got) == _torch_dtype_name(tensor), what
    assert got.shape == tuple(tensor.shape), what
    if tensor.dtype is torch.bfloat16:
        assert got.dtype.itemsize == 2
        np.testing.assert_array_equal(widened(got), tensor.float().numpy(), err_msg=str(what))
        bits = tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(got.view(np.uint16), bits), what
    else:
        assert np.array_equal(got, tensor.numpy()), what


def test_mapped_safetensors_equal_load_file(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {
        "a.weight": torch.randn(64, 3, 3, 3, generator=g),
        "b.bf16": torch.randn(17, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(5, 3, generator=g).to(torch.float16),
        "d.double": torch.randn(4, generator=g, dtype=torch.float64),
        "e.count": torch.tensor(7, dtype=torch.int64),
        "f.empty": torch.zeros(0, 4),
        "g.bytes": torch.arange(3, dtype=torch.uint8),  # leaves what follows misaligned
        "h.after": torch.randn(9, generator=g),
    }
    path = tmp_path / "weights.safetensors"
    save_file(tensors, str(path), metadata={"step": "12"})
    expected = load_file(str(path))
    mapped = SafetensorsFile(path)
    assert mapped.metadata == {"step": "12"}
    assert set(mapped.keys()) == set(expected)
    for key, tensor in expected.items():
        got = mapped.get_tensor(key)
        _assert_array_equals_tensor(got, tensor, key)
    # big tensors are views of the file, not copies
    view = mapped.get_tensor("a.weight")
    address = view.__array_interface__["data"][0]
    assert address == mapped.file.base + mapped.entries["a.weight"].offset
    assert not view.flags.writeable


def _safetensors_bytes(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "header",
    [
        {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}},  # size mismatch
        {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}},  # past the end
        {"x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}},
        {"x": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}},
        {
            "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "y": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},  # overlap
        },
    ],
)
def test_malformed_safetensors_are_refused(tmp_path: Path, header: dict[str, object]) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_safetensors_bytes(header, bytes(16)))
    with pytest.raises(NotMappableError):
        SafetensorsFile(path)
    # The reader then defers to the safetensors library, which explains what is wrong.
    with pytest.raises(CheckpointError):
        SafetensorsSource((path,))


# ----------------------------------------------------------------------------- torch zip


def _assert_same(got: object, expected: object, where: str = "") -> None:
    """`got` (from `load_torch_zip`) holds what `expected` (from `torch.load`) holds, with numpy
    arrays in place of tensors: same dtype, shape, strides and values."""
    if isinstance(expected, torch.Tensor):  # parameters included
        _assert_array_equals_tensor(got, expected, where)
        assert isinstance(got, np.ndarray)
        strides = tuple(s * got.dtype.itemsize for s in expected.stride())
        assert got.strides == strides, (where, got.strides, strides)
        return
    assert type(got) is type(expected), (where, type(got), type(expected))
    if isinstance(expected, dict):
        assert isinstance(got, dict)
        assert list(got) == list(expected), where
        for key in expected:
            _assert_same(got[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, list | tuple):
        assert isinstance(got, list | tuple)
        assert len(got) == len(expected), where
        for i, (u, v) in enumerate(zip(got, expected, strict=True)):
            _assert_same(u, v, f"{where}/{i}")
    else:
        assert got == expected, where


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def _training_checkpoint(optimizer: str) -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(4),
    )
    model(torch.randn(2, 3, 8, 8))
    opt: torch.optim.Optimizer
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1, "epoch": 0}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_mapped_torch_zip_equals_torch_load(tmp_path: Path, optimizer: str) -> None:
    checkpoint = _training_checkpoint(optimizer)
    shared = torch.randn(6, 4)
    checkpoint["extras"] = {
        "tied_a": shared,
        "tied_b": shared,  # the same storage twice
        "transposed": shared.t(),  # a non-contiguous view
        "param": torch.nn.Parameter(torch.randn(3)),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "nested": [1, 2.5, "text", None, (True, -3)],
    }
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint, path)
    expected = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    got = load_torch_zip(path)
    _assert_same(got, expected)
    extras = got["extras"]
    assert _address(extras["tied_a"]) == _address(extras["tied_b"])
    assert _address(extras["transposed"]) == _address(extras["tied_a"])
    assert not extras["transposed"].flags.c_contiguous
    assert not extras["tied_a"].flags.writeable  # a view of the read-only map
    loaded = load_torch_file(path)
    assert loaded.keys() == expected.keys()
    _assert_same(loaded, expected)


def test_mapped_torch_zip_reads_non_contiguous_tensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(6)
    base = torch.randn(6, 10, generator=g)
    conv = torch.randn(8, 3, 3, 3, generator=g)
    tensors = {
        "transposed": torch.randn(5, 7, generator=g).t(),
        "channels_last": conv.to(memory_format=torch.channels_last),
        "permuted": torch.randn(2, 3, 4, generator=g).permute(2, 0, 1),
        "sliced": base[1:, 2::3],  # a storage offset and a step
        "column": base[:, 4],
        "row": base[2],  # contiguous, at an offset into the same storage
        "expanded": torch.randn(3, 1, generator=g).expand(3, 4),  # stride 0
        "bf16": torch.randn(4, 6, generator=g).to(torch.bfloat16).t(),
        "half": torch.randn(4, 6, generator=g).to(torch.float16)[:, 1::2],
        "double": torch.randn(3, 5, generator=g, dtype=torch.float64).t(),
    }
    assert not all(t.is_contiguous() for t in tensors.values())
    path = tmp_path / "strided.pt"
    torch.save(tensors, path)
    expected = torch.load(path, map_location="cpu", weights_only=True)
    for key, tensor in tensors.items():  # torch.save keeps the layout: the case is what it says
        assert expected[key].stride() == tensor.stride(), key
    got = load_torch_zip(path)
    _assert_same(got, expected)
    for key in ("transposed", "channels_last", "permuted", "sliced", "column", "bf16"):
        assert not got[key].flags.c_contiguous, key
    # views of one storage in the file, not copies
    assert np.shares_memory(got["sliced"], got["row"])
    assert np.shares_memory(got["column"], got["row"])
    # the sweep reads such views element by element as they are laid out
    stats = tensor_stats(got["channels_last"], None, per_row=True)
    assert stats.row_norms is not None
    np.testing.assert_allclose(stats.row_norms, conv.double().flatten(1).norm(dim=1), rtol=1e-13)
    stats = tensor_stats(got["bf16"], got["transposed"][:6, :4], per_row=True)
    b64 = tensors["bf16"].double().numpy()
    a64 = tensors["transposed"][:6, :4].double().numpy()
    assert stats.diff_norm == pytest.approx(float(np.linalg.norm(b64 - a64)), rel=1e-13)


class _RawTensor:
    """Pickles as `torch.save` pickles a tensor, with any storage offset, size and stride
    (torch itself will not make a tensor that reaches past its storage)."""

    def __init__(
        self, storage: object, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
    ) -> None:
        self.args: tuple[object, ...] = (storage, offset, size, stride, False, OrderedDict())

    def __reduce_ex__(self, protocol: object) -> tuple[object, tuple[object, ...]]:
        return (torch._utils._rebuild_tensor_v2, self.args)


@pytest.mark.parametrize(
    ("offset", "size", "stride", "fits"),
    [
        (0, (3, 4), (4, 1), True),  # the whole storage
        (2, (2, 5), (5, 1), True),  # last element 11: the last of the storage
        (0, (4, 3), (1, 4), True),  # transposed
        (11, (1,), (1,), True),
        (0, (3, 4), (0, 1), True),  # stride 0 (an expanded row)
        (1, (3, 4), (4, 1), False),  # one element past the end
        (0, (3, 4), (5, 1), False),  # the stride reaches past the end
        (0, (4, 3), (1, 5), False),
        (0, (2,), (12,), False),
        (12, (1,), (1,), False),
        (0, (13,), (1,), False),
    ],
)
def test_crafted_tensor_geometry_must_stay_inside_its_storage(
    tmp_path: Path, offset: int, size: tuple[int, ...], stride: tuple[int, ...], fits: bool
) -> None:
    values = torch.arange(12, dtype=torch.float32)
    storage = torch.storage.TypedStorage(
        wrap_storage=values.untyped_storage(), dtype=torch.float32, _internal=True
    )
    path = tmp_path / "crafted.pt"
    torch.save({"w": _RawTensor(storage, offset, size, stride)}, path)
    if fits:  # the crafted file is sound: it loads, and as torch loads it
        got = load_torch_zip(path)["w"]
        expected = torch.as_strided(values, size, stride, offset)
        np.testing.assert_array_equal(got, expected.numpy())
        _assert_same(got, torch.load(path, weights_only=True)["w"])
    else:
        with pytest.raises(NotMappableError, match="past the end of its storage"):
            load_torch_zip(path)
    # the same geometry given to `strided_view` directly
    flat = np.arange(12, dtype=np.float32)
    if fits:
        view = strided_view(flat, offset, size, stride)
        np.testing.assert_array_equal(view, torch.as_strided(values, size, stride, offset))
        assert np.shares_memory(view, flat)
    else:
        with pytest.raises(NotMappableError):
            strided_view(flat, offset, size, stride)


@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [
        (-1, (2,), (1,)),
        (0, (2,), (-1,)),
        (0, (-2,), (1,)),
        (4, (2, 2), (-2, 1)),
        (0, (-2, -3), (-3, 1)),  # "row-major" strides of two negative sizes, 6 elements
        (-1, (2, 3), (3, 1)),  # row-major, starting before the storage
    ],
)
def test_strided_view_refuses_negative_geometry(
    offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> None:
    with pytest.raises(NotMappableError):
        strided_view(np.arange(12, dtype=np.float32), offset, size, stride)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned-by-pickle",))


def test_mapped_torch_zip_refuses_foreign_globals_and_runs_no_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2)}, path)
    # Swap data.pkl for a pickle that calls os.system on load.
    with zipfile.ZipFile(path) as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist()}
    name = next(n for n in members if n.endswith("data.pkl"))
    members[name] = pickle.dumps({"w": _Payload()}, protocol=2)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    with pytest.raises(NotMappableError, match="global"):
        load_torch_zip(path)
    with pytest.raises(UnsafeCheckpointError):
        load_torch_file(path)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_metadata_objects_fall_back_to_the_general_loader(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "timm.pth.tar"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(NotMappableError):
        load_torch_zip(path)
    loaded = load_torch_file(path)  # placeholders for the Namespace, as before
    w = loaded["state_dict"]["w"]
    assert isinstance(w, np.ndarray) and w.dtype == np.float32
    np.testing.assert_array_equal(w, np.ones(2, dtype=np.float32))


# ----------------------------------------------------------------------------- memory


def test_release_pages_keeps_data_and_ignores_heap_tensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    weights = {"big": torch.randn(512, 1024, generator=g), "small": torch.randn(7, generator=g)}
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    mapped = SafetensorsFile(path)
    big = mapped.get_tensor("big")
    assert big.nbytes >= RELEASE_MIN  # large enough to be released
    before = big.copy()
    release_pages(big, mapped.get_tensor("small"), None)
    np.testing.assert_array_equal(big, before)  # faulted back in from the file
    np.testing.assert_array_equal(big, weights["big"].numpy())
    heap = np.random.default_rng(2).standard_normal(1 << 20)
    copy = heap.copy()
    release_pages(heap)  # not a map of ours: must be left alone
    np.testing.assert_array_equal(heap, copy)
    tensor = torch.randn(1 << 20, generator=g)  # nor a torch tensor (not an array at all)
    tensor_copy = tensor.clone()
    release_pages(tensor)  # type: ignore[arg-type]
    assert torch.equal(tensor, tensor_copy)


# ----------------------------------------------------------------------------- start-up


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["inspect", "--help"]])
def test_help_and_version_do_not_import_torch(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from bnwd_cli.cli.app import app\n"
        f"result = CliRunner().invoke(app, {argv!r})\n"
        "assert result.exit_code == 0, result.output\n"
        "assert result.output.strip(), 'no output'\n"
        "print(sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_ordered_dict_metadata_survives(tmp_path: Path) -> None:
    # state_dict() carries `_metadata` on its OrderedDict (BUILD in the pickle).
    state = torch.nn.Linear(2, 2).state_dict()
    path = tmp_path / "sd.pt"
    torch.save(state, path)
    got = load_torch_zip(path)
    assert isinstance(got, OrderedDict)
    assert getattr(got, "_metadata", None) == getattr(
        torch.load(path, weights_only=True), "_metadata", None
    )
