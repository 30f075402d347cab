"""The last optimizer step, reconstructed from one checkpoint's weights and optimizer state.

A checkpoint holds `w_t` and the state the step to `w_t` used, so for heavy-ball SGD and the
Adam family the previous weights follow exactly (PyTorch semantics, shared/THEORY.md section 4):

- SGD, momentum m (dampening d, no Nesterov): `buf_t = m buf_{t-1} + (1-d)(g_t + wd w_{t-1})`,
  `w_t = w_{t-1} - lr buf_t`, so `w_{t-1} = w_t + lr buf_t`.
- Adam / AdamW: `u_t = m_hat / (sqrt(v_hat) + eps)` with `m_hat = exp_avg / (1 - beta1^t)` and
  `v_hat = exp_avg_sq / (1 - beta2^t)` (`max_exp_avg_sq` with amsgrad). Adam couples the decay
  into the gradient: `w_{t-1} = w_t + lr u_t`. AdamW decays first:
  `w_t = (1 - lr wd) w_{t-1} - lr u_t`, so `w_{t-1} = (w_t + lr u_t) / (1 - lr wd)`.

From `w_{t-1}` and `w_t` the per-step relative update and angular update follow with the same
float64 kernels as the checkpoint-to-checkpoint figures (`kernels.tensor_stats`), per row for
per-row invariant weights.

What is not exact, and said so in `ImpliedStep.approximation`:
- Nesterov steps by `g_t + m buf_t`; `g_t` is not in the state. The buffer's component along the
  weight (the persistent decay term) is used as it is, its orthogonal component scaled by
  `sqrt(c)`, the ratio of `E||g_t + m buf_t||^2` to `E||buf_t||^2` for uncorrelated gradient
  noise: `c = ((1 + m(1-d))^2 (1-m^2) + m^4 (1-d)^2) / (1-d)^2`.
- With an LR scheduler the stored lr is usually the next step's (the scheduler steps after the
  optimizer), which differs from the last step's by one scheduler step.
- When Adam and AdamW cannot be told apart, the angle is still exact (the two differ by a scalar
  factor on `w_{t-1}`); the relative update is off by at most lr*wd.
Plain SGD keeps no state and Lion's state lacks its last gradient, so neither implies a step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnwd_cli.checkpoints.arrays import as_array, is_floating, widened
from bnwd_cli.metrics.kernels import ADAM, LINEAR, StepFormula, TensorStats, as_rows, tensor_stats
from bnwd_cli.metrics.optimizer import OptimizerFamily, ParamHyper


@dataclass(frozen=True, slots=True)
class ImpliedStep:
    """The last step `w_{t-1} -> w_t`, as the optimizer state implies it."""

    relative_update: float
    """||w_t - w_{t-1}|| / ||w_{t-1}||, whole tensor."""
    angular_update: float | None
    """Angle turned by that step, radians; per-row weights: root-mean-square over rows."""
    update_norm: float
    exact: bool
    approximation: str | None = None
    optimizer_step: int | None = None
    """Adam's step count (`state['step']`), when the state has one."""


@dataclass(frozen=True)
class NoImpliedStep:
    """Why a checkpoint's state implies no step for a parameter."""

    reason: str


def _array(value: Any) -> np.ndarray | None:
    """A state entry as an array (torch tensors from API callers too); None for other values."""
    if value is None or isinstance(value, int | float | str | bool):
        return None
    try:
        return as_array(value)
    except (TypeError, ValueError):
        return None


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | np.number):
        return float(value)
    array = _array(value)
    if array is None or array.size == 0:
        return None
    return float(widened(array).reshape(-1)[0])


def _tensor(per_param: Mapping[str, Any], key: str, like: np.ndarray) -> np.ndarray | None:
    value = _array(per_param.get(key))
    if value is None or tuple(value.shape) != tuple(like.shape) or not is_floating(value):
        return None
    return widened(value).astype(np.float64)


def nesterov_noise_factor(momentum: float, dampening: float = 0.0) -> float:
    """sqrt(E||g_t + m buf_t||^2 / E||buf_t||^2) for uncorrelated gradient noise (see module doc)."""
    m, keep = momentum, 1.0 - dampening
    ratio = ((1.0 + m * keep) ** 2 * (1.0 - m * m) + m**4 * keep * keep) / (keep * keep)
    return math.sqrt(ratio)


def _split_along(vector: np.ndarray, weight: np.ndarray, per_row: bool) -> np.ndarray:
    """The component of `vector` along `weight`, per invariant unit (row or whole tensor)."""
    v, w = as_rows(vector, per_row), as_rows(weight, per_row)
    w_sq = (w * w).sum(axis=1, keepdims=True)
    with np.errstate(all="ignore"):
        coef = np.where(w_sq > 0, (v * w).sum(axis=1, keepdims=True) / w_sq, 0.0)
    return (coef * w).reshape(vector.shape)


