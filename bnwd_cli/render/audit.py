"""Rendering what the optimizer state says: equilibrium per scale-invariant layer, the
weight-decay audit (for `bnwd inspect`), and the parameter-group plan of `bnwd suggest-groups`."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bnwd_cli.metrics.audit import AuditFinding, AuditSeverity
from bnwd_cli.metrics.dynamics import LayerDynamics, RunDynamics
from bnwd_cli.metrics.equilibrium import EquilibriumStatus
from bnwd_cli.render.console import rendered_text, text_console
from bnwd_cli.render.output import SCHEMA_VERSION, OutputFormat
from bnwd_cli.render.serialize import dumps, to_data

if TYPE_CHECKING:  # Rich is imported where a table is drawn (render.console)
    from rich.table import Table

    from bnwd_cli.groups import ParamGroupSummary

EQUILIBRIUM_TITLE = "Optimizer and equilibrium of scale-invariant weights (per optimizer step)"
AUDIT_TITLE = "Weight-decay audit"


def _fmt(value: float | None, spec: str = ".3g") -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return format(value, spec)


def _deg(radians: float | None) -> str:
    return "–" if radians is None or not math.isfinite(radians) else f"{math.degrees(radians):.3g}°"


def _with_equilibrium(report: RunDynamics) -> list[LayerDynamics]:
    return [layer for layer in report.layers if layer.equilibrium is not None]


def _names(parameters: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(parameters[:limit])
    return shown + (f" (+{len(parameters) - limit} more)" if len(parameters) > limit else "")


def _equilibrium_cells(layer: LayerDynamics) -> list[str]:
    eq = layer.equilibrium
    assert eq is not None
    last = layer.points[-1]
    rate = (
        last.lr * last.weight_decay
        if last.lr is not None and last.weight_decay is not None
        else None
    )
    norm = (
        f"{_fmt(eq.unit_norm)} → {_fmt(eq.predicted_norm)}"
        if eq.predicted_norm
        else _fmt(eq.unit_norm)
    )
    status = eq.status.value
    if eq.status is EquilibriumStatus.NO_EQUILIBRIUM or eq.status is EquilibriumStatus.UNKNOWN:
        status += f" ({eq.explanation})" if eq.explanation else ""
    return [
        layer.name,
        _fmt(last.lr),
        _fmt(last.weight_decay),
        _fmt(rate),
        _deg(eq.measured_angle),
        _deg(eq.prediction.angle),
        f"×{eq.ratio:.2f}" if eq.ratio is not None else "–",
        norm,
        _fmt(eq.prediction.steps_to_equilibrium, ".0f"),
        status,
    ]


EQUILIBRIUM_COLUMNS = (
    "layer",
    "lr",
    "wd",
    "lr·wd",
    "step angle",
    "equil. angle",
    "ratio",
    "unit norm → equil.",
    "τ steps",
    "status",
)


def _sources(layers: Sequence[LayerDynamics]) -> str:
    sources = sorted(
        {
            layer.equilibrium.measured_from
            for layer in layers
            if layer.equilibrium and layer.equilibrium.measured_from
        }
    )
    return " / ".join(sources)


def equilibrium_table(report: RunDynamics) -> Table | None:
    from rich import box
    from rich.table import Table

    layers = _with_equilibrium(report)
    if not layers:
        return None
    source = _sources(layers)
    caption = (
        "step angle: RMS of the last per-step angles, from " + source
        if source
        else "step angle: none measured (needs momentum/Adam state or checkpoints one step apart)"
    )
    table = Table(
        title=EQUILIBRIUM_TITLE,
        title_justify="left",
        caption=caption + "; equil. norm: AdamW's sqrt(lr·C/(2·wd)) (assumes unit-RMS Adam "
        "updates), else the norm at which the measured angle would meet the prediction; τ: "
        "relaxation time of the norm (THEORY.md §3)",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in EQUILIBRIUM_COLUMNS:
        table.add_column(
            column,
            justify="left" if column in ("layer", "status") else "right",
            overflow="fold",
        )
    for layer in layers:
        table.add_row(*_equilibrium_cells(layer))
    return table


def audit_table(findings: Sequence[AuditFinding]) -> Table | None:
    from rich import box
    from rich.table import Table

    if not findings:
        return None
    table = Table(title=AUDIT_TITLE, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("severity")
    table.add_column("finding", overflow="fold", ratio=3)
    table.add_column("parameters", overflow="fold", ratio=2)
    table.add_column("why", overflow="fold", ratio=3)
    for finding in findings:
        table.add_row(
            finding.severity.value,
            f"{finding.title} [{finding.id}]",
            _names(finding.parameters),
            finding.why,
        )
    return table


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def equilibrium_markdown(report: RunDynamics) -> list[str]:
    layers = _with_equilibrium(report)
    if not layers:
        return []
    lines = [f"**{EQUILIBRIUM_TITLE}**", ""]
    lines.append("| " + " | ".join(EQUILIBRIUM_COLUMNS) + " |")
    lines.append("|---|" + "---:|" * (len(EQUILIBRIUM_COLUMNS) - 2) + "---|")
    for layer in layers:
        cells = _equilibrium_cells(layer)
        cells[0] = f"`{cells[0]}`"
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    source = _sources(layers)
    if source:
        lines += ["", f"Step angle: RMS of the last per-step angles, from {source}."]
    lines.append("")
    return lines


def audit_markdown(findings: Sequence[AuditFinding]) -> list[str]:
    if not findings:
        return []
    lines = [f"**{AUDIT_TITLE}**", ""]
    for finding in findings:
        marker = "⚠️" if finding.severity is AuditSeverity.WARNING else "ℹ️"
        lines.append(
            f"- {marker} **{finding.severity.value}** `{finding.id}`: {_md(finding.title)}. "
            f"{_md(finding.why)} Parameters: {', '.join(f'`{p}`' for p in finding.parameters)}"
        )
    lines.append("")
    return lines


# --------------------------------------------------------------------------- suggest-groups


def groups_table(summary: ParamGroupSummary) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(
        title=f"Parameter groups (weight decay {summary.weight_decay:g}, scale-invariant "
        f"weights: {summary.invariant_policy.value}; {summary.classification_method})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in ("parameter", "shape", "kind", "group", "weight_decay", "why"):
        table.add_column(
            column, overflow="fold", justify="right" if column == "weight_decay" else "left"
        )
    decays = {g.role: g.weight_decay for g in summary.groups}
    for p in summary.params:
        table.add_row(
            p.name,
            "×".join(map(str, p.shape)) or "scalar",
            p.kind.value,
            p.role.value,
            f"{decays[p.role]:g}",
            p.reason,
        )
    return table


def _python_list(names: Sequence[str], indent: str = "    ") -> str:
    if not names:
        return "[]"
    body = "".join(f"{indent}{json.dumps(n)},\n" for n in names)
    return "[\n" + body + "]"


def training_snippet(
    summary: ParamGroupSummary,
    *,
    model_call: str = "build_model()",
    example_input: str = "example_input()",
    literal: bool = False,
) -> str:
    """Python for a training script that builds these groups."""
    wd = repr(summary.weight_decay)
    if not literal:
        return (
            "import torch\n"
            "import bnwd_cli\n\n"
            f"model = {model_call}\n"
            f"groups = bnwd_cli.param_groups(\n"
            f"    model, weight_decay={wd}, example_input={example_input},\n"
            f'    invariant_policy="{summary.invariant_policy.value}",\n'
            ")\n"
            "print(groups.summary.describe())\n"
            "optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # or AdamW(groups, lr=...)\n"
        )
    lines = [
        "import torch\n",
        f"# Groups decided by `bnwd suggest-groups` ({summary.classification_method}).",
        f"model = {model_call}",
    ]
    from bnwd_cli.groups import GroupRole  # (here: `inspect` never needs the groups)

    constants = {
        GroupRole.DECAY: "DECAY",
        GroupRole.NO_DECAY: "NO_DECAY",
        GroupRole.SCALE_INVARIANT: "SCALE_INVARIANT",
    }
    for group in summary.groups:
        lines.append(f"{constants[group.role]} = {_python_list(group.param_names)}")
    lines.append("params = dict(model.named_parameters())")
    lines.append("groups = [")
    for group in summary.groups:
        name = constants[group.role]
        lines.append(
            f'    {{"params": [params[n] for n in {name}], "param_names": {name}, '
            f'"weight_decay": {group.weight_decay!r}}},'
        )
    lines.append("]")
    lines.append(
        "optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # or AdamW(groups, lr=...)"
    )
    return "\n".join(lines) + "\n"


def groups_document(summary: ParamGroupSummary, snippet: str) -> dict[str, object]:
    from bnwd_cli._version import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "bnwd_version": __version__,
        "weight_decay": summary.weight_decay,
        "invariant_policy": summary.invariant_policy.value,
        "classification_method": summary.classification_method,
        "groups": to_data(summary.groups),
        "params": to_data(summary.params),
        "notes": list(summary.notes),
        "snippet": snippet,
    }


def groups_markdown(summary: ParamGroupSummary, snippet: str) -> str:
    lines = [
        f"### bnwd suggest-groups (weight decay {summary.weight_decay:g}, scale-invariant "
        f"weights: {summary.invariant_policy.value})",
        "",
        "| group | weight_decay | tensors | values |",
        "|---|---:|---:|---:|",
    ]
    for group in summary.groups:
        lines.append(
            f"| {group.role.value} | {group.weight_decay:g} | {len(group.param_names)} "
            f"| {group.numel:,} |"
        )
    lines += ["", "| parameter | shape | kind | group | why |", "|---|---|---|---|---|"]
    for p in summary.params:
        lines.append(
            f"| `{p.name}` | {'×'.join(map(str, p.shape))} | {p.kind.value} | {p.role.value} "
            f"| {_md(p.reason)} |"
        )
    lines += ["", "```python", snippet.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def render_groups(
    summary: ParamGroupSummary, snippet: str, fmt: OutputFormat, width: int | None = None
) -> str:
    if fmt is OutputFormat.JSON:
        return dumps(groups_document(summary, snippet))
    if fmt is OutputFormat.MARKDOWN:
        return groups_markdown(summary, snippet)
    if fmt is OutputFormat.CSV:
        import csv

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["parameter", "shape", "kind", "group", "weight_decay"])
        decays = {g.role: g.weight_decay for g in summary.groups}
        for p in summary.params:
            writer.writerow(
                [
                    p.name,
                    "x".join(map(str, p.shape)),
                    p.kind.value,
                    p.role.value,
                    repr(decays[p.role]),
                ]
            )
        return buffer.getvalue()
    console = text_console(width or 140)
    console.print(groups_table(summary))
    console.print("# in the training script:", highlight=False)
    console.print(snippet, highlight=False, markup=False, soft_wrap=True)
    return rendered_text(console)
