"""Reading a checkpoint's optimizer state: the family, and per parameter its hyper-parameters.

PyTorch's `optimizer.state_dict()` numbers parameters with integer ids in the order they were
passed, across groups; `state` is keyed by those ids and is sparse. torch >= 2.6 also records
`param_names` in each group when the optimizer was built from `named_parameters()`. Without
names, ids are matched to the parameter order and the guess is checked against every state
tensor's shape (shared/THEORY.md section 4); a mapping the shapes cannot settle is reported as
ambiguous, never guessed.

Besides plain order, two well-known group builders are tried, each checked against the shapes:
the Transformers Trainer's decay / no-decay split (`Trainer.get_decay_parameter_names`: group 0
holds every parameter outside `nn.LayerNorm` modules whose lower-cased name matches none of
`bias`, `layernorm`, `rmsnorm`, `(^|.)norm($|.)`, `_norm($|.)`; older releases dropped only
`bias`), and timm's `param_groups_weight_decay` (group 0, undecayed: 1-D parameters and
biases). Both list each group's parameters in `named_parameters()` order.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class OptimizerFamily(StrEnum):
    SGD = "SGD"
    SGD_MOMENTUM = "SGD+momentum"
    NESTEROV = "SGD+Nesterov"
    ADAM = "Adam (coupled L2)"
    ADAMW = "AdamW (decoupled)"
    ADAM_OR_ADAMW = "Adam or AdamW"
    LION = "Lion"
    UNKNOWN = "unknown"

    @property
    def is_adaptive(self) -> bool:
        """Normalized update (Adam family, Lion's sign): the effective LR is lr/||w||."""
        return self in (
            OptimizerFamily.ADAM,
            OptimizerFamily.ADAMW,
            OptimizerFamily.ADAM_OR_ADAMW,
            OptimizerFamily.LION,
        )

    @property
    def is_adam(self) -> bool:
        return self in (OptimizerFamily.ADAM, OptimizerFamily.ADAMW, OptimizerFamily.ADAM_OR_ADAMW)

    @property
    def is_sgd(self) -> bool:
        return self in (OptimizerFamily.SGD, OptimizerFamily.SGD_MOMENTUM, OptimizerFamily.NESTEROV)


class NameMapping(StrEnum):
    PARAM_NAMES = "param_names recorded by the optimizer"
    ORDER_VERIFIED = "parameter order, checked against state shapes"
    ORDER_UNVERIFIED = "parameter order (no state tensors to check shapes against)"
    TRAINER_SPLIT = "Transformers Trainer decay/no-decay split, checked against state shapes"
    TIMM_SPLIT = "timm decay/no-decay split, checked against state shapes"
    AMBIGUOUS = "ambiguous"


class LayoutHint(StrEnum):
    """Which group builder the checkpoint format points to (used only to break a tie)."""

    TRANSFORMERS_TRAINER = "the Transformers Trainer"
    TIMM = "timm"

    @property
    def mapping(self) -> NameMapping:
        if self is LayoutHint.TIMM:
            return NameMapping.TIMM_SPLIT
        return NameMapping.TRAINER_SPLIT


@dataclass(frozen=True, slots=True)
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
    amsgrad: bool = False
    maximize: bool = False
    scheduled: bool = False
    """The group carries `initial_lr`: an LR scheduler ran, so lr changes between steps."""


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
    unmapped_ids: tuple[int, ...] = ()
    """Optimizer ids that could not be given a name (ambiguous or unknown)."""

    def lrs(self) -> set[float]:
        return {float(g["lr"]) for g in self.groups if "lr" in g}


# --------------------------------------------------------------------------- family


def _keys(state: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], set[str], set[str]]:
    groups = [g for g in (state.get("param_groups") or []) if isinstance(g, Mapping)]
    group_keys = {str(k) for g in groups for k in g} - {"params", "param_names"}
    state_keys: set[str] = set()
    for per_param in (state.get("state") or {}).values():
        if isinstance(per_param, Mapping):
            state_keys.update(str(k) for k in per_param)
    return groups, group_keys, state_keys


