"""Rendering `bnwd inspect` results: Rich table, tidy CSV, JSON, Markdown."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from bnwd_cli._version import __version__
from bnwd_cli.graph.classes import ParamKind
from bnwd_cli.metrics.dynamics import (
    CheckpointInfo,
    LayerDynamics,
    LayerPoint,
    LayerRenderer,
    RunDynamics,
    layers_by_kind,
)
from bnwd_cli.render.audit import (
    audit_markdown,
    audit_table,
    equilibrium_markdown,
    equilibrium_table,
)
from bnwd_cli.render.console import rendered_text, text_console
from bnwd_cli.render.output import SCHEMA_VERSION, OutputFormat
from bnwd_cli.render.serialize import (
    Lazy,
    Raw,
    RecordEncoder,
    item_text,
    iter_dumps,
    rows,
    to_data,
)

if TYPE_CHECKING:  # Rich is imported where a table is drawn (render.console)
    from rich.table import Table
    from rich.text import Text

SPARK = "▁▂▃▄▅▆▇█"
KIND_TITLES = {
    ParamKind.SCALE_INVARIANT: "Scale-invariant weights (decay only sets their effective LR)",
    ParamKind.NORM_AFFINE: "Normalization gamma/beta",
    ParamKind.DEAD_BIAS: "Dead biases (removed by the following BatchNorm)",
    ParamKind.SCALE_SENSITIVE: "Scale-sensitive parameters (decay is ordinary L2)",
}


def sparkline(values: Sequence[float], width: int = 12) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return ""
    if len(values) > width:  # sample evenly, always keeping the last point
        values = [values[round(i * (len(values) - 1) / (width - 1))] for i in range(width)]
    lo, hi = min(finite), max(finite)
    span = hi - lo
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append("!")
        elif span <= 1e-12 * max(abs(hi), 1e-300):
            out.append(SPARK[3])
        else:
            out.append(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))])
    return "".join(out)


def fmt(value: float | None, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return format(value, spec)


def fmt_ratio(value: float | None) -> str:
    """A ratio such as growth; undefined ratios (a norm that started at 0) show as a dash."""
    if value is None or math.isnan(value):
        return "–"
    return f"×{fmt(value, '.2f')}" if math.isfinite(value) else fmt(value)


def degrees(radians: float | None) -> str:
    return "–" if radians is None else f"{fmt(math.degrees(radians), '.3g')}°"


def _notes(layer: LayerDynamics) -> str:
    c = layer.classification
    parts: list[str] = []
    if c.kind is ParamKind.SCALE_INVARIANT:
        parts.append(c.granularity.value)
    last = layer.points[-1]
    if last.weight_decay is not None:
        parts.append(f"wd {fmt(last.weight_decay)}")
    if any(p.nonfinite for p in layer.points):
        parts.append("NaN/Inf!")
    if last.row_norm_cv is not None:
        parts.append(f"row-norm cv {fmt(last.row_norm_cv, '.2f')}")
    return ", ".join(parts)


def render_table(
    report: RunDynamics, *, per_checkpoint: bool = False, width: int | None = None
) -> str:
    console = text_console(width or 140)
    console.print(_header(report), highlight=False)
    for kind, layers in layers_by_kind(report.layers).items():
        if not layers:
            continue
        if per_checkpoint:
            for layer in layers:
                console.print(_checkpoint_table(report, layer))
        else:
            console.print(_summary_table(KIND_TITLES[kind], kind, layers))
    for extra in (equilibrium_table(report), audit_table(report.audit)):
        if extra is not None:
            console.print(extra)
            console.print()
    return rendered_text(console)


def _header(report: RunDynamics) -> Text:
    from rich.text import Text

    run = report.run
    steps = [c.step for c in report.checkpoints if c.step is not None]
    span = f", steps {steps[0]}–{steps[-1]}" if len(steps) >= 2 else ""
    formats = sorted({c.format for c in report.checkpoints})
    family = report.optimizer_family.value if report.optimizer_family else "no optimizer state"
    mappings = [c.name_mapping for c in report.checkpoints if c.name_mapping is not None]
    if mappings:
        family += f" (names: {mappings[-1].value})"
    lrs = sorted({lr for c in report.checkpoints for lr in c.lrs})
    lr_text = (
        f", lr {fmt(lrs[0])}"
        if len(lrs) == 1
        else (f", lr {fmt(lrs[0])}…{fmt(lrs[-1])}" if lrs else "")
    )
    return Text(
        f"{run.root}: {len(report.checkpoints)} checkpoints{span} ({', '.join(formats)}), "
        f"ordered by {run.order_source.value}\n"
        f"optimizer: {family}{lr_text}; layers classified by {report.classification_method.value}"
    )


def _summary_table(title: str, kind: ParamKind, layers: Sequence[LayerDynamics]) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", overflow="fold")
    table.add_column("shape")
    table.add_column("norm first→last", justify="right")
    table.add_column("trend")
    table.add_column("growth", justify="right")
    table.add_column("last rel. step", justify="right")
    table.add_column("last angle", justify="right")
    if kind is ParamKind.SCALE_INVARIANT:
        table.add_column("eff. LR change", justify="right")
    table.add_column("notes", overflow="fold")
    for layer in layers:
        s = layer.summary
        row = [
            layer.name,
            "×".join(map(str, layer.shape)),
            f"{fmt(s.norm_first)} → {fmt(s.norm_last)}",
            sparkline([p.norm for p in layer.points]),
            fmt_ratio(s.norm_growth),
            fmt(s.relative_step_last),
            degrees(s.angular_update_last),
        ]
        if kind is ParamKind.SCALE_INVARIANT:
            row.append(fmt_ratio(s.effective_lr_change))
        row.append(_notes(layer))
        table.add_row(*row)
    return table


def _checkpoint_table(report: RunDynamics, layer: LayerDynamics) -> Table:
    from rich import box
    from rich.table import Table

    title = f"{layer.name} ({layer.classification.kind.value}, {'×'.join(map(str, layer.shape))})"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in (
        "checkpoint",
        "step",
        "norm",
        "Δsteps",
        "rel. step",
        "angle",
        "lr",
        "wd",
        "eff. LR",
        "LR factor",
        "step angle",
        "equil. angle",
    ):
        table.add_column(name, justify="left" if name == "checkpoint" else "right")
    for p in layer.points:
        table.add_row(
            report.checkpoints[p.checkpoint].label,
            fmt(p.step, "d") if p.step is not None else "–",
            fmt(p.norm, ".4g"),
            str(p.steps_between) if p.steps_between is not None else "–",
            fmt(p.relative_step),
            degrees(p.angular_update),
            fmt(p.lr),
            fmt(p.weight_decay),
            fmt(p.effective_lr),
            fmt(p.lr_factor),
            degrees(p.implied_angle),
            degrees(p.equilibrium_angle),
        )
    return table


CSV_COLUMNS = (
    "checkpoint",
    "label",
    "step",
    "epoch",
    "layer",
    "kind",
    "granularity",
    "shape",
    "norm",
    "row_norm_min",
    "row_norm_max",
    "row_norm_cv",
    "steps_between",
    "relative_step",
    "angular_update_rad",
    "lr",
    "weight_decay",
    "effective_lr",
    "lr_factor",
    "nonfinite",
    "implied_relative_update",
    "implied_angle_rad",
    "implied_exact",
    "optimizer_step",
    "equilibrium_angle_rad",
    "optimizer_group",
    "momentum",
    "beta1",
    "beta2",
    "eps",
)


def render_csv_pieces(report: RunDynamics) -> Iterator[str]:
    """Tidy CSV, one row per checkpoint x layer, a layer at a time."""
    import csv  # (here: only CSV needs it)

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(CSV_COLUMNS)
    yield buffer.getvalue()
    for layer, text in zip(report.layers, _made_ahead(report, csv_layer_text), strict=True):
        yield text if text is not None else csv_layer_text(layer, report.checkpoints)


def _made_ahead(report: RunDynamics, renderer: LayerRenderer) -> Sequence[str | None]:
    """Per layer, its text by `renderer` where the process that analyzed it made it, else None
    (`analyze_run(render_layer=)`)."""
    texts = report.prerendered.of(renderer) if report.prerendered is not None else None
    return texts if texts is not None else (None,) * len(report.layers)


def csv_layer_text(layer: LayerDynamics, checkpoints: Sequence[CheckpointInfo]) -> str:
    """The CSV rows of one layer (`render_csv_pieces`)."""
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for p in layer.points:
        info = checkpoints[p.checkpoint]
        writer.writerow(
            [
                p.checkpoint,
                info.label,
                _cell(info.step),
                _cell(info.epoch),
                layer.name,
                layer.classification.kind.value,
                layer.classification.granularity.value,
                "x".join(map(str, layer.shape)),
                _cell(p.norm),
                _cell(p.row_norm_min),
                _cell(p.row_norm_max),
                _cell(p.row_norm_cv),
                _cell(p.steps_between),
                _cell(p.relative_step),
                _cell(p.angular_update),
                _cell(p.lr),
                _cell(p.weight_decay),
                _cell(p.effective_lr),
                _cell(p.lr_factor),
                p.nonfinite,
                _cell(p.implied_relative_update),
                _cell(p.implied_angle),
                "" if p.implied_exact is None else str(p.implied_exact).lower(),
                _cell(p.optimizer_step),
                _cell(p.equilibrium_angle),
                _cell(p.optimizer_group),
                _cell(p.momentum),
                _cell(p.betas[0] if p.betas else None),
                _cell(p.betas[1] if p.betas else None),
                _cell(p.eps),
            ]
        )
    return buffer.getvalue()


def _cell(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else str(value))
    return str(value)


def report_document(report: RunDynamics) -> dict[str, object]:
    """The JSON document of a report, as plain data."""
    return _document(report, [_layer_document(layer) for layer in report.layers])


def _layer_document(layer: LayerDynamics, points: object = None) -> dict[str, object]:
    return {
        "name": layer.name,
        "shape": list(layer.shape),
        "classification": to_data(layer.classification),
        "summary": to_data(layer.summary),
        "points": to_data(layer.points) if points is None else points,
        "equilibrium": to_data(layer.equilibrium),
    }


def _document(report: RunDynamics, layers: object) -> dict[str, object]:
    run = report.run
    return {
        "schema_version": SCHEMA_VERSION,
        "bnwd_version": __version__,
        "run": {
            "root": str(run.root),
            "order_source": run.order_source.value,
            "checkpoints": to_data(report.checkpoints),
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in run.skipped],
            "problems": [{"path": str(p.path), "message": p.message} for p in run.problems],
        },
        "optimizer_family": to_data(report.optimizer_family),
        "classification_method": report.classification_method.value,
        "layers": layers,
        "audit": to_data(report.audit),
        "warnings": list(report.warnings),
        "notes": list(report.notes),
    }


def render_json_pieces(report: RunDynamics) -> Iterator[str]:
    """The JSON of `report_document`, a layer at a time (`iter_dumps`): a long run's report is
    never held as one document or one text."""
    items = (
        Raw(text if text is not None else json_layer_text(layer, report.checkpoints))
        for layer, text in zip(report.layers, _made_ahead(report, json_layer_text), strict=True)
    )
    return iter_dumps(_document(report, Lazy(items)))


_POINT_JSON = RecordEncoder(LayerPoint)


def json_layer_text(layer: LayerDynamics, checkpoints: Sequence[CheckpointInfo]) -> str:
    """A layer's object in the JSON of `render_json_pieces` (`item_text` of its
    `report_document` part)."""
    points = rows([_POINT_JSON(point) for point in layer.points])
    return item_text(_layer_document(layer, points))


def render_markdown(report: RunDynamics) -> str:
    lines = [
        f"### bnwd inspect: {report.run.root}",
        "",
        _header(report).plain.replace("\n", "  \n"),
        "",
    ]
    for kind, layers in layers_by_kind(report.layers).items():
        if not layers:
            continue
        lines += [f"**{KIND_TITLES[kind]}**", ""]
        lines.append(
            "| layer | shape | norm first → last | growth | last rel. step | last angle "
            "| eff. LR change | notes |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---|")
        for layer in layers:
            s = layer.summary
            lines.append(
                f"| `{layer.name}` | {'×'.join(map(str, layer.shape))} | {fmt(s.norm_first)} → "
                f"{fmt(s.norm_last)} | {fmt_ratio(s.norm_growth)} | {fmt(s.relative_step_last)} | "
                f"{degrees(s.angular_update_last)} | {fmt_ratio(s.effective_lr_change)} "
                f"| {_notes(layer)} |"
            )
        lines.append("")
    lines += equilibrium_markdown(report)
    lines += audit_markdown(report.audit)
    return "\n".join(lines)


def layer_renderer(fmt_: OutputFormat) -> LayerRenderer | None:
    """What renders one layer of a report in `fmt_`, where the format has such a part, for
    `analyze_run(render_layer=)`: the processes that share a run then share its rendering."""
    return {OutputFormat.CSV: csv_layer_text, OutputFormat.JSON: json_layer_text}.get(fmt_)


def render_pieces(
    report: RunDynamics, fmt_: OutputFormat, *, per_checkpoint: bool = False
) -> Iterator[str]:
    """The report in `fmt_`, in pieces: CSV and JSON (a row or a point per layer per
    checkpoint) a layer at a time, the tables whole."""
    if fmt_ is OutputFormat.CSV:
        return render_csv_pieces(report)
    if fmt_ is OutputFormat.JSON:
        return render_json_pieces(report)
    if fmt_ is OutputFormat.MARKDOWN:
        return iter((render_markdown(report),))
    return iter((render_table(report, per_checkpoint=per_checkpoint),))
