"""`bnwd inspect`: per-layer dynamics of a run, read from its checkpoints."""

from __future__ import annotations

from typing import Annotated

import typer

from bnwd_cli.cli._options import (
    CkptDir,
    Ema,
    Factory,
    Format,
    InputShape,
    Layers,
    Lr,
    ModelFile,
    Optimizer,
    Output,
    Strict,
    TrustPickle,
    build_inspect_options,
    refuse_output_inside,
)
from bnwd_cli.cli.app import app
from bnwd_cli.render.output import OutputFormat


@app.command("inspect")
def inspect(
    ckpt_dir: CkptDir,
    model: ModelFile = None,
    factory: Factory = None,
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
    from bnwd_cli.metrics.dynamics import analyze_run
    from bnwd_cli.render.console import say_note, say_warning
    from bnwd_cli.render.dynamics import layer_renderer, render_pieces
    from bnwd_cli.render.output import emit
    from bnwd_cli.render.progress import checkpoint_progress

    refuse_output_inside(output, ckpt_dir)
    options = build_inspect_options(
        model=model,
        factory=factory,
        input_shape=input_shape,
        lr=lr,
        optimizer=optimizer,
        trust_pickle=trust_pickle,
        ema=ema,
        strict=strict,
        layers=layers,
    )
    with checkpoint_progress("reading checkpoints") as progress:
        report = analyze_run(ckpt_dir, options, progress, render_layer=layer_renderer(fmt))
    for warning in report.warnings:
        say_warning(warning)
    for note in report.notes:
        say_note(note)
    if list_skipped:
        for skipped in report.run.skipped:
            say_note(f"skipped {skipped.path}: {skipped.reason}")
    emit(render_pieces(report, fmt, per_checkpoint=per_checkpoint), output)
