"""Options shared by several commands, declared once so every command spells them the same."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bnwd_cli.errors import UsageError

if TYPE_CHECKING:
    from bnwd_cli.metrics.dynamics import InspectOptions
    from bnwd_cli.metrics.optimizer import OptimizerFamily
from bnwd_cli.render.output import OutputFormat


class OptimizerChoice(StrEnum):
    """User-facing spelling of an optimizer family (mapped to the core's enum at the edge)."""

    sgd = "sgd"
    sgd_momentum = "sgd-momentum"
    nesterov = "nesterov"
    adam = "adam"
    adamw = "adamw"


CkptDir = Annotated[
    Path,
    typer.Argument(
        help="Run folder (or a single checkpoint file) as training left it.",
        show_default=False,
    ),
]
Format = Annotated[
    OutputFormat, typer.Option("--format", "-f", help="Output format.", case_sensitive=False)
]
Output = Annotated[
    Path | None,
    typer.Option(
        "--output", "-o", help="Write the output to this file (atomically) instead of stdout."
    ),
]
ModelFile = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model file (model.py or model.py:factory) whose graph decides which weights are "
        "scale-invariant, instead of the state-dict heuristic.",
    ),
]
Factory = Annotated[
    str | None,
    typer.Option("--factory", help="Factory function in --model (default build_model)."),
]
InputShape = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        help="Example input shape for --model, e.g. 8,3,32,32 "
        "(default: the file's example_input()).",
    ),
]
Layers = Annotated[
    str | None,
    typer.Option("--layers", help="Only parameters whose name matches this regular expression."),
]
Lr = Annotated[
    float | None,
    typer.Option(
        "--lr",
        help="Learning rate for the effective-LR column, overriding the "
        "optimizer state's (needed when the checkpoints carry none).",
        min=0.0,
    ),
]
Optimizer = Annotated[
    OptimizerChoice | None,
    typer.Option(
        "--optimizer",
        help="Optimizer family, where the state cannot tell (Adam vs AdamW).",
        case_sensitive=False,
    ),
]
TrustPickle = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow full unpickling (runs code from the files). Only for checkpoints you trust.",
    ),
]
Ema = Annotated[
    bool, typer.Option("--ema", help="Analyze the EMA weights stored beside the model's (timm).")
]
Strict = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Stop at the first unreadable checkpoint instead of skipping it with a warning.",
    ),
]


def optimizer_family(choice: OptimizerChoice | None) -> OptimizerFamily | None:
    """Translate the CLI spelling into the core enum (imports the core lazily)."""
    if choice is None:
        return None
    from bnwd_cli.metrics.optimizer import OptimizerFamily

    return {
        OptimizerChoice.sgd: OptimizerFamily.SGD,
        OptimizerChoice.sgd_momentum: OptimizerFamily.SGD_MOMENTUM,
        OptimizerChoice.nesterov: OptimizerFamily.NESTEROV,
        OptimizerChoice.adam: OptimizerFamily.ADAM,
        OptimizerChoice.adamw: OptimizerFamily.ADAMW,
    }[choice]


def refuse_output_inside(output: Path | None, ckpt_dir: Path) -> None:
    """bnwd never writes into a checkpoint folder."""
    if output is None:
        return
    folder = ckpt_dir if ckpt_dir.is_dir() else ckpt_dir.parent
    target = output.resolve().parent
    if target == folder.resolve() or target.is_relative_to(folder.resolve()):
        raise UsageError(
            f"--output {output}: refusing to write inside the checkpoint folder {ckpt_dir}; "
            "choose a path outside it"
        )


def split_model_spec(model: str, factory: str | None) -> tuple[Path, str | None]:
    """`model.py:build` -> (model.py, 'build'); an explicit --factory wins."""
    path, sep, name = model.rpartition(":")
    if sep and path and not name.startswith(("\\", "/")) and name.isidentifier():
        return Path(path), factory or name
    return Path(model), factory


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: expected integers like 8,3,32,32") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r}: expected positive integers like 8,3,32,32")
    return shape


def build_inspect_options(
    *,
    model: str | None,
    factory: str | None,
    input_shape: str | None,
    lr: float | None,
    optimizer: OptimizerChoice | None,
    trust_pickle: bool,
    ema: bool,
    strict: bool,
    layers: str | None = None,
) -> InspectOptions:
    """The analysis options every checkpoint command shares; with --model, the graph analysis
    classifies the parameters instead of the state-dict heuristic."""
    from bnwd_cli.metrics.dynamics import InspectOptions
    from bnwd_cli.metrics.split import auto_processes

    classification = None
    if model is not None:
        from bnwd_cli.graph.analyze import classify_model_file

        model_path, factory_name = split_model_spec(model, factory)
        classification = classify_model_file(
            model_path, factory=factory_name, input_shape=parse_shape(input_shape)
        )
    return InspectOptions(
        layers=layers,
        lr=lr,
        optimizer=optimizer_family(optimizer),
        trust_pickle=trust_pickle,
        use_ema=ema,
        strict=strict,
        classification=classification,
        processes=auto_processes(),
    )