# Fingerprints of torch.optim classes that are not handled, to name what was seen.
_LOOKALIKES = (
    ("NAdam", lambda g, s: "momentum_decay" in g or "mu_product" in s),
    ("RAdam", lambda g, s: "betas" in g and "amsgrad" not in g and "exp_avg_sq" in s),
    ("Adamax", lambda g, s: "exp_inf" in s),
    ("Adagrad", lambda g, s: "lr_decay" in g or "sum" in s),
    ("RMSprop", lambda g, s: "alpha" in g or "square_avg" in s),
    ("Adadelta", lambda g, s: "rho" in g or "acc_delta" in s),
)


def _detect(
    groups: Sequence[Mapping[str, Any]], group_keys: set[str], state_keys: set[str]
) -> tuple[OptimizerFamily, tuple[str, ...]]:
    # NAdam has Adam's betas and moments but a different update
    nadam = "momentum_decay" in group_keys or "mu_product" in state_keys
    if not nadam and "betas" in group_keys and "amsgrad" in group_keys:
        # torch >= 2.6 writes `decoupled_weight_decay` into Adam's and AdamW's groups (AdamW is
        # Adam with it set); apex/DeepSpeed FusedAdam write `adam_w_mode`.
        flags = {g.get("decoupled_weight_decay", g.get("adam_w_mode")) for g in groups}
        if flags == {True}:
            return OptimizerFamily.ADAMW, ()
        if flags == {False}:
            decayed = any(float(g.get("weight_decay") or 0.0) > 0 for g in groups)
            return OptimizerFamily.ADAM, (
                () if decayed else ("Adam without weight decay in any group",)
            )
        same = not any(float(g.get("weight_decay") or 0.0) > 0 for g in groups)
        return OptimizerFamily.ADAM_OR_ADAMW, (
            "the optimizer state has no `decoupled_weight_decay` flag (written by torch < 2.6?): "
            "Adam (coupled L2) and AdamW (decoupled) look the same"
            + (
                "; no group has weight decay, so both behave the same"
                if same
                else "; pass --optimizer adam or --optimizer adamw"
            ),
        )
    if (
        "betas" in group_keys
        and "eps" not in group_keys
        and state_keys <= {"exp_avg"}
        and "amsgrad" not in group_keys
    ):
        # lion-pytorch and timm's Lion: betas, no eps, one moment.
        return OptimizerFamily.LION, ()
    if {"momentum", "dampening", "nesterov"} <= group_keys:
        if any(g.get("nesterov") for g in groups):
            return OptimizerFamily.NESTEROV, ()
        if any(float(g.get("momentum") or 0.0) > 0 for g in groups):
            return OptimizerFamily.SGD_MOMENTUM, ()
        return OptimizerFamily.SGD, ()
    looks = next((name for name, test in _LOOKALIKES if test(group_keys, state_keys)), None)
    seen = (
        f"group keys: {', '.join(sorted(group_keys)) or 'none'}; "
        f"state keys: {', '.join(sorted(state_keys)) or 'none'}"
    )
    what = f"looks like {looks}, which bnwd does not model" if looks else "unrecognized"
    return OptimizerFamily.UNKNOWN, (f"optimizer {what} ({seen})",)


def detect_family(
    state: Mapping[str, Any], family_hint: OptimizerFamily | None = None
) -> tuple[OptimizerFamily, tuple[str, ...]]:
    """Recognize the optimizer from its group keys and state keys (THEORY.md section 4).

    `family_hint` (the user's `--optimizer`) wins; a note says so when the state disagrees.
    """
    groups, group_keys, state_keys = _keys(state)
    detected, notes = _detect(groups, group_keys, state_keys)
    if family_hint is None:
        return detected, notes
    agrees = (
        detected is family_hint
        or detected is OptimizerFamily.UNKNOWN
        or (detected is OptimizerFamily.ADAM_OR_ADAMW and family_hint.is_adam)
    )
    if agrees:
        return family_hint, (f"optimizer family set by --optimizer: {family_hint.value}",)
    return family_hint, (
        f"--optimizer says {family_hint.value} but the optimizer state says {detected.value}; "
        "using --optimizer",
    )


