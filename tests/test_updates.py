"""The one-step update an optimizer state implies: closed-form cases worked by hand, and real
PyTorch optimizer steps reconstructed from their own state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnwd_cli.metrics.optimizer import OptimizerFamily, ParamHyper
from bnwd_cli.metrics.updates import (
    ImpliedStep,
    NoImpliedStep,
    implied_step,
    nesterov_noise_factor,
    previous_weight,
)


def angle_between(a: torch.Tensor, b: torch.Tensor) -> float:
    """Reference angle, 2·atan2(|u - v|, |u + v|) of the unit vectors: stable for tiny angles
    and a different formula from the code's chord/asin."""
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    u, v = a / a.norm(), b / b.norm()
    return 2 * math.atan2(float((u - v).norm()), float((u + v).norm()))


def sgd_hyper(lr: float, momentum: float = 0.9, wd: float = 0.0, **kw: object) -> ParamHyper:
    return ParamHyper(lr=lr, weight_decay=wd, group=0, momentum=momentum, dampening=0.0, **kw)  # type: ignore[arg-type]


def adam_hyper(lr: float, wd: float, **kw: object) -> ParamHyper:
    return ParamHyper(lr=lr, weight_decay=wd, group=0, betas=(0.9, 0.999), eps=1e-8, **kw)  # type: ignore[arg-type]


def test_sgd_momentum_closed_form() -> None:
    # w_t = (1, 0), buf = (0.2, -1), lr 0.1: w_{t-1} = w_t + lr·buf = (1.02, -0.1)
    w = torch.tensor([1.0, 0.0])
    state = {"momentum_buffer": torch.tensor([0.2, -1.0])}
    step = implied_step(w, state, sgd_hyper(0.1), OptimizerFamily.SGD_MOMENTUM)
    assert isinstance(step, ImpliedStep)
    assert step.exact
    assert step.angular_update == pytest.approx(math.atan(0.1 / 1.02), rel=1e-6)
    # |w_t - w_{t-1}| = 0.1·sqrt(0.04 + 1); |w_{t-1}| = sqrt(1.02² + 0.01)
    assert step.relative_update == pytest.approx(
        0.1 * math.sqrt(1.04) / math.sqrt(1.02**2 + 0.01), rel=1e-6
    )


def test_sgd_without_buffer_implies_nothing() -> None:
    result = implied_step(torch.ones(3), {}, sgd_hyper(0.1, momentum=0.0), OptimizerFamily.SGD)
    assert isinstance(result, NoImpliedStep)
    assert "gradient" in result.reason


def test_adamw_first_step_closed_form() -> None:
    # step 1: exp_avg = (1-β1)g, exp_avg_sq = (1-β2)g², so m_hat = g, v_hat = g² and the update
    # is g/(|g| + eps) = (1, -1) to 8 digits. AdamW: w_{t-1} = (w_t + lr·u) / (1 - lr·wd).
    g = torch.tensor([3.0, -4.0], dtype=torch.float64)
    state = {"step": torch.tensor(1.0), "exp_avg": 0.1 * g, "exp_avg_sq": 0.001 * g * g}
    w = torch.tensor([2.0, 1.0], dtype=torch.float64)
    lr, wd = 0.01, 0.1
    before = torch.tensor([2.01, 0.99], dtype=torch.float64) / (1 - lr * wd)
    step = implied_step(w, state, adam_hyper(lr, wd), OptimizerFamily.ADAMW)
    assert isinstance(step, ImpliedStep)
    assert step.optimizer_step == 1
    assert step.angular_update == pytest.approx(
        abs(math.atan2(1.0, 2.0) - math.atan2(0.99, 2.01)), rel=1e-6
    )
    assert step.relative_update == pytest.approx(
        float((w - before).norm() / before.norm()), rel=1e-6
    )
    # coupled Adam: no rescale of w_{t-1}, so the same angle and a different relative update
    coupled = implied_step(w, state, adam_hyper(lr, wd), OptimizerFamily.ADAM)
    assert isinstance(coupled, ImpliedStep)
    assert coupled.angular_update == pytest.approx(step.angular_update, rel=1e-9)
    plain_before = torch.tensor([2.01, 0.99], dtype=torch.float64)
    assert coupled.relative_update == pytest.approx(
        float((w - plain_before).norm() / plain_before.norm()), rel=1e-6
    )
    unknown = implied_step(w, state, adam_hyper(lr, wd), OptimizerFamily.ADAM_OR_ADAMW)
    assert isinstance(unknown, ImpliedStep)
    assert not unknown.exact
    assert unknown.angular_update == pytest.approx(step.angular_update, rel=1e-9)


def test_adam_bias_correction_and_amsgrad() -> None:
    # step 3, one element: m_hat = 0.5/(1-0.9³) = 1.8450..., v_hat = 0.04/(1-0.999³) = 13.3467...
    lr = 1e-3
    state = {
        "step": 3,
        "exp_avg": torch.tensor([0.5]),
        "exp_avg_sq": torch.tensor([0.04]),
        "max_exp_avg_sq": torch.tensor([0.16]),
    }
    w = torch.tensor([1.0])
    m_hat = 0.5 / (1 - 0.9**3)
    for amsgrad, second in ((False, 0.04), (True, 0.16)):
        v_hat = second / (1 - 0.999**3)
        u = m_hat / (math.sqrt(v_hat) + 1e-8)
        before = previous_weight(
            w, state, adam_hyper(lr, 0.0, amsgrad=amsgrad), OptimizerFamily.ADAMW
        )
        assert not isinstance(before, NoImpliedStep)
        assert float(before[0][0]) == pytest.approx(1.0 + lr * u, rel=1e-6)


