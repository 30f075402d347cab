"""Numeric verification of a structural classification: the ground truth the graph must match.

All checks run in train mode with the random number generator reset before every forward pass
(dropout and stochastic depth draw the same masks every time), on a copy of the model, in
float64 on the CPU (or float32 on a GPU with TF32 off, with looser tolerances that say so). The
loss is a fixed random projection of the output, `L = <r, f(x)>`, so that a normalized output
does not make every gradient vanish.

- Output check: every claimed unit (a whole tensor, a joint group, or a tensor's rows / row
  groups with independent random factors) is rescaled at once, in one forward pass; when the
  output moves, bisection finds the units responsible (a few passes per failure, not one per
  parameter). Claimed dead biases are perturbed instead of rescaled.
- Euler check: `cos(w, dL/dw)` for every parameter (and every row) from one backward pass; 0
  for an invariant weight.
- Gradient scaling: one more backward at the rescaled point, `dL/dw(c*w) = dL/dw(w) / c`.

Each check runs twice: with every normalization's eps (and every small constant the analysis
read as an eps) shrunk 1e16-fold, which decides "structurally invariant or not", and with the
model's own eps, which tells "invariant" from "invariant up to eps" (small-variance channels).
A parameter whose gradient is zero (a dead branch behind a zero gamma) cannot be tested: it is
reported as no evidence, never as invariance.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bnwd_cli.errors import ModelFileError, UsageError
from bnwd_cli.graph.analyze import EPS_MAX
from bnwd_cli.graph.classes import (
    Granularity,
    ModelClassification,
    ParamClassification,
    ParamKind,
)
from bnwd_cli.graph.model_file import ExampleInput, as_example_input, describe_user_error
from bnwd_cli.graph.trace import TraceMethod, raw_name

EPS_SHRINK = 1e-16
"""Factor applied to every eps in the strict pass: a channel whose variance is 1e-9 of the
others is still far above the shrunk eps (1e-21 for the usual 1e-5), and float32 can still
represent it."""


class Device(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class NumericVerdict(StrEnum):
    INVARIANT = "invariant"
    EPS_LIMITED = "invariant up to eps"
    NOT_INVARIANT = "not invariant"
    DEAD = "dead"
    """Claimed dead bias: zero gradient and no effect of any change, as claimed."""
    HAS_EFFECT = "has an effect"
    """Claimed dead bias that does change the output."""
    NO_EVIDENCE = "no evidence"
    """No effect on the output (e.g. behind a zero gamma): the test proves nothing."""
    NOT_CHECKED = "not checked"


class Agreement(StrEnum):
    AGREE = "agree"
    DISAGREE = "DISAGREE"
    NO_EVIDENCE = "no evidence"
    NOT_APPLICABLE = "n/a"


@dataclass(frozen=True)
class Tolerances:
    """What counts as zero in each check, for one floating-point precision."""

    dtype: str
    output: float
    """Relative output change allowed for an invariant rescaling (eps shrunk)."""
    euler: float
    """|cos(w, grad)| allowed for an invariant weight (eps shrunk)."""
    grad_scaling: float
    """Relative error allowed in grad(c*w) = grad(w)/c."""
    eps_output: float
    """Relative output change, at the model's eps, above which eps visibly limits invariance."""
    eps_euler: float
    """|cos(w, grad)| per row, at the model's eps, above which eps visibly limits invariance."""
    no_effect: float
    """Influence |w| |grad| / |f| below which a test has no power: no evidence."""


FLOAT64 = Tolerances("float64", 1e-9, 1e-8, 1e-8, 1e-2, 1e-2, 1e-8)
FLOAT32 = Tolerances("float32", 1e-4, 1e-3, 1e-3, 3e-2, 5e-2, 1e-4)


@dataclass(frozen=True)
class NumericResult:
    """The numbers behind one parameter's numeric verdict (None where not measured)."""

    verdict: NumericVerdict
    output_error: float | None = None
    """Relative output change when its unit was rescaled (eps shrunk)."""
    output_batch: int | None = None
    """How many units were rescaled together in that forward pass."""
    output_error_model_eps: float | None = None
    """The same at the model's own eps."""
    euler_cos: float | None = None
    """cos(w, dL/dw) of its unit (eps shrunk); of the parameter itself when not claimed."""
    euler_cos_model_eps: float | None = None
    row_euler_max: float | None = None
    """Largest |cos| over rows (per-row units) or row groups (per-group units)."""
    row_euler_max_model_eps: float | None = None
    grad_scaling_error: float | None = None
    influence: float | None = None
    """|w| |dL/dw| / |f|: how much the output depends on it at first order."""
    rows_without_evidence: int = 0
    note: str = ""


