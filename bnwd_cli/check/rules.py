"""The rules of `bnwd check`: each one reads a `RunDynamics` and returns findings.

Every rule has an id, a default severity, named thresholds and a one-line reason that is shown
with each of its findings. Defaults are chosen so the healthy bundled run passes and the
"NoConvL2" run fails; the README says why each threshold is where it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from bnwd_cli.graph.classes import ParamKind
from bnwd_cli.metrics.dynamics import LayerDynamics, LayerPoint, RunDynamics


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        return {"error": 3, "warning": 2, "info": 1}[self.value]


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: Severity
    layers: tuple[str, ...]
    message: str
    evidence: Mapping[str, float | int | str | None] = field(default_factory=dict)
    checkpoint: str | None = None
    """The checkpoint (label) the evidence points at, when there is one."""


@dataclass(frozen=True)
class RuleSettings:
    severity: Severity
    thresholds: Mapping[str, float]


Evaluate = Callable[[RunDynamics, Sequence[LayerDynamics], RuleSettings, str], list[Finding]]


@dataclass(frozen=True)
class Rule:
    id: str
    severity: Severity
    thresholds: Mapping[str, float]
    reason: str
    """One line: why a finding of this rule matters (THEORY.md)."""
    evaluate: Evaluate


def _invariant(layers: Sequence[LayerDynamics]) -> list[LayerDynamics]:
    return [layer for layer in layers if layer.classification.kind is ParamKind.SCALE_INVARIANT]


def _gammas(layers: Sequence[LayerDynamics]) -> list[LayerDynamics]:
    return [
        layer
        for layer in layers
        if layer.classification.kind is ParamKind.NORM_AFFINE and layer.name.endswith("weight")
    ]


def _nonfinite(
    run: RunDynamics, layers: Sequence[LayerDynamics], s: RuleSettings, rule: str
) -> list[Finding]:
    findings = []
    for layer in layers:
        bad = next((p for p in layer.points if p.nonfinite or not math.isfinite(p.norm)), None)
        if bad is not None:
            label = run.checkpoints[bad.checkpoint].label
            findings.append(
                Finding(
                    rule,
                    s.severity,
                    (layer.name,),
                    f"{layer.name} has {bad.nonfinite or 'some'} NaN/Inf values from {label} on",
                    {"nonfinite": bad.nonfinite, "step": bad.step},
                    label,
                )
            )
    return findings


EARLY_FRACTION = 0.25
"""Early and late windows: the first and last quarter of the run's steps."""


def _windows(layer: LayerDynamics) -> tuple[list[LayerPoint], list[LayerPoint]]:
    """Checkpoints of the early and the late quarter of the run, for robust comparisons.

    The first checkpoint is left out of the early window when the run has enough points: from
    initialization a weight's norm moves toward its equilibrium (usually up), a transient that
    says nothing about whether the run is healthy. Medians over windows, rather than single
    checkpoints, keep the noise of one interval (+-15% at equilibrium) from deciding.
    """
    points = list(layer.points)
    steps = [p.step for p in points]
    if len(points) < 5 or any(s is None for s in steps):
        return points[1:2] or points[:1], points[-1:]
    first, last = float(steps[0]), float(steps[-1])  # type: ignore[arg-type]
    span = last - first
    early = [p for p in points[1:] if float(p.step) <= first + EARLY_FRACTION * span]  # type: ignore[arg-type]
    late = [p for p in points if float(p.step) >= last - EARLY_FRACTION * span]  # type: ignore[arg-type]
    return early or points[1:2], late


def _median(values: Sequence[float]) -> float | None:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return None
    middle = len(finite) // 2
    return finite[middle] if len(finite) % 2 else 0.5 * (finite[middle - 1] + finite[middle])


def _per_step_relative_update(point: LayerPoint) -> float | None:
    """Relative step per optimizer step: per interval / sqrt(k) (independent steps add like a
    random walk, THEORY.md section 2); lr-normalized so schedules do not count as collapse."""
    if point.relative_step is None:
        return None
    k = point.steps_between or 1
    value = point.relative_step / math.sqrt(k)
    return value / point.lr if point.lr else value


