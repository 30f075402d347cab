"""`bnwd plot`: the curves carry exactly the numbers `inspect` reports, and files come out right.

The runs are real (a few SGD steps of a conv -> BN -> conv -> BN -> head network on seeded noise),
saved at unequal intervals so the per-step conversion (interval value / sqrt(k)) is exercised. The
weight, update and effective-LR panels are checked twice: against `analyze_run`'s numbers, and
against an independent float64 computation from the raw tensors of the saved files.
"""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib as mpl
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import nn
from typer.testing import CliRunner

from bnwd_cli.cli.app import app
from bnwd_cli.errors import UsageError
from bnwd_cli.metrics.dynamics import LayerDynamics, RunDynamics, analyze_run
from bnwd_cli.render.plots import (
    AGGREGATE,
    Panel,
    PlotData,
    PlotFormat,
    PlotOptions,
    SeriesRole,
    XAxis,
    build_figure,
    draw,
    plot_data,
    require_matplotlib,
    run_labels,
    write_figure,
)

runner = CliRunner()

LR = 0.1
MOMENTUM = 0.9
STEPS = (0, 2, 5, 9)
"""Checkpoint steps: intervals of 2, 3 and 4 optimizer steps."""
INVARIANT = ("conv1.weight", "conv2.weight")
GAMMAS = ("bn1.weight", "bn2.weight")


def _network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


