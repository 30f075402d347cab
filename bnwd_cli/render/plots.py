"""`bnwd plot`: the dynamics of one run or several as curves, the way the seed blog post shows them.

Two steps: `plot_data` turns `RunDynamics` into the series to draw (plain numbers, no matplotlib),
and `draw` puts them on a matplotlib `Figure` that it returns without saving, so tests can read the
plotted numbers back from the `Line2D` objects (`build_figure` does both). `write_figure` saves a
figure atomically. Each curve's `Line2D` carries its `Series.key` as gid.

Panels (shared x axis: optimizer steps, or epochs / checkpoint order when steps are unknown):
1. sum of squares (or norm) of the scale-invariant weights, in total and per layer;
2. per-step relative update, and 3. per-step angular update, with the predicted equilibrium
   (shared/THEORY.md section 3) dashed where the analysis gives one;
4. effective learning rate, with the nominal lr on a secondary axis;
5. norms of the normalization layers' gammas.

matplotlib is an optional extra (`pip install 'bnwd-cli[plot]'`); it is imported only when a figure
is built, and never through pyplot: a bare `Figure` needs no GUI backend and no global state.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnwd_cli._version import __version__
from bnwd_cli.errors import UsageError
from bnwd_cli.graph.classes import ParamKind

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from bnwd_cli.metrics.dynamics import CheckpointInfo, LayerDynamics, LayerPoint, RunDynamics

INSTALL_HINT = "pip install 'bnwd-cli[plot]'"
AUTO_LAYER_LIMIT = 8
"""Without --layers, single-layer curves of a kind are drawn only when all runs together have at
most this many; beyond that the figure shows the aggregates alone (a curve per layer of a
ResNet-50 is noise)."""
AGGREGATE = "*"
"""The `layer` of a series that sums or averages over all layers of its kind."""


class PlotFormat(StrEnum):
    PNG = "png"
    SVG = "svg"
    PDF = "pdf"

    @classmethod
    def from_path(cls, path: Path) -> PlotFormat:
        """The format named by the file's extension; anything else is a usage error."""
        suffix = path.suffix.lower().lstrip(".")
        try:
            return cls(suffix)
        except ValueError:
            choices = ", ".join(f".{f.value}" for f in cls)
            found = f"extension '{path.suffix}'" if path.suffix else "no extension"
            raise UsageError(
                f"--output {path}: {found}; the plot format comes from the extension, "
                f"one of {choices}"
            ) from None


class XAxis(StrEnum):
    """What the shared x axis counts (steps whenever every checkpoint of every run knows its step)."""

    STEP = "optimizer step"
    EPOCH = "epoch"
    CHECKPOINT = "checkpoint (training order; steps unknown)"


class Panel(StrEnum):
    WEIGHT_NORM = "weight-norm"
    RELATIVE_UPDATE = "relative-update"
    ANGULAR_UPDATE = "angular-update"
    EFFECTIVE_LR = "effective-lr"
    NOMINAL_LR = "nominal-lr"
    """Drawn on the secondary axis of the effective-LR panel."""
    GAMMA_NORM = "gamma-norm"


class SeriesRole(StrEnum):
    MEASURED = "measured"
    """Computed from the weights of consecutive checkpoints."""
    IMPLIED = "implied"
    """The one-step update the checkpoint's optimizer state implies (THEORY.md section 4)."""
    PREDICTED = "predicted"
    """The equilibrium the hyper-parameters predict (THEORY.md section 3)."""


class EffectiveLrMeasure(StrEnum):
    LR = "effective LR"
    """lr/|w|^2 (SGD) or lr/|w| (Adam-family), needs the lr."""
    FACTOR = "effective-LR factor"
    """(|w_0|/|w_t|)^p relative to the first checkpoint: what the norm alone did, no lr needed."""


@dataclass(frozen=True)
class PlotOptions:
    layers: str | None = None
    """Regular expression: draw single-layer curves for the parameters it matches (re.search).
    None: every layer, for runs with at most AUTO_LAYER_LIMIT of a kind."""
    log_scale: bool = False
    sum_of_squares: bool = False
    """Weight panel shows sum ||w||^2 (the blog's measure) instead of ||w||."""
    title: str | None = None


