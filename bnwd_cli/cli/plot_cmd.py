"""`bnwd plot`: the run's dynamics as curves in an image file (PNG, SVG or PDF)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnwd_cli.cli._options import (
    Ema,
    Factory,
    InputShape,
    Lr,
    ModelFile,
    Optimizer,
    Strict,
    TrustPickle,
    build_inspect_options,
    refuse_output_inside,
)
from bnwd_cli.cli.app import app


@app.command("plot")
def plot(
    ckpt_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="Run folder(s) (or single checkpoint files) as training left them; several "
            "folders are drawn as several runs, one colour each.",
            metavar="CKPT_DIR",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Image to write: .png, .svg or .pdf (the format comes from the extension; "
            "written atomically).",
            show_default=False,
        ),
    ],
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            help="Legend name of a run; give it once per CKPT_DIR, in the same order "
            "(default: the folder names).",
            show_default=False,
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            help="Draw single-layer curves for the parameters matching this regular expression "
            "(default: every layer when all runs together have at most 8 of a kind). The "
            "aggregate curves always cover all scale-invariant weights.",
        ),
    ] = None,
    log: Annotated[bool, typer.Option("--log", help="Logarithmic y axes.")] = False,
    sum_of_squares: Annotated[
        bool,
        typer.Option(
            "--sum-of-squares",
            help="Weight panel: sum of squared weights (the seed blog post's measure) "
            "instead of the norm.",
        ),
    ] = False,
    title: Annotated[
        str | None, typer.Option("--title", help="Figure title (default: names the runs).")
    ] = None,
    dpi: Annotated[
        int, typer.Option("--dpi", help="Resolution of PNG output.", min=50, max=600)
    ] = 150,
    model: ModelFile = None,
    factory: Factory = None,
    input_shape: InputShape = None,
    lr: Lr = None,
    optimizer: Optimizer = None,
    ema: Ema = False,
    strict: Strict = False,
    trust_pickle: TrustPickle = False,
) -> None:
    """Draw the dynamics as curves, the way the seed blog post does: weight norm (or sum of
    squares) of the scale-invariant weights, per-step relative and angular updates with the
    predicted equilibrium, effective learning rate, and normalization gamma norms over steps."""
    from bnwd_cli.render.plots import (
        PlotFormat,
        PlotOptions,
        compile_layers,
        output_folder,
        require_matplotlib,
        run_labels,
    )

    # Everything the user can get wrong is checked before the (slow) reading of checkpoints.
    fmt = PlotFormat.from_path(output)
    output_folder(output)
    labels = run_labels(ckpt_dirs, label)
    for ckpt_dir in ckpt_dirs:
        refuse_output_inside(output, ckpt_dir)
    compile_layers(layers)
    require_matplotlib()

    from rich.markup import escape

    from bnwd_cli.metrics.dynamics import RunDynamics, analyze_run
    from bnwd_cli.render.console import say_note, say_warning, stderr_console
    from bnwd_cli.render.plots import draw, plot_data, write_figure
    from bnwd_cli.render.progress import checkpoint_progress

    options = build_inspect_options(
        model=model,
        factory=factory,
        input_shape=input_shape,
        lr=lr,
        optimizer=optimizer,
        trust_pickle=trust_pickle,
        ema=ema,
        strict=strict,
    )
    console = stderr_console()
    reports: list[RunDynamics] = []
    for ckpt_dir, name in zip(ckpt_dirs, labels, strict=True):
        with checkpoint_progress(f"reading {escape(name)}") as progress:
            report = analyze_run(ckpt_dir, options, progress)
        for warning in report.warnings:
            say_warning(f"{name}: {warning}")
        reports.append(report)
    plot_options = PlotOptions(
        layers=layers, log_scale=log, sum_of_squares=sum_of_squares, title=title
    )
    data = plot_data(reports, labels, plot_options)
    # the same note from several runs (e.g. "classified from the state dict alone") says it once
    notes = dict.fromkeys(note for report in reports for note in report.notes)
    for note in [*notes, *data.notes]:
        say_note(note)
    write_figure(draw(data), output, fmt, dpi=dpi)
    console.print(f"wrote {escape(str(output))}", highlight=False, soft_wrap=True)