def _hyper(group: Mapping[str, Any], index: int, pid: int | None) -> ParamHyper:
    betas = group.get("betas")
    return ParamHyper(
        lr=float(group.get("lr", float("nan"))),
        weight_decay=float(group.get("weight_decay") or 0.0),
        group=index,
        momentum=float(group["momentum"]) if "momentum" in group else None,
        nesterov=bool(group.get("nesterov", False)),
        dampening=float(group["dampening"]) if "dampening" in group else None,
        betas=(float(betas[0]), float(betas[1])) if betas is not None else None,
        eps=float(group["eps"]) if "eps" in group else None,
        optimizer_id=pid,
        amsgrad=bool(group.get("amsgrad", False)),
        maximize=bool(group.get("maximize", False)),
        scheduled="initial_lr" in group,
    )


# --------------------------------------------------------------------------- name mapping


Shape = tuple[int, ...]
_MANY = 2  # counts of assignments are capped: only 0, 1 and "several" matter
_MAX_DP_CELLS = 4_000_000


@dataclass(frozen=True)
class _Match:
    """The outcome of matching one layout: how many assignments fit the shapes, and which ids
    every fitting assignment gives the same name."""

    count: int
    settled: dict[int, str]


def param_state(state: Mapping[str, Any], pid: int) -> Mapping[str, Any] | None:
    """The per-parameter state of optimizer id `pid` (int keys; str keys after a JSON trip)."""
    states = state.get("state") or {}
    per_param = states.get(pid, states.get(str(pid)))
    return per_param if isinstance(per_param, Mapping) else None


def _state_shape(state: Mapping[str, Any], pid: int) -> Shape | None:
    """The shape the state tensors of `pid` say the parameter has (None: nothing to check)."""
    per_param = param_state(state, pid)
    if per_param is None:
        return None
    for value in per_param.values():
        # numpy arrays from a checkpoint, or torch tensors from an API caller's state_dict()
        if not isinstance(value, str | bytes) and len(getattr(value, "shape", ())) > 0:
            return tuple(value.shape)
    return None


def _subsequence_match(
    ids: Sequence[int],
    id_shapes: Mapping[int, Shape | None],
    names: Sequence[str],
    shapes: Mapping[str, Shape],
) -> _Match:
    """Assign `ids` (in order) to an order-preserving subsequence of `names`, by shape.

    A group built by filtering `named_parameters()` (frozen parameters left out, or a decay
    rule) lists its parameters as such a subsequence. Counts are capped at 2; `settled` holds
    the ids that every fitting assignment maps to the same name.
    """
    n, m = len(ids), len(names)
    if n > m:
        return _Match(0, {})

    def fits(i: int, j: int) -> bool:
        want = id_shapes.get(ids[i])
        return want is None or want == shapes[names[j]]

    if n == m:  # a single alignment: check it directly
        if all(fits(i, i) for i in range(n)):
            return _Match(1, {ids[i]: names[i] for i in range(n)})
        return _Match(0, {})
    slack = m - n
    if n * (slack + 1) > _MAX_DP_CELLS:
        return _Match(_MANY, {})
    # left[i][k]: ways to place ids[:i] in names[:i+k] (k = names skipped so far), capped
    left = [[0] * (slack + 1) for _ in range(n + 1)]
    left[0] = [1] * (slack + 1)
    for i in range(n):
        for k in range(slack + 1):
            j = i + k  # ids[i] placed at names[j]
            here = left[i][k] if fits(i, j) else 0
            below = left[i + 1][k - 1] if k > 0 else 0
            left[i + 1][k] = min(_MANY, below + here)
    # right[i][k]: ways to place ids[i:] in names[i+k:], capped
    right = [[0] * (slack + 2) for _ in range(n + 1)]
    right[n] = [1] * (slack + 2)
    right[n][slack + 1] = 0
    for i in range(n - 1, -1, -1):
        right[i][slack + 1] = 0
        for k in range(slack, -1, -1):
            here = right[i + 1][k] if fits(i, i + k) else 0
            right[i][k] = min(_MANY, here + right[i][k + 1])
    total = right[0][0]
    settled: dict[int, str] = {}
    if total == 0:
        return _Match(0, {})
    for i in range(n):
        # ids[i] at names[i+k] is possible when ids[:i] fit before it and ids[i+1:] after it
        places = [
            k for k in range(slack + 1) if fits(i, i + k) and left[i][k] > 0 and right[i + 1][k] > 0
        ]
        if len(places) == 1:
            settled[ids[i]] = names[i + places[0]]
    return _Match(total, settled)