class Net(nn.Module):
    """Named like a hand-written model, so the parameter names read as in the figure."""

    def __init__(self) -> None:
        super().__init__()
        layers = _network()
        self.conv1, self.bn1, self.conv2, self.bn2, self.fc = (
            layers[0],
            layers[1],
            layers[3],
            layers[4],
            layers[8],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def make_run(folder: Path, *, weight_decay: float, seed: int = 0, with_steps: bool = True) -> Path:
    """Train a few SGD steps and save checkpoints at STEPS (or by epoch, without step counts)."""
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(16, 3, 6, 6, generator=generator)
    labels = torch.randint(0, 3, (16,), generator=generator)
    for step in range(STEPS[-1] + 1):
        if step in STEPS:
            position = STEPS.index(step)
            state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            if with_steps:
                torch.save({**state, "step": step}, folder / f"step_{step:04d}.pt")
            else:
                torch.save({**state, "epoch": position}, folder / f"epoch_{position}.pt")
        loss = nn.functional.cross_entropy(model(inputs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    return {
        "decay": make_run(base / "decay", weight_decay=5e-2),
        "no_decay": make_run(base / "no_decay", weight_decay=0.0, seed=1),
        "epochs": make_run(base / "epochs", weight_decay=5e-2, with_steps=False),
    }


@pytest.fixture(scope="module")
def decay_run(runs: dict[str, Path]) -> RunDynamics:
    return analyze_run(runs["decay"])


def raw_weights(folder: Path) -> list[dict[str, torch.Tensor]]:
    """The saved state dicts in step order, as float64 tensors (independent of bnwd's reader)."""
    files = sorted(folder.glob("*.pt"))
    return [
        {k: v.double() for k, v in torch.load(f, weights_only=True)["model"].items()} for f in files
    ]


def lines(figure: Figure) -> dict[str, Line2D]:
    """Every plotted curve, by the key bnwd stores as its gid."""
    found: dict[str, Line2D] = {}
    for ax in figure.axes:
        for line in ax.get_lines():
            gid = line.get_gid()
            if gid:
                found[gid] = line
    return found


def xy(line: Line2D) -> tuple[list[float], list[float]]:
    x, y = line.get_data()
    return [float(v) for v in x], [float(v) for v in y]


def key(panel: Panel, run: int = 0, layer: str = AGGREGATE, role: str = "measured") -> str:
    return f"{panel.value}|{run}|{layer}|{role}"


def layer(report: RunDynamics, name: str) -> LayerDynamics:
    return next(item for item in report.layers if item.name == name)


# --- the plotted numbers ----------------------------------------------------------------------


@pytest.mark.parametrize("sum_of_squares", [False, True])
def test_weight_panel_equals_metrics_and_raw_tensors(
    runs: dict[str, Path], decay_run: RunDynamics, sum_of_squares: bool
) -> None:
    figure = build_figure([decay_run], ["decay"], PlotOptions(sum_of_squares=sum_of_squares))
    plotted = lines(figure)
    raw = raw_weights(runs["decay"])
    power = 2 if sum_of_squares else 1
    for name in INVARIANT:
        x, y = xy(plotted[key(Panel.WEIGHT_NORM, layer=name)])
        assert x == [float(s) for s in STEPS]
        reported = [p.norm**power for p in layer(decay_run, name).points]
        assert y == pytest.approx(reported, rel=1e-12)
        independent = [float(state[name].norm()) ** power for state in raw]
        assert y == pytest.approx(independent, rel=1e-9)
    x, total = xy(plotted[key(Panel.WEIGHT_NORM)])
    assert x == [float(s) for s in STEPS]
    squares = [sum(float(state[n].square().sum()) for n in INVARIANT) for state in raw]
    expected = squares if sum_of_squares else [math.sqrt(v) for v in squares]
    assert total == pytest.approx(expected, rel=1e-9)


def test_update_panels_are_per_step_and_equal_metrics(
    runs: dict[str, Path], decay_run: RunDynamics
) -> None:
    plotted = lines(build_figure([decay_run], ["decay"]))
    raw = raw_weights(runs["decay"])
    intervals = [b - a for a, b in itertools.pairwise(STEPS)]
    means_rel: list[list[float]] = [[] for _ in intervals]
    means_angle: list[list[float]] = [[] for _ in intervals]
    for name in INVARIANT:
        points = layer(decay_run, name).points[1:]
        x, rel = xy(plotted[key(Panel.RELATIVE_UPDATE, layer=name)])
        assert x == [float(s) for s in STEPS[1:]]
        assert [p.steps_between for p in points] == intervals
        reported = [p.relative_step / math.sqrt(p.steps_between) for p in points]  # type: ignore[operator,arg-type]
        assert rel == pytest.approx(reported, rel=1e-12)
        _, angle = xy(plotted[key(Panel.ANGULAR_UPDATE, layer=name)])
        reported_deg = [
            math.degrees(p.angular_update / math.sqrt(p.steps_between))  # type: ignore[operator,arg-type]
            for p in points
        ]
        assert angle == pytest.approx(reported_deg, rel=1e-12)
        for i, k in enumerate(intervals):
            before, after = raw[i][name], raw[i + 1][name]
            rel_raw = float((after - before).norm() / before.norm()) / math.sqrt(k)
            assert rel[i] == pytest.approx(rel_raw, rel=1e-9)
            # per output row (BatchNorm follows), root-mean-square over rows
            a, b = before.flatten(1), after.flatten(1)
            cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
            rms = float(torch.arccos(cos.clamp(-1, 1)).square().mean().sqrt())
            assert angle[i] == pytest.approx(math.degrees(rms / math.sqrt(k)), rel=1e-6)
            means_rel[i].append(rel[i])
            means_angle[i].append(angle[i])
    _, rel_all = xy(plotted[key(Panel.RELATIVE_UPDATE)])
    assert rel_all == pytest.approx([sum(v) / len(v) for v in means_rel], rel=1e-12)
    _, angle_all = xy(plotted[key(Panel.ANGULAR_UPDATE)])
    assert angle_all == pytest.approx([sum(v) / len(v) for v in means_angle], rel=1e-12)


def test_effective_lr_nominal_lr_and_gamma_panels(
    runs: dict[str, Path], decay_run: RunDynamics
) -> None:
    plotted = lines(build_figure([decay_run], ["decay"]))
    raw = raw_weights(runs["decay"])
    per_layer = []
    for name in INVARIANT:
        _, elr = xy(plotted[key(Panel.EFFECTIVE_LR, layer=name)])
        assert elr == pytest.approx([p.effective_lr for p in layer(decay_run, name).points])
        rows = raw[0][name].shape[0]
        # SGD: lr / |w|^2 with |w| the root-mean-square row norm (rows are invariant on their own)
        independent = [LR / (float(s[name].norm()) ** 2 / rows) for s in raw]
        assert elr == pytest.approx(independent, rel=1e-9)
        per_layer.append(elr)
    _, elr_all = xy(plotted[key(Panel.EFFECTIVE_LR)])
    assert elr_all == pytest.approx([sum(v) / 2 for v in zip(*per_layer, strict=True)])
    x, nominal = xy(plotted[key(Panel.NOMINAL_LR)])
    assert x == [float(s) for s in STEPS]
    assert nominal == pytest.approx([LR] * len(STEPS))
    for name in GAMMAS:
        _, gamma = xy(plotted[key(Panel.GAMMA_NORM, layer=name)])
        assert gamma == pytest.approx([float(s[name].norm()) for s in raw], rel=1e-9)
        assert gamma == pytest.approx([p.norm for p in layer(decay_run, name).points])
    # the other kinds never reach the figure
    names = {gid.split("|")[2] for gid in plotted}
    assert names == {AGGREGATE, *INVARIANT, *GAMMAS}


def test_several_runs_give_one_coloured_series_each(
    runs: dict[str, Path], decay_run: RunDynamics
) -> None:
    other = analyze_run(runs["no_decay"])
    figure = build_figure([decay_run, other], ["with wd", "without wd"])
    plotted = lines(figure)
    for panel in (Panel.WEIGHT_NORM, Panel.RELATIVE_UPDATE, Panel.EFFECTIVE_LR, Panel.GAMMA_NORM):
        first, second = plotted[key(panel, 0)], plotted[key(panel, 1)]
        assert first.get_color() != second.get_color()
        assert xy(first)[1] != xy(second)[1]
    _, norm_other = xy(plotted[key(Panel.WEIGHT_NORM, 1, "conv2.weight")])
    assert norm_other == pytest.approx([p.norm for p in layer(other, "conv2.weight").points])
    # single layers are tints of their run's colour, never another run's colour
    run_colour = mpl.colors.to_rgb(plotted[key(Panel.WEIGHT_NORM, 1)].get_color())
    tint = mpl.colors.to_rgb(plotted[key(Panel.WEIGHT_NORM, 1, "conv1.weight")].get_color())
    assert tint != run_colour
    assert all(t >= c - 1e-9 for t, c in zip(tint, run_colour, strict=True))
    legend_texts = [t.get_text() for legend in _legends(figure) for t in legend.get_texts()]
    runs_legend = [text.split("\n")[0] for text in legend_texts if "SGD+momentum" in text]
    assert runs_legend == ["with wd", "without wd"]


def _legends(figure: Figure) -> list[Any]:
    legend_axes = next(ax for ax in figure.axes if ax.get_gid() == "legend")
    return [child for child in legend_axes.get_children() if type(child).__name__ == "Legend"]


def test_axis_labels_name_steps_and_units(decay_run: RunDynamics) -> None:
    figure = build_figure([decay_run], ["decay"], PlotOptions(log_scale=True))
    by_gid = {ax.get_gid(): ax for ax in figure.axes}
    assert by_gid[Panel.WEIGHT_NORM.value].get_xlabel() == XAxis.STEP.value
    assert "per step" in by_gid[Panel.RELATIVE_UPDATE.value].get_ylabel()
    assert "√k" in by_gid[Panel.RELATIVE_UPDATE.value].get_ylabel()
    assert "degrees" in by_gid[Panel.ANGULAR_UPDATE.value].get_ylabel()
    assert "‖w‖²" in by_gid[Panel.EFFECTIVE_LR.value].get_ylabel()
    assert by_gid[Panel.WEIGHT_NORM.value].get_yscale() == "log"
    assert by_gid[Panel.GAMMA_NORM.value].get_yscale() == "log"


def test_without_steps_the_axis_counts_epochs_and_updates_stay_per_interval(
    runs: dict[str, Path],
) -> None:
    report = analyze_run(runs["epochs"])
    data = plot_data([report], ["epochs"])
    assert data.x_axis is XAxis.EPOCH and not data.per_step
    series = data.find(Panel.RELATIVE_UPDATE, 0, "conv1.weight")
    assert series is not None
    assert series.x == (1.0, 2.0, 3.0)
    # no step counts: the interval figures as they are, not divided by anything
    assert series.y == pytest.approx(
        [p.relative_step for p in layer(report, "conv1.weight").points[1:]]
    )
    figure = draw(data)
    by_gid = {ax.get_gid(): ax for ax in figure.axes}
    assert by_gid[Panel.ANGULAR_UPDATE.value].get_xlabel() == "epoch"
    assert "per checkpoint interval" in by_gid[Panel.ANGULAR_UPDATE.value].get_ylabel()
    assert any("step counts unknown" in note for note in data.notes)


def test_predicted_equilibrium_and_implied_step_come_from_the_optimizer_analysis(
    runs: dict[str, Path], decay_run: RunDynamics
) -> None:
    plotted = lines(build_figure([decay_run], ["decay"]))
    line = plotted[key(Panel.ANGULAR_UPDATE, role=SeriesRole.PREDICTED.value)]
    assert line.get_linestyle() == "--"
    x, y = xy(line)
    assert x == [float(s) for s in STEPS]
    # THEORY.md section 3, SGD with momentum m: sqrt(2 lr wd / (1 + m)) radians per step
    theory = math.degrees(math.sqrt(2 * LR * 5e-2 / (1 + MOMENTUM)))
    assert y == pytest.approx([theory] * len(STEPS), rel=1e-9)
    # every layer shares the prediction: one dashed line, not one per layer on top of each other
    assert not any(gid.endswith("|predicted") and f"|{AGGREGATE}|" not in gid for gid in plotted)
    for panel, field, convert in (
        (Panel.RELATIVE_UPDATE, "implied_relative_update", float),
        (Panel.ANGULAR_UPDATE, "implied_angle", math.degrees),
    ):
        implied = plotted[key(panel, role=SeriesRole.IMPLIED.value)]
        x, y = xy(implied)
        per_layer = [
            [getattr(p, field) for p in layer(decay_run, name).points] for name in INVARIANT
        ]
        expected = [
            (step, sum(convert(v) for v in values) / len(values))
            for step, *values in zip(STEPS, *per_layer, strict=True)
            if None not in values
        ]
        assert len(expected) >= len(STEPS) - 1  # the initial checkpoint may hold no state yet
        assert x == [float(step) for step, _ in expected]
        assert y == pytest.approx([value for _, value in expected], rel=1e-12)
    # no decay, no equilibrium: no dashed line is invented
    no_decay = lines(build_figure([analyze_run(runs["no_decay"])], ["no wd"]))
    assert not any(gid.endswith("|predicted") for gid in no_decay)


def test_a_layer_with_its_own_prediction_gets_its_own_dashed_line(
    decay_run: RunDynamics,
) -> None:
    """E.g. a separate param group with another decay: its prediction differs from the rest."""
    other = 0.25
    layers = tuple(
        replace(item, points=tuple(replace(p, equilibrium_angle=other) for p in item.points))
        if item.name == "conv2.weight"
        else item
        for item in decay_run.layers
    )
    plotted = lines(build_figure([replace(decay_run, layers=layers)], ["decay"]))
    _, own = xy(plotted[key(Panel.ANGULAR_UPDATE, layer="conv2.weight", role="predicted")])
    assert own == pytest.approx([math.degrees(other)] * len(STEPS))
    _, mean = xy(plotted[key(Panel.ANGULAR_UPDATE, role="predicted")])
    conv1 = layer(decay_run, "conv1.weight").points[0].equilibrium_angle
    assert conv1 is not None
    assert mean == pytest.approx([math.degrees((conv1 + other) / 2)] * len(STEPS))


def test_layers_regex_selects_single_layer_curves(decay_run: RunDynamics) -> None:
    data = plot_data([decay_run], ["decay"], PlotOptions(layers=r"conv2|bn1"))
    names = {s.layer for s in data.series}
    assert names == {AGGREGATE, "conv2.weight", "bn1.weight"}
    # the aggregate still covers every scale-invariant weight
    total = data.find(Panel.WEIGHT_NORM, 0)
    assert total is not None
    expected = [
        math.sqrt(sum(layer(decay_run, n).points[i].norm ** 2 for n in INVARIANT))
        for i in range(len(STEPS))
    ]
    assert total.y == pytest.approx(expected)
    with pytest.raises(UsageError, match="matches no scale-invariant"):
        plot_data([decay_run], ["decay"], PlotOptions(layers="nothing-like-this"))
    with pytest.raises(UsageError, match="not a valid regular expression"):
        plot_data([decay_run], ["decay"], PlotOptions(layers="("))


def test_many_layers_show_the_aggregate_only_unless_asked(decay_run: RunDynamics) -> None:
    five = [decay_run] * 5  # 10 scale-invariant weights in all: above AUTO_LAYER_LIMIT
    data = plot_data(five, [f"run{i}" for i in range(5)])
    assert {s.layer for s in data.series} == {AGGREGATE}
    assert any("10 scale-invariant weights" in note and "--layers" in note for note in data.notes)
    asked = plot_data(five, [f"run{i}" for i in range(5)], PlotOptions(layers="conv1"))
    assert {s.layer for s in asked.series} == {AGGREGATE, "conv1.weight"}
    assert len({s.run for s in asked.series if s.layer == "conv1.weight"}) == 5


def test_run_labels_default_to_folder_names_and_disambiguate(tmp_path: Path) -> None:
    (tmp_path / "a" / "ckpt").mkdir(parents=True)
    (tmp_path / "b" / "ckpt").mkdir(parents=True)
    assert run_labels([tmp_path / "a"]) == ["a"]
    assert run_labels([tmp_path / "a" / "ckpt", tmp_path / "b" / "ckpt"]) == ["a/ckpt", "b/ckpt"]
    assert run_labels([tmp_path / "a"], ["mine"]) == ["mine"]
    with pytest.raises(UsageError, match="--label given 1 time"):
        run_labels([tmp_path / "a", tmp_path / "b"], ["only one"])


def test_format_comes_from_the_extension() -> None:
    assert PlotFormat.from_path(Path("r.PNG")) is PlotFormat.PNG
    assert PlotFormat.from_path(Path("r.svg")) is PlotFormat.SVG
    with pytest.raises(UsageError, match=r"extension '\.jpg'.*\.png, \.svg, \.pdf"):
        PlotFormat.from_path(Path("r.jpg"))
    with pytest.raises(UsageError, match="no extension"):
        PlotFormat.from_path(Path("report"))


def test_write_is_atomic_when_saving_fails(
    tmp_path: Path, decay_run: RunDynamics, monkeypatch: pytest.MonkeyPatch
) -> None:
    figure = build_figure([decay_run], ["decay"])

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(figure, "savefig", broken)
    target = tmp_path / "report.png"
    with pytest.raises(RuntimeError):
        write_figure(figure, target, PlotFormat.PNG)
    assert list(tmp_path.iterdir()) == []


# --- the command --------------------------------------------------------------------------------

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF"}


@pytest.mark.parametrize("suffix", ["png", "svg", "pdf"])
def test_cli_writes_the_requested_format(
    runs: dict[str, Path], tmp_path: Path, suffix: str
) -> None:
    target = tmp_path / f"report.{suffix}"
    result = runner.invoke(
        app,
        ["plot", str(runs["decay"]), str(runs["no_decay"]), "-o", str(target), "--dpi", "50"],
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert f"wrote {target}" in result.stderr
    content = target.read_bytes()
    assert len(content) > 1000
    if suffix == "svg":
        assert b"<svg" in content[:2000]
        assert b"no_decay" in content  # the legend names the runs (as text, svg.fonttype)
    else:
        assert content.startswith(MAGIC[suffix])
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left


def test_cli_labels_and_options(runs: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "r.svg"
    result = runner.invoke(
        app,
        [
            "plot",
            str(runs["decay"]),
            str(runs["no_decay"]),
            "-o",
            str(target),
            "--label",
            "healthy",
            "--label",
            "NoConvL2 $5",
            "--layers",
            "conv1",
            "--log",
            "--sum-of-squares",
            "--title",
            "My two runs",
        ],
    )
    assert result.exit_code == 0, result.stderr
    svg = target.read_text(encoding="utf-8")
    # "$" is shown as typed (matplotlib would otherwise start mathtext and fail on it)
    for text in ("healthy", "NoConvL2 $5", "My two runs", "conv1.weight"):
        assert text in svg
    assert "conv2.weight" not in svg


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["-o", "{tmp}/report.jpg"], "one of .png, .svg, .pdf"),
        (["-o", "{tmp}/missing/report.png"], "does not exist"),
        (["-o", "{run}/report.png"], "refusing to write inside the checkpoint folder"),
        (["-o", "{tmp}/r.png", "--label", "a", "--label", "b"], "--label given 2 time"),
        (["-o", "{tmp}/r.png", "--layers", "("], "not a valid regular expression"),
        (["-o", "{tmp}/r.png", "--layers", "zzz"], "matches no scale-invariant"),
    ],
)
def test_cli_bad_usage_exits_2(
    runs: dict[str, Path], tmp_path: Path, arguments: list[str], message: str
) -> None:
    filled = [a.format(tmp=tmp_path, run=runs["decay"]) for a in arguments]
    result = runner.invoke(app, ["plot", str(runs["decay"]), *filled])
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""
    assert not list(runs["decay"].glob("*.png"))
    assert not list(tmp_path.glob("*.png"))


def test_cli_without_matplotlib_says_how_to_install(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    with pytest.raises(UsageError, match=re.escape("pip install 'bnwd-cli[plot]'")):
        require_matplotlib()
    target = tmp_path / "r.png"
    result = runner.invoke(app, ["plot", str(runs["decay"]), "-o", str(target)])
    assert result.exit_code == 2
    assert "matplotlib, which is not installed: pip install 'bnwd-cli[plot]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not target.exists()


def test_cli_unreadable_run_exits_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["plot", str(empty), "-o", str(tmp_path / "r.png")])
    assert result.exit_code == 2
    assert str(empty) in result.stderr


def test_help_imports_neither_torch_nor_matplotlib() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from bnwd_cli.cli.app import app\n"
        "result = CliRunner().invoke(app, ['plot', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert '--sum-of-squares' in result.output\n"
        "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_plot_data_is_pure_numbers(decay_run: RunDynamics) -> None:
    data = plot_data([decay_run], ["decay"])
    assert isinstance(data, PlotData)
    assert {s.panel for s in data.series} == {
        Panel.WEIGHT_NORM,
        Panel.RELATIVE_UPDATE,
        Panel.ANGULAR_UPDATE,
        Panel.EFFECTIVE_LR,
        Panel.NOMINAL_LR,
        Panel.GAMMA_NORM,
    }
    assert all(len(s.x) == len(s.y) > 0 for s in data.series)
    assert data.runs[0].description == (
        "SGD+momentum, lr 0.1, wd 0.05 on scale-invariant weights, 4 checkpoints"
    )
