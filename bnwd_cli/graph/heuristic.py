"""Classifying parameters from a state dict alone, when no model code is given.

A state dict keeps module registration order, which for conv/linear -> norm pairs is almost
always forward order. The rules, each reported as the evidence of its verdict:
- a module with `running_mean`/`running_var` buffers is a BatchNorm (per-channel statistics);
- a module named like a norm (`norm`, `ln`, `gn`, `bn`, `rms`, ...) with a 1-D weight is a
  LayerNorm/GroupNorm/RMSNorm (no running statistics);
- a weight with dim >= 2 whose next parametrized module in key order is such a norm with as many
  channels as the weight has output rows feeds that norm: scale-invariant. For BatchNorm this is
  per row and the weight's bias is dead. For the other norms the weight must also sit in the same
  parent module as the norm (a pre-norm transformer's `attn.proj -> norm2` is a residual add,
  not a direct feed), and the bias is not removed, so weight and bias are invariant jointly.
Every verdict is marked heuristic: `bnwd inspect --model model.py` replaces it with the graph
analysis.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from bnwd_cli.graph.classes import (
    ClassificationMethod,
    Granularity,
    ModelClassification,
    ParamClassification,
    ParamKind,
)

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
NORM_NAME = re.compile(
    r"(^|[._])(bn\d*|norm\w*|\w*_norm|ln\w*|gn\d*|layernorm|layer_norm|groupnorm|group_norm|"
    r"rmsnorm|rms_norm|batchnorm|batch_norm|instancenorm|instance_norm)$",
    re.I,
)
GROUP_NAME = re.compile(r"(gn\d*|group_?norm)$", re.I)


@dataclass(frozen=True)
class TensorEntry:
    """A state-dict entry as the heuristic needs it: name, shape, whether it is floating."""

    name: str
    shape: tuple[int, ...]
    is_float: bool = True


@dataclass(frozen=True)
class _Module:
    """A module of the state dict: its name, its parameters' shapes, its buffers."""

    name: str
    params: dict[str, tuple[int, ...]]
    buffers: frozenset[str]

    @property
    def is_batchnorm(self) -> bool:
        return "running_mean" in self.buffers and "running_var" in self.buffers

    @property
    def is_named_norm(self) -> bool:
        leaf = self.name.rsplit(".", 1)[-1]
        return bool(NORM_NAME.search(leaf)) and len(self.params.get("weight", (0, 0))) == 1

    @property
    def is_norm(self) -> bool:
        return self.is_batchnorm or self.is_named_norm

    @property
    def channels(self) -> int | None:
        shape = self.params.get("weight") or self.params.get("bias")
        return shape[0] if shape and len(shape) == 1 else None

    @property
    def norm_type(self) -> str:
        if self.is_batchnorm:
            return "BatchNorm"
        leaf = self.name.rsplit(".", 1)[-1].lower()
        if GROUP_NAME.search(leaf):
            return "GroupNorm"
        if "rms" in leaf:
            return "RMSNorm"
        return "LayerNorm-like"


def is_buffer_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in BN_BUFFERS


