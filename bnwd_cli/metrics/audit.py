"""The weight-decay audit: what the run's decay settings mean for each kind of parameter.

Each finding has an id, a severity, the parameters concerned, figures measured from the run and
one sentence of why, from shared/THEORY.md section 5:

- decay on a normalization layer's gamma/beta pulls them toward 0 (usually a bug);
- decay on a scale-invariant weight does not regularize: it is the effective-LR control;
- no decay on a scale-invariant weight lets its norm grow and its effective LR decay;
- Adam's coupled L2 on a scale-invariant weight has no gradient-independent equilibrium;
- a bias before BatchNorm is dead (zero gradient); decay on other biases is conventionally off;
- decay on a scale-sensitive weight is ordinary L2 regularization, its absence is no L2.

The audit reads only the finished per-layer records, never tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from bnwd_cli.graph.classes import ParamKind
from bnwd_cli.metrics.optimizer import OptimizerFamily

if TYPE_CHECKING:
    from bnwd_cli.metrics.dynamics import LayerDynamics

Figure = float | int | str | None
_DECOUPLED = (OptimizerFamily.ADAMW, OptimizerFamily.LION)


class AuditSeverity(StrEnum):
    WARNING = "warning"
    """Probably not what the run intended."""
    INFO = "info"
    """Worth knowing: what the decay settings mean here."""


@dataclass(frozen=True)
class ParamEvidence:
    """Figures measured from the run for one parameter of a finding."""

    parameter: str
    figures: Mapping[str, Figure]


@dataclass(frozen=True)
class AuditFinding:
    """One finding of the weight-decay audit (THEORY.md section 5)."""

    id: str
    severity: AuditSeverity
    title: str
    """What was found, with the headline figure."""
    why: str
    """One sentence: what it means (THEORY.md section 5)."""
    parameters: tuple[str, ...]
    evidence: tuple[ParamEvidence, ...]


WHY = {
    "wd-on-norm-affine": "Decay pulls a normalization layer's gamma and beta toward 0, shrinking "
    "the post-norm activations, and regularizes nothing: usually a bug.",
    "wd-on-scale-invariant": "Decay cannot regularize a scale-invariant weight (the loss ignores "
    "its norm); it is the only brake on the norm and so, with the LR, sets its effective LR.",
    "no-wd-on-scale-invariant": "Without decay the norm of a scale-invariant weight only grows, "
    "so its effective LR (lr/|w|^2 for SGD, lr/|w| for Adam) decays over training.",
    "coupled-l2-adam": "Adam's coupled L2 divides the decay by the gradient's second moment, so "
    "scale-invariant weights reach no gradient-independent equilibrium; AdamW decouples it.",
    "dead-bias": "A bias right before BatchNorm is removed by its mean subtraction: its gradient "
    "is 0, so it is dead weight (build the layer with bias=False).",
    "wd-on-bias": "Decay on a bias is L2 on an offset, which limits no weight's scale; most "
    "recipes exclude biases from decay.",
    "wd-on-scale-sensitive": "Decay on a weight whose scale matters (no normalization after it) "
    "is ordinary L2 regularization.",
    "no-wd-on-scale-sensitive": "These scale-sensitive weights get no L2 regularization; fine "
    "when intended.",
    "decay-unknown": "Without the optimizer's per-parameter settings the audit cannot tell "
    "which parameters were decayed.",
    "not-optimized": "Parameters the optimizer does not hold (frozen) keep their values; decay "
    "does not touch them.",
}


def _decay_only_factor(layer: LayerDynamics, family: OptimizerFamily | None) -> float | None:
    """How much decay alone would have shrunk the weight over the run: prod (1 - r)^k.

    Per step r = lr*wd for decoupled decay (AdamW, Lion); SGD's momentum buffer accumulates a
    persistent decay term, so once it has built up (~1/(1-m) steps) r = lr*wd*(1-d)/(1-m)
    (Nesterov: (1-m*d)/(1-m)). Adam's coupled decay passes through the normalization: no
    gradient-free figure (None), nor without step counts. Each checkpoint's lr and decay are
    used for the steps before it.
    """
    if family is None or not (family.is_sgd or family in _DECOUPLED):
        return None
    log_factor = 0.0
    counted = False
    for point in layer.points[1:]:
        if point.steps_between is None or point.lr is None or point.weight_decay is None:
            return None
        rate = point.lr * point.weight_decay
        if family.is_sgd:
            m, d = point.momentum or 0.0, point.dampening or 0.0
            gain = (1 - m * d) if family is OptimizerFamily.NESTEROV else (1 - d)
            rate = rate * gain / (1 - m) if m < 1 else math.inf
        if rate >= 1:
            return 0.0
        log_factor += point.steps_between * math.log1p(-rate)
        counted = True
    return math.exp(log_factor) if counted else None


def _rms(layer: LayerDynamics, index: int) -> float:
    return layer.points[index].norm / math.sqrt(max(1, math.prod(layer.shape)))


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 and math.isfinite(a) else None


def _is_bias(layer: LayerDynamics) -> bool:
    return layer.name.rpartition(".")[2] == "bias"


def _wd(layer: LayerDynamics) -> float | None:
    return layer.points[-1].weight_decay


def _norm_affine(layer: LayerDynamics, family: OptimizerFamily | None) -> Mapping[str, Figure]:
    first, last = _rms(layer, 0), _rms(layer, -1)
    role = "gamma" if layer.name.endswith("weight") else "beta"
    return {
        "role": role,
        "weight_decay": _wd(layer),
        "lr": layer.points[-1].lr,
        "rms_first": first,
        "rms_last": last,
        "rms_ratio": _ratio(last, first),
        "decay_only_ratio": _decay_only_factor(layer, family),
    }


def _invariant(layer: LayerDynamics) -> Mapping[str, Figure]:
    eq = layer.equilibrium
    last = layer.points[-1]
    return {
        "weight_decay": _wd(layer),
        "lr": last.lr,
        "lr_x_wd": last.lr * last.weight_decay
        if last.lr is not None and last.weight_decay is not None
        else None,
        "norm_growth": layer.summary.norm_growth,
        "effective_lr_change": layer.summary.effective_lr_change,
        "equilibrium_angle": eq.prediction.angle if eq else None,
        "measured_angle": eq.measured_angle if eq else None,
        "equilibrium_status": eq.status.value if eq else None,
        "steps_to_equilibrium": eq.prediction.steps_to_equilibrium if eq else None,
    }


def _no_decay_invariant(layer: LayerDynamics) -> Mapping[str, Figure]:
    return {
        "weight_decay": _wd(layer),
        "norm_first": layer.summary.norm_first,
        "norm_last": layer.summary.norm_last,
        "norm_growth": layer.summary.norm_growth,
        "effective_lr_change": layer.summary.effective_lr_change,
        "steps": layer.points[-1].step,
    }


def _dead_bias(layer: LayerDynamics, family: OptimizerFamily | None) -> Mapping[str, Figure]:
    return {
        "weight_decay": _wd(layer),
        "norm_first": layer.summary.norm_first,
        "norm_last": layer.summary.norm_last,
        "norm_ratio": layer.summary.norm_growth,
        "decay_only_ratio": _decay_only_factor(layer, family),
        "norm_layer": ", ".join(layer.classification.norm_layers),
    }


def _plain(layer: LayerDynamics) -> Mapping[str, Figure]:
    return {
        "weight_decay": _wd(layer),
        "lr": layer.points[-1].lr,
        "norm_first": layer.summary.norm_first,
        "norm_last": layer.summary.norm_last,
        "norm_growth": layer.summary.norm_growth,
    }


def _finding(
    id_: str,
    severity: AuditSeverity,
    layers: Sequence[LayerDynamics],
    figures: Callable[[LayerDynamics], Mapping[str, Figure]],
    title: Callable[[list[ParamEvidence]], str],
) -> AuditFinding:
    evidence = [ParamEvidence(layer.name, figures(layer)) for layer in layers]
    return AuditFinding(
        id=id_,
        severity=severity,
        title=title(evidence),
        why=WHY[id_],
        parameters=tuple(layer.name for layer in layers),
        evidence=tuple(evidence),
    )


def _g(value: Figure) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "?" if value is None else str(value)


def _span(evidence: Sequence[ParamEvidence], key: str, fmt: str = "×{:.2f}") -> str:
    values = [e.figures.get(key) for e in evidence]
    numbers = sorted(v for v in values if isinstance(v, int | float) and math.isfinite(v))
    if not numbers:
        return "?"
    lo, hi = numbers[0], numbers[-1]
    return (
        fmt.format(lo)
        if math.isclose(lo, hi, rel_tol=5e-3)
        else (f"{fmt.format(lo)}…{fmt.format(hi)}")
    )


def audit_run(
    layers: Sequence[LayerDynamics],
    *,
    family: OptimizerFamily | None,
    have_optimizer_state: bool,
    mapping_complete: bool = False,
) -> tuple[AuditFinding, ...]:
    """Every finding of the weight-decay audit for one run's layers.

    `mapping_complete`: the optimizer's ids were all named without ambiguity, so a parameter
    without settings is one the optimizer does not hold (frozen), not an unmapped one.
    """
    by_kind: dict[ParamKind, list[LayerDynamics]] = {kind: [] for kind in ParamKind}
    for layer in layers:
        by_kind[layer.classification.kind].append(layer)
    known = [layer for layer in layers if _wd(layer) is not None]
    unknown = [layer for layer in layers if _wd(layer) is None]

    def decayed(group: Sequence[LayerDynamics]) -> list[LayerDynamics]:
        return [layer for layer in group if (_wd(layer) or 0.0) > 0]

    def undecayed(group: Sequence[LayerDynamics]) -> list[LayerDynamics]:
        return [layer for layer in group if _wd(layer) == 0.0]

    findings: list[AuditFinding] = []
    affine = decayed(by_kind[ParamKind.NORM_AFFINE])
    if affine:
        gammas = [layer for layer in affine if layer.name.endswith("weight")]

        def affine_title(ev: list[ParamEvidence]) -> str:
            wds = _span(ev, "weight_decay", "{:.3g}")
            shrink = _span([e for e in ev if e.figures.get("role") == "gamma"], "rms_ratio")
            alone = _span([e for e in ev if e.figures.get("role") == "gamma"], "decay_only_ratio")
            text = f"weight decay {wds} on {len(ev)} normalization gamma/beta"
            if gammas:
                text += f"; gamma RMS {shrink} over the run (decay alone: {alone})"
            return text

        findings.append(
            _finding(
                "wd-on-norm-affine",
                AuditSeverity.WARNING,
                affine,
                lambda layer: _norm_affine(layer, family),
                affine_title,
            )
        )
    invariant = by_kind[ParamKind.SCALE_INVARIANT]
    inv_decayed = decayed(invariant)
    if inv_decayed and family is OptimizerFamily.ADAM:
        findings.append(
            _finding(
                "coupled-l2-adam",
                AuditSeverity.WARNING,
                inv_decayed,
                _invariant,
                lambda ev: (
                    f"Adam with coupled L2 (weight decay {_span(ev, 'weight_decay', '{:.3g}')}) "
                    f"on {len(ev)} scale-invariant weights"
                ),
            )
        )
    elif inv_decayed:

        def inv_title(ev: list[ParamEvidence]) -> str:
            statuses = [e.figures.get("equilibrium_status") for e in ev]
            counts = {s: statuses.count(s) for s in dict.fromkeys(statuses) if s}
            status = ", ".join(f"{n} {s}" for s, n in counts.items())
            return (
                f"weight decay {_span(ev, 'weight_decay', '{:.3g}')} on {len(ev)} scale-invariant "
                f"weights (lr·wd {_span(ev, 'lr_x_wd', '{:.3g}')})"
                + (f"; equilibrium: {status}" if status else "")
            )

        findings.append(
            _finding(
                "wd-on-scale-invariant", AuditSeverity.INFO, inv_decayed, _invariant, inv_title
            )
        )
    inv_free = undecayed(invariant)
    if inv_free:
        findings.append(
            _finding(
                "no-wd-on-scale-invariant",
                AuditSeverity.WARNING,
                inv_free,
                _no_decay_invariant,
                lambda ev: (
                    f"no weight decay on {len(ev)} scale-invariant weights: norm "
                    f"{_span(ev, 'norm_growth')}, effective LR {_span(ev, 'effective_lr_change')} "
                    "over the run"
                ),
            )
        )
    dead = by_kind[ParamKind.DEAD_BIAS]
    if dead:
        findings.append(
            _finding(
                "dead-bias",
                AuditSeverity.INFO,
                dead,
                lambda layer: _dead_bias(layer, family),
                lambda ev: (
                    f"{len(ev)} bias(es) right before BatchNorm (zero gradient); norm "
                    f"{_span(ev, 'norm_ratio')} over the run"
                ),
            )
        )
    sensitive = by_kind[ParamKind.SCALE_SENSITIVE]
    # a bias before LayerNorm/GroupNorm is scale-invariant jointly with its weight: not here
    biases = decayed([layer for layer in sensitive if _is_bias(layer)])
    if biases:
        findings.append(
            _finding(
                "wd-on-bias",
                AuditSeverity.INFO,
                biases,
                _plain,
                lambda ev: (
                    f"weight decay {_span(ev, 'weight_decay', '{:.3g}')} on {len(ev)} "
                    "bias(es) of scale-sensitive layers"
                ),
            )
        )
    weights = [layer for layer in sensitive if not _is_bias(layer)]
    if decayed(weights):
        findings.append(
            _finding(
                "wd-on-scale-sensitive",
                AuditSeverity.INFO,
                decayed(weights),
                _plain,
                lambda ev: (
                    f"weight decay {_span(ev, 'weight_decay', '{:.3g}')} on {len(ev)} "
                    f"scale-sensitive weights (ordinary L2); norm {_span(ev, 'norm_growth')}"
                ),
            )
        )
    if undecayed(weights):
        findings.append(
            _finding(
                "no-wd-on-scale-sensitive",
                AuditSeverity.INFO,
                undecayed(weights),
                _plain,
                lambda ev: (
                    f"no weight decay on {len(ev)} scale-sensitive weights; norm "
                    f"{_span(ev, 'norm_growth')}"
                ),
            )
        )
    if unknown and have_optimizer_state and mapping_complete:
        findings.append(
            _finding(
                "not-optimized",
                AuditSeverity.INFO,
                unknown,
                _plain,
                lambda ev: (
                    f"{len(ev)} parameter(s) not in the optimizer (frozen); norm "
                    f"{_span(ev, 'norm_growth')} over the run"
                ),
            )
        )
    elif unknown:
        reason = (
            "the checkpoints carry no optimizer state"
            if not have_optimizer_state
            else "the optimizer state could not be mapped to these names"
        )
        findings.append(
            _finding(
                "decay-unknown",
                AuditSeverity.INFO,
                unknown,
                lambda layer: {"kind": layer.classification.kind.value},
                lambda ev: (
                    f"decay unknown for {len(ev)} of {len(known) + len(unknown)} "
                    f"parameters: {reason}"
                ),
            )
        )
    return tuple(findings)
