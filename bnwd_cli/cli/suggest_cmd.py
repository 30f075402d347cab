"""`bnwd suggest-groups`: optimizer parameter groups for a model, from its graph analysis."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from bnwd_cli.cli._options import Format, InputShape, Output, parse_shape, split_model_spec
from bnwd_cli.cli.app import app
from bnwd_cli.render.output import OutputFormat


class PolicyChoice(StrEnum):
    decay = "decay"
    exclude = "exclude"


class SnippetChoice(StrEnum):
    bnwd = "bnwd"
    literal = "literal"


@app.command("suggest-groups")
def suggest_groups(
    model: Annotated[
        str,
        typer.Argument(
            help="Model file (model.py or model.py:factory) with a factory returning the "
            "nn.Module and, unless --input-shape is given, example_input().",
            show_default=False,
        ),
    ],
    weight_decay: Annotated[
        float,
        typer.Option("--weight-decay", "--wd", help="Weight decay of the decayed groups.", min=0.0),
    ] = 5e-4,
    invariant_policy: Annotated[
        PolicyChoice,
        typer.Option(
            "--invariant-policy",
            help="Scale-invariant weights: keep decay (it sets their effective LR) or exclude "
            "them from it (their norm then grows and the effective LR decays).",
            case_sensitive=False,
        ),
    ] = PolicyChoice.decay,
    factory: Annotated[
        str | None,
        typer.Option("--factory", help="Factory function in the model file (default build_model)."),
    ] = None,
    input_shape: InputShape = None,
    snippet: Annotated[
        SnippetChoice,
        typer.Option(
            "--snippet",
            help="Code for the training script: 'bnwd' calls bnwd_cli.param_groups; 'literal' "
            "lists the names, with no bnwd import at training time.",
            case_sensitive=False,
        ),
    ] = SnippetChoice.bnwd,
    fmt: Format = OutputFormat.TABLE,
    output: Output = None,
) -> None:
    """Print optimizer parameter groups for a model: no decay on normalization gamma/beta and
    biases, a stated policy for scale-invariant weights, and a snippet for a training script."""
    from bnwd_cli.graph.model_file import load_model_file
    from bnwd_cli.groups import param_groups
    from bnwd_cli.render.audit import render_groups, training_snippet
    from bnwd_cli.render.console import stderr_console
    from bnwd_cli.render.output import emit

    path, factory_name = split_model_spec(model, factory)
    loaded = load_model_file(path, factory=factory_name, input_shape=parse_shape(input_shape))
    groups = param_groups(
        loaded.model,
        weight_decay,
        example_input=loaded.example_input,
        invariant_policy=invariant_policy.value,
    )
    summary = groups.summary
    shape = parse_shape(input_shape)
    example = (
        f"torch.randn({', '.join(map(str, shape))})" if shape is not None else "example_input()"
    )
    code = training_snippet(
        summary,
        model_call=f"{loaded.factory}()",
        example_input=example,
        literal=snippet is SnippetChoice.literal,
    )
    console = stderr_console()
    for note in (*loaded.notes, *summary.notes):
        console.print(f"[dim]note: {note}[/]", highlight=False, soft_wrap=True)
    emit(render_groups(summary, code, fmt), output)
