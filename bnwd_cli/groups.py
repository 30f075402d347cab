"""Optimizer parameter groups built from the scale-invariance analysis, not from name patterns.

    groups = bnwd_cli.param_groups(model, weight_decay=5e-4, example_input=x)
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    print(groups.summary.describe())

What goes where (shared/THEORY.md section 5):
- normalization gamma/beta: no decay (decay pulls them toward 0 and regularizes nothing);
- biases, and dead biases right before BatchNorm: no decay;
- scale-invariant weights (and biases invariant jointly with their weight): their own group,
  decayed by default (`invariant_policy="decay"`), because there decay is the only brake on the
  norm and so the effective-LR control; `"exclude"` puts them at weight decay 0 (their norm then
  grows and the effective LR decays, THEORY.md section 2);
- every other weight: decay (ordinary L2 on a weight whose scale matters).

Each group carries `param_names`, which PyTorch (>= 2.6) stores in the optimizer's state dict,
so `bnwd inspect` maps the optimizer state to names without guessing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from bnwd_cli.errors import UsageError
from bnwd_cli.graph.classes import ModelClassification, ParamClassification, ParamKind

if TYPE_CHECKING:
    import torch


class InvariantPolicy(StrEnum):
    DECAY = "decay"
    """Keep decay on scale-invariant weights: it sets their effective LR (the default)."""
    EXCLUDE = "exclude"
    """No decay on scale-invariant weights: their norm grows, their effective LR decays."""


class GroupRole(StrEnum):
    DECAY = "decay"
    NO_DECAY = "no_decay"
    SCALE_INVARIANT = "scale_invariant"


@dataclass(frozen=True)
class PlacedParam:
    """Where one parameter went, and why."""

    name: str
    shape: tuple[int, ...]
    kind: ParamKind
    role: GroupRole
    reason: str


@dataclass(frozen=True)
class GroupSpec:
    role: GroupRole
    weight_decay: float
    param_names: tuple[str, ...]
    numel: int


@dataclass(frozen=True)
class ParamGroupSummary:
    """What went where: the groups, every parameter with its reason, and notes."""

    weight_decay: float
    invariant_policy: InvariantPolicy
    classification_method: str
    groups: tuple[GroupSpec, ...]
    params: tuple[PlacedParam, ...]
    notes: tuple[str, ...] = field(default=())

    def group(self, role: GroupRole) -> GroupSpec | None:
        return next((g for g in self.groups if g.role is role), None)

    def describe(self) -> str:
        """A few lines for a training log."""
        lines = [
            f"bnwd param groups (weight decay {self.weight_decay:g}, scale-invariant: "
            f"{self.invariant_policy.value}; {self.classification_method}):"
        ]
        for group in self.groups:
            lines.append(
                f"  {group.role.value}: {len(group.param_names)} tensors, {group.numel:,} "
                f"values, weight_decay={group.weight_decay:g}"
            )
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


class ParamGroups(list[dict[str, Any]]):
    """The optimizer groups (a plain list of dicts, as `torch.optim` takes) with `.summary`."""

    summary: ParamGroupSummary

    def __init__(self, groups: Sequence[dict[str, Any]], summary: ParamGroupSummary) -> None:
        super().__init__(groups)
        self.summary = summary


def _place(
    verdict: ParamClassification, joint_groups: Sequence[Sequence[str]]
) -> tuple[GroupRole, str]:
    attribute = verdict.name.rpartition(".")[2]
    if verdict.kind is ParamKind.NORM_AFFINE:
        norm = ", ".join(f"'{n}'" for n in verdict.norm_layers) or "a normalization layer"
        return GroupRole.NO_DECAY, f"gamma/beta of norm {norm}: decay would pull it toward 0"
    if verdict.kind is ParamKind.DEAD_BIAS:
        return GroupRole.NO_DECAY, "bias before BatchNorm: zero gradient, decay only shrinks it"
    if verdict.kind is ParamKind.SCALE_INVARIANT:
        how = verdict.granularity.value
        group = verdict.joint_group
        if group is not None and 0 <= group < len(joint_groups):
            others = [n for n in joint_groups[group] if n != verdict.name]
            how = "jointly with " + ", ".join(others) if others else how
        return GroupRole.SCALE_INVARIANT, f"scale-invariant ({how}): decay sets its effective LR"
    if attribute == "bias":
        return GroupRole.NO_DECAY, "bias of a scale-sensitive layer: L2 on an offset"
    return GroupRole.DECAY, "scale-sensitive: ordinary L2 regularization"


def plan_param_groups(
    classification: ModelClassification,
    weight_decay: float,
    *,
    invariant_policy: InvariantPolicy | str = InvariantPolicy.DECAY,
    params: Sequence[tuple[str, tuple[int, ...]]] | None = None,
    frozen: Sequence[str] = (),
) -> ParamGroupSummary:
    """Decide the groups from a classification alone (no tensors needed).

    `params` are the trainable parameters in `named_parameters()` order (default: the
    classification's own order); `frozen` names are left out and noted.
    """
    policy = _policy(invariant_policy)
    if weight_decay < 0:
        raise UsageError(f"weight_decay {weight_decay}: must be >= 0")
    verdicts = classification.by_name()
    order = (
        list(params) if params is not None else [(p.name, p.shape) for p in classification.params]
    )
    placed: list[PlacedParam] = []
    notes: list[str] = []
    unclassified: list[str] = []
    for name, shape in order:
        verdict = verdicts.get(name)
        if verdict is None:
            unclassified.append(name)
            verdict = ParamClassification(name, tuple(shape), ParamKind.SCALE_SENSITIVE)
        role, reason = _place(verdict, classification.joint_groups)
        placed.append(PlacedParam(name, tuple(shape), verdict.kind, role, reason))
    if unclassified:
        notes.append(
            f"{len(unclassified)} parameter(s) missing from the classification were treated as "
            f"scale-sensitive: {', '.join(unclassified[:5])}{' ...' if len(unclassified) > 5 else ''}"
        )
    if frozen:
        notes.append(f"{len(frozen)} frozen parameter(s) (requires_grad=False) left out")
    invariant_wd = weight_decay if policy is InvariantPolicy.DECAY else 0.0
    if policy is InvariantPolicy.EXCLUDE and any(
        p.role is GroupRole.SCALE_INVARIANT for p in placed
    ):
        notes.append(
            "scale-invariant weights excluded from decay: their norm will grow and their "
            "effective LR decay over training"
        )
    decays = {
        GroupRole.DECAY: weight_decay,
        GroupRole.NO_DECAY: 0.0,
        GroupRole.SCALE_INVARIANT: invariant_wd,
    }
    groups = []
    for role in GroupRole:
        members = [p for p in placed if p.role is role]
        if members:
            numel = sum(_numel(p.shape) for p in members)
            groups.append(GroupSpec(role, decays[role], tuple(p.name for p in members), numel))
    return ParamGroupSummary(
        weight_decay=weight_decay,
        invariant_policy=policy,
        classification_method=classification.method.value,
        groups=tuple(groups),
        params=tuple(placed),
        notes=tuple(notes) + tuple(classification.notes),
    )


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    *,
    example_input: Any = None,
    invariant_policy: InvariantPolicy | str = InvariantPolicy.DECAY,
    classification: ModelClassification | None = None,
    extra: Mapping[GroupRole | str, Mapping[str, Any]] | None = None,
) -> ParamGroups:
    """Optimizer parameter groups for `model`, from its graph's scale-invariance analysis.

    `example_input` is what `model(...)` takes (a tensor, a tuple of arguments or a dict of
    keyword arguments), needed to trace the graph; `classification` skips the analysis (from
    `bnwd_cli.classify_model`). `extra` adds optimizer options per group, e.g.
    `{"scale_invariant": {"lr": 0.2}}`. Frozen parameters are left out; a tied parameter
    appears once, as `named_parameters()` lists it.
    """
    policy = _policy(invariant_policy)
    if classification is None:
        if example_input is None:
            raise UsageError(
                "param_groups(model, ...) needs example_input=, what model(...) is called with "
                "(a tensor, a tuple of arguments or a dict of keyword arguments), to trace the "
                "graph; or pass classification= from bnwd_cli.classify_model"
            )
        from bnwd_cli.graph.analyze import classify_model

        classification = classify_model(model, example_input)
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    frozen = [n for n, p in named if not p.requires_grad]
    summary = plan_param_groups(
        classification,
        weight_decay,
        invariant_policy=policy,
        params=[(n, tuple(p.shape)) for n, p in trainable],
        frozen=frozen,
    )
    tensors = dict(trainable)
    options = {_role(k): dict(v) for k, v in (extra or {}).items()}
    groups = [
        {
            "params": [tensors[name] for name in spec.param_names],
            "param_names": list(spec.param_names),
            "weight_decay": spec.weight_decay,
            **options.get(spec.role, {}),
        }
        for spec in summary.groups
    ]
    return ParamGroups(groups, summary)


def _policy(value: InvariantPolicy | str) -> InvariantPolicy:
    try:
        return InvariantPolicy(value)
    except ValueError:
        raise UsageError(
            f"invariant_policy {value!r}: expected 'decay' (keep decay as the effective-LR "
            "control) or 'exclude'"
        ) from None


def _role(value: GroupRole | str) -> GroupRole:
    try:
        return GroupRole(value)
    except ValueError:
        roles = ", ".join(r.value for r in GroupRole)
        raise UsageError(f"extra options for group {value!r}: groups are {roles}") from None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
