"""Equilibrium theory (THEORY.md section 3): the formulas worked by hand, the status logic, and
a short real training run of a BatchNorm net in which the measured per-step angular update of
the scale-invariant layers lands on the prediction.

The real run is built so the theory's assumptions hold: random inputs and labels drawn afresh
every step (gradient noise dominates), a frozen random head and no decay on the BatchNorm
gamma/beta (so the gradient reaching the convolutions does not fade as those shrink), and decay
only on the two scale-invariant convolution weights, at lr·wd large enough that the norm relaxes
within the first ~100 steps of 600.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from bnwd_cli.graph.classes import Granularity, ParamKind
from bnwd_cli.metrics.dynamics import LayerDynamics, analyze_run
from bnwd_cli.metrics.equilibrium import (
    AngleSample,
    EquilibriumPrediction,
    EquilibriumStatus,
    assess_equilibrium,
    predict_equilibrium,
)
from bnwd_cli.metrics.optimizer import OptimizerFamily

# ---------------------------------------------------------------------- formulas, by hand


def test_sgd_momentum_prediction() -> None:
    p = predict_equilibrium(OptimizerFamily.SGD_MOMENTUM, 0.1, 5e-4, momentum=0.9, dampening=0.0)
    # 2·0.1·5e-4 / 1.9 = 5.2631578947e-5, sqrt = 7.2547625011e-3 rad
    assert p.exists
    assert p.angle == pytest.approx(7.2547625011e-3, rel=1e-9)
    assert p.steps_to_equilibrium == pytest.approx(500.0)  # (1 - 0.9) / (4·5e-5)
    assert p.norm is None  # the SGD norm needs the gradient noise


def test_plain_sgd_is_the_zero_momentum_row() -> None:
    p = predict_equilibrium(OptimizerFamily.SGD, 0.2, 1e-3, momentum=0.0)
    assert p.angle == pytest.approx(0.02, rel=1e-12)  # sqrt(2·2e-4)
    assert p.steps_to_equilibrium == pytest.approx(1250.0)  # 1 / (4·2e-4)


def test_adamw_prediction_with_norm() -> None:
    p = predict_equilibrium(OptimizerFamily.ADAMW, 1e-3, 0.05, betas=(0.9, 0.999), unit_size=27)
    # 2·5e-5·0.1/1.9 = 5.2631578947e-6 -> 2.2941573387e-3; norm sqrt(1e-3·27/0.1) = sqrt(0.27)
    assert p.angle == pytest.approx(2.2941573387e-3, rel=1e-9)
    assert p.norm == pytest.approx(0.5196152422706632, rel=1e-12)
    assert p.steps_to_equilibrium == pytest.approx(10_000.0)


def test_lion_prediction() -> None:
    p = predict_equilibrium(OptimizerFamily.LION, 1e-4, 1.0, betas=(0.9, 0.99))
    # sqrt(pi/2)·sqrt(2e-4)·sqrt(0.01 + 0.81·0.01/1.99) = 1.2533141·0.0141421·0.1197...
    spread = 0.01 + 0.81 * 0.01 / 1.99
    assert p.angle == pytest.approx(1.2533141373155 * 0.01414213562373 * math.sqrt(spread))


@pytest.mark.parametrize(
    ("family", "wd", "none_exists"),
    [
        (OptimizerFamily.ADAM, 0.1, True),  # coupled L2
        (OptimizerFamily.SGD_MOMENTUM, 0.0, True),  # no decay
        (OptimizerFamily.ADAMW, 0.0, True),
        (OptimizerFamily.ADAM_OR_ADAMW, 0.1, False),  # cannot tell
        (OptimizerFamily.UNKNOWN, 0.1, False),
    ],
)
def test_no_prediction_cases(family: OptimizerFamily, wd: float, none_exists: bool) -> None:
    p = predict_equilibrium(family, 1e-3, wd, momentum=0.9, betas=(0.9, 0.999))
    assert not p.exists and p.angle is None
    assert p.none_exists is none_exists
    status = assess_equilibrium(
        p, [], measured_from="", unit_norm=1.0, steps_elapsed=10, adaptive=False
    ).status
    expected = EquilibriumStatus.NO_EQUILIBRIUM if none_exists else EquilibriumStatus.UNKNOWN
    assert status is expected


# ---------------------------------------------------------------------- status logic

PRED = EquilibriumPrediction(True, angle=0.01, steps_to_equilibrium=100.0)


def samples(*angles: float) -> list[AngleSample]:
    return [AngleSample(i, 10 * i, a, 0.01) for i, a in enumerate(angles)]


def test_at_equilibrium_uses_rms_of_the_last_samples() -> None:
    # first samples far off, the last window at 0.011 and 0.009: RMS = sqrt((1.21+0.81)/2)e-2
    got = assess_equilibrium(
        PRED,
        samples(0.05, *[0.011, 0.009] * 5),
        measured_from="x",
        unit_norm=2.0,
        steps_elapsed=1000,
        adaptive=False,
    )
    assert got.status is EquilibriumStatus.AT
    assert got.measured_angle == pytest.approx(math.sqrt((1.21e-4 + 0.81e-4) / 2))  # 0.0100499
    assert got.samples == 10
    # SGD: angle ~ 1/|w|², so the norm at which it equals the prediction is |w|·sqrt(ratio)
    assert got.predicted_norm == pytest.approx(2.0 * math.sqrt(0.01004987562112089 / 0.01))


def test_approaching_early_or_while_closing_in_far_otherwise() -> None:
    early = assess_equilibrium(
        PRED, samples(0.003), measured_from="x", unit_norm=1.0, steps_elapsed=50, adaptive=True
    )
    assert early.status is EquilibriumStatus.APPROACHING  # 50 < 3·100 steps
    closing = assess_equilibrium(
        PRED,
        samples(0.001, 0.002, 0.004),
        measured_from="x",
        unit_norm=1.0,
        steps_elapsed=5000,
        adaptive=True,
    )
    assert closing.status is EquilibriumStatus.APPROACHING
    far = assess_equilibrium(
        PRED,
        samples(0.004, 0.004),
        measured_from="x",
        unit_norm=1.0,
        steps_elapsed=5000,
        adaptive=True,
    )
    assert far.status is EquilibriumStatus.FAR
    assert far.ratio == pytest.approx(0.4)
    # Adam: angle ~ 1/|w|, so the predicted norm scales with the ratio itself
    assert far.predicted_norm == pytest.approx(0.4)
    nothing = assess_equilibrium(
        PRED, [], measured_from="", unit_norm=1.0, steps_elapsed=5000, adaptive=True
    )
    assert nothing.status is EquilibriumStatus.UNKNOWN


# ---------------------------------------------------------------------- a real training run

STEPS = 600
SAVE_FROM = 500
SAVE_EVERY = 10
CONVS = ("0.weight", "3.weight")
TOLERANCE = 0.15
"""Measured per-step RMS angle vs prediction. Observed over 5 seeds x 2 layers x (SGDM, AdamW,
Nesterov): x0.905 to x1.019 of the prediction; the deeper convolution sits 5-9 % low under
SGD in every seed, a systematic shortfall (its consecutive gradients are slightly correlated,
which the white-noise derivation ignores). The formulas are leading order in lr*wd (5e-4 and
5e-3 here), the run is stationary by construction, and the RMS over 300 steps x 8-16 rows has
a sampling error of a few per cent: 15 % covers the shortfall plus that scatter."""


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny convolutions run faster on one thread, and stay reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def row_angles(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per-row angles, 2·atan2(|u-v|, |u+v|) in float64 (the test's own reference)."""
    a = before.detach().double().reshape(before.shape[0], -1)
    b = after.detach().double().reshape(after.shape[0], -1)
    u = a / a.norm(dim=1, keepdim=True)
    v = b / b.norm(dim=1, keepdim=True)
    return 2 * torch.atan2((u - v).norm(dim=1), (u + v).norm(dim=1))