@dataclass(frozen=True)
class ParamVerification:
    classification: ParamClassification
    numeric: NumericResult
    agreement: Agreement


@dataclass(frozen=True)
class JointGroupCheck:
    group: int
    members: tuple[str, ...]
    verdict: NumericVerdict
    output_error: float | None
    agreement: Agreement


@dataclass(frozen=True)
class InvarianceReport:
    """Structural verdicts beside the numbers, per parameter, for one model."""

    classification: ModelClassification
    params: tuple[ParamVerification, ...]
    joint_groups: tuple[JointGroupCheck, ...]
    device: str
    tolerances: Tolerances
    forward_passes: int
    backward_passes: int
    seed: int
    notes: tuple[str, ...] = ()
    model: str = ""
    input: str = ""
    analysis_seconds: float = field(default=0.0, compare=False, repr=False)
    verification_seconds: float = field(default=0.0, compare=False, repr=False)

    @property
    def disagreements(self) -> tuple[str, ...]:
        names = [p.classification.name for p in self.params if p.agreement is Agreement.DISAGREE]
        names += [
            f"joint group {g.group}" for g in self.joint_groups if g.agreement is Agreement.DISAGREE
        ]
        return tuple(names)

    @property
    def agrees(self) -> bool:
        return not self.disagreements

    def count(self, agreement: Agreement) -> int:
        return sum(1 for p in self.params if p.agreement is agreement)


# -- eps shrinking -------------------------------------------------------------------------

_NORM_EPS: dict[Any, tuple[int, float | None]] = {
    F.batch_norm: (7, 1e-5),
    torch.batch_norm: (7, 1e-5),
    F.instance_norm: (7, 1e-5),
    torch.instance_norm: (7, 1e-5),
    F.layer_norm: (4, 1e-5),
    torch.layer_norm: (4, 1e-5),
    F.group_norm: (4, 1e-5),
    torch.group_norm: (4, 1e-5),
    F.normalize: (3, 1e-12),
}
for _fn in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)):
    if _fn is not None:
        _NORM_EPS[_fn] = (3, None)
_ADDS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})
_CLAMPS = frozenset({"clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"})


def _small(value: Any) -> bool:
    return isinstance(value, float | int) and not isinstance(value, bool) and 0 < value <= EPS_MAX


