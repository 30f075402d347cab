"""`bnwd inspect`: per-layer dynamics of a run, read from its checkpoints."""

from __future__ import annotations

from typing import Annotated

import typer

from bnwd_cli.cli._options import (
    CkptDir,
    Ema,
    Format,
    InputShape,
    Layers,
    Lr,
    ModelFile,
    Optimizer,
    Output,
    Strict,
    TrustPickle,
    optimizer_family,
    parse_shape,
    refuse_output_inside,
    split_model_spec,
)
from bnwd_cli.cli.app import app
from bnwd_cli.render.output import OutputFormat


@app.command("inspect")
def inspect(
    ckpt_dir: CkptDir,
    model: ModelFile = None,
    factory: Annotated[
        str | None,
        typer.Option("--factory", help="Factory function in --model (default build_model)."),
    ] = None,
    input_shape: InputShape = None,
    layers: Layers = None,
    lr: Lr = None,
    optimizer: Optimizer = None,
    per_checkpoint: Annotated[
        bool,
        typer.Option(
            "--per-checkpoint", help="One table row per checkpoint and layer (long view)."
        ),
    ] = False,
    fmt: Format = OutputFormat.TABLE,
    output: Output = None,
    ema: Ema = False,
    strict: Strict = False,
    trust_pickle: TrustPickle = False,
    list_skipped: Annotated[
        bool,
        typer.Option("--list-skipped", help="List the files that were skipped and why (stderr)."),
    ] = False,
) -> None:
    """Show per layer what weight decay and the optimizer did: norms, relative steps, angular
    updates and effective learning rates over the run's checkpoints."""
    from bnwd_cli.metrics.dynamics import InspectOptions, analyze_run
    from bnwd_cli.render.console import stderr_console
    from bnwd_cli.render.dynamics import render
    from bnwd_cli.render.output import emit
    from bnwd_cli.render.progress import checkpoint_progress

    refuse_output_inside(output, ckpt_dir)
    classification = None
    if model is not None:
        from bnwd_cli.graph.analyze import classify_model_file

        model_path, factory_name = split_model_spec(model, factory)
        classification = classify_model_file(
            model_path, factory=factory_name, input_shape=parse_shape(input_shape)
        )
    options = InspectOptions(
        layers=layers,
        lr=lr,
        optimizer=optimizer_family(optimizer),
        trust_pickle=trust_pickle,
        use_ema=ema,
        strict=strict,
        classification=classification,
    )
    with checkpoint_progress("reading checkpoints") as progress:
        report = analyze_run(ckpt_dir, options, progress)
    from rich.markup import escape

    console = stderr_console()
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"[dim]note: {escape(note)}[/]", highlight=False, soft_wrap=True)
    if list_skipped:
        for skipped in report.run.skipped:
            console.print(
                escape(f"skipped {skipped.path}: {skipped.reason}"),
                highlight=False,
                soft_wrap=True,
            )
    emit(render(report, fmt, per_checkpoint=per_checkpoint), output)