def test_per_row_angles_are_rms_over_rows() -> None:
    # rows (1, 0) and (0, 2); buffer rows (0, -1) and (3, 0), lr 0.1:
    # row 0 turns by atan(0.1), row 1 by atan(0.3 / 2)
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    state = {"momentum_buffer": torch.tensor([[0.0, -1.0], [3.0, 0.0]])}
    step = implied_step(w, state, sgd_hyper(0.1), OptimizerFamily.SGD_MOMENTUM, per_row=True)
    assert isinstance(step, ImpliedStep)
    a, b = math.atan(0.1), math.atan(0.15)
    assert step.angular_update == pytest.approx(math.sqrt((a * a + b * b) / 2), rel=1e-6)
    whole = implied_step(w, state, sgd_hyper(0.1), OptimizerFamily.SGD_MOMENTUM)
    assert isinstance(whole, ImpliedStep)
    before = torch.tensor([[1.0, -0.1], [0.3, 2.0]])
    assert whole.angular_update == pytest.approx(angle_between(before, w), rel=1e-6)


def test_nesterov_factor_matches_a_simulated_ar_process() -> None:
    # buf_t = m buf_{t-1} + (1-d) g_t with white g: compare E|g + m buf|² / E|buf|² by sampling
    g = torch.Generator().manual_seed(1)
    for m, d in ((0.9, 0.0), (0.5, 0.2)):
        noise = torch.randn(4000, 256, generator=g, dtype=torch.float64)
        buf = torch.zeros(256, dtype=torch.float64)
        num = den = 0.0
        for t in range(noise.shape[0]):
            buf = m * buf + (1 - d) * noise[t]
            if t > 200:
                num += float((noise[t] + m * buf).square().sum())
                den += float(buf.square().sum())
        assert nesterov_noise_factor(m, d) == pytest.approx(math.sqrt(num / den), rel=0.02)


def test_nesterov_estimate_splits_radial_and_orthogonal() -> None:
    w = torch.tensor([1.0, 0.0])
    hyper = sgd_hyper(0.1, nesterov=True)
    radial = previous_weight(
        w, {"momentum_buffer": torch.tensor([0.5, 0.0])}, hyper, OptimizerFamily.NESTEROV
    )
    assert not isinstance(radial, NoImpliedStep)
    # a persistent (decay-like) buffer along w moves w by lr·buf exactly
    assert radial[0].tolist() == pytest.approx([1.05, 0.0])
    assert radial[1] is False
    orthogonal = previous_weight(
        w, {"momentum_buffer": torch.tensor([0.0, 1.0])}, hyper, OptimizerFamily.NESTEROV
    )
    assert not isinstance(orthogonal, NoImpliedStep)
    # (1+m)²(1-m²) + m⁴ = 3.61·0.19 + 0.6561 = 1.3420 for m = 0.9
    assert orthogonal[0].tolist() == pytest.approx([1.0, 0.1 * math.sqrt(1.342)], rel=1e-6)


def test_unavailable_cases_say_why() -> None:
    w = torch.ones(2)
    lion = implied_step(w, {"exp_avg": torch.ones(2)}, adam_hyper(1e-4, 0.1), OptimizerFamily.LION)
    assert isinstance(lion, NoImpliedStep) and "Lion" in lion.reason
    missing = implied_step(w, None, sgd_hyper(0.1), OptimizerFamily.SGD_MOMENTUM)
    assert isinstance(missing, NoImpliedStep) and "no entry" in missing.reason
    ended = implied_step(
        w,
        {"momentum_buffer": torch.ones(2)},
        sgd_hyper(0.0, scheduled=True),
        OptimizerFamily.SGD_MOMENTUM,
    )
    assert isinstance(ended, NoImpliedStep) and "lr is 0" in ended.reason


OPTIMIZERS = [
    (
        "sgd-momentum",
        OptimizerFamily.SGD_MOMENTUM,
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    ),
    (
        "sgd-dampening",
        OptimizerFamily.SGD_MOMENTUM,
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-2),
    ),
    (
        "sgd-maximize",
        OptimizerFamily.SGD_MOMENTUM,
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2, maximize=True),
    ),
    (
        "adam-coupled",
        OptimizerFamily.ADAM,
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-1),
    ),
    ("adamw", OptimizerFamily.ADAMW, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5)),
    (
        "adamw-amsgrad",
        OptimizerFamily.ADAMW,
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5, amsgrad=True),
    ),
    (
        "adamw-foreach",
        OptimizerFamily.ADAMW,
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5, foreach=True),
    ),
]


@pytest.mark.parametrize(("label", "family", "make"), OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_reconstructs_real_pytorch_steps(label: str, family: OptimizerFamily, make) -> None:
    """The previous weights rebuilt from the state equal the weights PyTorch stepped from."""
    from bnwd_cli.metrics.optimizer import read_optimizer_state

    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5)
    optimizer = make(layer.parameters())
    x = torch.randn(16, 6)
    for _ in range(4):
        before = layer.weight.detach().clone()
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
    state = optimizer.state_dict()
    snapshot = read_optimizer_state(state, [("weight", (5, 6)), ("bias", (5,))])
    assert snapshot.family is family
    hyper = snapshot.per_param["weight"]
    rebuilt = previous_weight(layer.weight, state["state"][0], hyper, family)
    assert not isinstance(rebuilt, NoImpliedStep)
    assert rebuilt[1] is True
    assert isinstance(rebuilt[0], np.ndarray) and rebuilt[0].dtype == np.float64
    np.testing.assert_allclose(rebuilt[0], before.double().numpy(), rtol=0, atol=1e-6)
    step = implied_step(layer.weight, state["state"][0], hyper, family)
    assert isinstance(step, ImpliedStep)
    assert step.angular_update == pytest.approx(angle_between(before, layer.weight), rel=1e-3)