def previous_weight(
    weight: Any,
    per_param: Mapping[str, Any] | None,
    hyper: ParamHyper,
    family: OptimizerFamily,
    *,
    per_row: bool = False,
) -> tuple[np.ndarray, bool, str | None, int | None] | NoImpliedStep:
    """`w_{t-1}` (float64), whether it is exact, what approximation was made, Adam's step count."""
    if per_param is None:
        return NoImpliedStep("the optimizer state has no entry for this parameter (never stepped?)")
    weight = as_array(weight)
    w = widened(weight).astype(np.float64)
    lr, wd = hyper.lr, hyper.weight_decay
    if not math.isfinite(lr):
        return NoImpliedStep("the optimizer group has no lr")
    if lr == 0.0 and hyper.scheduled:
        return NoImpliedStep(
            "the stored lr is 0 (the scheduler's next value); the last step's lr is unknown"
        )
    notes: list[str] = []
    if hyper.scheduled:
        notes.append("an LR scheduler ran: the stored lr may be the next step's")
    if family.is_sgd:
        buf = _tensor(per_param, "momentum_buffer", weight)
        if buf is None:
            return NoImpliedStep(
                "plain SGD (or a step before momentum started) keeps no buffer: "
                "the last update needs the gradient"
            )
        if not hyper.nesterov:
            return w + lr * buf, not notes, "; ".join(notes) or None, None
        m = hyper.momentum or 0.0
        d = hyper.dampening or 0.0
        if d >= 1.0:
            return NoImpliedStep("Nesterov with dampening 1 keeps a zero buffer")
        along = _split_along(buf, w, per_row)
        radial = (1.0 - m * d) / (1.0 - d)  # persistent (decay) part: update/buffer ratio
        update = radial * along + nesterov_noise_factor(m, d) * (buf - along)
        notes.insert(
            0,
            "Nesterov: the last gradient is not in the state; the step is estimated from the "
            "buffer for uncorrelated gradient noise",
        )
        return w + lr * update, False, "; ".join(notes), None
    if family.is_adam:
        exp_avg = _tensor(per_param, "exp_avg", weight)
        second = _tensor(per_param, "max_exp_avg_sq" if hyper.amsgrad else "exp_avg_sq", weight)
        step = _scalar(per_param.get("step"))
        if exp_avg is None or second is None or step is None or step < 1:
            return NoImpliedStep("the Adam state lacks exp_avg, exp_avg_sq or step")
        beta1, beta2 = hyper.betas or (0.9, 0.999)
        eps = hyper.eps if hyper.eps is not None else 1e-8
        correction1 = 1.0 - beta1**step
        correction2 = 1.0 - beta2**step
        # torch: denom = sqrt(v) / sqrt(1 - beta2^t) + eps; step size lr / (1 - beta1^t)
        update = (exp_avg / correction1) / (np.sqrt(second) / math.sqrt(correction2) + eps)
        before = w + lr * update
        exact = not notes
        if family is OptimizerFamily.ADAMW:
            if lr * wd >= 1.0:
                return NoImpliedStep(f"lr*weight_decay = {lr * wd:g} >= 1 zeroes the weight")
            before = before / (1.0 - lr * wd)
        elif family is OptimizerFamily.ADAM_OR_ADAMW and wd > 0:
            exact = False
            notes.append(
                "Adam or AdamW unknown: the angle is exact, the relative update off by up to "
                "lr*weight_decay"
            )
        return before, exact, "; ".join(notes) or None, round(step)
    if family is OptimizerFamily.LION:
        return NoImpliedStep("Lion's state keeps one moment; its last update needs the gradient")
    return NoImpliedStep(f"no update model for optimizer family '{family.value}'")


def _state_array(per_param: Mapping[str, Any], key: str, weight: np.ndarray) -> np.ndarray | None:
    value = _array(per_param.get(key))
    if value is None or tuple(value.shape) != tuple(weight.shape) or not is_floating(value):
        return None
    return value


@dataclass(frozen=True, slots=True)
class StepPlan:
    """How to compute the last step block by block (see `plan_step`)."""

    fill: StepFormula
    """`w_t - w_{t-1}` element-wise, for the sweep to evaluate block by block."""
    exact: bool
    approximation: str | None
    optimizer_step: int | None