@dataclass(frozen=True)
class Series:
    """One curve: what it shows, for which run and layer, and its points."""

    panel: Panel
    run: int
    """Index of the run, in the order given (it picks the colour)."""
    layer: str
    """Parameter name, or AGGREGATE."""
    role: SeriesRole
    x: tuple[float, ...]
    y: tuple[float, ...]
    shade: int = 0
    """0 for the aggregate, 1.. for single layers in parameter order (lighter, other markers)."""

    @property
    def key(self) -> str:
        """Stable identifier, also stored as the Line2D's gid."""
        return f"{self.panel.value}|{self.run}|{self.layer}|{self.role.value}"


@dataclass(frozen=True)
class RunLegend:
    label: str
    description: str
    """Optimizer, lr and weight decay of the scale-invariant weights, checkpoint count."""


@dataclass(frozen=True)
class PlotData:
    series: tuple[Series, ...]
    runs: tuple[RunLegend, ...]
    x_axis: XAxis
    per_step: bool
    """Relative and angular updates are per optimizer step (interval value / sqrt(k)); False when
    step counts are unknown and the figures are per checkpoint interval."""
    effective_lr: EffectiveLrMeasure
    lr_power: frozenset[int]
    """1 (Adam-family), 2 (SGD-family): which effective-LR formula(s) the runs use."""
    options: PlotOptions
    notes: tuple[str, ...] = ()
    """What the figure leaves out and why (stderr, not part of the picture)."""

    def find(
        self,
        panel: Panel,
        run: int,
        layer: str = AGGREGATE,
        role: SeriesRole = SeriesRole.MEASURED,
    ) -> Series | None:
        for series in self.series:
            if (series.panel, series.run, series.layer, series.role) == (panel, run, layer, role):
                return series
        return None


# ---------------------------------------------------------------------------------------------
# What to draw (no matplotlib)


def run_labels(paths: Sequence[Path], labels: Sequence[str] | None = None) -> list[str]:
    """Legend names: the --label values, or the folder names (with parents where they clash)."""
    if labels:
        if len(labels) != len(paths):
            raise UsageError(
                f"--label given {len(labels)} time(s) for {len(paths)} run folder(s); "
                "give one --label per CKPT_DIR, in the same order"
            )
        return list(labels)
    resolved = [p.resolve() for p in paths]
    names = [p.stem if p.is_file() else p.name for p in resolved]
    depth = 1
    while len(set(names)) < len(names) and depth < 4:
        depth += 1
        names = ["/".join(p.parts[-depth:]) for p in resolved]
    return names


def compile_layers(expression: str | None) -> re.Pattern[str] | None:
    if expression is None:
        return None
    try:
        return re.compile(expression)
    except re.error as exc:
        raise UsageError(
            f"--layers {expression!r} is not a valid regular expression ({exc})"
        ) from None


def is_gamma(layer: LayerDynamics) -> bool:
    """A normalization layer's scale (its `weight`); its `bias` is beta."""
    return layer.classification.kind is ParamKind.NORM_AFFINE and layer.name.endswith(
        ("weight", "gamma", "scale")
    )


def per_step(value: float | None, steps_between: int | None, per_step: bool) -> float | None:
    """An interval figure as a per-step figure, assuming steps add like a random walk.

    Between checkpoints k steps apart, independent per-step changes of size d add to about
    sqrt(k)*d, not k*d (cos theta_k ~ exp(-k Delta^2 / 2), THEORY.md section 2). Momentum
    correlates steps, so for k >> 1/(1-m) this estimate can exceed the true per-step value.
    """
    if value is None:
        return None
    if not per_step:
        return value
    if steps_between is None or steps_between <= 0:
        return None
    return value / math.sqrt(steps_between)