@dataclass(frozen=True)
class _Layout:
    """A way the optimizer state's parameter ids may map to the model's names."""

    mapping: NameMapping
    description: str
    groups: tuple[tuple[tuple[int, ...], tuple[str, ...]], ...]
    """(ids, candidate names) per matched unit: ids must fit a subsequence of the names."""
    disjoint: bool = False
    """The units share candidates, so their matches must not overlap. Only unique matches are
    checked for overlap; several matches per unit count as several (conservative)."""


_TRAINER_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def _trainer_no_decay(name: str, in_layernorm: bool, patterns: Sequence[str]) -> bool:
    return in_layernorm or any(re.search(p, name.lower()) for p in patterns)


def _layouts(
    group_ids: Sequence[tuple[int, ...]],
    groups: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    shapes: Mapping[str, Shape],
    layernorm_params: Collection[str],
) -> list[_Layout]:
    flat = tuple(pid for ids in group_ids for pid in ids)
    layouts = [
        _Layout(NameMapping.ORDER_VERIFIED, "parameter order", ((flat, tuple(names)),)),
    ]
    if len(group_ids) > 1:
        # groups built by filtering named_parameters(): each group in order, groups disjoint
        layouts.append(
            _Layout(
                NameMapping.ORDER_VERIFIED,
                "each group in parameter order",
                tuple((ids, tuple(names)) for ids in group_ids),
                disjoint=True,
            )
        )
    if len(group_ids) != 2:
        return layouts
    wds = [float(g.get("weight_decay") or 0.0) for g in groups]
    if wds[1] == 0.0:
        seen: set[tuple[str, ...]] = set()
        for patterns in (_TRAINER_PATTERNS, (r"bias",)):  # current and older releases
            for ln in (frozenset(layernorm_params), frozenset()):
                decay = tuple(n for n in names if not _trainer_no_decay(n, n in ln, patterns))
                if decay in seen:
                    continue
                seen.add(decay)
                rest = tuple(n for n in names if n not in set(decay))
                layouts.append(
                    _Layout(
                        NameMapping.TRAINER_SPLIT,
                        "Transformers Trainer split",
                        ((group_ids[0], decay), (group_ids[1], rest)),
                    )
                )
    if wds[0] == 0.0:
        no_decay = tuple(n for n in names if len(shapes[n]) <= 1 or n.endswith(".bias"))
        decay = tuple(n for n in names if n not in set(no_decay))
        layouts.append(
            _Layout(
                NameMapping.TIMM_SPLIT,
                "timm split",
                ((group_ids[0], no_decay), (group_ids[1], decay)),
            )
        )
    return layouts


def _match_layout(
    layout: _Layout,
    id_shapes: Mapping[int, Shape | None],
    shapes: Mapping[str, Shape],
) -> _Match:
    count = 1
    settled: dict[int, str] = {}
    for ids, candidates in layout.groups:
        part = _subsequence_match(ids, id_shapes, candidates, shapes)
        count = min(_MANY, count * part.count)
        if count == 0:
            return _Match(0, {})
        settled.update(part.settled)
    if layout.disjoint and count == 1 and len(set(settled.values())) < len(settled):
        return _Match(0, {})
    # With several fits per unit, a name settled within its unit stays settled once the units
    # must also be disjoint (more constraints, fewer fits), as long as any fit remains.
    return _Match(count, settled)


