"""`metrics.dynamics.analyze_run` against an independent float64 reference written here in numpy,
plus layer filtering, the bad-input cases (architecture change, NaN, corrupt checkpoint) and the
streaming promise: at most two checkpoints open at a time, all closed at the end."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import BN_CNN_PARAMS, save_safetensors, save_torch, training_states, write_run

import bnwd_cli.metrics.dynamics as dynamics
from bnwd_cli.errors import CheckpointError, UsageError
from bnwd_cli.graph.classes import ParamKind
from bnwd_cli.metrics.dynamics import InspectOptions, LayerDynamics, RunDynamics, analyze_run
from bnwd_cli.metrics.kernels import WINDOW

PER_ROW = {"conv1.weight", "conv2.weight"}
"""The conv weights feed BatchNorms: invariant per output row (THEORY.md section 1)."""
EXPECTED_KINDS = {
    "conv1.weight": ParamKind.SCALE_INVARIANT,
    "bn1.weight": ParamKind.NORM_AFFINE,
    "bn1.bias": ParamKind.NORM_AFFINE,
    "conv2.weight": ParamKind.SCALE_INVARIANT,
    "conv2.bias": ParamKind.DEAD_BIAS,
    "bn2.weight": ParamKind.NORM_AFFINE,
    "bn2.bias": ParamKind.NORM_AFFINE,
    "head.weight": ParamKind.SCALE_SENSITIVE,
    "head.bias": ParamKind.SCALE_SENSITIVE,
}


def kahan_angle(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua, ub = a / na, b / nb
    return float(2.0 * math.atan2(np.linalg.norm(ua - ub), np.linalg.norm(ua + ub)))


def reference(
    states: list[dict[str, torch.Tensor]], steps: list[int | None], name: str, lr: float | None
) -> list[dict[str, Any]]:
    """Per checkpoint: the figures THEORY.md section 2 defines, in float64 numpy."""
    per_row = name in PER_ROW
    invariant = EXPECTED_KINDS[name] is ParamKind.SCALE_INVARIANT
    ws = [s[name].detach().numpy().astype(np.float64) for s in states]
    points: list[dict[str, Any]] = []
    unit0 = None
    for t, w in enumerate(ws):
        rows = w.reshape(w.shape[0], -1) if per_row else w.reshape(1, -1)
        row_norms = np.sqrt((rows**2).sum(axis=1))
        norm = float(np.sqrt((w**2).sum()))
        unit = float(np.sqrt(np.mean(row_norms**2)))  # RMS row norm; the norm for one row
        unit0 = unit if unit0 is None else unit0
        point: dict[str, Any] = {
            "norm": norm,
            "effective_lr": lr / unit**2 if invariant and lr is not None else None,
            "lr_factor": (unit0 / unit) ** 2 if invariant else None,
            "relative_step": None,
            "angular_update": None,
            "steps_between": None,
        }
        if per_row:
            point["row_norm_min"] = float(row_norms.min())
            point["row_norm_max"] = float(row_norms.max())
            point["row_norm_cv"] = float(row_norms.std() / row_norms.mean())
        if t > 0:
            prev = ws[t - 1]
            point["relative_step"] = float(np.linalg.norm(w - prev) / np.linalg.norm(prev))
            prev_rows = prev.reshape(rows.shape)
            angles = [kahan_angle(prev_rows[r], rows[r]) for r in range(rows.shape[0])]
            point["angular_update"] = float(np.sqrt(np.mean(np.square(angles))))
            if steps[t] is not None and steps[t - 1] is not None:
                point["steps_between"] = steps[t] - steps[t - 1]
        points.append(point)
    return points


def close(value: float | None, expected: float | None, rel: float = 1e-10) -> bool:
    if expected is None:
        return value is None
    return value is not None and value == pytest.approx(expected, rel=rel)


def assert_matches_reference(
    layer: LayerDynamics,
    states: list[dict[str, torch.Tensor]],
    steps: list[int | None],
    lr: float | None,
) -> None:
    expected = reference(states, steps, layer.name, lr)
    assert len(layer.points) == len(expected)
    for t, (point, ref) in enumerate(zip(layer.points, expected, strict=True)):
        where = f"{layer.name} @ {t}"
        assert point.norm == pytest.approx(ref["norm"], rel=1e-12), where
        assert close(point.relative_step, ref["relative_step"]), where
        assert close(point.angular_update, ref["angular_update"], rel=1e-9), where
        assert point.steps_between == ref["steps_between"], where
        assert close(point.effective_lr, ref["effective_lr"]), where
        assert close(point.lr_factor, ref["lr_factor"]), where
        if "row_norm_min" in ref:
            assert close(point.row_norm_min, ref["row_norm_min"]), where
            assert close(point.row_norm_max, ref["row_norm_max"]), where
            assert close(point.row_norm_cv, ref["row_norm_cv"], rel=1e-9), where


def by_name(report: RunDynamics) -> dict[str, LayerDynamics]:
    return {layer.name: layer for layer in report.layers}


# --------------------------------------------------------------------------- the metrics


# safetensors is checked separately below: it keeps no key order, so conv1 -> bn1 is not seen
# (tests/test_heuristic.py, the xfail on named siblings) and the classification differs.
@pytest.mark.parametrize("fmt", ["torch", "legacy", "lightning", "hf-bin"])
def test_metrics_match_float64_reference(tmp_path: Path, fmt: str) -> None:
    states = training_states(4, noise=0.05, growth=1.07)
    steps: list[int | None] = [0, 100, 250, 1000]  # uneven intervals
    write_run(tmp_path, states, steps=[0, 100, 250, 1000], fmt=fmt)
    report = analyze_run(tmp_path, InspectOptions(lr=0.1))
    layers = by_name(report)
    assert set(layers) == set(BN_CNN_PARAMS)
    assert [c.step for c in report.checkpoints] == steps
    for name, layer in layers.items():
        assert layer.classification.kind is EXPECTED_KINDS[name], name
        assert_matches_reference(layer, states, steps, lr=0.1)


def test_safetensors_metrics_match_float64_reference(tmp_path: Path) -> None:
    states = training_states(3, noise=0.05, growth=1.07)
    write_run(tmp_path, states, steps=[10, 20, 40], fmt="safetensors")
    report = analyze_run(tmp_path)
    assert set(by_name(report)) == set(BN_CNN_PARAMS)
    for layer in report.layers:
        ref = reference(states, [10, 20, 40], layer.name, lr=None)
        assert [p.norm for p in layer.points] == pytest.approx([r["norm"] for r in ref], rel=1e-12)
        for point, expected in zip(layer.points[1:], ref[1:], strict=True):
            assert point.relative_step == pytest.approx(expected["relative_step"], rel=1e-10)
            assert point.steps_between == expected["steps_between"]


def test_summary_matches_reference(tmp_path: Path) -> None:
    states = training_states(3, noise=0.1, growth=1.2)
    write_run(tmp_path, states)
    report = analyze_run(tmp_path, InspectOptions(lr=0.5))
    for name, layer in by_name(report).items():
        ref = reference(states, [100, 200, 300], name, lr=0.5)
        s = layer.summary
        assert s.norm_first == pytest.approx(ref[0]["norm"], rel=1e-12)
        assert s.norm_last == pytest.approx(ref[-1]["norm"], rel=1e-12)
        assert s.norm_growth == pytest.approx(ref[-1]["norm"] / ref[0]["norm"], rel=1e-12)
        assert s.relative_step_first == pytest.approx(ref[1]["relative_step"], rel=1e-10)
        assert s.relative_step_last == pytest.approx(ref[2]["relative_step"], rel=1e-10)
        assert s.angular_update_last == pytest.approx(ref[2]["angular_update"], rel=1e-9)
        if EXPECTED_KINDS[name] is ParamKind.SCALE_INVARIANT:
            # lr/|w_last|^2 over lr/|w_0|^2: the norm grew 1.2x per interval, so about 1.2^-4
            assert s.effective_lr_change == pytest.approx(ref[-1]["lr_factor"], rel=1e-10)
            assert 0.5 < s.effective_lr_change / 1.2**-4 < 2


def test_effective_lr_uses_the_optimizer_states_lr(tmp_path: Path) -> None:
    states = training_states(2, growth=1.5)
    write_run(tmp_path, states, lr=0.2)
    report = analyze_run(tmp_path)
    conv = by_name(report)["conv1.weight"]
    ref = reference(states, [100, 200], "conv1.weight", lr=0.2)
    for point, expected in zip(conv.points, ref, strict=True):
        assert point.lr == pytest.approx(0.2)
        assert point.effective_lr == pytest.approx(expected["effective_lr"], rel=1e-10)
    assert by_name(report)["head.weight"].points[-1].effective_lr is None


def test_without_any_lr_only_the_factor_is_given(tmp_path: Path) -> None:
    states = training_states(3, growth=2.0)
    write_run(tmp_path, states)
    report = analyze_run(tmp_path)
    conv = by_name(report)["conv2.weight"]
    assert [p.effective_lr for p in conv.points] == [None, None, None]
    ref = reference(states, [100, 200, 300], "conv2.weight", lr=None)
    assert [p.lr_factor for p in conv.points] == pytest.approx([r["lr_factor"] for r in ref])
    assert conv.points[0].lr_factor == 1.0


def test_steps_between_unknown_without_steps(tmp_path: Path) -> None:
    states = training_states(2)
    for name, state in zip(("alpha.pt", "beta.pt"), states, strict=True):
        save_torch(tmp_path / name, state, model_key=None)
    report = analyze_run(tmp_path)
    for layer in report.layers:
        assert layer.points[1].steps_between is None
        assert layer.points[1].relative_step is not None


def test_layers_filter(tmp_path: Path) -> None:
    write_run(tmp_path, training_states(2))
    report = analyze_run(tmp_path, InspectOptions(layers=r"^conv"))
    assert [layer.name for layer in report.layers] == ["conv1.weight", "conv2.weight", "conv2.bias"]
    # the filter selects layers, it does not change their classification
    assert by_name(report)["conv2.bias"].classification.kind is ParamKind.DEAD_BIAS
    report = analyze_run(tmp_path, InspectOptions(layers=r"bn\d\.bias"))
    assert [layer.name for layer in report.layers] == ["bn1.bias", "bn2.bias"]


def test_layers_filter_errors(tmp_path: Path) -> None:
    write_run(tmp_path, training_states(2))
    with pytest.raises(UsageError, match="not a valid regular expression"):
        analyze_run(tmp_path, InspectOptions(layers="conv(["))
    with pytest.raises(UsageError, match="matches no parameter") as info:
        analyze_run(tmp_path, InspectOptions(layers="^decoder"))
    assert "^decoder" in str(info.value)


# --------------------------------------------------------------------------- bad input


def test_shape_change_names_file_and_tensor(tmp_path: Path) -> None:
    states = training_states(3)
    states[2]["conv2.weight"] = torch.randn(6, 4, 5, 5)
    files = write_run(tmp_path, states)
    with pytest.raises(CheckpointError) as info:
        analyze_run(tmp_path)
    message = str(info.value)
    assert str(files[2]) in message
    assert "conv2.weight" in message and "(6, 4, 5, 5)" in message and "(6, 4, 3, 3)" in message


def test_missing_tensor_names_file_and_tensor(tmp_path: Path) -> None:
    states = training_states(3)
    del states[1]["head.bias"]
    files = write_run(tmp_path, states)
    with pytest.raises(CheckpointError) as info:
        analyze_run(tmp_path)
    assert str(files[1]) in str(info.value) and "head.bias" in str(info.value)


def test_nan_weights_warn_naming_checkpoint_and_tensor(tmp_path: Path) -> None:
    states = training_states(3)
    states[1]["head.weight"][0, 1] = math.nan
    states[1]["head.weight"][2, 2] = math.inf
    write_run(tmp_path, states)
    report = analyze_run(tmp_path)
    matching = [w for w in report.warnings if "head.weight" in w]
    assert len(matching) == 1
    assert "step_200.pt" in matching[0] and "2 NaN/Inf" in matching[0]
    head = by_name(report)["head.weight"]
    assert [p.nonfinite for p in head.points] == [0, 2, 0]
    assert math.isnan(head.points[1].norm)
    # the other layers are untouched by it
    ref = reference(states, [100, 200, 300], "conv1.weight", lr=None)
    assert by_name(report)["conv1.weight"].points[1].norm == pytest.approx(ref[1]["norm"])


def test_corrupt_checkpoint_in_the_middle_is_skipped(tmp_path: Path) -> None:
    states = training_states(3)
    files = write_run(tmp_path, states)
    files[1].write_bytes(files[1].read_bytes()[:-50])
    report = analyze_run(tmp_path)
    assert [c.label for c in report.checkpoints] == ["step_100.pt", "step_300.pt"]
    assert any(str(files[1]) in w and "skipped" in w for w in report.warnings)
    # the step is taken across the gap: checkpoint 100 -> 300
    survivors = [states[0], states[2]]
    for layer in report.layers:
        assert_matches_reference(layer, survivors, [100, 300], lr=None)
    with pytest.raises(CheckpointError) as info:
        analyze_run(tmp_path, InspectOptions(strict=True))
    assert str(files[1]) in str(info.value)


def test_checkpoint_unreadable_only_when_opened_is_skipped(tmp_path: Path) -> None:
    # a safetensors file cut inside its data: the header (all discovery reads) is intact
    states = training_states(3)
    files = [
        save_safetensors(tmp_path / f"step_{s}.safetensors", st)
        for s, st in zip((1, 2, 3), states, strict=True)
    ]
    files[1].write_bytes(files[1].read_bytes()[:-40])
    report = analyze_run(tmp_path)
    assert [c.step for c in report.checkpoints] == [1, 3]
    assert any("step_2.safetensors" in w and "skipped" in w for w in report.warnings)
    with pytest.raises(CheckpointError, match=r"step_2\.safetensors"):
        analyze_run(tmp_path, InspectOptions(strict=True))


# --------------------------------------------------------------------------- streaming


class HandleCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = 0
        self.most = 0
        self.opened = 0
        original = dynamics.open_checkpoint

        def counting_open(*args: Any, **kwargs: Any) -> Any:
            ckpt = original(*args, **kwargs)
            self.open += 1
            self.opened += 1
            self.most = max(self.most, self.open)
            close = ckpt.close
            closed = False

            def counted_close() -> None:
                nonlocal closed
                if not closed:
                    closed = True
                    self.open -= 1
                close()

            ckpt.close = counted_close  # type: ignore[method-assign]
            return ckpt

        monkeypatch.setattr(dynamics, "open_checkpoint", counting_open)


@pytest.mark.parametrize(("fmt", "most"), [("torch", WINDOW + 1), ("legacy", 2)])
def test_open_checkpoints_bounded_and_all_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, most: int
) -> None:
    """Mapped checkpoints are swept WINDOW at a time (plus the one before); a legacy file, read
    into memory, is swept with only the one before it open."""
    count = 2 * WINDOW + 3
    states = training_states(count)
    write_run(tmp_path, states, fmt=fmt)
    counter = HandleCounter(monkeypatch)
    report = analyze_run(tmp_path)
    assert len(report.checkpoints) == count
    assert counter.opened == count
    assert counter.most == most
    assert counter.open == 0
    # every interval measured, across window boundaries too (float64 reference)
    name = "conv1.weight"
    layer = next(layer for layer in report.layers if layer.name == name)
    for k in range(1, count):
        a, b = states[k - 1][name].double(), states[k][name].double()
        expected = float((b - a).norm() / a.norm())
        assert layer.points[k].relative_step == pytest.approx(expected, rel=1e-12)


def test_checkpoints_closed_when_analysis_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states = training_states(4)
    states[2]["conv1.weight"] = torch.randn(4, 3, 5, 5)
    write_run(tmp_path, states)
    counter = HandleCounter(monkeypatch)
    with pytest.raises(CheckpointError, match=r"step_300\.pt.*conv1\.weight"):
        analyze_run(tmp_path)
    assert counter.opened >= 3  # the window reads ahead of the failing checkpoint
    assert counter.open == 0


def test_pages_released_within_the_byte_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers too large for the budget are released piece by piece as they are swept; the
    others are released all at once whenever the bytes swept since the last release pass the
    budget, so no more than about the budget stays resident."""
    write_run(tmp_path, training_states(5), fmt="safetensors")
    budget = 400  # bytes: conv weights over 5 checkpoints are larger, BN gamma/beta smaller
    monkeypatch.setattr(dynamics, "RELEASE_BUDGET", budget)
    swept: list[tuple[str, int, bool]] = []  # in order: a layer, its bytes, released by pieces?
    events: list[str] = []
    real_window_stats = dynamics.window_stats

    def spy_window_stats(tensors: Any, before: Any, **kwargs: Any) -> Any:
        nbytes = sum(t.nbytes for t in tensors) + (before.nbytes if before is not None else 0)
        swept.append(("layer", nbytes, kwargs["release"] is dynamics.release_pages))
        events.append("layer")
        return real_window_stats(tensors, before, **kwargs)

    monkeypatch.setattr(dynamics, "window_stats", spy_window_stats)
    monkeypatch.setattr(dynamics, "release_all_pages", lambda: events.append("release"))
    report = analyze_run(tmp_path)
    assert len(report.checkpoints) == 5
    assert any(by_pieces for _, _, by_pieces in swept)  # conv weights over 5 checkpoints
    assert any(not by_pieces for _, _, by_pieces in swept)  # BN gamma/beta
    for _, nbytes, by_pieces in swept:
        assert by_pieces == (nbytes > budget)
    # replay: the unreleased bytes never pass the budget by more than one layer
    unreleased, layers = 0, iter(swept)
    for event in events:
        if event == "release":
            assert unreleased > budget
            unreleased = 0
        else:
            _, nbytes, by_pieces = next(layers)
            unreleased += 0 if by_pieces else nbytes
            assert unreleased <= 2 * budget or by_pieces
    assert events.count("release") >= 1
