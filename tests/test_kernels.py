"""`metrics.kernels`: norms, differences and angles against independent float64 / exact references.

The reference angle uses Kahan's `2 atan2(|a^ - b^|, |a^ + b^|)` (a different formula from the
code's chord-and-asin), and the tiny-step cases are checked against exact rational arithmetic.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bnwd_cli.metrics.kernels import as_rows, tensor_stats


def ref_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two vectors, Kahan's formula in float64 (NaN when one is zero)."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return math.nan
    ua, ub = a / na, b / nb
    return float(2.0 * math.atan2(np.linalg.norm(ua - ub), np.linalg.norm(ua + ub)))


def exact_fraction_sum_sq(values: np.ndarray) -> Fraction:
    return sum((Fraction(float(v)) ** 2 for v in values.ravel()), Fraction(0))


def exact_relative_step_and_angle(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """|b - a| / |a| and the angle between a and b, from exact rationals (float32 inputs are
    exact in binary fractions) and 80-digit decimals for the square roots."""
    fa = [Fraction(float(v)) for v in a.ravel()]
    fb = [Fraction(float(v)) for v in b.ravel()]
    diff_sq = sum(((y - x) ** 2 for x, y in zip(fa, fb, strict=True)), Fraction(0))
    a_sq = sum((x * x for x in fa), Fraction(0))
    b_sq = sum((y * y for y in fb), Fraction(0))
    dot = sum((x * y for x, y in zip(fa, fb, strict=True)), Fraction(0))
    with localcontext() as ctx:
        ctx.prec = 80

        def dec(f: Fraction) -> Decimal:
            return Decimal(f.numerator) / Decimal(f.denominator)

        relative = (dec(diff_sq) / dec(a_sq)).sqrt()
        cos = dec(dot) / (dec(a_sq) * dec(b_sq)).sqrt()
        chord = (2 - 2 * cos).sqrt()  # |a^ - b^|, free of cancellation at 80 digits
    return float(relative), 2.0 * math.asin(float(chord) / 2.0)


finite32 = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def tensor_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    rows = draw(st.integers(1, 5))
    cols = draw(st.integers(1, 12))
    a = draw(arrays(np.float32, (rows, cols), elements=finite32))
    b = draw(arrays(np.float32, (rows, cols), elements=finite32))
    return a, b


def as_input(values: np.ndarray, as_torch: bool) -> np.ndarray | torch.Tensor:
    """`tensor_stats` takes numpy arrays (checkpoints) and torch tensors (API callers) alike."""
    return torch.from_numpy(values) if as_torch else values


@settings(max_examples=150, deadline=None)
@given(tensor_pairs(), st.booleans())
def test_whole_tensor_figures_match_float64_reference(
    pair: tuple[np.ndarray, np.ndarray], as_torch: bool
) -> None:
    a, b = pair
    stats = tensor_stats(as_input(b, as_torch), as_input(a, as_torch), per_row=False)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert stats.norm == pytest.approx(np.linalg.norm(b64), rel=1e-12, abs=1e-300)
    assert stats.sum_sq == pytest.approx(float(np.sum(b64 * b64)), rel=1e-12, abs=1e-300)
    assert stats.diff_norm == pytest.approx(np.linalg.norm(b64 - a64), rel=1e-12, abs=1e-300)
    assert stats.nonfinite == 0
    assert stats.row_norms is None
    expected = ref_angle(a, b)
    if math.isnan(expected):
        assert stats.angle is not None and math.isnan(stats.angle)
    else:
        assert stats.angle == pytest.approx(expected, rel=1e-9, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(tensor_pairs(), st.booleans())
def test_per_row_figures_match_float64_reference(
    pair: tuple[np.ndarray, np.ndarray], as_torch: bool
) -> None:
    a, b = pair
    stats = tensor_stats(as_input(b, as_torch), as_input(a, as_torch), per_row=True)
    b64 = b.astype(np.float64)
    assert stats.norm == pytest.approx(np.linalg.norm(b64), rel=1e-12, abs=1e-300)
    if a.shape[0] == 1:
        assert stats.row_norms is None  # one row: the whole tensor is the row
        return
    assert stats.row_norms is not None and stats.row_angles is not None
    assert isinstance(stats.row_norms, np.ndarray) and stats.row_norms.dtype == np.float64
    assert isinstance(stats.row_angles, np.ndarray) and stats.row_angles.dtype == np.float64
    np.testing.assert_allclose(
        stats.row_norms, np.linalg.norm(b64, axis=1), rtol=1e-12, atol=1e-300
    )
    expected = np.array([ref_angle(a[r], b[r]) for r in range(a.shape[0])])
    got = stats.row_angles
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    finite = ~np.isnan(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-9, atol=1e-12)


def plane_vector(radius: float, phi: float, dim: int = 5) -> torch.Tensor:
    v = torch.zeros(dim, dtype=torch.float64)
    v[1], v[3] = radius * math.cos(phi), radius * math.sin(phi)
    return v


@pytest.mark.parametrize("theta", [1e-12, 1e-8, 1e-4, 0.3, 1.0, 2.5])
def test_rotation_by_known_angle(theta: float) -> None:
    # b is a rotated by theta in a 2-D plane and rescaled: the angle is theta exactly.
    a = plane_vector(2.0, 0.7)
    b = plane_vector(3.5, 0.7 + theta)
    stats = tensor_stats(b, a, per_row=False)
    assert stats.angle == pytest.approx(theta, rel=1e-9)
    # |b - a|^2 = r1^2 + r2^2 - 2 r1 r2 cos(theta) (law of cosines)
    assert stats.diff_norm == pytest.approx(
        math.sqrt(2.0**2 + 3.5**2 - 2 * 2.0 * 3.5 * math.cos(theta)), rel=1e-12
    )
    assert stats.norm == pytest.approx(3.5, rel=1e-15)


def test_per_row_rotations_by_known_angles() -> None:
    thetas = [0.0, 1e-9, 0.01, 0.5, 1.2]
    a = torch.stack([plane_vector(1.0 + r, 0.1 * r, dim=6) for r in range(len(thetas))])
    b = torch.stack([plane_vector(0.5 + 2 * r, 0.1 * r + t, dim=6) for r, t in enumerate(thetas)])
    stats = tensor_stats(b.reshape(5, 2, 3), a.reshape(5, 2, 3), per_row=True)
    assert stats.row_angles is not None and stats.row_norms is not None
    got = stats.row_angles.tolist()
    assert got[0] == pytest.approx(0.0, abs=1e-15)
    for value, theta in zip(got[1:], thetas[1:], strict=True):
        assert value == pytest.approx(theta, rel=1e-9)
    assert stats.row_norms.tolist() == pytest.approx([0.5 + 2 * r for r in range(5)], rel=1e-15)


def test_pure_rescaling_has_zero_angle_and_known_step() -> None:
    a = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stats = tensor_stats(2.0 * a, a, per_row=True)
    assert stats.angle == pytest.approx(0.0, abs=1e-15)
    assert stats.row_angles is not None
    assert float(np.abs(stats.row_angles).max()) == pytest.approx(0.0, abs=1e-15)
    assert stats.diff_norm == pytest.approx(float(a.norm()), rel=1e-14)


@pytest.mark.parametrize("target", [1e-6, 1e-7, 1e-8, 1e-9])
def test_tiny_relative_steps_in_float32_stay_accurate(target: float) -> None:
    g = torch.Generator().manual_seed(7)
    a = torch.randn(4096, generator=g, dtype=torch.float32)
    norm = float(a.double().norm())
    # Nudge the smallest-magnitude elements (finest float32 grid) so that the whole step is
    # about `target` of the norm; b is whatever float32 rounding makes of it.
    k = 16
    idx = a.abs().argsort()[:k]
    b = a.clone()
    b[idx] = (a[idx].double() + target * norm / math.sqrt(k)).float()
    assert not torch.equal(a, b)
    exact_rel, exact_angle = exact_relative_step_and_angle(a.numpy(), b.numpy())
    assert target / 3 < exact_rel < 3 * target  # the case is what it says

    stats = tensor_stats(b, a, per_row=False)
    assert stats.diff_norm is not None and stats.angle is not None
    assert stats.diff_norm / float(a.double().norm()) == pytest.approx(exact_rel, rel=1e-9)
    assert stats.angle == pytest.approx(exact_angle, rel=1e-9)
    if target <= 1e-8:
        # The check has teeth: the textbook acos of the float64 cosine cannot resolve these.
        cos = float(torch.dot(a.double(), b.double()) / (a.double().norm() * b.double().norm()))
        naive = math.acos(min(1.0, cos))
        assert abs(naive - exact_angle) > 0.1 * exact_angle


def test_per_row_tiny_steps_in_float32() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(8, 3, 3, 3, generator=g)
    b = a.clone()
    # one element per row nudged by one float32 ulp
    for r in range(8):
        b[r, 0, 0, 0] = torch.nextafter(a[r, 0, 0, 0], torch.tensor(math.inf))
    stats = tensor_stats(b, a, per_row=True)
    assert stats.row_angles is not None
    for r in range(8):
        _, exact = exact_relative_step_and_angle(a[r].numpy(), b[r].numpy())
        assert float(stats.row_angles[r]) == pytest.approx(exact, rel=1e-9)
        assert 1e-10 < exact < 1e-6


def test_float64_accumulation_does_not_overflow_float32() -> None:
    t = torch.tensor([3e38, -3e38, 1.0], dtype=torch.float32)
    stats = tensor_stats(t, None, per_row=False)
    assert math.isfinite(stats.norm)
    assert stats.norm == pytest.approx(math.sqrt(2) * float(torch.tensor(3e38)), rel=1e-12)


def test_exact_sum_of_squares_of_many_elements() -> None:
    g = torch.Generator().manual_seed(11)
    t = torch.randn(20000, generator=g) * 1e3
    exact = exact_fraction_sum_sq(t.numpy())
    stats = tensor_stats(t, None, per_row=False)
    assert stats.sum_sq == pytest.approx(float(exact), rel=1e-13)
    assert stats.norm == pytest.approx(math.sqrt(float(exact)), rel=1e-13)


def test_nan_and_inf_are_counted_and_poison_the_figures() -> None:
    a = torch.ones(4, 5)
    b = a.clone()
    b[1, 2] = math.nan
    b[3, 0] = math.inf
    b[3, 1] = -math.inf
    stats = tensor_stats(b, a, per_row=True)
    assert stats.nonfinite == 3
    assert math.isnan(stats.norm)
    assert stats.angle is not None and math.isnan(stats.angle)
    assert stats.row_angles is not None
    # rows 0 and 2 are untouched: their angles are still 0; rows 1 and 3 are undefined
    angles = stats.row_angles.tolist()
    assert angles[0] == pytest.approx(0.0, abs=1e-12)
    assert angles[2] == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(angles[1]) and math.isnan(angles[3])
    # NaN in the previous tensor only
    back = tensor_stats(a, b, per_row=False)
    assert back.nonfinite == 0 and back.norm == pytest.approx(math.sqrt(20))
    assert back.angle is not None and math.isnan(back.angle)


def test_zero_tensor_has_zero_norm_and_undefined_angle() -> None:
    zero = torch.zeros(3, 4)
    stats = tensor_stats(zero, torch.ones(3, 4), per_row=True)
    assert stats.norm == 0.0 and stats.nonfinite == 0
    assert stats.angle is not None and math.isnan(stats.angle)
    assert stats.diff_norm == pytest.approx(math.sqrt(12))


@pytest.mark.parametrize(
    ("shape", "per_row", "expected"),
    [
        ((6, 4, 3, 3), True, (6, 36)),
        ((6, 4, 3, 3), False, (1, 216)),
        ((7,), True, (1, 7)),
        ((), True, (1, 1)),
        ((5, 3), True, (5, 3)),
    ],
)
def test_as_rows_flattens_all_but_the_output_dimension(
    shape: tuple[int, ...], per_row: bool, expected: tuple[int, int]
) -> None:
    assert tuple(as_rows(torch.zeros(shape), per_row).shape) == expected
