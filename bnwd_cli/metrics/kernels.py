"""Per-tensor arithmetic of the streaming pass, in float64 accumulation.

Differences are taken element-wise (`w_t - w_{t-1}`), never recovered from norms and dot
products: a relative step of 1e-6 would drown in the cancellation of `|a|^2 + |b|^2 - 2<a,b>`.
The angle uses the chord between the unit vectors,
    |u - v|^2 = (|a - b|^2 - (|a| - |b|)^2) / (|a| |b|),   angle = 2 asin(|u - v| / 2),
which stays accurate for tiny angles where `acos` of a cosine near 1 does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorStats:
    """Figures of one tensor at one checkpoint (and its change since the previous one)."""

    norm: float
    sum_sq: float
    nonfinite: int
    row_norms: torch.Tensor | None
    """Per-row norms (float64), for per-row invariant weights."""
    diff_norm: float | None = None
    angle: float | None = None
    """Whole-tensor angle between this and the previous checkpoint, radians."""
    row_angles: torch.Tensor | None = None


def as_rows(t: torch.Tensor, per_row: bool) -> torch.Tensor:
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.reshape(t.shape[0], -1) if per_row and t.dim() >= 2 else t.reshape(1, -1)


def chord_angle(diff_sq: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> torch.Tensor:
    """Angle between vectors a and b from |a-b|^2, |a| and |b| (element-wise over rows)."""
    denom = norm_a * norm_b
    chord_sq = (diff_sq - (norm_a - norm_b) ** 2).clamp_min(0.0) / denom
    angle = 2.0 * torch.asin((chord_sq.sqrt() / 2.0).clamp(max=1.0))
    return torch.where(denom > 0, angle, torch.full_like(angle, float("nan")))


def tensor_stats(
    current: torch.Tensor, previous: torch.Tensor | None, *, per_row: bool
) -> TensorStats:
    """Norms of `current`; with `previous`, also the step and the angle between them."""
    cur = as_rows(current.detach(), per_row).to(torch.float64)
    row_sq = (cur * cur).sum(dim=1)
    sum_sq = float(row_sq.sum())
    nonfinite = 0 if math.isfinite(sum_sq) else int((~torch.isfinite(cur)).sum())
    norm = math.sqrt(sum_sq) if math.isfinite(sum_sq) else float("nan")
    row_norms = row_sq.sqrt() if per_row and cur.shape[0] > 1 else None
    if previous is None:
        return TensorStats(norm, sum_sq, nonfinite, row_norms)
    prev = as_rows(previous.detach(), per_row).to(torch.float64)
    diff = cur - prev
    diff_row_sq = (diff * diff).sum(dim=1)
    prev_row_sq = (prev * prev).sum(dim=1)
    diff_sq = diff_row_sq.sum()
    prev_norm = prev_row_sq.sum().sqrt()
    angle = float(chord_angle(diff_sq, prev_norm, torch.tensor(norm, dtype=torch.float64)))
    row_angles = None
    if row_norms is not None:
        row_angles = chord_angle(diff_row_sq, prev_row_sq.sqrt(), row_norms)
    return TensorStats(
        norm,
        sum_sq,
        nonfinite,
        row_norms,
        diff_norm=float(diff_sq.sqrt()),
        angle=angle,
        row_angles=row_angles,
    )