def plot_data(
    runs: Sequence[RunDynamics], labels: Sequence[str], options: PlotOptions | None = None
) -> PlotData:
    """Everything the figure shows, as numbers."""
    options = options or PlotOptions()
    if len(labels) != len(runs):
        raise ValueError("one label per run")
    pattern = compile_layers(options.layers)
    x_axis = _x_axis(runs)
    per_step_updates = x_axis is XAxis.STEP
    invariant = [_of_kind(run, ParamKind.SCALE_INVARIANT) for run in runs]
    gammas = [[layer for layer in run.layers if is_gamma(layer)] for run in runs]
    if not any(invariant):
        raise UsageError(
            "no scale-invariant weights in "
            + ", ".join(labels)
            + ": nothing to plot (pass --model model.py when the state-dict heuristic misses them)"
        )
    notes: list[str] = []
    if pattern is not None and not any(
        pattern.search(layer.name) for group in (*invariant, *gammas) for layer in group
    ):
        raise UsageError(
            f"--layers {options.layers!r} matches no scale-invariant weight or normalization "
            f"gamma of {', '.join(labels)}"
        )
    measure = (
        EffectiveLrMeasure.LR
        if all(
            p.effective_lr is not None
            for group in invariant
            for layer in group
            for p in layer.points
        )
        else EffectiveLrMeasure.FACTOR
    )
    if measure is EffectiveLrMeasure.FACTOR:
        notes.append(
            "the learning rate is unknown for some checkpoints (no optimizer state, no --lr): "
            "the effective-LR panel shows the factor relative to the first checkpoint instead"
        )
    chosen = _chosen(invariant, pattern, "scale-invariant weights", notes)
    chosen_gammas = _chosen(gammas, pattern, "normalization gammas", notes)
    series: list[Series] = []
    for index, run in enumerate(runs):
        xs = [_x_value(info, position, x_axis) for position, info in enumerate(run.checkpoints)]
        if not invariant[index]:
            notes.append(f"{labels[index]}: no scale-invariant weights found")
        series.extend(
            _invariant_series(
                index, invariant[index], chosen[index], xs, options, measure, per_step_updates
            )
        )
        series.extend(_gamma_series(index, gammas[index], chosen_gammas[index], xs))
    if not per_step_updates:
        notes.append(
            "step counts unknown: relative and angular updates are per checkpoint interval, "
            "and the per-step equilibrium prediction is not drawn"
        )
    powers = frozenset(
        1 if run.optimizer_family is not None and run.optimizer_family.is_adaptive else 2
        for run in runs
    )
    return PlotData(
        series=tuple(s for s in series if s.x),
        runs=tuple(
            RunLegend(label, _describe(run, layers))
            for label, run, layers in zip(labels, runs, invariant, strict=True)
        ),
        x_axis=x_axis,
        per_step=per_step_updates,
        effective_lr=measure,
        lr_power=powers,
        options=options,
        notes=tuple(dict.fromkeys(notes)),
    )


def _of_kind(run: RunDynamics, kind: ParamKind) -> list[LayerDynamics]:
    return [layer for layer in run.layers if layer.classification.kind is kind]


def _x_axis(runs: Sequence[RunDynamics]) -> XAxis:
    infos = [info for run in runs for info in run.checkpoints]
    if all(info.step is not None for info in infos):
        return XAxis.STEP
    if all(info.epoch is not None for info in infos):
        return XAxis.EPOCH
    return XAxis.CHECKPOINT


def _x_value(info: CheckpointInfo, position: int, axis: XAxis) -> float:
    value = {XAxis.STEP: info.step, XAxis.EPOCH: info.epoch}.get(axis, position)
    return float(value if value is not None else position)


def _chosen(
    groups: Sequence[Sequence[LayerDynamics]],
    pattern: re.Pattern[str] | None,
    what: str,
    notes: list[str],
) -> list[list[LayerDynamics]]:
    """Per run, the layers that get their own curve."""
    if pattern is not None:
        return [[layer for layer in layers if pattern.search(layer.name)] for layers in groups]
    total = sum(len(layers) for layers in groups)
    if total <= AUTO_LAYER_LIMIT:
        return [list(layers) for layers in groups]
    notes.append(
        f"{total} {what} in all runs: showing their aggregate only; "
        "pass --layers REGEX to add single-layer curves"
    )
    return [[] for _ in groups]