@dataclass
class Reference:
    """Measured while training, independently of bnwd."""

    sq_angles: dict[str, list[float]]
    """Per layer: mean over rows of the squared per-step angle, every step of the second half."""
    at_step: dict[str, dict[int, float]]
    """Per layer: RMS-over-rows angle of the step that produced each saved checkpoint."""
    row_norm_rms: dict[str, float]

    def rms(self, layer: str) -> float:
        values = self.sq_angles[layer]
        return math.sqrt(sum(values) / len(values))


def train(folder: Path, optimizer_kind: str, seed: int = 0) -> Reference:
    torch.manual_seed(seed)
    data = torch.Generator().manual_seed(seed + 1)
    model = make_net()
    for p in model[8].parameters():
        p.requires_grad_(False)
    named = dict(model.named_parameters())
    decayed = [(n, named[n]) for n in CONVS]
    affine = [(n, named[n]) for n in ("1.weight", "1.bias", "4.weight", "4.bias")]
    if optimizer_kind == "adamw":
        # lr·wd = 5e-3: relaxation time 1/(2·lr·wd) = 100 steps. Built without names: the
        # mapping must come from "each group in parameter order" and the state shapes.
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            [
                {"params": [p for _, p in decayed], "weight_decay": 0.5},
                {"params": [p for _, p in affine], "weight_decay": 0.0},
            ],
            lr=0.01,
        )
    else:
        # lr·wd = 5e-4: relaxation time (1-m)/(4·lr·wd) = 50 steps; with param_names
        optimizer = torch.optim.SGD(
            [
                {"params": decayed, "weight_decay": 5e-3},
                {"params": affine, "weight_decay": 0.0},
            ],
            lr=0.1,
            momentum=0.9,
            nesterov=optimizer_kind == "nesterov",
        )
    reference = Reference({n: [] for n in CONVS}, {n: {} for n in CONVS}, {})
    for step in range(1, STEPS + 1):
        x = torch.randn(32, 3, 8, 8, generator=data)
        y = torch.randint(0, 10, (32,), generator=data)
        before = {n: named[n].detach().clone() for n in CONVS}
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        for n in CONVS:
            sq = float(row_angles(before[n], named[n]).square().mean())
            if step > STEPS // 2:
                reference.sq_angles[n].append(sq)
            if step >= SAVE_FROM and step % SAVE_EVERY == 0:
                reference.at_step[n][step] = math.sqrt(sq)
        if step >= SAVE_FROM and step % SAVE_EVERY == 0:
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                folder / f"ckpt_{step}.pt",
            )
    for n in CONVS:
        rows = named[n].detach().double().reshape(named[n].shape[0], -1)
        reference.row_norm_rms[n] = float(rows.square().sum(dim=1).mean().sqrt())
    return reference