def _effective_lr_collapse(
    run: RunDynamics, layers: Sequence[LayerDynamics], s: RuleSettings, rule: str
) -> list[Finding]:
    floor = s.thresholds["min-fraction"]
    findings = []
    for layer in _invariant(layers):
        if len(layer.points) < 3:
            continue
        early, late = _windows(layer)
        # The effective-LR factor (|w0|/|wt|)^p is what the norm alone did to the learning rate,
        # whatever the schedule did to the nominal lr.
        factor_early = _median([p.lr_factor for p in early if p.lr_factor is not None])
        factor_late = _median([p.lr_factor for p in late if p.lr_factor is not None])
        step_early = _median([v for p in early if (v := _per_step_relative_update(p)) is not None])
        step_late = _median([v for p in late if (v := _per_step_relative_update(p)) is not None])
        factor = factor_late / factor_early if factor_early and factor_late is not None else None
        step = step_late / step_early if step_early and step_late is not None else None
        if (factor is not None and factor < floor) or (step is not None and step < floor):
            label = run.checkpoints[layer.points[-1].checkpoint].label
            findings.append(
                Finding(
                    rule,
                    s.severity,
                    (layer.name,),
                    f"{layer.name}: per-step relative update (per unit lr) fell to "
                    f"{_x(step)} and the effective LR through norm growth to {_x(factor)} "
                    f"of their early values (below {floor:g})",
                    {
                        "relative_update_change": step,
                        "effective_lr_factor_change": factor,
                        "min_fraction": floor,
                    },
                    label,
                )
            )
    return findings


def _x(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}x"


def _norm_growth(
    run: RunDynamics, layers: Sequence[LayerDynamics], s: RuleSettings, rule: str
) -> list[Finding]:
    limit = s.thresholds["max-growth"]
    findings = []
    for layer in _invariant(layers):
        early, late = _windows(layer)
        norm_early = _median([p.norm for p in early])
        norm_late = _median([p.norm for p in late])
        if not norm_early or norm_late is None:
            continue
        growth = norm_late / norm_early
        if growth > limit:
            findings.append(
                Finding(
                    rule,
                    s.severity,
                    (layer.name,),
                    f"{layer.name}: norm still growing after the start: x{growth:.2f} from the "
                    f"early to the late part of the run ({norm_early:.3g} -> {norm_late:.3g}; "
                    f"x{layer.summary.norm_growth:.2f} since the first checkpoint)",
                    {
                        "norm_growth": growth,
                        "norm_growth_since_first": layer.summary.norm_growth,
                        "max_growth": limit,
                    },
                    run.checkpoints[layer.points[-1].checkpoint].label,
                )
            )
    return findings


def _norm_affine_decay(
    run: RunDynamics, layers: Sequence[LayerDynamics], s: RuleSettings, rule: str
) -> list[Finding]:
    decayed = [
        layer
        for layer in layers
        if layer.classification.kind is ParamKind.NORM_AFFINE
        and (layer.points[-1].weight_decay or 0.0) > s.thresholds["max-weight-decay"]
    ]
    if not decayed:
        return []
    wds = sorted({layer.points[-1].weight_decay or 0.0 for layer in decayed})
    return [
        Finding(
            rule,
            s.severity,
            tuple(layer.name for layer in decayed),
            f"weight decay {', '.join(f'{w:g}' for w in wds)} on {len(decayed)} normalization "
            "gamma/beta parameters",
            {"parameters": len(decayed), "weight_decay": wds[-1]},
        )
    ]


def _gamma_collapse(
    run: RunDynamics, layers: Sequence[LayerDynamics], s: RuleSettings, rule: str
) -> list[Finding]:
    floor = s.thresholds["min-fraction"]
    findings = []
    for layer in _gammas(layers):
        growth = layer.summary.norm_growth
        if math.isfinite(growth) and growth < floor:
            findings.append(
                Finding(
                    rule,
                    s.severity,
                    (layer.name,),
                    f"{layer.name}: gamma norm shrank to {growth:.2f}x of its start "
                    f"({layer.summary.norm_first:.3g} -> {layer.summary.norm_last:.3g})",
                    {"gamma_norm_change": growth, "min_fraction": floor},
                    run.checkpoints[layer.points[-1].checkpoint].label,
                )
            )
    return findings