class _ShrunkEps(torch.overrides.TorchFunctionMode):
    """Every normalization's eps, and every small constant added to or clamping a tensor (what
    the structural analysis reads as an eps), times `factor`."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        args = list(args)
        kwargs = dict(kwargs or {})
        spec = _NORM_EPS.get(func)
        if spec is not None:
            position, default = spec
            if len(args) > position:
                args[position] = self._shrink(args[position], args)
            else:
                kwargs["eps"] = self._shrink(kwargs.get("eps", default), args)
        else:
            name = raw_name(func)
            if name in _ADDS and len(args) == 2:
                if _small(args[1]) and isinstance(args[0], torch.Tensor):
                    args[1] = args[1] * self.factor
                elif _small(args[0]) and isinstance(args[1], torch.Tensor):
                    args[0] = args[0] * self.factor
            elif name in _CLAMPS and kwargs.get("max") is None and not (len(args) > 2):
                if len(args) > 1 and _small(args[1]):
                    args[1] = args[1] * self.factor
                elif _small(kwargs.get("min")):
                    kwargs["min"] = kwargs["min"] * self.factor
        return func(*args, **kwargs)

    def _shrink(self, eps: Any, args: Sequence[Any]) -> Any:
        if eps is None:
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            dtype = (
                first.dtype if first is not None and first.is_floating_point() else torch.float32
            )
            return torch.finfo(dtype).eps * self.factor
        return eps * self.factor if isinstance(eps, float | int) else eps


# -- forward passes ------------------------------------------------------------------------


def resolve_device(device: Device | str) -> torch.device:
    device = Device(device)
    if device is Device.CUDA and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    if device is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device.value)


@contextmanager
def _numerics(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """float64 default dtype on the CPU; TF32 and nondeterministic kernels off on a GPU."""
    old_default = torch.get_default_dtype()
    cuda = device.type == "cuda"
    saved: dict[str, Any] = {}
    if cuda:
        saved = {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "deterministic": torch.backends.cudnn.deterministic,
            "benchmark": torch.backends.cudnn.benchmark,
        }
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    py_state = random.getstate()
    np_state = None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[device] if cuda else []):
            yield
    finally:
        torch.set_default_dtype(old_default)
        random.setstate(py_state)
        if np_state is not None:
            import numpy as np

            np.random.set_state(np_state)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = saved["matmul"]
            torch.backends.cudnn.allow_tf32 = saved["cudnn_tf32"]
            torch.backends.cudnn.deterministic = saved["deterministic"]
            torch.backends.cudnn.benchmark = saved["benchmark"]


def _convert(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            return value.detach().to(device=device, dtype=dtype)
        return value.detach().to(device=device)
    if isinstance(value, list | tuple):
        return type(value)(_convert(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _convert(v, device, dtype) for k, v in value.items()}
    return value


class _Runner:
    """Forward (and backward) passes of a private copy of the model with overridden tensors."""

    def __init__(
        self, model: torch.nn.Module, example: ExampleInput, device: torch.device,
        dtype: torch.dtype, seed: int,
    ) -> None:  # fmt: skip
        try:
            self.model = copy.deepcopy(model)
        except Exception as exc:
            raise ModelFileError(
                f"cannot copy the model for the numeric check ({type(exc).__name__}: {exc})"
            ) from None
        self.model.to(device=device, dtype=dtype).train()
        self.device = device
        self.seed = seed
        self.args = _convert(example.args, device, dtype)
        self.kwargs = _convert(dict(example.kwargs), device, dtype)
        self.params = {n: p.detach() for n, p in self.model.named_parameters()}
        self.buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        self.forward_passes = 0
        self.backward_passes = 0
        self.projection: torch.Tensor | None = None

    def _reset_rng(self) -> None:
        torch.manual_seed(self.seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(self.seed)
        random.seed(self.seed)
        try:
            import numpy as np

            np.random.seed(self.seed % 2**32)
        except ImportError:  # pragma: no cover
            pass

    def run(
        self, overrides: dict[str, torch.Tensor], *, strict: bool, grad: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        tensors = {**self.params, **overrides}
        if grad:
            tensors = {n: t.detach().clone().requires_grad_(True) for n, t in tensors.items()}
        state = {**tensors, **{n: b.clone() for n, b in self.buffers.items()}}
        self._reset_rng()
        mode = _ShrunkEps(EPS_SHRINK) if strict else nullcontext()
        self.forward_passes += 1
        try:
            with torch.set_grad_enabled(grad), mode:
                out = torch.func.functional_call(
                    self.model, state, tuple(self.args), dict(self.kwargs), strict=False
                )
        except (KeyboardInterrupt, ModelFileError):
            raise
        except Exception as exc:
            raise describe_user_error("the forward pass of the numeric check", exc) from None
        leaves = [
            t.reshape(-1)
            for t in torch.utils._pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point()
        ]
        flat = torch.cat(leaves) if leaves else torch.zeros(0, device=self.device)
        if self.projection is None:
            generator = torch.Generator().manual_seed(self.seed + 1)
            r = torch.randn(flat.numel(), generator=generator, dtype=torch.float64)
            self.projection = (r / r.norm().clamp_min(1e-300)).to(flat.device, flat.dtype)
        if not grad:
            return flat.detach(), None
        loss = (flat * self.projection).sum()
        names = list(tensors)
        self.backward_passes += 1
        grads = torch.autograd.grad(loss, [tensors[n] for n in names], allow_unused=True)
        return flat.detach(), {
            n: (g if g is not None else torch.zeros_like(tensors[n])).detach()
            for n, g in zip(names, grads, strict=True)
        }


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.norm())
    diff = float((a - b).norm())
    return diff / scale if scale > 0 else diff


# -- units ---------------------------------------------------------------------------------


@dataclass
class _Unit:
    """What one rescaling moves: members rescaled together (rows, groups or whole)."""

    label: str
    names: tuple[str, ...]
    mode: str
    """"rows" (per row), "groups" (per group of `block` rows), "whole", or "perturb"."""
    block: int = 1
    factors: dict[str, torch.Tensor] = field(default_factory=dict)

    def apply(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.mode == "perturb":
            return {n: params[n] + self.factors[n] for n in self.names}
        return {n: params[n] * self.factors[n] for n in self.names}


def _random_factors(count: int, generator: torch.Generator) -> torch.Tensor:
    """Positive factors away from 1: exp(+-u), u in [0.25, 0.7] (0.5 to 0.78 or 1.28 to 2)."""
    magnitude = 0.25 + 0.45 * torch.rand(count, generator=generator, dtype=torch.float64)
    sign = torch.where(torch.rand(count, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return torch.exp(sign * magnitude)


def _make_units(
    classification: ModelClassification,
    params: dict[str, torch.Tensor],
    seed: int,
) -> tuple[list[_Unit], dict[str, int], list[int]]:
    """Units to test, the unit index of each claimed parameter, and the joint-group units."""
    generator = torch.Generator().manual_seed(seed + 2)
    units: list[_Unit] = []
    unit_of: dict[str, int] = {}
    for p in classification.params:
        tensor = params[p.name]
        rows = tensor.shape[0] if tensor.dim() > 0 else 1
        view = (rows,) + (1,) * max(tensor.dim() - 1, 0)
        if p.kind is ParamKind.DEAD_BIAS:
            scale = max(float(tensor.pow(2).mean().sqrt()) if tensor.numel() else 0.0, 1.0)
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * scale
            unit = _Unit(p.name, (p.name,), "perturb", 1, {p.name: noise.to(tensor)})
        elif (
            p.kind is ParamKind.SCALE_INVARIANT
            and p.granularity is Granularity.PER_ROW
            and (tensor.dim() > 0)
        ):
            factors = _random_factors(rows, generator).reshape(view)
            unit = _Unit(p.name, (p.name,), "rows", 1, {p.name: factors.to(tensor)})
        elif (
            p.kind is ParamKind.SCALE_INVARIANT
            and p.granularity is Granularity.PER_GROUP
            and p.groups
            and rows % p.groups == 0
        ):
            block = rows // p.groups
            factors = _random_factors(p.groups, generator).repeat_interleave(block).reshape(view)
            unit = _Unit(p.name, (p.name,), "groups", block, {p.name: factors.to(tensor)})
        elif p.kind is ParamKind.SCALE_INVARIANT and p.granularity in (
            Granularity.WHOLE_TENSOR,
            Granularity.PER_ROW,
            Granularity.PER_GROUP,
        ):
            factor = _random_factors(1, generator)
            unit = _Unit(p.name, (p.name,), "whole", 1, {p.name: factor.to(tensor).reshape(())})
        else:
            continue
        unit_of[p.name] = len(units)
        units.append(unit)
    groups = list(classification.joint_groups)
    if not groups:  # classifications made without the members list: rebuild from the ids
        ids: dict[int, list[str]] = {}
        for p in classification.params:
            if p.kind is ParamKind.SCALE_INVARIANT and p.joint_group is not None:
                ids.setdefault(p.joint_group, []).append(p.name)
        groups = [tuple(ids[k]) for k in sorted(ids)] if ids else []
        if ids and sorted(ids) != list(range(len(ids))):
            groups = [tuple(ids.get(k, ())) for k in range(max(ids) + 1)]
    group_units: list[int] = []
    for gid, members in enumerate(groups):
        factor = _random_factors(1, generator)
        present = tuple(m for m in members if m in params)
        unit = _Unit(
            f"joint group {gid}", present, "whole", 1,
            {m: factor.to(params[m]).reshape(()) for m in present},
        )  # fmt: skip
        group_units.append(len(units))
        units.append(unit)
    return units, unit_of, group_units


# -- the checks ----------------------------------------------------------------------------


def _flat(tensors: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1).to(torch.float64) for n in names])


def _cos(w: torch.Tensor, g: torch.Tensor) -> float | None:
    denominator = float(w.norm()) * float(g.norm())
    if denominator == 0.0:
        return None
    return float((w * g).sum()) / denominator


def _row_cosines(w: torch.Tensor, g: torch.Tensor, block: int) -> tuple[float | None, int]:
    """Largest |cos| over rows (or blocks of rows) that carry evidence, and how many do not."""
    if w.dim() == 0:
        return None, 0
    rows = w.shape[0] // block
    w2 = w.reshape(rows, -1).to(torch.float64)
    g2 = g.reshape(rows, -1).to(torch.float64)
    norms = w2.norm(dim=1) * g2.norm(dim=1)
    top = float(norms.max()) if rows else 0.0
    if top == 0.0:
        return None, rows
    evident = norms > 1e-6 * top
    cos = (w2 * g2).sum(dim=1)[evident] / norms[evident]
    return float(cos.abs().max()), int((~evident).sum())


class _Verifier:
    def __init__(
        self,
        runner: _Runner,
        classification: ModelClassification,
        tolerances: Tolerances,
        seed: int,
    ) -> None:
        self.runner = runner
        self.classification = classification
        self.tol = tolerances
        self.params = runner.params
        self.units, self.unit_of, self.group_units = _make_units(classification, self.params, seed)
        self.notes: list[str] = []

    def point(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        overrides: dict[str, torch.Tensor] = {}
        for i in indices:
            unit = self.units[i]
            current = {n: overrides.get(n, self.params[n]) for n in unit.names}
            overrides.update(unit.apply(current))
        return overrides

    def total_factors(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Each parameter's overall factor when `indices` are rescaled together (a parameter
        in two joint groups is rescaled by both factors)."""
        total: dict[str, torch.Tensor] = {}
        for i in indices:
            unit = self.units[i]
            if unit.mode == "perturb":
                continue
            for n in unit.names:
                total[n] = total[n] * unit.factors[n] if n in total else unit.factors[n]
        return total

    def isolate(
        self, indices: list[int], base: torch.Tensor, tol: float, strict: bool,
        first_error: float | None = None,
    ) -> dict[int, tuple[bool, float, int]]:  # fmt: skip
        """Output check of `indices` together, bisecting on failure: unit -> (passed, error,
        how many units shared the forward pass that decided it)."""
        results: dict[int, tuple[bool, float, int]] = {}

        def test(group: list[int], error: float | None = None) -> None:
            if not group:
                return
            if error is None:
                out, _ = self.runner.run(self.point(group), strict=strict, grad=False)
                error = _relative(out, base)
            if error <= tol:
                for u in group:
                    results[u] = (True, error, len(group))
                return
            if len(group) == 1:
                results[group[0]] = (False, error, 1)
                return
            middle = len(group) // 2
            test(group[:middle])
            test(group[middle:])

        test(indices, first_error)
        return results

    def grad_scaling(
        self,
        unit: _Unit,
        g0: dict[str, torch.Tensor],
        g1: dict[str, torch.Tensor],
        factors: dict[str, torch.Tensor],
    ) -> float | None:
        """Relative error of `c * grad(c*w) = grad(w)` over the unit's members, with `c` each
        member's overall factor at the rescaled point."""
        if unit.mode == "perturb":
            return None
        expected = _flat(g0, unit.names)
        scale = float(expected.norm())
        if scale == 0.0:
            return None
        observed = torch.cat(
            [(g1[n] * factors[n]).reshape(-1).to(torch.float64) for n in unit.names]
        )
        return float((observed - expected).norm()) / scale

    def influence(
        self, names: Sequence[str], grads: dict[str, torch.Tensor], f_norm: float, perturb: bool
    ) -> float:
        w = _flat(self.params, names)
        size = float(w.norm())
        if perturb:
            size = max(size, math.sqrt(w.numel()))
        g = float(_flat(grads, names).norm())
        return size * g / f_norm if f_norm > 0 else size * g

    def run(self) -> tuple[list[ParamVerification], list[JointGroupCheck]]:
        runner = self.runner
        tol = self.tol
        all_units = list(range(len(self.units)))
        f0, g0 = runner.run({}, strict=True, grad=True)
        assert g0 is not None
        f_norm = float(f0.norm())
        strict: dict[int, tuple[bool, float, int]] = {}
        g1: dict[str, torch.Tensor] | None = None
        grad_units: list[int] = []
        if all_units:
            f1, g1 = runner.run(self.point(all_units), strict=True, grad=True)
            error = _relative(f1, f0)
            strict = self.isolate(all_units, f0, tol.output, True, error)
            grad_units = [u for u, (ok, _, _) in strict.items() if ok]
            if len(grad_units) != len(all_units):
                g1 = None
                if grad_units:
                    _, g1 = runner.run(self.point(grad_units), strict=True, grad=True)
        # the model's own eps
        fm, gm = runner.run({}, strict=False, grad=True)
        assert gm is not None
        passing = [u for u in all_units if strict.get(u, (False,))[0]]
        at_model_eps: dict[int, tuple[bool, float, int]] = {}
        if passing:
            out, _ = runner.run(self.point(passing), strict=False, grad=False)
            at_model_eps = self.isolate(passing, fm, tol.eps_output, False, _relative(out, fm))
        factors = self.total_factors(grad_units)
        unit_results: dict[int, NumericResult] = {}
        for u, unit in enumerate(self.units):
            grad_error = None
            if g1 is not None and u in grad_units:
                grad_error = self.grad_scaling(unit, g0, g1, factors)
            unit_results[u] = self.unit_result(
                unit, strict.get(u), at_model_eps.get(u), g0, gm, grad_error, f_norm
            )
        records = [
            self.param_record(p, unit_results, g0, gm, f0, f_norm)
            for p in self.classification.params
        ]
        groups = []
        for gid, u in enumerate(self.group_units):
            result = unit_results[u]
            groups.append(
                JointGroupCheck(
                    gid, self.units[u].names, result.verdict, result.output_error,
                    _agreement(ParamKind.SCALE_INVARIANT, result.verdict),
                )
            )  # fmt: skip
        return records, groups

    def unit_result(
        self,
        unit: _Unit,
        strict: tuple[bool, float, int] | None,
        model_eps: tuple[bool, float, int] | None,
        g0: dict[str, torch.Tensor],
        gm: dict[str, torch.Tensor],
        grad_error: float | None,
        f_norm: float,
    ) -> NumericResult:
        tol = self.tol
        perturb = unit.mode == "perturb"
        influence = self.influence(unit.names, g0, f_norm, perturb)
        w = _flat(self.params, unit.names)
        cos = _cos(w, _flat(g0, unit.names))
        cos_m = _cos(w, _flat(gm, unit.names))
        row_max = row_max_m = None
        without = 0
        if unit.mode in ("rows", "groups"):
            name = unit.names[0]
            row_max, without = _row_cosines(self.params[name], g0[name], unit.block)
            row_max_m, _ = _row_cosines(self.params[name], gm[name], unit.block)
        passed, error, batch = strict if strict is not None else (False, None, None)
        error_m = model_eps[1] if model_eps is not None else None
        common: dict[str, Any] = {
            "output_error": error,
            "output_batch": batch,
            "output_error_model_eps": error_m,
            "euler_cos": cos,
            "euler_cos_model_eps": cos_m,
            "row_euler_max": row_max,
            "row_euler_max_model_eps": row_max_m,
            "grad_scaling_error": grad_error,
            "influence": influence,
            "rows_without_evidence": without,
        }
        if influence < tol.no_effect:  # the gradient is noise: its direction means nothing
            common.update(
                euler_cos=None, euler_cos_model_eps=None, row_euler_max=None,
                row_euler_max_model_eps=None, grad_scaling_error=None,
            )  # fmt: skip
        if perturb:
            if influence < tol.no_effect and passed:
                return NumericResult(NumericVerdict.DEAD, **common)
            return NumericResult(NumericVerdict.HAS_EFFECT, **common)
        if influence < tol.no_effect:
            return NumericResult(
                NumericVerdict.NO_EVIDENCE, note="no effect on the output (zero gradient)", **common
            )
        failed = []
        if not passed:
            failed.append("output changed")
        if cos is not None and abs(cos) > tol.euler:
            failed.append("gradient not orthogonal to the weight")
        if row_max is not None and row_max > tol.euler:
            failed.append("a row's gradient not orthogonal to the row")
        if grad_error is not None and grad_error > tol.grad_scaling:
            failed.append("gradient did not scale as 1/c")
        if failed:
            return NumericResult(NumericVerdict.NOT_INVARIANT, note="; ".join(failed), **common)
        eps_reasons = []
        if model_eps is not None and not model_eps[0]:
            eps_reasons.append("output moves at the model's eps")
        if row_max_m is not None and row_max_m > tol.eps_euler:
            eps_reasons.append("a row's gradient is not orthogonal at the model's eps")
        elif (
            unit.mode not in ("rows", "groups") and cos_m is not None and abs(cos_m) > tol.eps_euler
        ):
            eps_reasons.append("gradient not orthogonal at the model's eps")
        note = ""
        if unit.mode == "whole" and len(unit.names) == 1:
            name = unit.names[0]
            finer, _ = _row_cosines(self.params[name], g0[name], 1)
            if finer is not None and finer <= tol.euler and self.params[name].shape[0] > 1:
                note = "every row's gradient is orthogonal too: possibly invariant per row"
        if eps_reasons:
            return NumericResult(NumericVerdict.EPS_LIMITED, note="; ".join(eps_reasons), **common)
        return NumericResult(NumericVerdict.INVARIANT, note=note, **common)

    def param_record(
        self,
        p: ParamClassification,
        unit_results: dict[int, NumericResult],
        g0: dict[str, torch.Tensor],
        gm: dict[str, torch.Tensor],
        f0: torch.Tensor,
        f_norm: float,
    ) -> ParamVerification:
        unit = self.unit_of.get(p.name)
        if (
            unit is None
            and p.kind is ParamKind.SCALE_INVARIANT
            and p.joint_group is not None
            and p.joint_group < len(self.group_units)
        ):
            unit = self.group_units[p.joint_group]
        if unit is not None:
            result = unit_results[unit]
            return ParamVerification(p, result, _agreement(p.kind, result.verdict))
        w = self.params[p.name]
        cos = _cos(w.reshape(-1).to(torch.float64), g0[p.name].reshape(-1).to(torch.float64))
        cos_m = _cos(w.reshape(-1).to(torch.float64), gm[p.name].reshape(-1).to(torch.float64))
        influence = self.influence((p.name,), g0, f_norm, False)
        if influence < self.tol.no_effect:
            cos = cos_m = None
        common: dict[str, Any] = {
            "euler_cos": cos,
            "euler_cos_model_eps": cos_m,
            "influence": influence,
        }
        if p.kind is not ParamKind.SCALE_SENSITIVE:
            result = NumericResult(NumericVerdict.NOT_CHECKED, **common)
            return ParamVerification(p, result, Agreement.NOT_APPLICABLE)
        if influence < self.tol.no_effect:
            result = NumericResult(
                NumericVerdict.NO_EVIDENCE, note="no effect on the output (zero gradient)", **common
            )
        elif cos is not None and abs(cos) > self.tol.euler:
            result = NumericResult(NumericVerdict.NOT_INVARIANT, **common)
        else:  # orthogonal gradient: check the output itself before calling it sensitive
            factor = torch.tensor(1.6, dtype=w.dtype, device=w.device)
            out, _ = self.runner.run({p.name: w * factor}, strict=True, grad=False)
            error = _relative(out, f0)
            verdict = (
                NumericVerdict.INVARIANT
                if error <= self.tol.output
                else NumericVerdict.NOT_INVARIANT
            )
            result = NumericResult(verdict, output_error=error, output_batch=1, **common)
        return ParamVerification(p, result, _agreement(p.kind, result.verdict))


