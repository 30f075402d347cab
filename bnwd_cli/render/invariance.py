"""Rendering `bnwd verify-invariance` results: table, JSON, CSV, Markdown."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

from rich import box
from rich.table import Table

from bnwd_cli._version import __version__
from bnwd_cli.graph.classes import Granularity, ParamClassification, ParamKind
from bnwd_cli.graph.verify import (
    EPS_SHRINK,
    Agreement,
    InvarianceReport,
    NumericResult,
    NumericVerdict,
    ParamVerification,
)
from bnwd_cli.render.console import rendered_text, text_console
from bnwd_cli.render.output import SCHEMA_VERSION, OutputFormat
from bnwd_cli.render.serialize import dumps


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.1e}"


def granularity_text(p: ParamClassification) -> str:
    if p.kind is not ParamKind.SCALE_INVARIANT:
        return "-"
    if p.granularity is Granularity.JOINT:
        return f"joint #{p.joint_group}"
    if p.granularity is Granularity.PER_GROUP and p.groups:
        return f"per-group ({p.groups})"
    return p.granularity.value


def norms_text(p: ParamClassification, limit: int = 2) -> str:
    names = list(p.norm_layers)
    if not names:
        return "-"
    shown = ", ".join(names[:limit])
    return shown + (f" +{len(names) - limit}" if len(names) > limit else "")


def evidence_text(n: NumericResult) -> str:
    """The numbers that decided the numeric verdict, shortest first."""
    v = n.verdict
    if v is NumericVerdict.NO_EVIDENCE:
        return "gradient 0: no effect"
    if v is NumericVerdict.DEAD:
        return f"output {_num(n.output_error)}, |grad| 0"
    if v is NumericVerdict.HAS_EFFECT:
        return f"output {_num(n.output_error)}, influence {_num(n.influence)}"
    if v is NumericVerdict.NOT_CHECKED:
        return "-"
    parts = []
    if n.output_error is not None:
        parts.append(f"output {_num(n.output_error)}")
    if n.row_euler_max is not None:
        parts.append(f"row cos {_num(n.row_euler_max)}")
    elif n.euler_cos is not None:
        parts.append(f"cos {_num(abs(n.euler_cos))}")
    if v is NumericVerdict.EPS_LIMITED:
        at_eps = n.row_euler_max_model_eps if n.row_euler_max is not None else n.euler_cos_model_eps
        parts = [
            f"at model eps: output {_num(n.output_error_model_eps)}, cos {_num(abs(at_eps or 0))}"
        ]
    return ", ".join(parts) or "-"


def _summary(report: InvarianceReport) -> str:
    counts = {a: report.count(a) for a in Agreement}
    tally = (
        f"{counts[Agreement.AGREE]} agree, {counts[Agreement.DISAGREE]} disagree, "
        f"{counts[Agreement.NO_EVIDENCE]} no evidence, {counts[Agreement.NOT_APPLICABLE]} n/a"
    )
    if report.agrees:
        return f"RESULT: graph and numbers agree ({tally})"
    return f"RESULT: graph and numbers DISAGREE on {', '.join(report.disagreements)} ({tally})"


def _header_lines(report: InvarianceReport) -> list[str]:
    tol = report.tolerances
    lines = []
    if report.model:
        lines.append(f"model: {report.model}; input {report.input}")
    elif report.input:
        lines.append(f"input {report.input}")
    lines.append(
        f"graph: {report.classification.method.value}; numbers: {tol.dtype} on {report.device}, "
        f"train mode, RNG reset per pass, eps shrunk 1e{round(-math.log10(EPS_SHRINK))}-fold for "
        "the strict check; "
        f"{report.forward_passes} forward + {report.backward_passes} backward passes"
    )
    lines.append(
        f"tolerances: output {tol.output:.0e}, cos {tol.euler:.0e}, grad scaling "
        f"{tol.grad_scaling:.0e}; eps-limited above output {tol.eps_output:.0e} or row cos "
        f"{tol.eps_euler:.0e} at the model's eps; no evidence below influence {tol.no_effect:.0e}"
    )
    return lines


def _notes(report: InvarianceReport) -> list[str]:
    notes = list(report.classification.notes) + list(report.notes)
    for v in report.params:
        worth_saying = (
            v.agreement is not Agreement.AGREE or v.numeric.verdict is NumericVerdict.INVARIANT
        )
        if v.numeric.note and worth_saying:
            notes.append(f"{v.classification.name}: {v.numeric.note}")
    return notes


def render_table(report: InvarianceReport, width: int | None = None) -> str:
    console = text_console(width or 150)
    for line in _header_lines(report):
        console.print(line, highlight=False, soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column, justify in (
        ("parameter", "left"),
        ("shape", "left"),
        ("structure", "left"),
        ("granularity", "left"),
        ("norm", "left"),
        ("numeric", "left"),
        ("evidence", "left"),
        ("agreement", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for v in report.params:
        p = v.classification
        table.add_row(
            p.name,
            "×".join(map(str, p.shape)) or "scalar",
            p.kind.value,
            granularity_text(p),
            norms_text(p),
            v.numeric.verdict.value,
            evidence_text(v.numeric),
            v.agreement.value,
        )
    console.print(table)
    if report.joint_groups:
        groups = Table(
            title="Joint groups", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False
        )
        for column in ("group", "members", "numeric", "output", "agreement"):
            groups.add_column(column, overflow="fold")
        for g in report.joint_groups:
            groups.add_row(
                f"#{g.group}", ", ".join(g.members), g.verdict.value, _num(g.output_error),
                g.agreement.value,
            )  # fmt: skip
        console.print(groups)
    for note in _notes(report):
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    console.print(_summary(report), highlight=False, soft_wrap=True)
    return rendered_text(console)


def _record(v: ParamVerification, method: str) -> dict[str, object]:
    p, n = v.classification, v.numeric
    return {
        "name": p.name,
        "shape": list(p.shape),
        "structural_class": p.kind.value,
        "granularity": p.granularity.value,
        "groups": p.groups,
        "norm_layers": list(p.norm_layers),
        "joint_group": p.joint_group,
        "path": list(p.path),
        "evidence": p.evidence,
        "tracing_method": method,
        "numeric": {
            "verdict": n.verdict.value,
            "output_error": n.output_error,
            "output_batch": n.output_batch,
            "output_error_model_eps": n.output_error_model_eps,
            "euler_cos": n.euler_cos,
            "euler_cos_model_eps": n.euler_cos_model_eps,
            "row_euler_max": n.row_euler_max,
            "row_euler_max_model_eps": n.row_euler_max_model_eps,
            "grad_scaling_error": n.grad_scaling_error,
            "influence": n.influence,
            "rows_without_evidence": n.rows_without_evidence,
            "note": n.note,
        },
        "agreement": v.agreement.value,
    }


def report_document(report: InvarianceReport) -> dict[str, object]:
    tol = report.tolerances
    method = report.classification.method.value
    return {
        "schema_version": SCHEMA_VERSION,
        "bnwd_version": __version__,
        "model": report.model,
        "input": report.input,
        "tracing_method": method,
        "device": report.device,
        "dtype": tol.dtype,
        "seed": report.seed,
        "eps_shrink": EPS_SHRINK,
        "tolerances": {
            "output": tol.output,
            "euler": tol.euler,
            "grad_scaling": tol.grad_scaling,
            "eps_output": tol.eps_output,
            "eps_euler": tol.eps_euler,
            "no_effect": tol.no_effect,
        },
        "passes": {"forward": report.forward_passes, "backward": report.backward_passes},
        "agree": report.agrees,
        "disagreements": list(report.disagreements),
        "summary": {a.value: report.count(a) for a in Agreement},
        "parameters": [_record(v, method) for v in report.params],
        "joint_groups": [
            {
                "id": g.group,
                "members": list(g.members),
                "verdict": g.verdict.value,
                "output_error": g.output_error,
                "agreement": g.agreement.value,
            }
            for g in report.joint_groups
        ],
        "notes": _notes(report),
    }


def render_json(report: InvarianceReport) -> str:
    return dumps(report_document(report))


CSV_COLUMNS: Sequence[str] = (
    "name", "shape", "structural_class", "granularity", "groups", "joint_group", "norm_layers",
    "numeric_verdict", "agreement", "output_error", "output_batch", "output_error_model_eps",
    "euler_cos", "euler_cos_model_eps", "row_euler_max", "row_euler_max_model_eps",
    "grad_scaling_error", "influence", "tracing_method",
)  # fmt: skip


def render_csv(report: InvarianceReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    method = report.classification.method.value
    for v in report.params:
        p, n = v.classification, v.numeric

        def cell(value: object) -> object:
            return "" if value is None else value

        writer.writerow(
            [
                p.name, "x".join(map(str, p.shape)), p.kind.value, p.granularity.value,
                cell(p.groups), cell(p.joint_group), ";".join(p.norm_layers), n.verdict.value,
                v.agreement.value, cell(n.output_error), cell(n.output_batch),
                cell(n.output_error_model_eps), cell(n.euler_cos), cell(n.euler_cos_model_eps),
                cell(n.row_euler_max), cell(n.row_euler_max_model_eps),
                cell(n.grad_scaling_error), cell(n.influence), method,
            ]
        )  # fmt: skip
    return buffer.getvalue()


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: InvarianceReport) -> str:
    icon = "✅" if report.agrees else "❌"
    lines = [f"### {icon} bnwd verify-invariance", ""]
    lines += [_md(line) + "  " for line in _header_lines(report)]
    lines += [
        "",
        "| parameter | shape | structure | granularity | norm | numeric | evidence | agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in report.params:
        p = v.classification
        lines.append(
            f"| `{p.name}` | {'×'.join(map(str, p.shape)) or 'scalar'} | {p.kind.value} | "
            f"{granularity_text(p)} | {_md(norms_text(p))} | {v.numeric.verdict.value} | "
            f"{_md(evidence_text(v.numeric))} | {v.agreement.value} |"
        )
    if report.joint_groups:
        lines += ["", "| joint group | members | numeric | agreement |", "|---|---|---|---|"]
        for g in report.joint_groups:
            members = ", ".join(f"`{m}`" for m in g.members)
            lines.append(f"| #{g.group} | {members} | {g.verdict.value} | {g.agreement.value} |")
    notes = _notes(report)
    if notes:
        lines += [""] + [f"- {_md(note)}" for note in notes]
    lines += ["", f"**{_md(_summary(report))}**", ""]
    return "\n".join(lines)


def render(report: InvarianceReport, fmt: OutputFormat, *, width: int | None = None) -> str:
    if fmt is OutputFormat.JSON:
        return render_json(report)
    if fmt is OutputFormat.CSV:
        return render_csv(report)
    if fmt is OutputFormat.MARKDOWN:
        return render_markdown(report)
    return render_table(report, width=width)