def resolve_name(
    recorded: str, weight_names: Collection[str], stored_keys: Mapping[str, str]
) -> str | None:
    """The checkpoint weight a name recorded by the optimizer refers to.

    Recorded names are the training module's `named_parameters()` names, which may still carry
    the prefixes the weights lost (a Lightning module's `net.`, a DDP `module.`). `stored_keys`
    maps the keys as the file stored them to the weight names.
    """
    from bnwd_cli.checkpoints.keys import strip_wrapper_prefixes

    if recorded in weight_names:
        return recorded
    if recorded in stored_keys:
        return stored_keys[recorded]
    stripped = strip_wrapper_prefixes(recorded)
    if stripped in weight_names:
        return stripped
    candidates = [
        w for w in weight_names if stripped.endswith("." + w) or w.endswith("." + stripped)
    ]
    return candidates[0] if len(candidates) == 1 else None


def read_optimizer_state(
    state: Mapping[str, Any],
    params: Sequence[tuple[str, tuple[int, ...]]],
    *,
    family_hint: OptimizerFamily | None = None,
    aliases: Mapping[str, str] | None = None,
    original_names: Mapping[str, str] | None = None,
    layout_hint: LayoutHint | None = None,
    layernorm_params: Collection[str] = (),
) -> OptimizerSnapshot:
    """Map an optimizer `state_dict()` onto parameter names.

    `params` are the model's trainable parameters in the order they were (most likely) passed
    to the optimizer, with their shapes, each tied parameter listed once (as
    `named_parameters()` lists it). `aliases` maps the other names of a tied parameter to the
    listed one; they receive its settings. `original_names` maps weight names to the keys the
    file stored (before prefixes were stripped), to resolve recorded `param_names`.
    `layernorm_params` are the gammas/betas of LayerNorm-like modules (for the Trainer split).
    """
    family, family_notes = detect_family(state, family_hint)
    groups = [g for g in (state.get("param_groups") or []) if isinstance(g, Mapping)]
    clean_groups = tuple(
        {k: v for k, v in g.items() if k not in ("params", "param_names")} for g in groups
    )
    group_ids = [tuple(int(pid) for pid in g.get("params", [])) for g in groups]
    id_group = {pid: index for index, ids in enumerate(group_ids) for pid in ids}
    shapes = dict(params)
    id_shapes = {pid: _state_shape(state, pid) for pid in id_group}
    notes: list[str] = []
    id_to_name: dict[int, str] = {}
    stored_keys = {stored: name for name, stored in (original_names or {}).items()}

    named = [i for i, g in enumerate(groups) if "param_names" in g]
    for index in named:
        id_to_name.update(_names_from_group(groups[index], shapes, id_shapes, stored_keys, notes))
    unnamed = [i for i in range(len(groups)) if i not in named]
    mapping = NameMapping.PARAM_NAMES
    if unnamed:
        claimed = set(id_to_name.values())
        remaining = [n for n, _ in params if n not in claimed]
        mapping, found = _map_by_layout(
            [group_ids[i] for i in unnamed],
            [groups[i] for i in unnamed],
            remaining,
            shapes,
            id_shapes,
            layout_hint,
            layernorm_params,
            notes,
        )
        id_to_name.update(found)
        if named and mapping is not NameMapping.AMBIGUOUS:
            mapping = NameMapping.PARAM_NAMES
    per_param: dict[str, ParamHyper] = {
        name: _hyper(groups[id_group[pid]], id_group[pid], pid) for pid, name in id_to_name.items()
    }
    for alias, canonical in (aliases or {}).items():
        if canonical in per_param and alias not in per_param:
            per_param[alias] = per_param[canonical]
    unmapped = tuple(pid for pid in id_group if pid not in id_to_name)
    return OptimizerSnapshot(
        family=family,
        per_param=per_param,
        mapping=mapping,
        groups=clean_groups,
        notes=tuple(family_notes) + tuple(notes),
        id_to_name=id_to_name,
        unmapped_ids=unmapped,
    )


