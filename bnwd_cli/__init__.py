"""bnwd: what weight decay really does to normalized layers, read from a run's checkpoints.

The Python API, for notebooks and training scripts::

    import bnwd_cli as bnwd

    report = bnwd.analyze_run(Path("runs/exp1"))            # what `bnwd inspect` computes
    for layer in report.layers:
        print(layer.name, layer.classification.kind, layer.summary.norm_growth)

    groups = bnwd.param_groups(model, weight_decay=5e-4, example_input=x)  # from the graph
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)

Names resolve lazily, so `import bnwd_cli` (and the CLI's `--help`) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from bnwd_cli._version import __version__

_EXPORTS = {
    # reading checkpoints
    "discover_run": "bnwd_cli.checkpoints",
    "open_checkpoint": "bnwd_cli.checkpoints",
    "read_state_dict": "bnwd_cli.checkpoints",
    # which weights are scale-invariant
    "classify_state_dict": "bnwd_cli.graph.heuristic",
    "classify_model": "bnwd_cli.graph.analyze",
    "classify_model_file": "bnwd_cli.graph.analyze",
    "ParamClassification": "bnwd_cli.graph.classes",
    "ParamKind": "bnwd_cli.graph.classes",
    "Granularity": "bnwd_cli.graph.classes",
    # metrics
    "analyze_run": "bnwd_cli.metrics.dynamics",
    "InspectOptions": "bnwd_cli.metrics.dynamics",
    "RunDynamics": "bnwd_cli.metrics.dynamics",
    "read_optimizer_state": "bnwd_cli.metrics.optimizer",
    "OptimizerFamily": "bnwd_cli.metrics.optimizer",
    # the CI gate
    "run_check": "bnwd_cli.check",
    "build_config": "bnwd_cli.check",
    # optimizer parameter groups
    "param_groups": "bnwd_cli.groups",
    "ParamGroups": "bnwd_cli.groups",
    "InvariantPolicy": "bnwd_cli.groups",
    # errors
    "BnwdError": "bnwd_cli.errors",
    "CheckpointError": "bnwd_cli.errors",
    "UsageError": "bnwd_cli.errors",
    "ModelFileError": "bnwd_cli.errors",
}

__all__ = [
    "BnwdError",
    "CheckpointError",
    "Granularity",
    "InspectOptions",
    "InvariantPolicy",
    "ModelFileError",
    "OptimizerFamily",
    "ParamClassification",
    "ParamGroups",
    "ParamKind",
    "RunDynamics",
    "UsageError",
    "__version__",
    "analyze_run",
    "build_config",
    "classify_model",
    "classify_model_file",
    "classify_state_dict",
    "discover_run",
    "open_checkpoint",
    "param_groups",
    "read_optimizer_state",
    "read_state_dict",
    "run_check",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bnwd_cli' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from bnwd_cli.check import build_config, run_check
    from bnwd_cli.checkpoints import discover_run, open_checkpoint, read_state_dict
    from bnwd_cli.errors import BnwdError, CheckpointError, ModelFileError, UsageError
    from bnwd_cli.graph.analyze import classify_model, classify_model_file
    from bnwd_cli.graph.classes import Granularity, ParamClassification, ParamKind
    from bnwd_cli.graph.heuristic import classify_state_dict
    from bnwd_cli.groups import InvariantPolicy, ParamGroups, param_groups
    from bnwd_cli.metrics.dynamics import InspectOptions, RunDynamics, analyze_run
    from bnwd_cli.metrics.optimizer import OptimizerFamily, read_optimizer_state
