"""Rotational equilibrium of scale-invariant weights under weight decay (shared/THEORY.md §3).

With weight decay the norm of a scale-invariant weight settles where decay balances the growth
that gradient steps cause, and the per-step angular update settles at a value that depends only
on the hyper-parameters (noise-dominated regime; Wan et al. 2021, Kosson et al. 2024):

    SGD, momentum m (heavy ball)  sqrt(2 lr wd / (1 + m))
    AdamW                         sqrt(2 lr wd (1 - beta1) / (1 + beta1))
    Lion                          sqrt(pi/2) sqrt(2 lr wd) sqrt((1-beta1)^2 + beta1^2 (1-beta2)/(1+beta2))
    Adam, coupled L2              none independent of the gradient

Nesterov is not in THEORY.md's table. Its row here is derived with the same balance argument
the SGDM row rests on: the decay term and the long-run displacement are those of heavy ball, so
the equilibrium norm is the same, while one step's size is larger by `nesterov_noise_factor`
(see `updates.py`); the angle is the SGDM angle times that factor. tests/test_equilibrium.py
checks it on a real BatchNorm training run, as it checks the SGDM and AdamW rows.

Time to equilibrium is of order 1/(lr wd) steps; the linearized relaxation of ||w||^2 takes
1/(2 lr wd) steps for AdamW and Lion, (1-m)/(4 lr wd) for SGD with momentum m.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from bnwd_cli.metrics.optimizer import OptimizerFamily
from bnwd_cli.metrics.updates import nesterov_noise_factor

AT_EQUILIBRIUM_TOLERANCE = 0.25
"""Measured/predicted angle within [1/1.25, 1.25] counts as at equilibrium. The formulas are
noise-dominated asymptotics: real BatchNorm nets at equilibrium land within about 15 % of them
(the test run of tests/test_equilibrium.py: x0.91 to x1.02; the bundled digits run
sample_checkpoints/sgd_wd_all: x1.07 to x1.14), and a window of ten per-step samples of a small
layer scatters by another ~10 %."""
SETTLING_TIMES = 3.0
"""Within this many relaxation times of the start a layer far from its prediction is still
approaching it (the distance to equilibrium shrinks as exp(-t/tau))."""
CLOSING_MARGIN = math.log(1.1)
"""The first sample must be at least 10 % further (in ratio) from the prediction than the
current window for a layer to count as moving toward it: per-step samples scatter."""
MEASUREMENT_WINDOW = 10
"""At most this many of the last per-step samples (at the last lr and weight decay) are averaged."""


class EquilibriumStatus(StrEnum):
    AT = "at equilibrium"
    APPROACHING = "approaching"
    FAR = "far from it"
    NO_EQUILIBRIUM = "no equilibrium exists"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class EquilibriumPrediction:
    """What theory predicts for one scale-invariant unit under given hyper-parameters."""

    exists: bool
    """An equilibrium exists and the formula for it applies."""
    angle: float | None = None
    """Per-step angular update at equilibrium, radians."""
    norm: float | None = None
    """Norm of one invariant unit (row or tensor) at equilibrium, where the theory gives one
    independent of the gradient (AdamW)."""
    steps_to_equilibrium: float | None = None
    """Linearized relaxation time of ||w||^2, in optimizer steps."""
    formula: str = ""
    reason: str | None = None
    """Why there is no prediction (coupled Adam, no decay, unknown optimizer)."""
    none_exists: bool = False
    """Theory says no equilibrium exists (no decay; Adam's coupled L2), as opposed to the
    prediction being unknown for lack of information."""


def predict_equilibrium(
    family: OptimizerFamily | None,
    lr: float | None,
    weight_decay: float | None,
    *,
    momentum: float | None = None,
    dampening: float | None = None,
    betas: tuple[float, float] | None = None,
    unit_size: int | None = None,
) -> EquilibriumPrediction:
    """The THEORY.md §3 prediction for one invariant unit of `unit_size` elements."""
    if family is None:
        return EquilibriumPrediction(False, reason="no optimizer state: lr and decay unknown")
    if lr is None or weight_decay is None or not math.isfinite(lr):
        return EquilibriumPrediction(False, reason="lr or weight decay unknown for this layer")
    if family is OptimizerFamily.UNKNOWN:
        return EquilibriumPrediction(False, reason="unrecognized optimizer: no theory for it")
    if lr <= 0:
        return EquilibriumPrediction(
            False, reason="lr is 0 at the last checkpoint (end of a schedule?): nothing moves"
        )
    if weight_decay <= 0:
        return EquilibriumPrediction(
            False,
            reason="no weight decay: nothing brakes the norm, which grows while the effective "
            "LR decays",
            none_exists=True,
        )
    rate = lr * weight_decay
    if family is OptimizerFamily.ADAM:
        return EquilibriumPrediction(
            False,
            reason="Adam with coupled L2: the decay is rescaled by the gradient's second "
            "moment, so no gradient-independent equilibrium exists (use AdamW)",
            none_exists=True,
        )
    if family is OptimizerFamily.ADAM_OR_ADAMW:
        return EquilibriumPrediction(
            False,
            reason="Adam (no equilibrium) or AdamW cannot be told apart; pass --optimizer",
        )
    if family.is_sgd:
        m = momentum or 0.0
        d = dampening or 0.0
        angle = math.sqrt(2 * rate / (1 + m))
        formula = "sqrt(2·lr·wd/(1+m))"
        if family is OptimizerFamily.NESTEROV and d < 1:
            angle *= nesterov_noise_factor(m, d)
            formula += "·c_nesterov(m) (derived, not in THEORY.md)"
        return EquilibriumPrediction(
            True, angle=angle, steps_to_equilibrium=(1 - m) / (4 * rate), formula=formula
        )
    beta1, beta2 = betas or (0.9, 0.999)
    if family is OptimizerFamily.ADAMW:
        norm = math.sqrt(lr * unit_size / (2 * weight_decay)) if unit_size else None
        return EquilibriumPrediction(
            True,
            angle=math.sqrt(2 * rate * (1 - beta1) / (1 + beta1)),
            norm=norm,
            steps_to_equilibrium=1 / (2 * rate),
            formula="sqrt(2·lr·wd·(1-β1)/(1+β1)); norm sqrt(lr·C/(2·wd))",
        )
    # Lion
    spread = (1 - beta1) ** 2 + beta1**2 * (1 - beta2) / (1 + beta2)
    return EquilibriumPrediction(
        True,
        angle=math.sqrt(math.pi / 2) * math.sqrt(2 * rate) * math.sqrt(spread),
        steps_to_equilibrium=1 / (2 * rate),
        formula="sqrt(π/2)·sqrt(2·lr·wd)·sqrt((1-β1)²+β1²(1-β2)/(1+β2))",
    )


@dataclass(frozen=True, slots=True)
class AngleSample:
    """One measured per-step angular update of a layer."""

    checkpoint: int
    step: int | None
    angle: float
    predicted: float | None
    """The prediction at that checkpoint's lr and weight decay."""


@dataclass(frozen=True)
class EquilibriumAssessment:
    """A scale-invariant layer measured against its equilibrium prediction."""

    prediction: EquilibriumPrediction
    status: EquilibriumStatus
    explanation: str
    measured_angle: float | None = None
    """Root-mean-square per-step angular update over the last samples, radians."""
    measured_from: str = ""
    samples: int = 0
    ratio: float | None = None
    """measured_angle / predicted angle."""
    unit_norm: float | None = None
    """Current norm of one invariant unit (root-mean-square row norm for per-row weights)."""
    predicted_norm: float | None = None
    norm_source: str = ""
    steps_elapsed: int | None = None


def rms(values: Sequence[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


def assess_equilibrium(
    prediction: EquilibriumPrediction,
    samples: Sequence[AngleSample],
    *,
    measured_from: str,
    unit_norm: float | None,
    steps_elapsed: int | None,
    adaptive: bool,
) -> EquilibriumAssessment:
    """Compare the measured per-step angles with the prediction and decide a status.

    The window is the last `MEASUREMENT_WINDOW` samples taken at the last prediction (same lr
    and decay), so a schedule's earlier phases do not blur it.
    """
    if not prediction.exists or prediction.angle is None:
        status = (
            EquilibriumStatus.NO_EQUILIBRIUM
            if prediction.none_exists
            else EquilibriumStatus.UNKNOWN
        )
        # the measured angle still says how fast the weight turns (and, without decay, how
        # that slows down)
        last = list(samples)[-MEASUREMENT_WINDOW:]
        return EquilibriumAssessment(
            prediction,
            status,
            prediction.reason or "",
            measured_angle=rms([s.angle for s in last]) if last else None,
            measured_from=measured_from if last else "",
            samples=len(last),
            unit_norm=unit_norm,
            steps_elapsed=steps_elapsed,
        )
    target = prediction.angle
    window = [s for s in samples if s.predicted is not None and _close(s.predicted, target)]
    window = window[-MEASUREMENT_WINDOW:]
    if not window:
        return EquilibriumAssessment(
            prediction,
            EquilibriumStatus.UNKNOWN,
            "no per-step angle measured: needs momentum/Adam state or checkpoints one step apart",
            unit_norm=unit_norm,
            steps_elapsed=steps_elapsed,
        )
    measured = rms([s.angle for s in window])
    ratio = measured / target
    predicted_norm, norm_source = prediction.norm, "theory (gradient-independent)"
    if predicted_norm is None and unit_norm is not None and ratio > 0:
        # In the noise-dominated regime the per-step angle scales as 1/||w||^2 under SGD and
        # 1/||w|| under normalized updates, so the norm at which it would equal the prediction
        # follows from the current ratio (THEORY.md §3's SGDM norm with E||g~||^2 measured).
        predicted_norm = unit_norm * (ratio if adaptive else math.sqrt(ratio))
        norm_source = "from the measured angle (gradient noise as it is now)"
    tolerance = math.log1p(AT_EQUILIBRIUM_TOLERANCE)
    distance = abs(math.log(ratio)) if ratio > 0 else math.inf
    tau = prediction.steps_to_equilibrium
    early = steps_elapsed is not None and tau is not None and steps_elapsed < SETTLING_TIMES * tau
    first = next((s for s in samples if s.predicted), None)
    closing = (
        first is not None
        and first is not window[-1]
        and first.predicted is not None
        and abs(math.log(max(first.angle, 1e-300) / first.predicted)) > distance + CLOSING_MARGIN
    )
    within = f"measured/predicted ×{ratio:.2f}"
    if distance <= tolerance:
        status, why = EquilibriumStatus.AT, f"{within}, within ±{AT_EQUILIBRIUM_TOLERANCE:.0%}"
    elif early or closing:
        status = EquilibriumStatus.APPROACHING
        parts = [within]
        if early and tau is not None and steps_elapsed is not None:
            parts.append(f"{steps_elapsed} steps of ~{tau:.0f} per relaxation time")
        if closing:
            parts.append("moving toward it")
        why = "; ".join(parts)
    else:
        status = EquilibriumStatus.FAR
        why = f"{within} after " + (
            f"{steps_elapsed} steps (relaxation time ~{tau:.0f})"
            if steps_elapsed is not None and tau is not None
            else "the run (its step count is unknown)"
        )
    return EquilibriumAssessment(
        prediction,
        status,
        why,
        measured_angle=measured,
        measured_from=measured_from,
        samples=len(window),
        ratio=ratio,
        unit_norm=unit_norm,
        predicted_norm=predicted_norm,
        norm_source=norm_source if predicted_norm is not None else "",
        steps_elapsed=steps_elapsed,
    )


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))