def plan_step(
    weight: Any,
    per_param: Mapping[str, Any] | None,
    hyper: ParamHyper,
    family: OptimizerFamily,
    *,
    per_row: bool,
) -> StepPlan | None:
    """`w_t - w_{t-1}` block by block, for the cases `previous_weight` handles exactly
    (heavy-ball SGD, the Adam family), with the same exactness, notes and step count.

    The streaming kernel then makes one pass over the weight and its state in cache-sized
    float64 blocks, instead of float64 copies of whole tensors; the step is taken directly
    (`-lr buf`, `-lr u`), never as a difference of two nearly equal weights. None: anything
    else (no state, Nesterov, a missing or odd tensor), for which `previous_weight` decides.
    `per_row` does not change the plan (the formula is element-wise; `tensor_stats` lays it
    out in rows); it is accepted so that the call mirrors `previous_weight`.
    """
    lr, wd = hyper.lr, hyper.weight_decay
    if per_param is None or not math.isfinite(lr) or (lr == 0.0 and hyper.scheduled):
        return None
    weight = as_array(weight)
    notes = ["an LR scheduler ran: the stored lr may be the next step's"] if hyper.scheduled else []
    if family.is_sgd and not hyper.nesterov:
        buf = _state_array(per_param, "momentum_buffer", weight)
        if buf is None:
            return None
        sgd_step = StepFormula(LINEAR, buf, scale=-lr)  # w_t = w_{t-1} - lr buf
        return StepPlan(sgd_step, not notes, "; ".join(notes) or None, None)
    if not family.is_adam:
        return None
    exp_avg = _state_array(per_param, "exp_avg", weight)
    second = _state_array(per_param, "max_exp_avg_sq" if hyper.amsgrad else "exp_avg_sq", weight)
    count = _scalar(per_param.get("step"))
    if exp_avg is None or second is None or count is None or count < 1:
        return None
    beta1, beta2 = hyper.betas or (0.9, 0.999)
    eps = hyper.eps if hyper.eps is not None else 1e-8
    correction1 = 1.0 - beta1**count
    root_correction2 = math.sqrt(1.0 - beta2**count)
    exact = not notes
    decay = 0.0
    scale = -lr
    if family is OptimizerFamily.ADAMW:
        if lr * wd >= 1.0:
            return None
        # w_{t-1} = (w_t + lr u) / (1 - lr wd), so w_t - w_{t-1} = -lr (u + wd w_t) / (1 - lr wd)
        decay, scale = wd, -lr / (1.0 - lr * wd)
    elif family is OptimizerFamily.ADAM_OR_ADAMW and wd > 0:
        exact = False
        notes.append(
            "Adam or AdamW unknown: the angle is exact, the relative update off by up to "
            "lr*weight_decay"
        )

    # u = (m / (1 - beta1^t)) / (sqrt(v) / sqrt(1 - beta2^t) + eps), as torch.optim.Adam
    adam_step = StepFormula(
        ADAM, exp_avg, second, scale=scale, c1=correction1, rc2=root_correction2, eps=eps,
        decay=decay,
    )  # fmt: skip
    return StepPlan(adam_step, exact, "; ".join(notes) or None, round(count))


def implied_step(
    weight: Any,
    per_param: Mapping[str, Any] | None,
    hyper: ParamHyper,
    family: OptimizerFamily,
    *,
    per_row: bool = False,
    plan: StepPlan | None = None,
    measured: TensorStats | None = None,
) -> ImpliedStep | NoImpliedStep:
    """The per-step relative and angular update the state implies for `weight`.

    `plan`, `measured`: the `plan_step` for these arguments and the `step_stats` of a
    `tensor_stats(weight, ..., with_step=plan.fill)` that already swept the weight (the
    streaming pass measures both steps in one read of it).
    """
    weight = as_array(weight)
    if plan is None:
        plan = plan_step(weight, per_param, hyper, family, per_row=per_row)
    if plan is not None:
        if measured is None:
            measured = tensor_stats(weight, None, per_row=per_row, step=plan.fill)
        stats = measured
        exact, approximation, step = plan.exact, plan.approximation, plan.optimizer_step
        previous_norm = math.sqrt(stats.previous_sum_sq or 0.0)
    else:
        before = previous_weight(weight, per_param, hyper, family, per_row=per_row)
        if isinstance(before, NoImpliedStep):
            return before
        previous, exact, approximation, step = before
        stats = tensor_stats(weight, previous, per_row=per_row)
        previous_norm = float(np.sqrt(np.square(previous).sum()))
    if stats.diff_norm is None or previous_norm == 0.0:
        return NoImpliedStep("the weight before the last step is zero")
    angle = stats.angular_update  # per row: the RMS of the finite row angles
    if angle is not None and not math.isfinite(angle):
        angle = None
    return ImpliedStep(
        relative_update=stats.diff_norm / previous_norm,
        angular_update=angle,
        update_norm=stats.diff_norm,
        exact=exact,
        approximation=approximation,
        optimizer_step=step,
    )