def _equilibrium(
    run: RunDynamics, layers: Sequence[LayerDynamics], s: RuleSettings, rule: str
) -> list[Finding]:
    """Decayed invariant layers far from the predicted equilibrium after the time it needs."""
    factor = 1.0 + s.thresholds["max-deviation"]
    findings = []
    for layer in _invariant(layers):
        eq = layer.equilibrium
        if eq is None or not eq.prediction.exists or eq.prediction.angle is None:
            continue
        tau, elapsed, measured = (
            eq.prediction.steps_to_equilibrium,
            eq.steps_elapsed,
            eq.measured_angle,
        )
        if tau is None or elapsed is None or measured is None:
            continue
        if elapsed < s.thresholds["min-elapsed-times"] * tau:
            continue
        predicted = eq.prediction.angle
        ratio = measured / predicted
        if ratio > factor or ratio < 1.0 / factor:
            findings.append(
                Finding(
                    rule,
                    s.severity,
                    (layer.name,),
                    f"{layer.name}: per-step angle {math.degrees(measured):.3g} deg vs predicted "
                    f"{math.degrees(predicted):.3g} deg (x{ratio:.2f}) after {elapsed} steps, "
                    f"{elapsed / tau:.1f}x the time to equilibrium",
                    {
                        "measured_rad": measured,
                        "predicted_rad": predicted,
                        "ratio": ratio,
                        "steps_elapsed": elapsed,
                        "time_to_equilibrium": tau,
                    },
                )
            )
    return findings


def _dead_bias(
    run: RunDynamics, layers: Sequence[LayerDynamics], s: RuleSettings, rule: str
) -> list[Finding]:
    dead = [layer for layer in layers if layer.classification.kind is ParamKind.DEAD_BIAS]
    return [
        Finding(
            rule,
            s.severity,
            (layer.name,),
            f"{layer.name}: bias right before BatchNorm "
            f"'{', '.join(layer.classification.norm_layers)}' has no effect",
            {"norm_layer": ", ".join(layer.classification.norm_layers)},
        )
        for layer in dead
    ]


RULES: tuple[Rule, ...] = (
    Rule(
        "nonfinite-weights",
        Severity.ERROR,
        {},
        "NaN or Inf in the weights: training diverged or a checkpoint is damaged.",
        _nonfinite,
    ),
    Rule(
        "effective-lr-collapse",
        Severity.ERROR,
        {"min-fraction": 0.5},
        "A scale-invariant layer learns at lr/|w|^2: when its norm grows with no decay to hold it, "
        "its learning silently slows down.",
        _effective_lr_collapse,
    ),
    Rule(
        "norm-growth",
        Severity.WARNING,
        {"max-growth": 1.05},
        "Norm growth of a scale-invariant weight lowers its effective LR without changing the "
        "function; weight decay is what holds it.",
        _norm_growth,
    ),
    Rule(
        "norm-affine-decay",
        Severity.WARNING,
        {"max-weight-decay": 0.0},
        "Decay on normalization gamma/beta pulls them to zero and shrinks activations; it "
        "regularizes nothing.",
        _norm_affine_decay,
    ),
    Rule(
        "gamma-collapse",
        Severity.WARNING,
        {"min-fraction": 0.5},
        "Normalization gammas shrinking toward zero squeeze the activations they scale.",
        _gamma_collapse,
    ),
    Rule(
        "equilibrium",
        Severity.INFO,
        {"max-deviation": 1.0, "min-elapsed-times": 3.0},
        "With weight decay the per-step angle of a scale-invariant layer settles at a value set "
        "by lr, decay and momentum alone; far from it after that time means the theory's "
        "assumptions do not hold here.",
        _equilibrium,
    ),
    Rule(
        "dead-bias",
        Severity.INFO,
        {},
        "A bias right before BatchNorm is removed by its mean subtraction: zero gradient, dead "
        "weight.",
        _dead_bias,
    ),
)
RULES_BY_ID: Mapping[str, Rule] = {rule.id: rule for rule in RULES}