def _agreement(kind: ParamKind, verdict: NumericVerdict) -> Agreement:
    if verdict is NumericVerdict.NOT_CHECKED:
        return Agreement.NOT_APPLICABLE
    if verdict is NumericVerdict.NO_EVIDENCE:
        return Agreement.NO_EVIDENCE
    if kind is ParamKind.SCALE_INVARIANT:
        ok = verdict in (NumericVerdict.INVARIANT, NumericVerdict.EPS_LIMITED)
    elif kind is ParamKind.DEAD_BIAS:
        ok = verdict is NumericVerdict.DEAD
    elif kind is ParamKind.SCALE_SENSITIVE:
        ok = verdict is NumericVerdict.NOT_INVARIANT
    else:
        return Agreement.NOT_APPLICABLE
    return Agreement.AGREE if ok else Agreement.DISAGREE


# -- public API ----------------------------------------------------------------------------


def verify_classification(
    model: torch.nn.Module,
    example_input: Any,
    classification: ModelClassification,
    *,
    device: Device | str = Device.CPU,
    seed: int = 0,
) -> InvarianceReport:
    """Test every structural verdict of `classification` on `model` numerically.

    `model` is not modified (the checks run on a copy). Raises `ModelFileError` when the model
    cannot run, `UsageError` for `device="cuda"` without a GPU.
    """
    example = as_example_input(example_input)
    where = resolve_device(device)
    dtype = torch.float64 if where.type == "cpu" else torch.float32
    tolerances = FLOAT64 if dtype == torch.float64 else FLOAT32
    known = {name for name, _ in model.named_parameters()}
    missing = [p.name for p in classification.params if p.name not in known]
    if missing:
        raise UsageError(
            f"classification names parameters the model lacks: {', '.join(missing[:5])}"
        )
    started = time.perf_counter()
    with _numerics(where, dtype):
        runner = _Runner(model, example, where, dtype, seed)
        verifier = _Verifier(runner, classification, tolerances, seed)
        records, groups = verifier.run()
    device_name = str(where)
    if where.type == "cuda":
        device_name += f" ({torch.cuda.get_device_name(where)}, TF32 off)"
    return InvarianceReport(
        classification=classification,
        params=tuple(records),
        joint_groups=tuple(groups),
        device=device_name,
        tolerances=tolerances,
        forward_passes=runner.forward_passes,
        backward_passes=runner.backward_passes,
        seed=seed,
        notes=tuple(verifier.notes),
        input=example.describe(),
        verification_seconds=time.perf_counter() - started,
    )