def invariant_layers(folder: Path) -> dict[str, LayerDynamics]:
    report = analyze_run(folder)
    layers = {layer.name: layer for layer in report.layers if layer.name in CONVS}
    for layer in layers.values():
        assert layer.classification.kind is ParamKind.SCALE_INVARIANT
        assert layer.classification.granularity is Granularity.PER_ROW
    return layers


@pytest.mark.parametrize(
    ("kind", "predicted"),
    [
        # sqrt(2·0.1·5e-3 / 1.9) = sqrt(5.2631578947e-4)
        ("sgdm", 0.022941573387056),
        # AdamW: sqrt(2·0.01·0.5·0.1 / 1.9), the same number by choice of lr and wd
        ("adamw", 0.022941573387056),
    ],
)
def test_real_run_reaches_the_predicted_angle(tmp_path: Path, kind: str, predicted: float) -> None:
    reference = train(tmp_path, kind)
    layers = invariant_layers(tmp_path)
    for name, layer in layers.items():
        eq = layer.equilibrium
        assert eq is not None
        assert eq.prediction.angle == pytest.approx(predicted, rel=1e-9)
        # the implied step of every checkpoint is the real step that produced it (exact for
        # heavy-ball SGD and AdamW, up to float32 rounding of the stored tensors)
        for point in layer.points:
            assert point.step is not None
            assert point.implied_angle == pytest.approx(
                reference.at_step[name][point.step], rel=1e-3
            )
        # bnwd's measurement: RMS of the implied angles of the last checkpoints
        window = [p.step for p in layer.points][-eq.samples :]
        expected = math.sqrt(
            sum(reference.at_step[name][s] ** 2 for s in window if s is not None) / len(window)
        )
        assert eq.measured_angle == pytest.approx(expected, rel=1e-3)
        # the theory: the RMS per-step angle over the second half of the run, measured here
        measured = reference.rms(name)
        print(  # shown with pytest -s, and on failure
            f"\n[{kind}] {name}: predicted {predicted:.5f} rad, measured RMS {measured:.5f} "
            f"(×{measured / predicted:.3f}); bnwd's last-{eq.samples} window "
            f"{eq.measured_angle:.5f} (×{eq.ratio:.3f}); status {eq.status.value}; RMS row "
            f"norm {reference.row_norm_rms[name]:.4f}, predicted norm {eq.predicted_norm}"
        )
        assert measured == pytest.approx(predicted, rel=TOLERANCE)
        assert eq.status is EquilibriumStatus.AT
        if kind == "adamw":
            # norm prediction sqrt(lr·C/(2·wd)), C = 27 and 72 inputs per row
            c = 27 if name == "0.weight" else 72
            assert eq.prediction.norm == pytest.approx(math.sqrt(0.01 * c / 1.0), rel=1e-9)


def test_real_run_nesterov_matches_the_derived_row(tmp_path: Path) -> None:
    """Nesterov is not in THEORY.md's table: its derived prediction is checked here."""
    reference = train(tmp_path, "nesterov")
    layers = invariant_layers(tmp_path)
    # sqrt(2·lr·wd/(1+m)) · sqrt((1+m)²(1-m²) + m⁴) = 0.0229416 · sqrt(1.342)
    predicted = 0.022941573387056 * math.sqrt(1.342)
    for name, layer in layers.items():
        eq = layer.equilibrium
        assert eq is not None
        assert eq.prediction.angle == pytest.approx(predicted, rel=1e-9)
        assert all(p.implied_exact is False for p in layer.points)
        measured = reference.rms(name)
        print(  # shown with pytest -s, and on failure
            f"\n[nesterov] {name}: predicted {predicted:.5f} rad, measured RMS "
            f"{measured:.5f} (×{measured / predicted:.3f}); bnwd's estimate "
            f"{eq.measured_angle:.5f}"
        )
        assert measured == pytest.approx(predicted, rel=TOLERANCE)
