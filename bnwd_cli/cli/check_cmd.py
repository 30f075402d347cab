"""`bnwd check`: the analysis of `inspect` as a CI gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnwd_cli.cli._options import (
    CkptDir,
    Ema,
    InputShape,
    Lr,
    ModelFile,
    Optimizer,
    Output,
    TrustPickle,
    build_inspect_options,
    refuse_output_inside,
)
from bnwd_cli.cli.app import EXIT_GATE_FAILED, app


@app.command("check")
def check(
    ckpt_dir: CkptDir,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="table, json, markdown (pull-request comment), github "
            "(workflow annotations) or junit (XML for CI dashboards).",
        ),
    ] = "table",
    output: Output = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="TOML file with a [tool.bnwd.check] table (default: the "
            "nearest pyproject.toml with one, from the current folder upwards).",
        ),
    ] = None,
    fail_on: Annotated[
        str | None,
        typer.Option(
            "--fail-on",
            help="Lowest severity that fails the gate: error, warning or info "
            "(default: error, or the config's fail-on).",
        ),
    ] = None,
    disable: Annotated[
        list[str] | None, typer.Option("--disable", help="Turn a rule off (repeatable).")
    ] = None,
    enable: Annotated[
        list[str] | None,
        typer.Option("--enable", help="Turn back on a rule the config disabled (repeatable)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a rule setting, RULE.KEY=VALUE, e.g. "
            "norm-growth.max-growth=3 or dead-bias.severity=warning (repeatable).",
        ),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option("--layers", help="Check only layers matching this regex (repeatable)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Skip layers matching this regex (repeatable)."),
    ] = None,
    list_rules: Annotated[
        bool, typer.Option("--list-rules", help="Print the rules with their defaults and exit.")
    ] = False,
    model: ModelFile = None,
    input_shape: InputShape = None,
    lr: Lr = None,
    optimizer: Optimizer = None,
    ema: Ema = False,
    trust_pickle: TrustPickle = False,
) -> None:
    """Gate a run in CI: apply the rules to its checkpoints; exit 0 pass, 1 fail, 2 bad input."""
    from bnwd_cli.check import build_config, load_table, run_check
    from bnwd_cli.errors import UsageError
    from bnwd_cli.render.check import CheckFormat, render
    from bnwd_cli.render.output import emit
    from bnwd_cli.render.progress import checkpoint_progress

    if list_rules:
        emit(_rules_listing(), None)
        return
    try:
        chosen = CheckFormat(fmt.lower())
    except ValueError:
        raise UsageError(
            f"--format {fmt!r}: expected one of {', '.join(f.value for f in CheckFormat)}"
        ) from None
    refuse_output_inside(output, ckpt_dir)
    table, source = load_table(config, Path.cwd())
    settings = build_config(
        table,
        source=source,
        fail_on=fail_on,
        disable=disable or (),
        enable=enable or (),
        overrides=set_ or (),
        include=include or (),
        exclude=exclude or (),
    )
    options = build_inspect_options(
        model=model,
        factory=None,
        input_shape=input_shape,
        lr=lr,
        optimizer=optimizer,
        trust_pickle=trust_pickle,
        ema=ema,
        strict=True,
    )
    with checkpoint_progress("checking checkpoints") as progress:
        report = run_check(ckpt_dir, settings, options, progress)
    emit(render(report, chosen), output)
    if not report.passed:
        raise typer.Exit(EXIT_GATE_FAILED)


def _rules_listing() -> str:
    from bnwd_cli.check import RULES

    lines = []
    for rule in RULES:
        thresholds = ", ".join(f"{k}={v:g}" for k, v in rule.thresholds.items()) or "no thresholds"
        lines.append(f"{rule.id} [{rule.severity.value}] ({thresholds})\n    {rule.reason}")
    return "\n".join(lines) + "\n"