def _split(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


def _parent(module: str) -> str:
    return module.rpartition(".")[0]


def classify_state_dict(entries: Sequence[TensorEntry]) -> ModelClassification:
    """Classify every floating, non-buffer entry of a state dict (in key order)."""
    modules: dict[str, _Module] = {}
    for entry in entries:
        module_name, attr = _split(entry.name)
        current = modules.get(module_name) or _Module(module_name, {}, frozenset())
        if is_buffer_name(entry.name):
            current = _Module(module_name, current.params, current.buffers | {attr})
        elif entry.is_float:
            current = _Module(module_name, {**current.params, attr: entry.shape}, current.buffers)
        modules[module_name] = current
    order = [m for m in modules.values() if m.params]

    verdicts: dict[str, ParamClassification] = {}
    joint_id = 0
    norms_by_parent: dict[str, list[_Module]] | None = None  # made where a name pairs them
    for index, owner in enumerate(order):
        if owner.is_norm:
            for attr, shape in owner.params.items():
                name = f"{owner.name}.{attr}" if owner.name else attr
                verdicts[name] = ParamClassification(
                    name,
                    shape,
                    ParamKind.NORM_AFFINE,
                    norm_layers=(owner.name,),
                    evidence=f"{'gamma' if attr == 'weight' else attr} of {owner.norm_type} "
                    f"'{owner.name}' ({_norm_evidence(owner)})",
                )
            continue
        weight_shape = owner.params.get("weight")
        if weight_shape is None or len(weight_shape) < 2:
            continue
        nxt = order[index + 1] if index + 1 < len(order) else None
        if _feeds(owner, weight_shape, nxt) and nxt is not None:
            where = (
                f"next module in key order is {nxt.norm_type} '{nxt.name}' with "
                f"{nxt.channels} channels = {weight_shape[0]} output rows"
            )
        else:
            if norms_by_parent is None:
                norms_by_parent = _norms_by_parent(order)
            nxt = _named_partner(owner, weight_shape, norms_by_parent.get(_parent(owner.name), ()))
            if nxt is None:
                continue
            where = (
                f"named pair: '{owner.name}' with {nxt.norm_type} '{nxt.name}' in the same "
                f"module, {nxt.channels} channels = {weight_shape[0]} output rows"
            )
        norm_name = nxt.name
        weight_name = f"{owner.name}.weight" if owner.name else "weight"
        bias_shape = owner.params.get("bias")
        bias_name = f"{owner.name}.bias" if owner.name else "bias"
        if nxt.is_batchnorm:
            verdicts[weight_name] = ParamClassification(
                weight_name,
                weight_shape,
                ParamKind.SCALE_INVARIANT,
                Granularity.PER_ROW,
                norm_layers=(norm_name,),
                path=(owner.name, norm_name),
                evidence=where,
            )
            if bias_shape is not None:
                verdicts[bias_name] = ParamClassification(
                    bias_name,
                    bias_shape,
                    ParamKind.DEAD_BIAS,
                    norm_layers=(norm_name,),
                    path=(owner.name, norm_name),
                    evidence=f"bias right before BatchNorm '{norm_name}': removed by its mean "
                    "subtraction",
                )
        else:
            granularity = (
                Granularity.PER_GROUP if nxt.norm_type == "GroupNorm" else Granularity.WHOLE_TENSOR
            )
            group = None
            if bias_shape is not None:
                joint_id += 1
                group = joint_id
                granularity = Granularity.JOINT
            verdicts[weight_name] = ParamClassification(
                weight_name,
                weight_shape,
                ParamKind.SCALE_INVARIANT,
                granularity,
                norm_layers=(norm_name,),
                joint_group=group,
                path=(owner.name, norm_name),
                evidence=where + (" (jointly with its bias)" if group else ""),
            )
            if bias_shape is not None:
                verdicts[bias_name] = ParamClassification(
                    bias_name,
                    bias_shape,
                    ParamKind.SCALE_INVARIANT,
                    Granularity.JOINT,
                    norm_layers=(norm_name,),
                    joint_group=group,
                    path=(owner.name, norm_name),
                    evidence=f"bias before {nxt.norm_type} '{norm_name}' is not removed by it: "
                    "invariant only jointly with its weight",
                )

    params: list[ParamClassification] = []
    for entry in entries:
        if is_buffer_name(entry.name) or not entry.is_float:
            continue
        verdict = verdicts.get(entry.name) or ParamClassification(
            entry.name,
            entry.shape,
            ParamKind.SCALE_SENSITIVE,
            evidence="no normalization layer found right after it in key order",
        )
        params.append(verdict)
    return ModelClassification(
        params=tuple(params),
        method=ClassificationMethod.HEURISTIC,
        notes=(
            "classified from the state dict alone (key order, names, channel counts); "
            "pass --model model.py for the graph analysis",
        ),
    )


def _feeds(owner: _Module, weight_shape: tuple[int, ...], norm: _Module | None) -> bool:
    return (
        norm is not None
        and norm.is_norm
        and norm.channels == weight_shape[0]
        and (norm.is_batchnorm or _parent(norm.name) == _parent(owner.name))
    )


LAYER_WORD = re.compile(r"^(conv|fc|linear|lin|proj|dense)", re.I)
NORM_WORD = re.compile(
    r"^(bn|norm|ln|gn|batchnorm|batch_norm|layernorm|layer_norm|groupnorm|group_norm)", re.I
)


def _norms_by_parent(order: Sequence[_Module]) -> dict[str, list[_Module]]:
    """The norms among `order`, by the module holding them (in their order)."""
    found: dict[str, list[_Module]] = {}
    for module in order:
        if module.is_norm:
            found.setdefault(_parent(module.name), []).append(module)
    return found


def _named_partner(
    owner: _Module, weight_shape: tuple[int, ...], siblings: Sequence[_Module]
) -> _Module | None:
    """A norm that pairs with `owner` by name: `conv1`/`bn1`, `conv`/`bn`, `fc2`/`norm2`;
    `siblings`: the norms in the module that holds `owner`.

    Safetensors files store keys sorted, not in module order, so `bn1` comes before `conv1`
    and the key-order rule cannot see the pair; the names still can.
    """
    leaf = owner.name.rpartition(".")[2]
    layer_word = LAYER_WORD.match(leaf)
    if layer_word is None:
        return None
    suffix = leaf[layer_word.end() :]
    partners = [
        m
        for m in siblings
        if (match := NORM_WORD.match(m.name.rpartition(".")[2])) is not None
        and m.name.rpartition(".")[2][match.end() :] == suffix
        and _feeds(owner, weight_shape, m)
    ]
    return partners[0] if len(partners) == 1 else None


def _norm_evidence(module: _Module) -> str:
    if module.is_batchnorm:
        return "has running statistics"
    return "named like a norm, 1-D weight, no running statistics"
