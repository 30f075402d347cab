"""Rendering `bnwd check` results: table, JSON, Markdown, GitHub annotations, JUnit XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from enum import StrEnum

from rich import box
from rich.table import Table

from bnwd_cli._version import __version__
from bnwd_cli.check import CheckReport, RuleOutcome
from bnwd_cli.render.console import rendered_text, text_console
from bnwd_cli.render.output import SCHEMA_VERSION
from bnwd_cli.render.serialize import dumps, to_data


class CheckFormat(StrEnum):
    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"
    GITHUB = "github"
    JUNIT = "junit"


def _status(report: CheckReport, outcome: RuleOutcome) -> str:
    if outcome.settings is None:
        return "disabled"
    if outcome.fails(report.config.fail_on):
        return "FAIL"
    return "findings" if outcome.findings else "ok"


def _verdict(report: CheckReport) -> str:
    if report.passed:
        return f"PASSED (fail-on {report.config.fail_on.value}; {len(report.findings)} findings)"
    return (
        f"FAILED: {', '.join(o.rule.id for o in report.failed)} "
        f"(fail-on {report.config.fail_on.value})"
    )


def render_table(report: CheckReport, width: int = 120) -> str:
    console = text_console(width)
    console.print(
        f"bnwd check {report.run.run.root}: {len(report.run.checkpoints)} checkpoints, "
        f"{len(report.run.layers)} layers; config: {report.config.source}",
        highlight=False,
    )
    rules = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("rule", "severity", "status", "findings", "why it matters"):
        rules.add_column(column, overflow="fold")
    for outcome in report.outcomes:
        severity = (
            outcome.settings.severity.value if outcome.settings else outcome.rule.severity.value
        )
        rules.add_row(
            outcome.rule.id,
            severity,
            _status(report, outcome),
            str(len(outcome.findings)),
            outcome.rule.reason,
        )
    console.print(rules)
    if report.findings:
        table = Table(title="Findings", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("severity", "rule", "finding"):
            table.add_column(column, overflow="fold")
        for finding in sorted(report.findings, key=lambda f: -f.severity.rank):
            table.add_row(finding.severity.value, finding.rule, finding.message)
        console.print(table)
    console.print(_verdict(report), highlight=False)
    return rendered_text(console)


def render_json(report: CheckReport) -> str:
    return dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "bnwd_version": __version__,
            "run": str(report.run.run.root),
            "checkpoints": len(report.run.checkpoints),
            "passed": report.passed,
            "fail_on": report.config.fail_on.value,
            "config_source": report.config.source,
            "rules": [
                {
                    "id": o.rule.id,
                    "enabled": o.settings is not None,
                    "severity": (o.settings or o.rule).severity.value,
                    "thresholds": dict(o.settings.thresholds)
                    if o.settings
                    else dict(o.rule.thresholds),
                    "reason": o.rule.reason,
                    "status": _status(report, o),
                    "findings": [to_data(f) for f in o.findings],
                }
                for o in report.outcomes
            ],
        }
    )


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: CheckReport) -> str:
    icon = "✅" if report.passed else "❌"
    lines = [
        f"## {icon} bnwd check: {_md(_verdict(report))}",
        "",
        f"Run `{report.run.run.root}`: {len(report.run.checkpoints)} checkpoints, "
        f"{len(report.run.layers)} layers.",
        "",
        "| rule | severity | status | findings | why it matters |",
        "|---|---|---|---:|---|",
    ]
    for o in report.outcomes:
        severity = (o.settings or o.rule).severity.value
        lines.append(
            f"| `{o.rule.id}` | {severity} | {_status(report, o)} | {len(o.findings)} | {_md(o.rule.reason)} |"
        )
    if report.findings:
        lines += ["", "| severity | rule | finding |", "|---|---|---|"]
        for f in sorted(report.findings, key=lambda f: -f.severity.rank):
            lines.append(f"| {f.severity.value} | `{f.rule}` | {_md(f.message)} |")
    return "\n".join(lines) + "\n"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def render_github(report: CheckReport) -> str:
    """GitHub Actions workflow commands: one annotation per finding."""
    level = {"error": "error", "warning": "warning", "info": "notice"}
    lines = []
    for f in report.findings:
        title = _escape_property(f"bnwd {f.rule}")
        file = f",file={_escape_property(str(report.run.run.root))}"
        lines.append(f"::{level[f.severity.value]} title={title}{file}::{_escape_data(f.message)}")
    lines.append(
        f"::{'notice' if report.passed else 'error'} title=bnwd check::{_escape_data(_verdict(report))}"
    )
    return "\n".join(lines) + "\n"


def render_junit(report: CheckReport) -> str:
    """JUnit XML: one test case per rule; a rule whose findings reach fail-on is a failure."""
    suite = ET.Element(
        "testsuite",
        name="bnwd check",
        tests=str(len(report.outcomes)),
        failures=str(len(report.failed)),
        skipped=str(sum(1 for o in report.outcomes if o.settings is None)),
        errors="0",
    )
    for o in report.outcomes:
        case = ET.SubElement(suite, "testcase", classname="bnwd.check", name=o.rule.id)
        if o.settings is None:
            ET.SubElement(case, "skipped", message="disabled")
            continue
        body = "\n".join(f"[{f.severity.value}] {f.message}" for f in o.findings)
        if o.fails(report.config.fail_on):
            failure = ET.SubElement(
                case, "failure", message=o.rule.reason, type=o.settings.severity.value
            )
            failure.text = body
        elif body:
            ET.SubElement(case, "system-out").text = body
    suites = ET.Element(
        "testsuites",
        name="bnwd",
        tests=suite.get("tests", "0"),
        failures=suite.get("failures", "0"),
    )
    suites.append(suite)
    ET.indent(suites)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
    )


def render(report: CheckReport, fmt: CheckFormat) -> str:
    return {
        CheckFormat.TABLE: render_table,
        CheckFormat.JSON: render_json,
        CheckFormat.MARKDOWN: render_markdown,
        CheckFormat.GITHUB: render_github,
        CheckFormat.JUNIT: render_junit,
    }[fmt](report)
