"""Reading a checkpoint's optimizer state: the family, and per parameter its hyper-parameters.

PyTorch's `optimizer.state_dict()` numbers parameters with integer ids in the order they were
passed, across groups; `state` is keyed by those ids and is sparse. torch >= 2.6 also records
`param_names` in each group when the optimizer was built from `named_parameters()`. Without
names, ids are matched to the parameter order and the guess is checked against every state
tensor's shape (shared/THEORY.md section 4); a mapping the shapes cannot settle is reported as
ambiguous, never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch


class OptimizerFamily(str, Enum):
    SGD = "SGD"
    SGD_MOMENTUM = "SGD+momentum"
    NESTEROV = "SGD+Nesterov"
    ADAM = "Adam (coupled L2)"
    ADAMW = "AdamW (decoupled)"
    ADAM_OR_ADAMW = "Adam or AdamW"
    UNKNOWN = "unknown"

    @property
    def is_adaptive(self) -> bool:
        """Adam-family: the update is normalized, so the effective LR is lr/||w||."""
        return self in (OptimizerFamily.ADAM, OptimizerFamily.ADAMW, OptimizerFamily.ADAM_OR_ADAMW)

    @property
    def is_sgd(self) -> bool:
        return self in (OptimizerFamily.SGD, OptimizerFamily.SGD_MOMENTUM, OptimizerFamily.NESTEROV)


class NameMapping(str, Enum):
    PARAM_NAMES = "param_names recorded by the optimizer"
    ORDER_VERIFIED = "parameter order, checked against state shapes"
    ORDER_UNVERIFIED = "parameter order (no state tensors to check shapes against)"
    AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class ParamHyper:
    """The optimizer's settings for one parameter at one checkpoint."""

    lr: float
    weight_decay: float
    group: int
    momentum: float | None = None
    nesterov: bool = False
    dampening: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    optimizer_id: int | None = None


@dataclass(frozen=True)
class OptimizerSnapshot:
    """What one checkpoint's optimizer state says, per parameter name."""

    family: OptimizerFamily
    per_param: Mapping[str, ParamHyper]
    mapping: NameMapping
    groups: tuple[Mapping[str, Any], ...]
    """The param_groups without their `params` lists (lr, weight_decay, ...)."""
    notes: tuple[str, ...] = field(default=())
    id_to_name: Mapping[int, str] = field(default_factory=dict)

    def lrs(self) -> set[float]:
        return {float(g["lr"]) for g in self.groups if "lr" in g}


def detect_family(
    state: Mapping[str, Any], family_hint: OptimizerFamily | None = None
) -> tuple[OptimizerFamily, tuple[str, ...]]:
    """Recognize the optimizer from its group keys and state keys (THEORY.md section 4)."""
    if family_hint is not None:
        return family_hint, (f"optimizer family set by the user: {family_hint.value}",)
    groups = state.get("param_groups") or []
    first = groups[0] if groups else {}
    state_keys: set[str] = set()
    for per_param in (state.get("state") or {}).values():
        if isinstance(per_param, Mapping):
            state_keys.update(str(k) for k in per_param)
    if "exp_avg" in state_keys or "betas" in first:
        if first.get("decoupled_weight_decay") is True:
            return OptimizerFamily.ADAMW, ()
        if first.get("decoupled_weight_decay") is False:
            wd = any(float(g.get("weight_decay", 0.0)) > 0 for g in groups)
            return OptimizerFamily.ADAM, (() if wd else ("Adam without weight decay",))
        return OptimizerFamily.ADAM_OR_ADAMW, (
            "the state cannot tell Adam (coupled L2) from AdamW (decoupled); pass --optimizer",
        )
    if "momentum" in first and "dampening" in first:
        if first.get("nesterov"):
            return OptimizerFamily.NESTEROV, ()
        if float(first.get("momentum") or 0.0) > 0:
            return OptimizerFamily.SGD_MOMENTUM, ()
        return OptimizerFamily.SGD, ()
    seen = ", ".join(sorted(state_keys | set(first)))
    return OptimizerFamily.UNKNOWN, (f"unrecognized optimizer (keys seen: {seen})",)