def _curve(
    layer: LayerDynamics, xs: Sequence[float], value: Callable[[LayerPoint], float | None]
) -> tuple[list[float], list[float]]:
    """(x, y) of the points where `value` is defined and finite."""
    x: list[float] = []
    y: list[float] = []
    for point in layer.points:
        v = value(point)
        if v is not None and math.isfinite(v):
            x.append(xs[point.checkpoint])
            y.append(v)
    return x, y


def _aggregate(
    layers: Sequence[LayerDynamics],
    xs: Sequence[float],
    value: Callable[[LayerPoint], float | None],
    combine: Callable[[list[float]], float],
) -> tuple[list[float], list[float]]:
    """Combine the layers' values checkpoint by checkpoint, where every layer has one."""
    by_checkpoint: dict[int, list[float]] = {}
    for layer in layers:
        for point in layer.points:
            v = value(point)
            if v is not None and math.isfinite(v):
                by_checkpoint.setdefault(point.checkpoint, []).append(v)
    x: list[float] = []
    y: list[float] = []
    for checkpoint in sorted(by_checkpoint):
        values = by_checkpoint[checkpoint]
        if len(values) == len(layers):
            x.append(xs[checkpoint])
            y.append(combine(values))
    return x, y


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _invariant_series(
    run: int,
    layers: Sequence[LayerDynamics],
    chosen: Sequence[LayerDynamics],
    xs: Sequence[float],
    options: PlotOptions,
    measure: EffectiveLrMeasure,
    per_step_updates: bool,
) -> list[Series]:
    if not layers:
        return []
    squares = options.sum_of_squares

    def weight(p: LayerPoint) -> float:
        return p.norm * p.norm if squares else p.norm

    def relative(p: LayerPoint) -> float | None:
        return per_step(p.relative_step, p.steps_between, per_step_updates)

    def angle(p: LayerPoint) -> float | None:
        radians = per_step(p.angular_update, p.steps_between, per_step_updates)
        return math.degrees(radians) if radians is not None else None

    def effective(p: LayerPoint) -> float | None:
        return p.effective_lr if measure is EffectiveLrMeasure.LR else p.lr_factor

    def total_weight(values: list[float]) -> float:
        total = math.fsum(v if squares else v * v for v in values)
        return total if squares else math.sqrt(total)

    measured = {
        Panel.WEIGHT_NORM: (weight, total_weight),
        Panel.RELATIVE_UPDATE: (relative, _mean),
        Panel.ANGULAR_UPDATE: (angle, _mean),
        Panel.EFFECTIVE_LR: (effective, _mean),
    }
    out: list[Series] = []
    for panel, (value, combine) in measured.items():
        x, y = _aggregate(layers, xs, value, combine)
        out.append(Series(panel, run, AGGREGATE, SeriesRole.MEASURED, tuple(x), tuple(y)))
        for shade, layer in enumerate(chosen, start=1):
            x, y = _curve(layer, xs, value)
            out.append(
                Series(panel, run, layer.name, SeriesRole.MEASURED, tuple(x), tuple(y), shade)
            )
    x, y = _aggregate(layers, xs, lambda p: p.lr, _mean)
    out.append(Series(Panel.NOMINAL_LR, run, AGGREGATE, SeriesRole.MEASURED, tuple(x), tuple(y)))
    out.extend(_optimizer_series(run, layers, chosen, xs, per_step_updates))
    return out


