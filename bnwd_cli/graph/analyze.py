"""Which parameters are scale-invariant, read from the model's graph (shared/THEORY.md section 1).

The analysis is an abstract interpretation of the traced forward pass (`graph.trace`). To test
whether rescaling a set of parameters leaves the output unchanged, it follows the rescaling
through the graph as a `Wave`: a tensor that changes under the rescaling becomes

    t' = F**degree * t + r

where `F` is the rescaling factor -- one number, or a vector along one axis (`Pattern`: per
output row, per group) -- and `r` is an additive residual that varies only along the dimensions
in `shift` (left behind where unscaled tensors were added in, e.g. a bias). Every operation maps
waves to waves by its algebra: ReLU, pooling, dropout, padding, reshapes and concatenation keep
the degree; products add degrees; a normalization layer turns a wave into "unchanged" when the
factor and the residual are constant over what it normalizes together (BatchNorm removes a
per-channel factor and a per-channel bias; LayerNorm removes only a factor common to the whole
feature vector); GELU/SiLU/sigmoid, or a residual that survives into a nonlinearity, break it
(`Broken`). The parameters are invariant when no wave reaches the model's output.

Per parameter it asks, in order: is it a normalization layer's gamma/beta; is it removed
entirely (a bias before BatchNorm: an arbitrary change leaves the output unchanged); is it
invariant on its own (and then per row, per group or only as a whole tensor); or invariant only
jointly with others -- found by following where unscaled tensors were mixed into the wave back
to the parameters that produce them (the other branch of a residual sum, the bias of a conv
before LayerNorm), until the set is invariant or no partner is left. Every verdict states the
path and the normalization layer it rests on; the numeric check (`graph.verify`) tests it.

Public entry points: `classify_model(model, example_input)` and `classify_model_file(path)`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from bnwd_cli.graph.classes import (
    Granularity,
    ModelClassification,
    ParamClassification,
    ParamKind,
)
from bnwd_cli.graph.model_file import ExampleInput, as_example_input, load_model_file
from bnwd_cli.graph.trace import NORM_OPS, ModelGraph, OpNode, Ref, TraceMethod, trace_model

EPS_MAX = 1e-3
"""Adding a positive Python scalar up to this size to a rescaled tensor is read as a
normalization's epsilon (`var + 1e-5`, `clamp_min(1e-6)`): structurally ignored, and
`graph.verify` shrinks exactly these constants in its strict pass."""

MAX_JOINT_ROUNDS = 8
MAX_JOINT_MEMBERS = 256

_ONE = Fraction(1)
_ZERO = Fraction(0)


# -- abstract values -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    """The rescaling factor varies along `axis`: constant on blocks of `block` consecutive
    indices, and (when `period` is set) repeating with that period."""

    axis: int
    block: int = 1
    period: int | None = None


@dataclass(frozen=True)
class Wave:
    """How a tensor changes under the tested rescaling: `F**degree * t + r` (module docstring)."""

    degree: Fraction
    pattern: Pattern | None = None
    shift: frozenset[int] | None = None
    """None: no additive residual. Else the dimensions the residual varies along (empty: a
    single number)."""
    origins: frozenset[int] = frozenset()
    """Nodes of unscaled tensors that were mixed in (where a joint group may be completed)."""


@dataclass(frozen=True)
class Broken:
    """The rescaling can no longer be followed: the tensor changes in an arbitrary way."""

    reason: str
    origins: frozenset[int] = frozenset()


State = Wave | Broken | None
"""None: the tensor is unchanged by the tested rescaling."""


def _wave(
    degree: Fraction,
    pattern: Pattern | None,
    shift: frozenset[int] | None,
    origins: frozenset[int],
) -> State:
    if degree == 0:
        if shift is None:
            return None
        pattern = None
    return Wave(degree, pattern, shift, origins)


def _shifted(w: Wave, offset: int) -> Wave:
    if offset == 0:
        return w
    pattern = replace(w.pattern, axis=w.pattern.axis + offset) if w.pattern else None
    shift = frozenset(d + offset for d in w.shift) if w.shift is not None else None
    return Wave(w.degree, pattern, shift, w.origins)


def _align(state: State, from_ndim: int, to_ndim: int) -> State:
    """Broadcasting right-aligns shapes: a wave of a lower-rank operand moves right."""
    if isinstance(state, Wave):
        return _shifted(state, to_ndim - from_ndim)
    return state


def _varying(shape: Sequence[int], out_ndim: int) -> frozenset[int]:
    offset = out_ndim - len(shape)
    return frozenset(i + offset for i, size in enumerate(shape) if size != 1)


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _norm_dims(dims: Iterable[int] | None, ndim: int) -> frozenset[int]:
    if dims is None:
        return frozenset(range(ndim))
    return frozenset(_norm_dim(d, ndim) for d in dims)


def _renumber_after_reduce(w: Wave, dims: frozenset[int], keepdim: bool, shift: Any) -> Wave:
    if keepdim:
        pattern = w.pattern
        new_shift = shift
    else:

        def new(d: int) -> int:
            return d - sum(1 for r in dims if r < d)

        pattern = replace(w.pattern, axis=new(w.pattern.axis)) if w.pattern else None
        new_shift = frozenset(new(d) for d in shift) if shift is not None else None
    return Wave(w.degree, pattern, new_shift, w.origins)


def _fraction(value: float | int) -> Fraction:
    return Fraction(value).limit_denominator(10_000)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- reshapes ------------------------------------------------------------------------------


def _reshape_groups(
    in_shape: Sequence[int], out_shape: Sequence[int]
) -> list[tuple[list[int], list[int]]] | None:
    """Pair up runs of input and output dimensions with equal element counts."""
    if 0 in in_shape or 0 in out_shape:
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        gi: list[int] = []
        gj: list[int] = []
        pi = pj = 1
        if i < len(in_shape):
            gi.append(i)
            pi *= in_shape[i]
            i += 1
        if j < len(out_shape):
            gj.append(j)
            pj *= out_shape[j]
            j += 1
        while pi != pj:
            if pi < pj:
                if i >= len(in_shape):
                    return None
                gi.append(i)
                pi *= in_shape[i]
                i += 1
            else:
                if j >= len(out_shape):
                    return None
                gj.append(j)
                pj *= out_shape[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _reshape_state(state: State, in_shape: Sequence[int], out_shape: Sequence[int]) -> State:
    if not isinstance(state, Wave):
        return state
    groups = _reshape_groups(in_shape, out_shape)
    if groups is None:
        if state.pattern is None and state.shift is None:
            return state
        return Broken("a reshape the analysis cannot follow")
    shift = None
    if state.shift is not None:
        shift = frozenset(
            o for gi, go in groups if any(d in state.shift for d in gi) for o in go
            if out_shape[o] != 1
        )  # fmt: skip
    pattern = state.pattern
    if pattern is not None:
        pattern = _reshape_pattern(pattern, in_shape, out_shape, groups)
        if pattern is None:
            return Broken("a reshape mixes the rescaled axis with others")
    return Wave(state.degree, pattern, shift, state.origins)


def _reshape_pattern(
    pattern: Pattern,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    groups: list[tuple[list[int], list[int]]],
) -> Pattern | None:
    for gi, go in groups:
        if pattern.axis not in gi:
            continue
        if in_shape[pattern.axis] == 1:
            return None
        nu_in = [d for d in gi if in_shape[d] != 1]
        nu_out = [d for d in go if out_shape[d] != 1]
        if nu_in == [pattern.axis] and len(nu_out) == 1:
            return replace(pattern, axis=nu_out[0])
        if nu_in == [pattern.axis]:  # one axis split into several
            sizes = [out_shape[d] for d in nu_out]
            for k in range(len(sizes)):
                inner = math.prod(sizes[k + 1 :])
                outer = math.prod(sizes[k:])
                periodic_ok = pattern.period is None and k == 0
                if pattern.period is not None and pattern.period == outer:
                    periodic_ok = True
                if periodic_ok and pattern.block % inner == 0:
                    return Pattern(nu_out[k], pattern.block // inner, None)
            return None
        if len(nu_out) == 1:  # several axes merged into one
            position = nu_in.index(pattern.axis)
            before = math.prod(in_shape[d] for d in nu_in[:position])
            after = math.prod(in_shape[d] for d in nu_in[position + 1 :])
            size = in_shape[pattern.axis]
            period = None
            if before > 1 or pattern.period is not None:
                period = (pattern.period or size) * after
            return Pattern(nu_out[0], pattern.block * after, period)
        return None
    return None


def _permute_state(state: State, perm: Sequence[int]) -> State:
    """`perm[new] = old`, as `permute` takes it."""
    if not isinstance(state, Wave):
        return state
    where = {old: new for new, old in enumerate(perm)}
    pattern = replace(state.pattern, axis=where[state.pattern.axis]) if state.pattern else None
    shift = frozenset(where[d] for d in state.shift) if state.shift is not None else None
    return Wave(state.degree, pattern, shift, state.origins)


# -- combining operands --------------------------------------------------------------------


@dataclass(frozen=True)
class _Operand:
    state: State
    shape: tuple[int, ...]
    node: int | None = None
    value: Any = None
    """A Python number operand (None for tensors)."""


def _sum(parts: Sequence[_Operand], out_ndim: int) -> State:
    """Sum (or difference, or elementwise selection) of operands: degrees must agree, and
    operands that do not scale leave a residual `(1 - F) * value` behind."""
    aligned: list[tuple[State, _Operand]] = []
    for part in parts:
        if isinstance(part.state, Broken):
            return part.state
        aligned.append((_align(part.state, len(part.shape), out_ndim), part))
    waves = [s for s, _ in aligned if isinstance(s, Wave)]
    if not waves:
        return None
    scaling = [w for w in waves if w.degree != 0]
    origins = frozenset().union(*(w.origins for w in waves))
    shift: frozenset[int] | None = None
    for w in waves:
        if w.shift is not None:
            shift = (shift or frozenset()) | w.shift
    if not scaling:
        return Wave(_ZERO, None, shift or frozenset(), origins)
    if len({w.degree for w in scaling}) > 1:
        return Broken("adds tensors that rescale by different powers", origins)
    if len({w.pattern for w in scaling}) > 1:
        return Broken("adds tensors rescaled along different axes", origins)
    pattern = scaling[0].pattern
    extra_origins: set[int] = set()
    for state, part in aligned:
        if isinstance(state, Wave) and state.degree != 0:
            continue
        if state is None and part.node is None and part.value == 0:
            continue  # adding zero leaves nothing behind
        residual = _varying(part.shape, out_ndim)
        if pattern is not None:
            residual |= {pattern.axis}
        shift = (shift or frozenset()) | residual
        if part.node is not None:
            extra_origins.add(part.node)
    return Wave(scaling[0].degree, pattern, shift, origins | extra_origins)


def _mul(a: _Operand, b: _Operand, out_ndim: int) -> State:
    sa = _align(a.state, len(a.shape), out_ndim)
    sb = _align(b.state, len(b.shape), out_ndim)
    for s in (sa, sb):
        if isinstance(s, Broken):
            return s
    if sa is None and sb is None:
        return None
    if sa is None or sb is None:
        w = sa if isinstance(sa, Wave) else sb
        const = b if sa is not None else a
        assert isinstance(w, Wave)
        shift = w.shift | _varying(const.shape, out_ndim) if w.shift is not None else None
        return Wave(w.degree, w.pattern, shift, w.origins)
    assert isinstance(sa, Wave) and isinstance(sb, Wave)
    origins = sa.origins | sb.origins
    if sa.shift is not None or sb.shift is not None:
        return Broken("multiplies two changed tensors, one with an additive part", origins)
    if sa.pattern != sb.pattern:
        return Broken("multiplies tensors rescaled along different axes", origins)
    return _wave(sa.degree + sb.degree, sa.pattern, None, origins)


def _power(state: State, exponent: Fraction) -> State:
    if not isinstance(state, Wave):
        return state
    if state.shift is not None:
        return Broken("a power of a tensor with an additive part", state.origins)
    return _wave(state.degree * exponent, state.pattern, None, state.origins)


def _positive_homogeneous(state: State, what: str) -> State:
    """ReLU-like maps: f(c*x) = c*f(x) for c > 0, but no residual passes through them."""
    if isinstance(state, Wave) and state.shift is not None:
        return Broken(f"{what} of a tensor with an additive part (e.g. a bias)", state.origins)
    return state


# -- the pass ------------------------------------------------------------------------------


@dataclass
class PassResult:
    """Outcome of following one rescaling through the graph."""

    invariant: bool
    failure_node: int | None = None
    failure: Broken | None = None
    neutralizers: list[int] = field(default_factory=list)
    via: dict[int, int] = field(default_factory=dict)
    failures: list[tuple[int, Broken]] = field(default_factory=list)
    """Every place the rescaling broke (only with `collect_all`; else the first)."""
    changed: frozenset[int] = frozenset()
    """Nodes whose tensor the rescaling changed."""


_ABSORBING_ARITHMETIC = frozenset(
    {"div", "mul", "pow", "sqrt", "rsqrt", "reciprocal", "matmul", "softmax", "maximum"}
)
_LINEAR_OPS = frozenset({"conv", "conv_transpose", "linear", "embedding", "matmul", "addmm"})
_PASS_THROUGH = frozenset(
    {"identity", "dropout", "reshape", "expand", "repeat", "permute", "transpose", "t", "mt",
     "movedim", "relu", "neg", "add", "sub", "cat", "stack", "split", "item", "getitem",
     "select", "narrow", "index_select", "pool", "interpolate", "pad", "copy", "setitem",
     "abs", "clamp"}
)  # fmt: skip
_VIEW_OPS = frozenset(
    {"identity", "reshape", "expand", "permute", "transpose", "t", "mt", "movedim", "getitem",
     "select"}
)  # fmt: skip
_MULTI_OUTPUT = frozenset({"split", "var_mean", "std_mean", "max_dim"})


class _Analysis:
    """One graph, many passes (one per tested rescaling)."""

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        self.nodes = graph.nodes
        self.output_set = frozenset(graph.outputs)
        self.reaches = self._reaches_output()
        self.param_of = {index: name for name, index in graph.params.items()}
        self.unmodelled: dict[str, set[int]] = {}
        self._states: dict[int, State] = {}
        self._transfers: dict[str, Callable[[OpNode], State]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("_t_")
        }

    def _reaches_output(self) -> list[bool]:
        reaches = [False] * len(self.nodes)
        stack = list(self.graph.outputs)
        while stack:
            i = stack.pop()
            if reaches[i]:
                continue
            reaches[i] = True
            stack.extend(self.nodes[i].refs)
        return reaches

    # state access while a pass runs
    def st(self, value: Any) -> State:
        return self._states.get(value.node) if isinstance(value, Ref) else None

    def shape(self, value: Any) -> tuple[int, ...]:
        if isinstance(value, Ref):
            return self.nodes[value.node].shape or ()
        return ()

    def operand(self, value: Any) -> _Operand:
        if isinstance(value, Ref):
            return _Operand(self.st(value), self.shape(value), value.node)
        return _Operand(None, (), None, value)

    def run(self, seeds: dict[int, Wave], *, collect_all: bool = False) -> PassResult:
        """Follow the rescaling of `seeds` through the graph. By default stop at the first
        break; with `collect_all`, carry on past breaks to find every place the rescaling
        breaks (the joint-group search completes a group from all of them at once)."""
        self._states = {}
        failures: list[tuple[int, Broken]] = []
        states = self._states
        via: dict[int, int] = {}
        neutralizers: list[int] = []
        heap: list[int] = []
        consumers = self.graph.consumers
        for index, wave in seeds.items():
            states[index] = wave
            for c in consumers[index]:
                if self.reaches[c]:
                    heapq.heappush(heap, c)
        done: set[int] = set()
        while heap:
            i = heapq.heappop(heap)
            if i in done:
                continue
            done.add(i)
            node = self.nodes[i]
            live = [r for r in node.refs if r in states]
            if not live:
                continue
            if node.op == "param":
                continue
            inherited = [s for r in live if isinstance(s := states[r], Broken)]
            if inherited:  # only with collect_all: a break downstream of a break adds nothing
                out: State = Broken(
                    inherited[0].reason, frozenset().union(*(b.origins for b in inherited))
                )
            else:
                out = self.transfer(node)
            if out is None:
                neutralizers.append(i)
                via[i] = live[0]
                continue
            via[i] = live[0]
            if isinstance(out, Broken) and not inherited:
                if not out.origins:
                    origins = frozenset().union(
                        *(s.origins for r in live if isinstance(s := states[r], Wave | Broken))
                    )
                    out = Broken(out.reason, origins)
                failures.append((i, out))
                if not collect_all:
                    return PassResult(False, i, out, neutralizers, via, failures)
            if isinstance(out, Broken) and not out.origins:
                continue  # nothing downstream of it can name a partner: stop following it
            states[i] = out
            if i in self.output_set and not isinstance(out, Broken):
                failure = Broken("reaches the model output rescaled", out.origins)
                failures.append((i, failure))
                if not collect_all:
                    return PassResult(False, i, failure, neutralizers, via, failures)
            for c in consumers[i]:
                if self.reaches[c] and c not in done:
                    heapq.heappush(heap, c)
        changed = frozenset(states)
        if failures:
            first_node, first = failures[0]
            return PassResult(False, first_node, first, neutralizers, via, failures, changed)
        return PassResult(True, None, None, neutralizers, via, changed=changed)

    def transfer(self, node: OpNode) -> State:
        handler = self._transfers.get(node.op)
        if handler is None:
            return self._t_unknown(node)
        return handler(node)

    # -- transfer functions, one per canonical op ------------------------------------------

    def _t_identity(self, node: OpNode) -> State:
        return _align(
            self.st(node.args["x"]), len(self.shape(node.args["x"])), len(node.shape or ())
        )

    def _t_const(self, node: OpNode) -> State:
        return None

    def _t_unknown(self, node: OpNode) -> State:
        if any(self._states.get(r) is not None for r in node.refs):
            self.unmodelled.setdefault(node.fn_name, set()).add(node.index)
            return Broken(f"{node.fn_name} is not modelled by the analysis")
        return None

    def _t_nonhom(self, node: OpNode) -> State:
        if any(self._states.get(r) is not None for r in node.refs):
            return Broken(f"{node.fn_name} is not positively homogeneous")
        return None

    def _t_dropout(self, node: OpNode) -> State:
        state = self.st(node.args["x"])
        if isinstance(state, Wave) and state.shift is not None:
            ndim = len(node.shape or ())
            return replace(state, shift=frozenset(range(ndim)))
        return state

    def _t_reshape(self, node: OpNode) -> State:
        return _reshape_state(self.st(node.args["x"]), self.shape(node.args["x"]), node.shape or ())

    def _t_expand(self, node: OpNode) -> State:
        return self._t_identity(node)

    def _t_repeat(self, node: OpNode) -> State:
        x = node.args["x"]
        state = _align(self.st(x), len(self.shape(x)), len(node.shape or ()))
        if not isinstance(state, Wave) or state.pattern is None:
            return state
        in_shape = (1,) * (len(node.shape or ()) - len(self.shape(x))) + self.shape(x)
        axis = state.pattern.axis
        if (node.shape or ())[axis] == in_shape[axis]:
            return state
        period = state.pattern.period or in_shape[axis]
        return replace(state, pattern=replace(state.pattern, period=period))

    def _t_permute(self, node: OpNode) -> State:
        ndim = len(node.shape or ())
        dims = node.args["dims"]
        if dims is None or len(dims) != ndim:
            return Broken("a permutation the analysis cannot read")
        return _permute_state(self.st(node.args["x"]), [_norm_dim(d, ndim) for d in dims])

    def _swap(self, node: OpNode, d0: int, d1: int) -> State:
        ndim = len(node.shape or ())
        if ndim < 2:
            return self.st(node.args["x"])
        perm = list(range(ndim))
        d0, d1 = _norm_dim(d0, ndim), _norm_dim(d1, ndim)
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return _permute_state(self.st(node.args["x"]), perm)

    def _t_transpose(self, node: OpNode) -> State:
        return self._swap(node, node.args["d0"], node.args["d1"])

    def _t_t(self, node: OpNode) -> State:
        return self._swap(node, 0, 1)

    def _t_mt(self, node: OpNode) -> State:
        return self._swap(node, -2, -1)

    def _t_movedim(self, node: OpNode) -> State:
        ndim = len(node.shape or ())
        src, dst = node.args["source"], node.args["destination"]
        if src is None or dst is None or len(src) != len(dst):
            return Broken("a movedim the analysis cannot read")
        src = [_norm_dim(d, ndim) for d in src]
        dst = [_norm_dim(d, ndim) for d in dst]
        perm: list[int | None] = [None] * ndim
        for s, d in zip(src, dst, strict=True):
            perm[d] = s
        rest = iter(d for d in range(ndim) if d not in src)
        full = [p if p is not None else next(rest) for p in perm]
        return _permute_state(self.st(node.args["x"]), full)

    def _t_relu(self, node: OpNode) -> State:
        if self.st(node.args.get("weight")) is not None:
            return Broken(f"{node.fn_name} with a changed slope")
        return _positive_homogeneous(self.st(node.args["x"]), node.fn_name)

    def _t_abs(self, node: OpNode) -> State:
        return _positive_homogeneous(self.st(node.args["x"]), node.fn_name)

    def _t_neg(self, node: OpNode) -> State:
        return self.st(node.args["x"])

    def _t_add(self, node: OpNode) -> State:
        a, b = self.operand(node.args["a"]), self.operand(node.args["b"])
        for w, other in ((a, b), (b, a)):
            if (
                isinstance(w.state, Wave)
                and w.state.degree != 0
                and w.state.shift is None
                and other.node is None
                and _is_number(other.value)
                and 0 < other.value <= EPS_MAX
            ):
                return _align(w.state, len(w.shape), len(node.shape or ()))  # an epsilon
        if node.args.get("alpha", 1) == 0:
            b = _Operand(None, b.shape, None, 0)
        return _sum([a, b], len(node.shape or ()))

    def _t_sub(self, node: OpNode) -> State:
        return self._t_add(node)

    def _t_mul(self, node: OpNode) -> State:
        return _mul(
            self.operand(node.args["a"]), self.operand(node.args["b"]), len(node.shape or ())
        )

    def _t_div(self, node: OpNode) -> State:
        a, b = self.operand(node.args["a"]), self.operand(node.args["b"])
        if node.args.get("rounding_mode") is not None and (a.state or b.state) is not None:
            return Broken("a rounding division")
        return _mul(a, replace(b, state=_power(b.state, -_ONE)), len(node.shape or ()))

    def _t_pow(self, node: OpNode) -> State:
        exponent = node.args["exponent"]
        if not _is_number(exponent):
            if self.st(exponent) is not None or self.st(node.args["x"]) is not None:
                return Broken("a power with a tensor exponent")
            return None
        return _power(self.st(node.args["x"]), _fraction(exponent))

    def _t_sqrt(self, node: OpNode) -> State:
        return _power(self.st(node.args["x"]), Fraction(1, 2))

    def _t_rsqrt(self, node: OpNode) -> State:
        return _power(self.st(node.args["x"]), Fraction(-1, 2))

    def _t_reciprocal(self, node: OpNode) -> State:
        return _power(self.st(node.args["x"]), -_ONE)

    def _t_square(self, node: OpNode) -> State:
        return _power(self.st(node.args["x"]), Fraction(2))

    def _t_clamp(self, node: OpNode) -> State:
        state = self.st(node.args["x"])
        low, high = node.args.get("min"), node.args.get("max")
        if state is None or isinstance(state, Broken):
            return state
        if isinstance(low, Ref) or isinstance(high, Ref):
            return Broken("a clamp with tensor bounds")
        if high is None and low is None:
            return state
        if high is None and low == 0:
            return _positive_homogeneous(state, "clamp(min=0)")
        if (
            high is None
            and isinstance(low, int | float)
            and 0 < low <= EPS_MAX
            and state.shift is None
        ):
            return state  # clamp_min(eps) guarding a division
        return Broken(f"{node.fn_name} with bounds is not positively homogeneous")

    def _t_maximum(self, node: OpNode) -> State:
        a, b = self.operand(node.args["a"]), self.operand(node.args["b"])
        if a.state is None and b.state is None:
            return None
        if (
            isinstance(a.state, Wave)
            and isinstance(b.state, Wave)
            and (a.state.degree, a.state.pattern) == (b.state.degree, b.state.pattern)
            and a.state.shift is None
            and b.state.shift is None
        ):
            return _align(a.state, len(a.shape), len(node.shape or ()))
        return Broken(f"{node.fn_name} of a changed and an unchanged tensor")

    def _t_compare(self, node: OpNode) -> State:
        a, b = self.operand(node.args["a"]), self.operand(node.args["b"])
        if a.state is None and b.state is None:
            return None
        for w, other in ((a, b), (b, a)):
            if (
                isinstance(w.state, Wave)
                and w.state.shift is None
                and w.state.degree != 0
                and other.node is None
                and other.value == 0
            ):
                return None  # the sign survives a positive rescaling
        if (
            isinstance(a.state, Wave)
            and isinstance(b.state, Wave)
            and (a.state.degree, a.state.pattern) == (b.state.degree, b.state.pattern)
            and a.state.shift is None
            and b.state.shift is None
        ):
            return None  # both sides rescaled alike: the comparison is unchanged
        return Broken(f"{node.fn_name} against an unchanged threshold")

    def _reduced(self, node: OpNode, x: Any, kind: str) -> State:
        state = self.st(x)
        if not isinstance(state, Wave):
            return state
        ndim = len(self.shape(x))
        dims = _norm_dims(node.args.get("dims"), ndim)
        keepdim = bool(node.args.get("keepdim"))
        if state.pattern is not None and state.pattern.axis in dims:
            return Broken(f"{node.fn_name} mixes entries rescaled by different factors")
        shift = state.shift
        if kind in {"var", "std", "vnorm"}:
            if shift is not None and (shift & dims or kind == "vnorm"):
                return Broken(f"{node.fn_name} of a tensor with an additive part")
            degree = state.degree * 2 if kind == "var" else state.degree
            state = Wave(degree, state.pattern, None, state.origins)
            shift = None
            if degree == 0:
                return None
        elif kind == "max":
            if shift is not None and shift & dims:
                return Broken(f"{node.fn_name} over an additive part that varies")
        elif shift is not None:
            shift = shift - dims
        return _renumber_after_reduce(state, dims, keepdim, shift)

    def _t_reduce(self, node: OpNode) -> State:
        return self._reduced(node, node.args["x"], "sum")

    def _t_var(self, node: OpNode) -> State:
        return self._reduced(node, node.args["x"], "var")

    def _t_std(self, node: OpNode) -> State:
        return self._reduced(node, node.args["x"], "std")

    def _t_vnorm(self, node: OpNode) -> State:
        return self._reduced(node, node.args["x"], "vnorm")

    def _t_amax(self, node: OpNode) -> State:
        return self._reduced(node, node.args["x"], "max")

    def _t_var_mean(self, node: OpNode) -> State:
        return self.st(node.args["x"])  # a marker; the `item` nodes hold the results

    def _t_std_mean(self, node: OpNode) -> State:
        return self.st(node.args["x"])

    def _t_max_dim(self, node: OpNode) -> State:
        return self.st(node.args["x"])

    def _t_split(self, node: OpNode) -> State:
        return self.st(node.args["x"])

    def _t_pool(self, node: OpNode) -> State:
        x = node.args["x"]
        state = self.st(x)
        if node.args.get("return_indices"):
            return state  # a marker; see `_t_item`
        return self._pooled(node, state, len(self.shape(x)))

    def _pooled(self, node: OpNode, state: State, ndim: int) -> State:
        if not isinstance(state, Wave):
            return state
        spatial = frozenset(range(ndim - node.args["nd"], ndim))
        if state.pattern is not None and state.pattern.axis in spatial:
            return Broken(f"{node.fn_name} pools entries rescaled by different factors")
        kind = node.args["kind"]
        if state.shift is None:
            return state
        if kind in {"max", "adaptive_max"}:
            if state.shift & spatial:
                return Broken(f"{node.fn_name} of an additive part that varies in the window")
            return state
        if kind == "lp":
            return Broken(f"{node.fn_name} of a tensor with an additive part")
        padding = node.args.get("padding", 0)
        padded = any(p != 0 for p in (padding if isinstance(padding, tuple | list) else [padding]))
        if padded and node.args.get("count_include_pad", True):
            return replace(state, shift=state.shift | spatial)
        return state

    def _t_interpolate(self, node: OpNode) -> State:
        state = self.st(node.args["x"])
        if isinstance(state, Wave) and state.pattern is not None and state.pattern.axis >= 2:
            return Broken(f"{node.fn_name} along the rescaled axis")
        return state

    def _t_pad(self, node: OpNode) -> State:
        x = node.args["x"]
        state = self.st(x)
        if not isinstance(state, Wave):
            return state
        ndim = len(self.shape(x))
        pad = node.args["pad"] or ()
        padded = frozenset(
            ndim - 1 - i for i in range(len(pad) // 2) if (pad[2 * i], pad[2 * i + 1]) != (0, 0)
        )
        if state.pattern is not None and state.pattern.axis in padded:
            return Broken("pads along the rescaled axis")
        if node.args.get("mode", "constant") != "constant":
            return state
        value = node.args.get("value", 0) or 0
        if value == 0:
            shift = state.shift | padded if state.shift is not None else None
            return replace(state, shift=shift)
        extra = padded | ({state.pattern.axis} if state.pattern else frozenset())
        return replace(state, shift=(state.shift or frozenset()) | extra)

    def _t_cat(self, node: OpNode) -> State:
        tensors = node.args["tensors"]
        ndim = len(node.shape or ())
        dim = _norm_dim(node.args["dim"], ndim)
        parts = [self.operand(t) for t in tensors]
        if node.op == "stack":
            parts = [
                _Operand(_unsqueezed(p.state, dim), (*p.shape[:dim], 1, *p.shape[dim:]), p.node)
                for p in parts
            ]
        return self._concatenated(parts, dim, ndim)

    def _t_stack(self, node: OpNode) -> State:
        return self._t_cat(node)

    def _concatenated(self, parts: list[_Operand], dim: int, ndim: int) -> State:
        states = [p.state for p in parts]
        if all(s is None for s in states):
            return None
        for s in states:
            if isinstance(s, Broken):
                return s
        waves = [s for s in states if isinstance(s, Wave)]
        origins = frozenset().union(*(w.origins for w in waves))
        scaling = [w for w in waves if w.degree != 0]
        any_shift = any(w.shift is not None for w in waves)
        union: frozenset[int] = frozenset().union(*(w.shift or frozenset() for w in waves))
        shift = union | {dim} if any_shift else None
        if not scaling:
            return Wave(_ZERO, None, shift or frozenset({dim}), origins)
        if len({w.degree for w in scaling}) > 1:
            return Broken("concatenates tensors that rescale by different powers", origins)
        patterns = {w.pattern for w in scaling}
        sizes = [p.shape[dim] if len(p.shape) > dim else 1 for p in parts]
        unscaled = any(not (isinstance(s, Wave) and s.degree != 0) for s in states)
        if patterns == {None} and not unscaled:
            return Wave(scaling[0].degree, None, shift, origins)
        # The factor now varies along the concatenation axis (1 on unscaled segments): a
        # pattern along `dim` whose blocks respect every segment boundary.
        block = 0
        offset = 0
        for state, size in zip(states, sizes, strict=True):
            pattern = state.pattern if isinstance(state, Wave) and state.degree != 0 else None
            if pattern is not None:
                if pattern.axis != dim or pattern.period is not None:
                    return Broken("concatenates tensors rescaled along another axis", origins)
                block = math.gcd(block, pattern.block)
            block = math.gcd(block, offset)
            offset += size
        block = math.gcd(block, offset) or 1
        return Wave(scaling[0].degree, Pattern(dim, block), shift, origins)

    def _t_setitem(self, node: OpNode) -> State:
        x, value = self.operand(node.args["x"]), self.operand(node.args["value"])
        if x.state is None and value.state is None:
            return None
        for s in (x.state, value.state):
            if isinstance(s, Broken):
                return s
        if (
            isinstance(x.state, Wave)
            and isinstance(value.state, Wave)
            and x.state.pattern is None
            and value.state.pattern is None
            and x.state.degree == value.state.degree
            and x.state.shift is None
            and value.state.shift is None
        ):
            return x.state
        if isinstance(x.state, Wave) and value.node is None and value.value == 0:
            return _positive_homogeneous(x.state, "an in-place write of zeros")
        return Broken("an in-place write mixing changed and unchanged values")

    def _t_copy(self, node: OpNode) -> State:
        src = node.args["src"]
        return _align(self.st(src), len(self.shape(src)), len(node.shape or ()))

    def _t_item(self, node: OpNode) -> State:
        parent = self.nodes[node.args["parent"].node]
        index = node.args["index"]
        if not isinstance(index, int):
            return Broken("an element of a tuple the analysis cannot read")
        x = parent.args.get("x")
        state = self.st(x)
        if not isinstance(state, Wave):
            return state
        if parent.op == "split":
            return self._split_item(parent, node, index, state)
        if parent.op in {"var_mean", "std_mean"}:
            kind = ("var" if parent.op == "var_mean" else "std") if index == 0 else "sum"
            return self._reduced(parent, x, kind)
        if parent.op == "max_dim" or (parent.op == "pool" and parent.args.get("return_indices")):
            values = (
                self._reduced(parent, x, "max")
                if parent.op == "max_dim"
                else self._pooled(parent, state, len(self.shape(x)))
            )
            if index == 0 or isinstance(values, Broken):
                return values
            return None  # indices of a maximum survive a positive rescaling
        return Broken(f"an element of {parent.fn_name}'s output")

    def _split_item(self, parent: OpNode, node: OpNode, index: int, state: Wave) -> State:
        ndim = len(self.shape(parent.args["x"]))
        dim = _norm_dim(parent.args["dim"], ndim)
        siblings = sorted(
            (self.nodes[c] for c in self.graph.consumers[parent.index]
             if self.nodes[c].op == "item"),
            key=lambda n: n.args["index"],
        )  # fmt: skip
        offset = sum(
            (s.shape or ())[dim] if not parent.args.get("unbind") else 1
            for s in siblings
            if s.args["index"] < index
        )
        if parent.args.get("unbind"):
            if state.pattern is not None and state.pattern.axis == dim:
                state = replace(state, pattern=None)  # one index: one factor
            return _renumber_after_reduce(
                state, frozenset({dim}), False,
                state.shift - {dim} if state.shift is not None else None,
            )  # fmt: skip
        return _sliced(state, dim, offset, 1)

    def _index_map(self, node: OpNode) -> tuple[dict[int, int], dict[int, tuple[int, int]]] | None:
        """For `x[index]`: input dim -> output dim, and sliced input dims -> (start, step);
        None for advanced (tensor) indexing."""
        x = node.args["x"]
        in_shape = self.shape(x)
        index = node.args["index"]
        items = list(index) if isinstance(index, tuple) else [index]
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        mapping: dict[int, int] = {}
        slices: dict[int, tuple[int, int]] = {}
        d_in = d_out = 0
        for item in items:
            if item is Ellipsis:
                for _ in range(len(in_shape) - consumed):
                    mapping[d_in] = d_out
                    d_in += 1
                    d_out += 1
            elif item is None:
                d_out += 1
            elif isinstance(item, bool) or not isinstance(item, int | slice):
                return None
            elif isinstance(item, int):
                d_in += 1
            else:
                if any(isinstance(v, Ref) for v in (item.start, item.stop, item.step)):
                    return None
                start, _, step = item.indices(in_shape[d_in])
                mapping[d_in] = d_out
                slices[d_in] = (start, step)
                d_in += 1
                d_out += 1
        while d_in < len(in_shape):
            mapping[d_in] = d_out
            d_in += 1
            d_out += 1
        return mapping, slices

    def _t_getitem(self, node: OpNode) -> State:
        state = self.st(node.args["x"])
        if not isinstance(state, Wave):
            return state
        mapped = self._index_map(node)
        if mapped is None:
            if state.pattern is None and state.shift is None:
                return state
            return Broken("advanced indexing of a rescaled axis")
        mapping, slices = mapped
        pattern = state.pattern
        if pattern is not None:
            if pattern.axis not in mapping:
                pattern = None  # one index along the rescaled axis: a single factor
            else:
                start, step = slices.get(pattern.axis, (0, 1))
                sliced = _sliced(Wave(state.degree, pattern), pattern.axis, start, step)
                if isinstance(sliced, Broken):
                    return sliced
                assert isinstance(sliced, Wave) and sliced.pattern is not None
                pattern = replace(sliced.pattern, axis=mapping[pattern.axis])
        shift = None
        if state.shift is not None:
            shift = frozenset(mapping[d] for d in state.shift if d in mapping)
        return Wave(state.degree, pattern, shift, state.origins)

    def _t_select(self, node: OpNode) -> State:
        state = self.st(node.args["x"])
        if not isinstance(state, Wave):
            return state
        ndim = len(self.shape(node.args["x"]))
        dim = _norm_dim(node.args["dim"], ndim)
        if state.pattern is not None and state.pattern.axis == dim:
            state = replace(state, pattern=None)
        shift = state.shift - {dim} if state.shift is not None else None
        return _renumber_after_reduce(state, frozenset({dim}), False, shift)

    def _t_narrow(self, node: OpNode) -> State:
        state = self.st(node.args["x"])
        if not isinstance(state, Wave):
            return state
        ndim = len(self.shape(node.args["x"]))
        start = node.args["start"]
        if not isinstance(start, int):
            return Broken("a narrow with a tensor start")
        dim = _norm_dim(node.args["dim"], ndim)
        size = self.shape(node.args["x"])[dim]
        return _sliced(state, dim, start % size if size else 0, 1)

    def _t_index_select(self, node: OpNode) -> State:
        state = self.st(node.args["x"])
        if not isinstance(state, Wave):
            return state
        ndim = len(self.shape(node.args["x"]))
        dim = _norm_dim(node.args["dim"], ndim)
        pattern = state.pattern
        if (
            pattern is not None
            and pattern.axis == dim
            and (pattern.block != 1 or pattern.period is not None)
        ):
            return Broken("gathers rows of a per-group rescaling")
        return state

    def _t_where(self, node: OpNode) -> State:
        cond = self.operand(node.args["cond"])
        if cond.state is not None:
            return Broken("a selection whose condition changes")
        parts = [self.operand(node.args["a"]), self.operand(node.args["b"])]
        out = _sum(parts, len(node.shape or ()))
        if isinstance(out, Wave) and out.shift is not None:
            out = replace(out, shift=out.shift | _varying(cond.shape, len(node.shape or ())))
        return out

    def _t_masked_fill(self, node: OpNode) -> State:
        x, mask = self.operand(node.args["x"]), self.operand(node.args["mask"])
        value = self.operand(node.args["value"])
        if mask.state is not None or value.state is not None:
            return Broken("a masked fill whose mask or value changes")
        state = x.state
        if not isinstance(state, Wave):
            return state
        ndim = len(node.shape or ())
        masked = _varying(mask.shape, ndim)
        number = value.value
        if value.node is None and _is_number(number) and (number == 0 or math.isinf(number)):
            return replace(state, shift=state.shift | masked if state.shift is not None else None)
        extra = masked | ({state.pattern.axis} if state.pattern else frozenset())
        return replace(state, shift=(state.shift or frozenset()) | extra)

    def _t_conv(self, node: OpNode) -> State:
        x = self.operand(node.args["x"])
        weight = self.operand(node.args["weight"])
        bias_ref = node.args.get("bias")
        out_shape = node.shape or ()
        ndim = len(out_shape)
        for s in (x.state, weight.state):
            if isinstance(s, Broken):
                return s
        main: State = None
        if x.state is not None or weight.state is not None:
            xs, ws = x.state, weight.state
            origins = _product_origins(xs, ws, node.fn_name)
            if isinstance(origins, Broken):
                return origins
            patterns: list[Pattern] = []
            groups = int(node.args.get("groups") or 1)
            if isinstance(xs, Wave) and xs.pattern is not None:
                if xs.pattern.axis != 1 or xs.pattern.period is not None:
                    return Broken(f"{node.fn_name} mixes entries rescaled by different factors")
                c_in, c_out = x.shape[1], out_shape[1]
                per_in, per_out = c_in // groups, c_out // groups
                if xs.pattern.block % per_in:
                    return Broken(f"{node.fn_name} mixes channels rescaled by different factors")
                patterns.append(Pattern(1, xs.pattern.block // per_in * per_out))
            if isinstance(ws, Wave) and ws.pattern is not None:
                if node.args.get("transposed") or ws.pattern.axis != 0 or ws.pattern.period:
                    return Broken(f"{node.fn_name} sums over rescaled weight entries")
                patterns.append(Pattern(1, ws.pattern.block))
            if len(patterns) == 2 and patterns[0] != patterns[1]:
                return Broken(f"{node.fn_name} of input and weight rescaled differently")
            main = _product_wave(xs, ws, patterns[0] if patterns else None, origins, node.fn_name)
            if isinstance(main, Broken):
                return main
        if bias_ref is None:
            return main
        bias = self.operand(bias_ref)
        bias_shape = (out_shape[1],) + (1,) * (ndim - 2) if ndim >= 2 else bias.shape
        bias = _Operand(bias.state, bias_shape, bias.node)
        return _sum([_Operand(main, out_shape), bias], ndim)

    def _t_conv_transpose(self, node: OpNode) -> State:
        return self._t_conv(node)

    def _t_linear(self, node: OpNode) -> State:
        x = self.operand(node.args["x"])
        weight = self.operand(node.args["weight"])
        out_shape = node.shape or ()
        ndim = len(out_shape)
        for s in (x.state, weight.state):
            if isinstance(s, Broken):
                return s
        main: State = None
        if x.state is not None or weight.state is not None:
            xs, ws = x.state, weight.state
            origins = _product_origins(xs, ws, "linear")
            if isinstance(origins, Broken):
                return origins
            pattern: Pattern | None = None
            if isinstance(xs, Wave) and xs.pattern is not None:
                x_ndim = len(x.shape)
                if xs.pattern.axis == x_ndim - 1:
                    return Broken("linear sums over entries rescaled by different factors")
                pattern = _shifted(xs, ndim - x_ndim).pattern
            if isinstance(ws, Wave) and ws.pattern is not None:
                if ws.pattern.axis != 0 or ws.pattern.period:
                    return Broken("linear sums over rescaled weight entries")
                w_pattern = Pattern(ndim - 1, ws.pattern.block)
                if pattern is not None and pattern != w_pattern:
                    return Broken("linear of input and weight rescaled differently")
                pattern = w_pattern
            main = _product_wave(xs, ws, pattern, origins, "linear")
            if isinstance(main, Broken):
                return main
        bias_ref = node.args.get("bias")
        if bias_ref is None:
            return main
        return _sum([_Operand(main, out_shape), self.operand(bias_ref)], ndim)

    def _t_matmul(self, node: OpNode) -> State:
        a, b = self.operand(node.args["a"]), self.operand(node.args["b"])
        out_ndim = len(node.shape or ())
        for s in (a.state, b.state):
            if isinstance(s, Broken):
                return s
        if a.state is None and b.state is None:
            return None
        origins = frozenset().union(*(s.origins for s in (a.state, b.state) if isinstance(s, Wave)))
        if len(a.shape) < 2 or len(b.shape) < 2:
            waves = [s for s in (a.state, b.state) if isinstance(s, Wave)]
            if all(w.pattern is None and w.shift is None for w in waves):
                return _wave(sum((w.degree for w in waves), _ZERO), None, None, origins)
            return Broken("a vector product of a rescaled tensor")
        patterns: list[Pattern | None] = []
        degree = _ZERO
        for operand, contracted in ((a, len(a.shape) - 1), (b, len(b.shape) - 2)):
            state = operand.state
            if not isinstance(state, Wave):
                continue
            if state.shift is not None:
                return Broken("matmul of a tensor with an additive part", origins)
            degree += state.degree
            if state.pattern is None:
                patterns.append(None)
                continue
            if state.pattern.axis == contracted:
                return Broken("matmul sums over entries rescaled by different factors", origins)
            patterns.append(_shifted(state, out_ndim - len(operand.shape)).pattern)
        if len(patterns) == 2 and patterns[0] != patterns[1]:
            return Broken("matmul of operands rescaled differently", origins)
        return _wave(degree, patterns[0], None, origins)

    def _t_addmm(self, node: OpNode) -> State:
        product = self._t_matmul(node)
        return _sum(
            [_Operand(product, node.shape or ()), self.operand(node.args["bias"])],
            len(node.shape or ()),
        )

    def _t_embedding(self, node: OpNode) -> State:
        weight = self.st(node.args["weight"])
        if not isinstance(weight, Wave):
            return weight
        ndim = len(node.shape or ())
        if weight.shift is not None:
            return Wave(weight.degree, None, frozenset(range(ndim)), weight.origins)
        if weight.pattern is None:
            return weight
        if weight.pattern.axis == 1:
            return Wave(
                weight.degree, Pattern(ndim - 1, weight.pattern.block), None, weight.origins
            )
        return Broken("embedding looks up rows rescaled by different factors")

    def _t_sdpa(self, node: OpNode) -> State:
        for key in ("q", "k", "mask"):
            if self.st(node.args.get(key)) is not None:
                return Broken("attention scores from a changed query, key or mask")
        v = self.operand(node.args["v"])
        state = v.state
        if not isinstance(state, Wave):
            return state
        ndim = len(v.shape)
        if state.pattern is not None and state.pattern.axis == ndim - 2:
            return Broken("attention mixes positions rescaled by different factors")
        if state.shift is not None and (ndim - 2 in state.shift or node.args.get("dropout_p")):
            return Broken("attention of an additive part that varies over positions")
        return state

    def _t_softmax(self, node: OpNode) -> State:
        x = node.args["x"]
        state = self.st(x)
        if state is None or isinstance(state, Broken):
            return state
        dim = node.args.get("dim")
        if (
            isinstance(dim, int)
            and state.degree == 0
            and state.shift is not None
            and _norm_dim(dim, len(self.shape(x))) not in state.shift
        ):
            return None  # softmax ignores a shift that is constant along its axis
        return Broken(f"{node.fn_name} is not positively homogeneous")

    # -- normalization layers --------------------------------------------------------------

    def _normalized(
        self,
        node: OpNode,
        state: State,
        reduced: frozenset[int],
        subtracts_mean: bool,
        channel_group: int | None = None,
    ) -> State:
        if not isinstance(state, Wave):
            return state
        if state.pattern is not None:
            axis = state.pattern.axis
            if channel_group is not None and axis == 1:
                if state.pattern.block % channel_group or (
                    state.pattern.period and state.pattern.period % channel_group
                ):
                    return Broken(
                        f"{node.label} normalizes channels of one group together, but they are "
                        "rescaled by different factors"
                    )
            elif axis in reduced:
                return Broken(
                    f"{node.label} normalizes together entries rescaled by different factors"
                )
        if state.shift is not None:
            if not subtracts_mean:
                return Broken(f"{node.label} does not subtract a mean: an additive part survives")
            effective = reduced - {1} if channel_group == 1 else reduced
            if state.shift & effective:
                return Broken(
                    f"{node.label} does not remove an additive part that varies over what it "
                    "normalizes (e.g. a per-channel bias before a LayerNorm/GroupNorm)"
                )
        return None

    def _affine(
        self,
        node: OpNode,
        normalized: State,
        weight: Any,
        bias: Any,
        channel_axis: bool,
    ) -> State:
        out_shape = node.shape or ()
        ndim = len(out_shape)

        def broadcast(ref: Any) -> _Operand:
            op = self.operand(ref)
            if channel_axis and ndim >= 2:
                shape = (out_shape[1],) + (1,) * (ndim - 2)
                return _Operand(op.state, shape, op.node)
            return op

        out = normalized
        if weight is not None:
            out = _mul(_Operand(out, out_shape), broadcast(weight), ndim)
        if bias is not None:
            out = _sum([_Operand(out, out_shape), broadcast(bias)], ndim)
        return out

    def _t_batch_norm(self, node: OpNode) -> State:
        x = node.args["x"]
        ndim = len(self.shape(x))
        state = self.st(x)
        if node.args.get("batch_stats", True):
            normalized = self._normalized(node, state, frozenset(range(ndim)) - {1}, True)
        else:  # running statistics: a fixed per-channel affine map
            channel = (self.shape(x)[1],) + (1,) * (ndim - 2)
            scaled = _mul(_Operand(state, self.shape(x)), _Operand(None, channel, None, 1), ndim)
            normalized = _sum(
                [_Operand(scaled, self.shape(x)), _Operand(None, channel, None, 1)], ndim
            )
        return self._affine(node, normalized, node.args.get("weight"), node.args.get("bias"), True)

    def _t_instance_norm(self, node: OpNode) -> State:
        x = node.args["x"]
        ndim = len(self.shape(x))
        if not node.args.get("batch_stats", True):
            return self._t_batch_norm(node)
        normalized = self._normalized(node, self.st(x), frozenset(range(2, ndim)), True)
        return self._affine(node, normalized, node.args.get("weight"), node.args.get("bias"), True)

    def _t_layer_norm(self, node: OpNode) -> State:
        x = node.args["x"]
        ndim = len(self.shape(x))
        reduced = frozenset(range(ndim - int(node.args["ndim"]), ndim))
        normalized = self._normalized(node, self.st(x), reduced, node.op == "layer_norm")
        return self._affine(node, normalized, node.args.get("weight"), node.args.get("bias"), False)

    def _t_rms_norm(self, node: OpNode) -> State:
        return self._t_layer_norm(node)

    def _t_group_norm(self, node: OpNode) -> State:
        x = node.args["x"]
        shape = self.shape(x)
        ndim = len(shape)
        groups = int(node.args["groups"])
        per_group = shape[1] // groups if ndim >= 2 and groups else 1
        reduced = frozenset(range(1, ndim))
        normalized = self._normalized(node, self.st(x), reduced, True, per_group)
        return self._affine(node, normalized, node.args.get("weight"), node.args.get("bias"), True)

    def _t_normalize(self, node: OpNode) -> State:
        x = node.args["x"]
        ndim = len(self.shape(x))
        return self._normalized(
            node, self.st(x), frozenset({_norm_dim(node.args["dim"], ndim)}), False
        )

    def _t_weight_norm(self, node: OpNode) -> State:
        v = node.args["v"]
        ndim = len(self.shape(v))
        dim = node.args.get("dim", 0)
        kept = frozenset() if dim is None else frozenset({_norm_dim(dim, ndim)})
        normalized = self._normalized(node, self.st(v), frozenset(range(ndim)) - kept, False)
        g = self.operand(node.args["g"])
        return _mul(_Operand(normalized, self.shape(v)), g, ndim)

    # -- joint groups ----------------------------------------------------------------------

    def _direct_param(self, ref: Any) -> str | None:
        """The parameter behind `ref` when only views/reshapes stand between them."""
        while isinstance(ref, Ref):
            node = self.nodes[ref.node]
            if node.op == "param":
                return self.param_of[ref.node]
            if node.op not in _VIEW_OPS:
                return None
            ref = node.args.get("x")
        return None

    def sources(self, start: int) -> set[str]:
        """Parameters whose joint rescaling would rescale the tensor of node `start` (through
        sums, ReLUs, pooling, reshapes, ... back to the layers that produce it)."""
        found: set[str] = set()
        stack = [start]
        seen: set[int] = set()
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            node = self.nodes[i]
            if node.op == "param":
                found.add(self.param_of[i])
            elif node.op in {"conv", "conv_transpose", "linear", "embedding"}:
                for key in ("weight", "bias"):
                    name = self._direct_param(node.args.get(key))
                    if name is not None:
                        found.add(name)
            elif node.op in {"mul", "matmul", "addmm", "div"}:
                keys = ["a"] if node.op == "div" else ["a", "b"]
                direct = [n for k in keys if (n := self._direct_param(node.args.get(k)))]
                if direct:
                    found.add(direct[0])
                    if node.op == "addmm" and (bias := self._direct_param(node.args.get("bias"))):
                        found.add(bias)
                else:
                    refs = [r for k in keys if isinstance(r := node.args.get(k), Ref)]
                    if refs:
                        largest = max(refs, key=lambda r: math.prod(self.shape(r)))
                        stack.append(largest.node)
            elif node.op == "where":
                stack.extend(r.node for r in (node.args["a"], node.args["b"]) if isinstance(r, Ref))
            elif node.op == "item":
                stack.append(node.args["parent"].node)
            elif node.op in _PASS_THROUGH:
                stack.extend(node.refs)
        return found


def _unsqueezed(state: State, dim: int) -> State:
    if not isinstance(state, Wave):
        return state

    def new(d: int) -> int:
        return d + 1 if d >= dim else d

    pattern = replace(state.pattern, axis=new(state.pattern.axis)) if state.pattern else None
    shift = frozenset(new(d) for d in state.shift) if state.shift is not None else None
    return Wave(state.degree, pattern, shift, state.origins)


def _sliced(state: Wave, dim: int, start: int, step: int) -> State:
    pattern = state.pattern
    if pattern is None or pattern.axis != dim:
        return state
    if step != 1:
        if pattern.block == 1 and pattern.period is None:
            return state
        return Broken("a strided slice of a per-group rescaling")
    if pattern.period is not None and start % pattern.period:
        return Broken("a slice of a periodic rescaling")
    return replace(state, pattern=replace(pattern, block=math.gcd(pattern.block, start)))


# -- classification ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Invariance:
    granularity: Granularity
    result: PassResult
    groups: int | None = None


class _Classifier:
    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        self.analysis = _Analysis(graph)
        self.nodes = graph.nodes

    def norm_roles(self) -> dict[str, tuple[str, str]]:
        """Parameter -> (norm label, 'gamma'/'beta'/'gain') for normalization-layer affines."""
        roles: dict[str, tuple[str, str]] = {}
        for node in self.nodes:
            if node.op not in NORM_OPS:
                continue
            keys = (
                (("g", "gain"),)
                if node.op == "weight_norm"
                else (("weight", "gamma"), ("bias", "beta"))
            )
            for key, role in keys:
                name = self.analysis._direct_param(node.args.get(key))
                if name is not None and name not in roles:
                    roles[name] = (node.label, role)
        return roles

    def label_path(self, result: PassResult, neutralizer: int, seeds: set[int]) -> tuple[str, ...]:
        chain = [neutralizer]
        i = neutralizer
        while i in result.via and i not in seeds:
            i = result.via[i]
            chain.append(i)
        labels: list[str] = []
        for index in reversed(chain):
            node = self.nodes[index]
            if node.op == "param":
                continue
            if not labels or labels[-1] != node.label:
                labels.append(node.label)
        return tuple(labels)

    def norm_nodes(self, result: PassResult) -> list[int]:
        return [
            i
            for i in result.neutralizers
            if self.nodes[i].op in NORM_OPS or self.nodes[i].op in _ABSORBING_ARITHMETIC
        ]

    def path_nodes(self, result: PassResult, seed: int, targets: Sequence[int]) -> list[int]:
        """Shortest chain of changed nodes from `seed` to the first reachable target."""
        wanted = set(targets)
        parent: dict[int, int] = {seed: seed}
        frontier = [seed]
        while frontier:
            following = []
            for i in frontier:
                for c in self.graph.consumers[i]:
                    if c in parent or not (c in result.changed or c in wanted):
                        continue
                    parent[c] = i
                    if c in wanted:
                        chain = [c]
                        while chain[-1] != seed:
                            chain.append(parent[chain[-1]])
                        return chain[::-1]
                    following.append(c)
            frontier = following
        return []

    def describe_norm(
        self, result: PassResult, seed: int
    ) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
        """(norm labels, path from the parameter to the nearest of them, whether the parameter
        is normalized before any layer uses it: weight standardization)."""
        norms = self.norm_nodes(result)
        labels = tuple(dict.fromkeys(self.nodes[i].label for i in norms))
        chain = self.path_nodes(result, seed, norms)
        if not chain:
            return labels, (), False
        standardized = not any(self.nodes[j].op in _LINEAR_OPS for j in chain[1:-1])
        path: list[str] = []
        for index in chain[1:]:
            label = self.nodes[index].label
            if not path or path[-1] != label:
                path.append(label)
        return labels, tuple(path), standardized

    def classify(self) -> ModelClassification:
        graph = self.graph
        analysis = self.analysis
        method = graph.method
        roles = self.norm_roles()
        verdicts: dict[str, ParamClassification] = {}
        pending: dict[str, PassResult] = {}
        individually_invariant: set[str] = set()
        for name, index in graph.params.items():
            shape = self.nodes[index].shape or ()
            base: dict[str, Any] = {"name": name, "shape": shape, "method": method}
            if not analysis.reaches[index]:
                verdicts[name] = ParamClassification(
                    kind=ParamKind.SCALE_SENSITIVE,
                    evidence="not used by the forward pass on the example input: no structural "
                    "claim",
                    **base,
                )
                continue
            if name in roles:
                label, role = roles[name]
                verdicts[name] = ParamClassification(
                    kind=ParamKind.NORM_AFFINE,
                    norm_layers=(label,),
                    evidence=f"{role} of {label}",
                    **base,
                )
                continue
            dead = analysis.run({index: Wave(_ZERO, None, frozenset(range(len(shape))))})
            if dead.invariant:
                labels, path, _ = self.describe_norm(dead, index)
                verdicts[name] = ParamClassification(
                    kind=ParamKind.DEAD_BIAS,
                    norm_layers=labels,
                    path=path,
                    evidence=f"removed by {', '.join(labels) or 'the graph'} (mean subtraction): "
                    "any change leaves the output unchanged, its gradient is 0",
                    **base,
                )
                continue
            uniform = analysis.run({index: Wave(_ONE)})
            if not uniform.invariant:
                pending[name] = uniform
                continue
            found = self.granularity(index, shape, uniform)
            labels, path, standardized = self.describe_norm(found.result, index)
            individually_invariant.add(name)
            scope = {
                Granularity.PER_ROW: "each output row on its own",
                Granularity.PER_GROUP: f"each of its {found.groups} row groups on its own",
                Granularity.WHOLE_TENSOR: "the whole tensor (not row by row)",
            }[found.granularity]
            how = (
                "standardized before use (weight standardization)"
                if standardized
                else "normalized by " + (", ".join(labels) if labels else "nothing it reaches")
            )
            verdicts[name] = ParamClassification(
                kind=ParamKind.SCALE_INVARIANT,
                granularity=found.granularity,
                groups=found.groups,
                norm_layers=labels,
                path=path,
                evidence=f"rescaling {scope} leaves the output unchanged: {how}",
                **base,
            )
        joint_groups = self.joint_groups(pending, individually_invariant | set(verdicts))
        member_of: dict[str, int] = {}
        for group_id, (members, _) in enumerate(joint_groups):
            for m in members:
                member_of.setdefault(m, group_id)
        for name, uniform in pending.items():
            index = graph.params[name]
            shape = self.nodes[index].shape or ()
            base = {"name": name, "shape": shape, "method": method}
            gid = member_of.get(name)
            if gid is None:
                failure = uniform.failure
                where = (
                    self.nodes[uniform.failure_node].label
                    if uniform.failure_node is not None
                    else ""
                )
                reason = failure.reason if failure else "changes the output"
                verdicts[name] = ParamClassification(
                    kind=ParamKind.SCALE_SENSITIVE,
                    path=self.label_path(uniform, uniform.failure_node, {index})
                    if uniform.failure_node is not None
                    else (),
                    evidence=f"rescaling it changes the output: {reason}"
                    + (f" (at {where})" if where and where not in reason else ""),
                    **base,
                )
                continue
            members, result = joint_groups[gid]
            labels, path, _ = self.describe_norm(result, index)
            others = [m for m in members if m != name]
            shown = ", ".join(others[:4]) + (
                f" and {len(others) - 4} more" if len(others) > 4 else ""
            )
            verdicts[name] = ParamClassification(
                kind=ParamKind.SCALE_INVARIANT,
                granularity=Granularity.JOINT,
                joint_group=gid,
                norm_layers=labels,
                path=path,
                evidence=f"invariant only when rescaled together with {shown} (joint group "
                f"{gid}), normalized by {', '.join(labels) or 'nothing it reaches'}",
                **base,
            )
        notes = list(graph.notes)
        if analysis.unmodelled:
            ops = ", ".join(f"{k} ({len(v)}x)" for k, v in sorted(analysis.unmodelled.items()))
            notes.append(
                f"operations the analysis does not model were treated as breaking invariance: {ops}"
            )
        return ModelClassification(
            params=tuple(verdicts[name] for name in graph.params),
            method=method,
            notes=tuple(notes),
            joint_groups=tuple(members for members, _ in joint_groups),
        )

    def granularity(self, index: int, shape: tuple[int, ...], uniform: PassResult) -> _Invariance:
        rows = shape[0] if shape else 1
        if rows > 1:
            per_row = self.analysis.run({index: Wave(_ONE, Pattern(0, 1))})
            if per_row.invariant:
                return _Invariance(Granularity.PER_ROW, per_row)
            sizes = []
            for i in uniform.neutralizers:
                node = self.nodes[i]
                if node.op == "group_norm":
                    channels = (self.analysis.shape(node.args["x"]) or (0, 0))[1]
                    groups = int(node.args["groups"])
                    if groups and channels % groups == 0:
                        sizes.append(channels // groups)
            for size in sorted(set(sizes)):
                if 1 < size < rows and rows % size == 0:
                    per_group = self.analysis.run({index: Wave(_ONE, Pattern(0, size))})
                    if per_group.invariant:
                        return _Invariance(Granularity.PER_GROUP, per_group, rows // size)
        return _Invariance(Granularity.WHOLE_TENSOR, uniform)

    def joint_search(self, name: str) -> tuple[frozenset[str], PassResult] | None:
        """Grow `{name}` by the parameters that produce what was mixed into its rescaling, until
        the set is invariant (checked by a clean pass) or no partner is left."""
        params = self.graph.params
        members = {name}
        result = self.analysis.run({params[name]: Wave(_ONE)}, collect_all=True)
        for _ in range(MAX_JOINT_ROUNDS):
            if result.invariant:
                return frozenset(members), result
            partners: set[str] = set()
            for _node, failure in result.failures:
                for origin in failure.origins:
                    partners |= self.analysis.sources(origin)
            partners -= members
            if not partners or len(members) + len(partners) > MAX_JOINT_MEMBERS:
                return None
            members |= partners
            result = self.analysis.run({params[m]: Wave(_ONE) for m in members}, collect_all=True)
        return (frozenset(members), result) if result.invariant else None

    def joint_groups(
        self, pending: dict[str, PassResult], settled: set[str]
    ) -> list[tuple[tuple[str, ...], PassResult]]:
        """Smallest invariant groups first; members that are invariant (or dead) on their own
        are dropped when the rest stays invariant without them."""
        order = {name: i for i, name in enumerate(self.graph.params)}
        found: dict[frozenset[str], PassResult] = {}
        for name in pending:
            searched = self.joint_search(name)
            if searched is None:
                continue
            members, result = searched
            removable = sorted(members & settled, key=order.__getitem__)
            if removable and len(members) > len(removable):
                smaller = members - set(removable)
                check = self.analysis.run({self.graph.params[m]: Wave(_ONE) for m in smaller})
                if check.invariant and name in smaller:
                    members, result = frozenset(smaller), check
            found.setdefault(members, result)
        ranked = sorted(found.items(), key=lambda kv: (len(kv[0]), min(order[m] for m in kv[0])))
        return [
            (tuple(sorted(members, key=order.__getitem__)), result) for members, result in ranked
        ]


# -- public API ----------------------------------------------------------------------------


def classify_graph(graph: ModelGraph) -> ModelClassification:
    """Classify every parameter of an already traced graph."""
    return _Classifier(graph).classify()


def classify_model(
    model: torch.nn.Module,
    example_input: Any,
    *,
    method: TraceMethod = TraceMethod.AUTO,
) -> ModelClassification:
    """Decide, for every parameter of `model`, whether it is scale-invariant and how.

    `example_input` is what `model(...)` is called with: a tensor, a tuple of positional
    arguments, a dict of keyword arguments, or an `ExampleInput`. The model is traced in train
    mode (the mode invariance is about) with `torch.fx`, falling back to an execution trace when
    symbolic tracing fails; its mode and buffers are left as they were.

    Returns one `ParamClassification` per parameter, in `model.named_parameters()` order, with
    the class, the granularity, the normalization layer(s) and path it rests on, the joint group
    id, and `method` saying which trace was used. Raises `ModelFileError` when the model cannot
    run on the example input.
    """
    graph = trace_model(model, as_example_input(example_input), method)
    return classify_graph(graph)


def classify_model_file(
    path: Path,
    factory: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    checkpoint: Path | None = None,
    *,
    trust_pickle: bool = False,
    method: TraceMethod = TraceMethod.AUTO,
) -> ModelClassification:
    """`classify_model` on a model file (`build_model()` or `factory`, `example_input()` or
    `input_shape`, weights from `checkpoint` when given) -- what `bnwd inspect --model` uses."""
    loaded = load_model_file(
        Path(path),
        factory=factory,
        input_shape=input_shape,
        checkpoint=checkpoint,
        trust_pickle=trust_pickle,
    )
    graph = trace_model(loaded.model, loaded.example_input, method, where=f"{path}: ")
    result = classify_graph(graph)
    if loaded.notes:
        result = replace(result, notes=result.notes + loaded.notes)
    return result


__all__ = [
    "EPS_MAX",
    "ExampleInput",
    "TraceMethod",
    "classify_graph",
    "classify_model",
    "classify_model_file",
]


def _product_origins(xs: State, ws: State, what: str) -> frozenset[int] | Broken:
    """The weights an input x weight product depends on; Broken when either has an additive
    part (a rescaled term plus an unscaled one is not rescaled by the product)."""
    origins = frozenset().union(*(s.origins for s in (xs, ws) if isinstance(s, Wave)))
    if (isinstance(xs, Wave) and xs.shift is not None) or (
        isinstance(ws, Wave) and ws.shift is not None
    ):
        return Broken(f"{what} of an input with an additive part", origins)
    return origins


def _product_wave(
    xs: State, ws: State, pattern: Pattern | None, origins: frozenset[int], what: str
) -> State:
    """The state of input x weight: degrees add; one factor rescaled per channel and the other
    as a whole do not combine into one rescaling."""
    if (
        isinstance(xs, Wave)
        and isinstance(ws, Wave)
        and (xs.pattern is None) != (ws.pattern is None)
    ):
        return Broken(f"{what} of input and weight rescaled differently")
    degree = (xs.degree if isinstance(xs, Wave) else _ZERO) + (
        ws.degree if isinstance(ws, Wave) else _ZERO
    )
    return _wave(degree, pattern, None, origins)