def _hyper(group: Mapping[str, Any], index: int, pid: int | None) -> ParamHyper:
    betas = group.get("betas")
    return ParamHyper(
        lr=float(group.get("lr", float("nan"))),
        weight_decay=float(group.get("weight_decay", 0.0)),
        group=index,
        momentum=float(group["momentum"]) if "momentum" in group else None,
        nesterov=bool(group.get("nesterov", False)),
        dampening=float(group["dampening"]) if "dampening" in group else None,
        betas=(float(betas[0]), float(betas[1])) if betas is not None else None,
        eps=float(group["eps"]) if "eps" in group else None,
        optimizer_id=pid,
    )


def read_optimizer_state(
    state: Mapping[str, Any],
    params: Sequence[tuple[str, tuple[int, ...]]],
    *,
    family_hint: OptimizerFamily | None = None,
) -> OptimizerSnapshot:
    """Map an optimizer `state_dict()` onto parameter names.

    `params` are the model's trainable parameters in the order they were (most likely) passed
    to the optimizer, with their shapes.
    """
    family, notes = detect_family(state, family_hint)
    groups = list(state.get("param_groups") or [])
    clean_groups = tuple(
        {k: v for k, v in g.items() if k not in ("params", "param_names")} for g in groups
    )
    id_group: list[tuple[int, int]] = []
    for index, group in enumerate(groups):
        id_group.extend((int(pid), index) for pid in group.get("params", []))
    id_to_name: dict[int, str] = {}
    mapping = NameMapping.AMBIGUOUS
    extra_notes: list[str] = []
    if groups and all("param_names" in g for g in groups):
        for group in groups:
            for pid, name in zip(group["params"], group["param_names"], strict=False):
                id_to_name[int(pid)] = _normalize(str(name))
        mapping = NameMapping.PARAM_NAMES
    elif len(id_group) == len(params):
        shapes = dict(params)
        candidate = {pid: params[i][0] for i, (pid, _) in enumerate(id_group)}
        checked = 0
        for pid, name in candidate.items():
            for tensor in _state_tensors(state, pid):
                if tuple(tensor.shape) != shapes[name]:
                    extra_notes.append(
                        f"optimizer id {pid} does not match '{name}' by shape "
                        f"({tuple(tensor.shape)} vs {shapes[name]}): name mapping is ambiguous"
                    )
                    candidate = {}
                    break
                checked += 1
            if not candidate:
                break
        if candidate:
            id_to_name = candidate
            mapping = NameMapping.ORDER_VERIFIED if checked else NameMapping.ORDER_UNVERIFIED
    else:
        extra_notes.append(
            f"the optimizer holds {len(id_group)} parameters, the weights {len(params)}: "
            "cannot match them by order (frozen or tied parameters?); name mapping is ambiguous"
        )
    per_param = {
        id_to_name[pid]: _hyper(groups[gi], gi, pid) for pid, gi in id_group if pid in id_to_name
    }
    return OptimizerSnapshot(
        family=family,
        per_param=per_param,
        mapping=mapping,
        groups=clean_groups,
        notes=tuple(notes) + tuple(extra_notes),
        id_to_name=id_to_name,
    )


def _state_tensors(state: Mapping[str, Any], pid: int) -> list[torch.Tensor]:
    per_param = (state.get("state") or {}).get(pid)
    if not isinstance(per_param, Mapping):
        return []
    return [v for v in per_param.values() if isinstance(v, torch.Tensor) and v.dim() > 0]


def _normalize(name: str) -> str:
    from bnwd_cli.checkpoints.keys import strip_wrapper_prefixes

    return strip_wrapper_prefixes(name)
