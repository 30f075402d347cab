"""`bnwd verify-invariance`: which weights of a model are scale-invariant, from its graph,
checked numerically. Exit 0 when graph and numbers agree, 1 when they disagree, 2 for a model
file or option that cannot be used."""

from __future__ import annotations

from contextlib import nullcontext
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from bnwd_cli.cli._options import Format, Output, TrustPickle, parse_shape, split_model_spec
from bnwd_cli.cli.app import EXIT_GATE_FAILED, app
from bnwd_cli.render.output import OutputFormat


class DeviceChoice(StrEnum):
    """Where the numeric check runs (mapped to the core's enum inside the command, so that
    `bnwd --help` does not import torch)."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class TraceChoice(StrEnum):
    auto = "auto"
    fx = "fx"
    execution = "execution"


@app.command("verify-invariance")
def verify_invariance(
    model_file: Annotated[
        str,
        typer.Argument(
            help="Model file (model.py, or model.py:factory) defining build_model() -- or the "
            "factory -- and example_input().",
            show_default=False,
        ),
    ],
    factory: Annotated[
        str | None,
        typer.Option("--factory", help="Factory function in the file (default build_model)."),
    ] = None,
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input-shape",
            help="Shape of a random example input, e.g. 8,3,32,32 (default: the file's "
            "example_input()).",
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="Load these trained weights first (read like `inspect` reads checkpoints): "
            "invariance must hold for the trained weights, not only at initialisation.",
        ),
    ] = None,
    trust_pickle: TrustPickle = False,
    device: Annotated[
        DeviceChoice,
        typer.Option(
            "--device",
            help="Where the numeric check runs: cpu (float64, tight tolerances), cuda "
            "(float32 with TF32 off, looser tolerances) or auto (cuda when present).",
            case_sensitive=False,
        ),
    ] = DeviceChoice.auto,
    trace: Annotated[
        TraceChoice,
        typer.Option(
            "--trace",
            help="How the graph is obtained: auto (torch.fx symbolic trace, falling back to an "
            "execution trace), fx, or execution.",
            case_sensitive=False,
        ),
    ] = TraceChoice.auto,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            help="Seed of the rescaling factors, the loss projection and the "
            "RNG reset before every forward pass.",
        ),
    ] = 0,
    fmt: Format = OutputFormat.TABLE,
    output: Output = None,
) -> None:
    """Decide from the model's graph which weights are scale-invariant (per row, per group,
    whole tensor or jointly), then verify every verdict numerically; exit 1 when graph and
    numbers disagree."""
    from bnwd_cli.graph.trace import TraceMethod
    from bnwd_cli.graph.verify import Device, verify_model_file
    from bnwd_cli.render.console import stderr_console
    from bnwd_cli.render.invariance import render

    path, factory_name = split_model_spec(model_file, factory)
    shape = parse_shape(input_shape)
    console = stderr_console()
    status = console.status("tracing and verifying…") if console.is_terminal else nullcontext()
    with status:
        report = verify_model_file(
            path,
            factory=factory_name,
            input_shape=shape,
            checkpoint=checkpoint,
            trust_pickle=trust_pickle,
            device=Device(device.value),
            seed=seed,
            method=TraceMethod(trace.value),
        )
    from bnwd_cli.render.output import emit

    emit(render(report, fmt), output)
    console.print(
        f"[dim]graph analysis {report.analysis_seconds:.2f} s, numeric check "
        f"{report.verification_seconds:.2f} s ({report.forward_passes} forward, "
        f"{report.backward_passes} backward passes)[/]",
        highlight=False,
    )
    no_evidence = [
        v.classification.name for v in report.params if v.agreement.value == "no evidence"
    ]
    if no_evidence:
        console.print(
            f"[yellow]warning:[/] no numeric evidence for {len(no_evidence)} parameter(s) "
            f"(no effect on the output, e.g. behind a zero gamma): {', '.join(no_evidence[:6])}"
            + (" …" if len(no_evidence) > 6 else ""),
            highlight=False,
            soft_wrap=True,
        )
    if not report.agrees:
        console.print(
            f"[bold red]disagree:[/] graph and numbers disagree on "
            f"{', '.join(report.disagreements)}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_GATE_FAILED)