def _optimizer_series(
    run: int,
    layers: Sequence[LayerDynamics],
    chosen: Sequence[LayerDynamics],
    xs: Sequence[float],
    per_step_updates: bool,
) -> list[Series]:
    """The last step's relative and angular update as the optimizer state implies them, and the
    predicted equilibrium angle, where the optimizer analysis gives them.

    Both are per optimizer step by construction, so they are drawn only on per-step axes.
    """
    if not per_step_updates:
        return []
    out: list[Series] = []
    implied: dict[Panel, Callable[[LayerPoint], float | None]] = {
        Panel.RELATIVE_UPDATE: lambda p: p.implied_relative_update,
        Panel.ANGULAR_UPDATE: lambda p: _degrees(p.implied_angle),
    }
    for panel, value in implied.items():
        x, y = _aggregate(layers, xs, value, _mean)
        out.append(Series(panel, run, AGGREGATE, SeriesRole.IMPLIED, tuple(x), tuple(y)))

    # per checkpoint, so that the prediction follows the lr schedule
    def predicted(p: LayerPoint) -> float | None:
        return _degrees(p.equilibrium_angle)

    x, y = _aggregate(layers, xs, predicted, _mean)
    everyone = (tuple(x), tuple(y))
    out.append(Series(Panel.ANGULAR_UPDATE, run, AGGREGATE, SeriesRole.PREDICTED, *everyone))
    for shade, layer in enumerate(chosen, start=1):
        x, y = _curve(layer, xs, predicted)
        if (tuple(x), tuple(y)) != everyone:  # a layer in another group (lr, decay) than the rest
            out.append(
                Series(
                    Panel.ANGULAR_UPDATE,
                    run,
                    layer.name,
                    SeriesRole.PREDICTED,
                    tuple(x),
                    tuple(y),
                    shade,
                )
            )
    return out


def _degrees(radians: float | None) -> float | None:
    return math.degrees(radians) if radians is not None else None


def _gamma_series(
    run: int, gammas: Sequence[LayerDynamics], chosen: Sequence[LayerDynamics], xs: Sequence[float]
) -> list[Series]:
    if not gammas:
        return []
    x, y = _aggregate(
        gammas, xs, lambda p: p.norm, lambda v: math.sqrt(math.fsum(n * n for n in v))
    )
    out = [Series(Panel.GAMMA_NORM, run, AGGREGATE, SeriesRole.MEASURED, tuple(x), tuple(y))]
    for shade, layer in enumerate(chosen, start=1):
        x, y = _curve(layer, xs, lambda p: p.norm)
        out.append(
            Series(
                Panel.GAMMA_NORM, run, layer.name, SeriesRole.MEASURED, tuple(x), tuple(y), shade
            )
        )
    return out


def _describe(run: RunDynamics, invariant: Sequence[LayerDynamics]) -> str:
    parts = [
        run.optimizer_family.value if run.optimizer_family is not None else "optimizer unknown"
    ]
    lrs = sorted({lr for info in run.checkpoints for lr in info.lrs})
    if lrs:
        parts.append("lr " + (_g(lrs[0]) if len(lrs) == 1 else f"{_g(lrs[0])}–{_g(lrs[-1])}"))
    decays = sorted(
        {
            layer.points[-1].weight_decay
            for layer in invariant
            if layer.points[-1].weight_decay is not None
        }
    )
    if decays:
        parts.append("wd " + "/".join(_g(d) for d in decays) + " on scale-invariant weights")
    count = len(run.checkpoints)
    parts.append(f"{count} checkpoint{'s' if count != 1 else ''}")
    return ", ".join(parts)


def _g(value: float) -> str:
    return format(value, ".3g")


# ---------------------------------------------------------------------------------------------
# Drawing (matplotlib, imported lazily)