def verify_model(
    model: torch.nn.Module,
    example_input: Any,
    *,
    device: Device | str = Device.CPU,
    seed: int = 0,
    method: TraceMethod = TraceMethod.AUTO,
    where: str = "",
) -> InvarianceReport:
    """Structural analysis, then its numeric verification: what `bnwd verify-invariance` does."""
    from bnwd_cli.graph.analyze import classify_graph
    from bnwd_cli.graph.trace import trace_model

    example = as_example_input(example_input)
    resolve_device(device)  # a bad --device fails before the analysis, not after
    started = time.perf_counter()
    classification = classify_graph(trace_model(model, example, method, where=where))
    analysis_seconds = time.perf_counter() - started
    report = verify_classification(model, example, classification, device=device, seed=seed)
    return replace(report, analysis_seconds=analysis_seconds)


def verify_model_file(
    path: Path,
    *,
    factory: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    checkpoint: Path | None = None,
    trust_pickle: bool = False,
    device: Device | str = Device.AUTO,
    seed: int = 0,
    method: TraceMethod = TraceMethod.AUTO,
) -> InvarianceReport:
    """Load a model file (and trained weights), analyze it, verify the analysis."""
    from bnwd_cli.graph.model_file import load_model_file

    resolve_device(device)
    loaded = load_model_file(
        Path(path), factory=factory, input_shape=input_shape, checkpoint=checkpoint,
        trust_pickle=trust_pickle,
    )  # fmt: skip
    report = verify_model(
        loaded.model, loaded.example_input, device=device, seed=seed, method=method,
        where=f"{path}: ",
    )  # fmt: skip
    described = f"{path}:{loaded.factory}" + (f" with {checkpoint}" if checkpoint else "")
    return replace(
        report,
        model=described,
        input=f"{loaded.example_input.describe()} from {loaded.input_source}",
        notes=report.notes + loaded.notes,
    )


__all__ = [
    "FLOAT32",
    "FLOAT64",
    "Agreement",
    "Device",
    "InvarianceReport",
    "JointGroupCheck",
    "NumericResult",
    "NumericVerdict",
    "ParamVerification",
    "Tolerances",
    "verify_classification",
    "verify_model",
    "verify_model_file",
]
