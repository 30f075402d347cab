"""The rules of `bnwd check`: each one reads a `RunDynamics` and returns findings.

Every rule has an id, a default severity, named thresholds and a one-line reason that is shown
with each of its findings. Defaults are chosen so the healthy bundled run passes and the
"NoConvL2" run fails; the README says why each threshold is where it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from bnwd_cli.graph.classes import ParamKind
from bnwd_cli.metrics.dynamics import LayerDynamics, RunDynamics


class Severity(str, Enum):
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


def _lr_ratio(layer: LayerDynamics) -> float:
    """How much the nominal lr itself fell (1.0 when the run carries no lr)."""
    first, last = layer.points[0].lr, layer.points[-1].lr
    if first and last is not None and first > 0:
        return last / first
    return 1.0


def _effective_lr_collapse(
    run: RunDynamics, layers: Sequence[LayerDynamics], s: RuleSettings, rule: str
) -> list[Finding]:
    floor = s.thresholds["min-fraction"]
    findings = []
    for layer in _invariant(layers):
        if len(layer.points) < 2:
            continue
        factor = layer.points[-1].lr_factor  # (|w0|/|wt|)^p: the effective-LR change that the
        # norm alone caused, independent of the schedule
        nominal = _lr_ratio(layer)
        step_change = layer.summary.relative_step_change
        if factor is None or not math.isfinite(factor):
            continue
        collapsed = factor < floor
        step_collapsed = step_change is not None and step_change / nominal < floor
        if collapsed or step_collapsed:
            label = run.checkpoints[layer.points[-1].checkpoint].label
            findings.append(
                Finding(
                    rule,
                    s.severity,
                    (layer.name,),
                    f"{layer.name}: effective LR fell to {factor:.2f}x of its start through norm "
                    f"growth alone (per-step relative update x"
                    f"{'?' if step_change is None else format(step_change, '.2f')}) while the "
                    f"nominal lr changed x{nominal:.2f}",
                    {
                        "effective_lr_factor": factor,
                        "relative_step_change": step_change,
                        "nominal_lr_change": nominal,
                        "min_fraction": floor,
                    },
                    label,
                )
            )
    return findings


def _norm_growth(
    run: RunDynamics, layers: Sequence[LayerDynamics], s: RuleSettings, rule: str
) -> list[Finding]:
    limit = s.thresholds["max-growth"]
    findings = []
    for layer in _invariant(layers):
        growth = layer.summary.norm_growth
        if math.isfinite(growth) and growth > limit:
            findings.append(
                Finding(
                    rule,
                    s.severity,
                    (layer.name,),
                    f"{layer.name}: norm grew x{growth:.2f} ({layer.summary.norm_first:.3g} -> "
                    f"{layer.summary.norm_last:.3g})",
                    {"norm_growth": growth, "max_growth": limit},
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
    tolerance = s.thresholds["max-deviation"]
    findings = []
    for layer in _invariant(layers):
        eq = getattr(layer, "equilibrium", None)
        if eq is None:
            continue
        predicted = getattr(eq, "predicted_angular_update", None)
        measured = getattr(eq, "measured_angular_update", None)
        needed = getattr(eq, "time_to_equilibrium", None)
        elapsed = getattr(eq, "steps_elapsed", None)
        if not predicted or measured is None or needed is None or elapsed is None:
            continue
        if elapsed < s.thresholds["min-elapsed-times"] * needed:
            continue
        deviation = abs(math.log(measured / predicted)) if measured > 0 else math.inf
        if deviation > math.log(1 + tolerance):
            findings.append(
                Finding(
                    rule,
                    s.severity,
                    (layer.name,),
                    f"{layer.name}: per-step angle {math.degrees(measured):.3g} deg vs predicted "
                    f"{math.degrees(predicted):.3g} deg after {elapsed} steps "
                    f"({elapsed / needed:.1f}x the time to equilibrium)",
                    {
                        "measured_rad": measured,
                        "predicted_rad": predicted,
                        "steps_elapsed": elapsed,
                        "time_to_equilibrium": needed,
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
        {"min-fraction": 0.4},
        "A scale-invariant layer learns at lr/|w|^2: when its norm grows with no decay to hold it, "
        "its learning silently slows down.",
        _effective_lr_collapse,
    ),
    Rule(
        "norm-growth",
        Severity.WARNING,
        {"max-growth": 1.5},
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