def require_matplotlib() -> None:
    """Fail early, with the install command, when the optional extra is missing."""
    try:
        import matplotlib
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise UsageError(
            f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None


_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def build_figure(
    runs: Sequence[RunDynamics], labels: Sequence[str], options: PlotOptions | None = None
) -> Figure:
    """The report figure for one or several runs (one colour per run)."""
    return draw(plot_data(runs, labels, options))


def draw(data: PlotData) -> Figure:
    require_matplotlib()
    import matplotlib as mpl
    from matplotlib.figure import Figure

    with mpl.rc_context(
        {
            "font.size": 10.5,
            "axes.titlesize": 12,
            "axes.titleweight": "bold",
            "axes.labelsize": 10.5,
            "legend.fontsize": 9.5,
            "legend.title_fontsize": 10,
            "xtick.labelsize": 9.5,
            "ytick.labelsize": 9.5,
        }
    ):
        figure = Figure(figsize=(13.5, 13.0), layout="constrained")
        grid = figure.add_gridspec(3, 2)
        first = figure.add_subplot(grid[0, 0])
        axes = {
            Panel.WEIGHT_NORM: first,
            Panel.RELATIVE_UPDATE: figure.add_subplot(grid[0, 1], sharex=first),
            Panel.ANGULAR_UPDATE: figure.add_subplot(grid[1, 0], sharex=first),
            Panel.EFFECTIVE_LR: figure.add_subplot(grid[1, 1], sharex=first),
            Panel.GAMMA_NORM: figure.add_subplot(grid[2, 0], sharex=first),
        }
        axes[Panel.NOMINAL_LR] = axes[Panel.EFFECTIVE_LR].twinx()
        legend_axes = figure.add_subplot(grid[2, 1])
        colours = _run_colours(len(data.runs))
        for series in data.series:
            _draw_series(axes[series.panel], series, colours[series.run])
        _label_axes(axes, data)
        _draw_legends(figure, axes, legend_axes, data, colours)
        figure.suptitle(
            _literal(data.options.title) if data.options.title else _default_title(data),
            fontsize=14,
            fontweight="bold",
        )
    return figure


def _run_colours(count: int) -> list[tuple[float, float, float]]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return [tuple(palette(i % 10)[:3]) for i in range(count)]  # type: ignore[misc]


def _shade(colour: tuple[float, float, float], shade: int) -> tuple[float, float, float]:
    """Single layers in lighter tints of their run's colour, the aggregate in the full colour."""
    if shade == 0:
        return colour
    mix = min(0.65, 0.18 + 0.12 * (shade - 1))
    r, g, b = colour
    return (r + (1 - r) * mix, g + (1 - g) * mix, b + (1 - b) * mix)


def _draw_series(ax: Axes, series: Series, colour: tuple[float, float, float]) -> None:
    aggregate = series.layer == AGGREGATE
    style: dict[str, Any] = {"color": _shade(colour, series.shade), "gid": series.key}
    if series.role is SeriesRole.PREDICTED:
        style.update(linestyle=(0, (6, 3)), linewidth=1.6 if aggregate else 1.0, alpha=0.9)
    elif series.role is SeriesRole.IMPLIED:
        style.update(linestyle=(0, (1, 1.5)), linewidth=2.0, marker=".", markersize=5)
    elif series.panel is Panel.NOMINAL_LR:
        style.update(linestyle=":", linewidth=1.8)
    elif aggregate:
        style.update(linewidth=2.6, zorder=3)
    else:
        style.update(
            linewidth=1.1,
            marker=_MARKERS[(series.shade - 1) % len(_MARKERS)],
            markersize=3.5,
            markevery=max(1, len(series.x) // 25),
        )
    ax.plot(series.x, series.y, label=f"_{series.key}", **style)


def _label_axes(axes: dict[Panel, Axes], data: PlotData) -> None:
    per = "per step" if data.per_step else "per checkpoint interval"
    estimate = " (interval value / √k)" if data.per_step else ""
    squares = data.options.sum_of_squares
    # lr/|w|^2 for SGD, lr/|w| for normalized updates (Adam family, Lion): THEORY.md section 2
    exponent = {frozenset({1}): "", frozenset({2}): "²"}.get(data.lr_power, "^p")
    which = "" if exponent != "^p" else ", p = 2 SGD, 1 Adam"
    texts = {
        Panel.WEIGHT_NORM: (
            "Scale-invariant weights: " + ("sum of squares" if squares else "norm"),
            "Σ ‖w‖² (total, per layer ‖w‖²)" if squares else "‖w‖ (total √Σ‖w‖², per layer ‖w‖)",
        ),
        Panel.RELATIVE_UPDATE: (
            f"Relative update {per}",
            f"‖Δw‖ / ‖w‖ {per}{estimate}",
        ),
        Panel.ANGULAR_UPDATE: (
            f"Angular update {per}",
            f"angle (degrees) {per}{estimate}",
        ),
        Panel.EFFECTIVE_LR: (
            "Effective learning rate (solid) and nominal lr (dotted)"
            if data.effective_lr is EffectiveLrMeasure.LR
            else "Effective-LR change from the norm alone",
            f"η / ‖w‖{exponent}  (per-row layers: RMS row norm{which})"
            if data.effective_lr is EffectiveLrMeasure.LR
            else f"(‖w₀‖ / ‖w‖){exponent}: effective LR ÷ its first value{which}",
        ),
        Panel.GAMMA_NORM: (
            "Normalization gammas: norm",
            "‖γ‖ (total √Σ‖γ‖², per layer ‖γ‖)",
        ),
    }
    from matplotlib.ticker import MaxNLocator

    for panel, (title, ylabel) in texts.items():
        ax = axes[panel]
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.set_title(title, loc="left")
        ax.set_ylabel(ylabel)
        ax.set_xlabel(data.x_axis.value)
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.set_gid(panel.value)
        if data.options.log_scale:
            ax.set_yscale("log")
    nominal = axes[Panel.NOMINAL_LR]
    nominal.set_ylabel("nominal lr η (optimizer state)")
    nominal.set_gid(Panel.NOMINAL_LR.value)
    if data.options.log_scale:
        nominal.set_yscale("log")
    else:
        nominal.set_ylim(bottom=0)
    if not nominal.lines:
        nominal.set_yticks([])
        nominal.set_ylabel("")
    for panel in (Panel.WEIGHT_NORM, Panel.GAMMA_NORM):
        if not data.options.log_scale:
            axes[panel].set_ylim(bottom=0)
    if data.options.log_scale:
        _plain_log_labels(axes.values())


def _plain_log_labels(axes: Iterable[Axes]) -> None:
    """Log axes labelled 0.02, 0.5, 3 rather than 2x10^-2: easier to read off, and no mathtext
    superscripts crowding each other. Which ticks get a label stays matplotlib's choice."""
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainLogFormatter(LogFormatterSciNotation):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    for ax in axes:
        if ax.get_yscale() == "log":
            ax.yaxis.set_major_formatter(PlainLogFormatter())
            ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def _draw_legends(
    figure: Figure,
    axes: dict[Panel, Axes],
    legend_axes: Axes,
    data: PlotData,
    colours: Sequence[tuple[float, float, float]],
) -> None:
    """All legends in the sixth cell, so that none hides a curve: the runs, the layers of each
    kind (by marker), the line styles, and what each run was. Laid out after measuring them."""
    from matplotlib.lines import Line2D

    legend_axes.set_axis_off()
    legend_axes.set_gid("legend")
    grey = (0.35, 0.35, 0.35)
    runs = [
        Line2D(
            [],
            [],
            color=colours[i],
            linewidth=2.6,
            label=_literal(run.label)
            + "\n"
            + textwrap.fill(
                run.description,
                width=42,
                initial_indent="  ",
                subsequent_indent="  ",
                break_on_hyphens=False,
            ),
        )
        for i, run in enumerate(data.runs)
    ]
    key = [
        Line2D([], [], color=grey, linewidth=2.6, label="thick: all layers (total or mean)"),
        Line2D(
            [], [], color=grey, linewidth=1.1, marker="o", markersize=4, label="thin: one layer"
        ),
    ]
    roles = {s.role for s in data.series}
    if SeriesRole.PREDICTED in roles:
        key.append(Line2D([], [], color=grey, linestyle=(0, (6, 3)), label="predicted equilibrium"))
    if SeriesRole.IMPLIED in roles:
        key.append(
            Line2D(
                [],
                [],
                color=grey,
                linestyle=(0, (1, 1.5)),
                marker=".",
                label="last step, implied by\nthe optimizer state",
            )
        )
    if axes[Panel.NOMINAL_LR].lines:
        key.append(Line2D([], [], color=grey, linestyle=":", label="nominal lr (right axis)"))
    sections = [
        (runs, "runs"),
        (_layer_handles(Line2D, data, Panel.WEIGHT_NORM, colours), "scale-invariant weights"),
        (_layer_handles(Line2D, data, Panel.GAMMA_NORM, colours), "normalization gammas"),
        (key, "line styles"),
    ]
    for size in (9.5, 8.5, 7.5, 6.5):
        blocks = [
            legend_axes.legend(
                handles=handles,
                title=title,
                loc="upper left",
                frameon=False,
                alignment="left",
                borderaxespad=0.0,
                borderpad=0.0,
                fontsize=size,
                title_fontsize=size + 0.5,
            )
            for handles, title in sections
            if handles
        ]
        for block in blocks:
            legend_axes.add_artist(block)
        if _flow(figure, legend_axes, blocks) or size == 6.5:
            break
        for block in blocks:  # too many entries for the cell: try a smaller font
            block.remove()


def _layer_handles(
    line_class: Any, data: PlotData, panel: Panel, colours: Sequence[tuple[float, float, float]]
) -> list[Any]:
    """Legend entries of the single-layer curves: once, in grey, when every run draws the same
    layers (the marker names the layer, the colour the run); per run otherwise."""
    per_run: dict[int, list[Series]] = {}
    for series in data.series:
        if series.panel is panel and series.layer != AGGREGATE:
            per_run.setdefault(series.run, []).append(series)
    if not per_run:
        return []
    names = {tuple(s.layer for s in group) for group in per_run.values()}
    if len(names) == 1:
        return [
            _layer_handle(line_class, s, (0.35, 0.35, 0.35)) for s in next(iter(per_run.values()))
        ]
    return [
        _layer_handle(line_class, s, colours[run]) for run, group in per_run.items() for s in group
    ]


def _flow(figure: Figure, legend_axes: Axes, blocks: Sequence[Any]) -> bool:
    """Stack the legends top to bottom, starting a new column where the cell's height runs out;
    False when they do not fit in the cell.

    Positions come from the legends' measured sizes (in points, so independent of where they
    sit); the legends are kept out of the layout engine so the cell does not move under them.
    """
    for block in blocks:
        block.set_in_layout(False)
    figure.draw_without_rendering()
    to_axes = legend_axes.transAxes.inverted()
    gap = 0.05
    x, y, column_width = 0.0, 1.0, 0.0
    fits = True
    for block in blocks:
        extent = block.get_window_extent()
        (x0, y0), (x1, y1) = to_axes.transform([[extent.x0, extent.y0], [extent.x1, extent.y1]])
        width, height = x1 - x0, y1 - y0
        if y - height < 0 and y < 1.0:
            x, y, column_width = x + column_width + gap, 1.0, 0.0
        block.set_bbox_to_anchor((x, y), transform=legend_axes.transAxes)
        fits = fits and y - height >= -0.02 and x + width <= 1.02
        y -= height + gap
        column_width = max(column_width, width)
    return fits


def _layer_handle(line_class: Any, series: Series, colour: tuple[float, float, float]) -> Any:
    return line_class(
        [],
        [],
        color=_shade(colour, series.shade),
        linewidth=1.1,
        marker=_MARKERS[(series.shade - 1) % len(_MARKERS)],
        markersize=4,
        label=_literal(series.layer),
    )


def _literal(text: str) -> str:
    """User text shown as typed: a `$` in a folder name must not start matplotlib's mathtext."""
    return text.replace("$", r"\$")


def _default_title(data: PlotData) -> str:
    names = " vs ".join(_literal(run.label) for run in data.runs)
    return f"Weight decay and scale-invariant weights: {names}"


# ---------------------------------------------------------------------------------------------
# Writing


def output_folder(path: Path) -> Path:
    """The folder the image goes to; it must exist (bnwd creates no folders)."""
    folder = path.parent if str(path.parent) else Path()
    if not folder.is_dir():
        raise UsageError(f"--output {path}: folder {folder} does not exist")
    return folder


def write_figure(figure: Figure, path: Path, fmt: PlotFormat, *, dpi: int = 150) -> None:
    """Save through a temporary file in the same folder and a rename: never half an image."""
    folder = output_folder(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            figure.savefig(handle, format=fmt.value, dpi=dpi, metadata=_metadata(fmt))
        # mkstemp creates the file 0600; an image is for sharing, so honour the umask instead
        umask = os.umask(0)
        os.umask(umask)
        Path(tmp).chmod(0o666 & ~umask)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _metadata(fmt: PlotFormat) -> dict[str, Any]:
    """Name the tool; drop creation dates so the same run gives the same file."""
    software = f"bnwd {__version__}"
    if fmt is PlotFormat.PNG:
        return {"Software": software}
    if fmt is PlotFormat.SVG:
        return {"Creator": software, "Date": None}
    return {"Creator": software, "CreationDate": None}