def _names_from_group(
    group: Mapping[str, Any],
    shapes: Mapping[str, Shape],
    id_shapes: Mapping[int, Shape | None],
    stored_keys: Mapping[str, str],
    notes: list[str],
) -> dict[int, str]:
    found: dict[int, str] = {}
    missing: list[str] = []
    for pid, recorded in zip(group.get("params", []), group.get("param_names", []), strict=False):
        name = resolve_name(str(recorded), shapes.keys(), stored_keys)
        if name is None:
            missing.append(str(recorded))
            continue
        want = id_shapes.get(int(pid))
        if want is not None and want != shapes[name]:
            notes.append(
                f"optimizer id {pid} is recorded as '{recorded}' but its state has shape "
                f"{want}, the weight {shapes[name]}: left unmapped"
            )
            continue
        found[int(pid)] = name
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        notes.append(
            f"{len(missing)} parameter name(s) recorded by the optimizer are not among the "
            f"checkpoint's weights ({shown})"
        )
    return found


def _map_by_layout(
    group_ids: Sequence[tuple[int, ...]],
    groups: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    shapes: Mapping[str, Shape],
    id_shapes: Mapping[int, Shape | None],
    layout_hint: LayoutHint | None,
    layernorm_params: Collection[str],
    notes: list[str],
) -> tuple[NameMapping, dict[int, str]]:
    total_ids = sum(len(ids) for ids in group_ids)
    checked = any(id_shapes.get(pid) is not None for ids in group_ids for pid in ids)
    results = [
        (layout, _match_layout(layout, id_shapes, shapes))
        for layout in _layouts(group_ids, groups, names, shapes, layernorm_params)
    ]
    fitting = [(layout, match) for layout, match in results if match.count > 0]
    unique = [(layout, match) for layout, match in fitting if match.count == 1]
    distinct = {tuple(sorted(match.settled.items())) for _, match in unique}
    held = f"the optimizer holds {total_ids} parameters, the model {len(names)}" + (
        " (frozen parameters?)" if total_ids < len(names) else ""
    )
    if fitting and len(unique) == len(fitting) and len(distinct) == 1:
        layout, match = next(
            (u for u in unique if layout_hint and u[0].mapping is layout_hint.mapping), unique[0]
        )
        if not checked and total_ids == len(names):
            return NameMapping.ORDER_UNVERIFIED, match.settled
        if total_ids != len(names):
            notes.append(f"{held}; the state shapes settle which")
        return layout.mapping, match.settled
    if unique and layout_hint is not None:
        wanted = layout_hint.mapping
        hinted = {
            tuple(sorted(m.settled.items())) for layout, m in unique if layout.mapping is wanted
        }
        if len(hinted) == 1:
            notes.append(
                "several parameter layouts fit the state shapes; the checkpoint was written by "
                f"{layout_hint.value}, so its decay/no-decay split is used"
            )
            return wanted, dict(next(iter(hinted)))
    if not fitting:
        notes.append(
            f"{held}; no ordering of them (plain order"
            + (", Trainer or timm decay split" if len(group_ids) == 2 else "")
            + ") fits the state tensors' shapes: name mapping is ambiguous"
        )
        return NameMapping.AMBIGUOUS, {}
    settled = dict(fitting[0][1].settled)
    for _, match in fitting[1:]:
        settled = {pid: n for pid, n in settled.items() if match.settled.get(pid) == n}
    kinds = sorted({layout.description for layout, _ in fitting})
    notes.append(
        f"{held}; the state shapes fit more than one assignment "
        f"({', '.join(kinds)}): name mapping is ambiguous"
        + (f"; {len(settled)} of {total_ids} ids are the same in every fit" if settled else "")
    )
    return NameMapping.AMBIGUOUS, settled
