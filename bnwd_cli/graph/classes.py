"""What bnwd decides about each parameter: its class, its invariance granularity, and why.

Both deciders produce these records: the state-dict heuristic (`graph.heuristic`) when no model
code is given, and the graph analysis (`graph.analyze`) when it is. Everything downstream
(metrics, audit, check, plots) reads only these records, so either decider plugs in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class ParamKind(StrEnum):
    """How a parameter relates to normalization (shared/THEORY.md section 1 and 5)."""

    SCALE_INVARIANT = "scale-invariant"
    """Output unchanged when the weight (or its row, group, joint group) is rescaled."""
    NORM_AFFINE = "norm-affine"
    """A normalization layer's gamma (weight) or beta (bias)."""
    DEAD_BIAS = "dead-bias"
    """A bias removed by a following BatchNorm's mean subtraction: zero gradient in train mode."""
    SCALE_SENSITIVE = "scale-sensitive"
    """Everything else: rescaling changes the output, so L2 decay is ordinary regularization."""


class Granularity(StrEnum):
    """What may be rescaled independently without changing the output."""

    PER_ROW = "per-row"
    """Each output row w[c] on its own (BatchNorm / InstanceNorm after the layer)."""
    PER_GROUP = "per-group"
    """Each group of output rows together (GroupNorm)."""
    WHOLE_TENSOR = "whole-tensor"
    """Only the whole tensor (LayerNorm / RMSNorm over the features, weight standardization)."""
    JOINT = "joint"
    """Only together with the other members of its joint group (branches summed before a norm,
    or a weight together with its bias before LayerNorm / GroupNorm)."""
    NONE = "none"


class ClassificationMethod(StrEnum):
    """Where a classification came from, so every verdict says what it rests on."""

    HEURISTIC = "state-dict heuristic"
    FX_SYMBOLIC = "torch.fx symbolic trace"
    EXECUTION_TRACE = "execution trace"


@dataclass(frozen=True)
class ParamClassification:
    """The verdict on one parameter, with the evidence for it."""

    name: str
    shape: tuple[int, ...]
    kind: ParamKind
    granularity: Granularity = Granularity.NONE
    norm_layers: tuple[str, ...] = ()
    """The normalization layer(s) responsible, by module name (or op name for functional norms)."""
    joint_group: int | None = None
    """Members of the same joint group share this id."""
    groups: int | None = None
    """Number of groups, for PER_GROUP."""
    path: tuple[str, ...] = ()
    """Operations from the weight to the norm, e.g. ('conv1', 'relu', 'max_pool2d', 'bn1')."""
    method: ClassificationMethod = ClassificationMethod.HEURISTIC
    evidence: str = ""
    """One sentence: on what the verdict rests (key order, channel counts, graph path)."""

    @property
    def is_invariant(self) -> bool:
        return self.kind is ParamKind.SCALE_INVARIANT


@dataclass(frozen=True)
class ModelClassification:
    """Verdicts for every parameter of a model or state dict, in parameter order."""

    params: tuple[ParamClassification, ...]
    method: ClassificationMethod
    notes: tuple[str, ...] = field(default=())
    joint_groups: tuple[tuple[str, ...], ...] = field(default=())
    """Members of each joint group, indexed by `ParamClassification.joint_group`. A parameter
    can belong to more than one group (e.g. a conv bias before LayerNorm is rescaled with its
    weight, and also with the residual stream it feeds); its record names the smallest."""

    def by_name(self) -> dict[str, ParamClassification]:
        return {p.name: p for p in self.params}
