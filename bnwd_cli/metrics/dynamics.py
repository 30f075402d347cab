"""The streaming pass of `bnwd inspect`: per layer, per checkpoint, what the weights did.

Checkpoints are visited in training order and only two are open at a time (the current one and
the previous, for differences), so memory does not grow with the length of the run. Formulas and
their sources: shared/THEORY.md section 2.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bnwd_cli.checkpoints import (
    CheckpointRef,
    OpenCheckpoint,
    RunCheckpoints,
    discover_run,
    open_checkpoint,
)
from bnwd_cli.errors import CheckpointError, UsageError
from bnwd_cli.graph.classes import (
    ClassificationMethod,
    Granularity,
    ModelClassification,
    ParamClassification,
    ParamKind,
)
from bnwd_cli.graph.heuristic import TensorEntry, classify_state_dict, is_buffer_name
from bnwd_cli.metrics.kernels import tensor_stats
from bnwd_cli.metrics.optimizer import (
    NameMapping,
    OptimizerFamily,
    OptimizerSnapshot,
    read_optimizer_state,
)

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class InspectOptions:
    layers: str | None = None
    """Regular expression: analyze only parameters whose name it matches (re.search)."""
    lr: float | None = None
    """Learning rate to use instead of the optimizer state's."""
    optimizer: OptimizerFamily | None = None
    """Settles the optimizer family where the state cannot (Adam vs AdamW)."""
    trust_pickle: bool = False
    use_ema: bool = False
    strict: bool = False
    classification: ModelClassification | None = None
    """From the graph analysis (`--model`); None means the state-dict heuristic."""


@dataclass(frozen=True)
class LayerPoint:
    """One parameter at one checkpoint."""

    checkpoint: int
    step: int | None
    norm: float
    nonfinite: int = 0
    row_norm_min: float | None = None
    row_norm_max: float | None = None
    row_norm_cv: float | None = None
    """Coefficient of variation of the row norms (std / mean), per-row layers only."""
    steps_between: int | None = None
    relative_step: float | None = None
    """|w_t - w_{t-1}| / |w_{t-1}| over the interval since the previous checkpoint."""
    angular_update: float | None = None
    """Angle (radians) turned over the interval; per-row layers: RMS over rows."""
    lr: float | None = None
    weight_decay: float | None = None
    effective_lr: float | None = None
    lr_factor: float | None = None
    """Effective-LR factor relative to the first checkpoint: (|w_0|/|w_t|)^2 for SGD
    (the seed blog's conv_lr_factor), |w_0|/|w_t| for Adam-family. Needs no lr."""


@dataclass(frozen=True)
class LayerSummary:
    norm_first: float
    norm_last: float
    norm_growth: float
    relative_step_first: float | None
    relative_step_last: float | None
    relative_step_change: float | None
    """Last over first per-step relative step (random-walk normalized when intervals differ)."""
    angular_update_last: float | None
    effective_lr_change: float | None
    """Effective LR (or its factor) at the last checkpoint over the first."""


@dataclass(frozen=True)
class LayerDynamics:
    name: str
    shape: tuple[int, ...]
    classification: ParamClassification
    points: tuple[LayerPoint, ...]
    summary: LayerSummary


@dataclass(frozen=True)
class CheckpointInfo:
    label: str
    step: int | None
    epoch: int | None
    format: str
    optimizer_family: OptimizerFamily | None = None
    name_mapping: NameMapping | None = None
    lrs: tuple[float, ...] = ()


@dataclass(frozen=True)
class RunDynamics:
    """Everything `bnwd inspect` computed for one run."""

    run: RunCheckpoints
    checkpoints: tuple[CheckpointInfo, ...]
    layers: tuple[LayerDynamics, ...]
    classification_method: ClassificationMethod
    optimizer_family: OptimizerFamily | None
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    snapshots: tuple[OptimizerSnapshot | None, ...] = field(default=(), repr=False)


def analyze_run(
    path: Path, options: InspectOptions | None = None, progress: Progress | None = None
) -> RunDynamics:
    """Discover the checkpoints under `path` and compute every layer's dynamics."""
    options = options or InspectOptions()
    pattern = _compile(options.layers)
    run = discover_run(path, trust_pickle=options.trust_pickle, strict=options.strict)
    warnings = [p.message + " (skipped)" for p in run.problems]
    notes = list(run.notes)

    accumulators: dict[str, _LayerAccumulator] = {}
    infos: list[CheckpointInfo] = []
    snapshots: list[OptimizerSnapshot | None] = []
    previous: OpenCheckpoint | None = None
    classification: ModelClassification | None = options.classification
    family: OptimizerFamily | None = None
    total = len(run.checkpoints)
    try:
        for position, ref in enumerate(run.checkpoints):
            if progress is not None:
                progress(position, total, ref.label)
            try:
                current = open_checkpoint(
                    ref, trust_pickle=options.trust_pickle, use_ema=options.use_ema
                )
            except CheckpointError as exc:
                if options.strict or "re-run with" in exc.problem:
                    raise
                warnings.append(f"{exc} (skipped)")
                continue
            names = current.weights.names()
            if classification is None:
                classification = classify_state_dict(
                    [
                        TensorEntry(
                            n, current.weights.shape(n), current.weights.get(n).is_floating_point()
                        )
                        for n in names
                    ]
                )
            if not accumulators:
                accumulators = _start_layers(classification, names, current, pattern)
                if not accumulators:
                    raise UsageError(_no_layers_message(options.layers, path))
            snapshot = _snapshot(current, classification, options, notes)
            snapshots.append(snapshot)
            if snapshot is not None and family is None:
                family = snapshot.family
            index = len(infos)
            infos.append(
                CheckpointInfo(
                    label=ref.label,
                    step=ref.step,
                    epoch=ref.epoch,
                    format=ref.format.value,
                    optimizer_family=snapshot.family if snapshot else None,
                    name_mapping=snapshot.mapping if snapshot else None,
                    lrs=tuple(sorted(snapshot.lrs())) if snapshot else (),
                )
            )
            for acc in accumulators.values():
                acc.add(index, ref, current, previous, snapshot, options, family, warnings)
            if previous is not None:
                previous.close()
            previous = current
    finally:
        if previous is not None:
            previous.close()
    if progress is not None:
        progress(total, total, "")
    if not infos:
        raise CheckpointError(path, "no checkpoint could be read")
    assert classification is not None
    if options.classification is None:
        notes.extend(classification.notes)
    return RunDynamics(
        run=run,
        checkpoints=tuple(infos),
        layers=tuple(acc.finish() for acc in accumulators.values()),
        classification_method=classification.method,
        optimizer_family=family,
        warnings=tuple(dict.fromkeys(warnings)),
        notes=tuple(dict.fromkeys(notes)),
        snapshots=tuple(snapshots),
    )


def _compile(expression: str | None) -> re.Pattern[str] | None:
    if expression is None:
        return None
    try:
        return re.compile(expression)
    except re.error as exc:
        raise UsageError(
            f"--layers {expression!r} is not a valid regular expression ({exc})"
        ) from None


def _no_layers_message(expression: str | None, path: Path) -> str:
    if expression:
        return f"--layers {expression!r} matches no parameter of the checkpoints in {path}"
    return f"{path}: the checkpoints hold no floating-point parameters"


def _start_layers(
    classification: ModelClassification,
    names: Sequence[str],
    first: OpenCheckpoint,
    pattern: re.Pattern[str] | None,
) -> dict[str, _LayerAccumulator]:
    verdicts = classification.by_name()
    present = set(names)
    missing = [v.name for v in classification.params if v.name not in present]
    if missing and classification.method is not ClassificationMethod.HEURISTIC:
        raise UsageError(
            f"the model's parameters {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''} are not in {first.ref.label}: "
            "does --model build the network these checkpoints were saved from?"
        )
    layers: dict[str, _LayerAccumulator] = {}
    for name in names:
        verdict = verdicts.get(name)
        if verdict is None or (pattern is not None and not pattern.search(name)):
            continue
        layers[name] = _LayerAccumulator(verdict)
    return layers


def _snapshot(
    ckpt: OpenCheckpoint,
    classification: ModelClassification,
    options: InspectOptions,
    notes: list[str],
) -> OptimizerSnapshot | None:
    state = ckpt.optimizer_state
    if state is None:
        return None
    params = [(p.name, p.shape) for p in classification.params if not is_buffer_name(p.name)]
    snapshot = read_optimizer_state(state, params, family_hint=options.optimizer)
    notes.extend(snapshot.notes)
    return snapshot


def _unit_norm(stats_norm: float, row_norms: torch.Tensor | None, rows: int) -> float:
    """Norm of the invariant unit: per-row layers use the root-mean-square row norm."""
    return stats_norm / math.sqrt(rows) if row_norms is not None else stats_norm


class _LayerAccumulator:
    def __init__(self, verdict: ParamClassification) -> None:
        self.verdict = verdict
        self.per_row = verdict.granularity is Granularity.PER_ROW and len(verdict.shape) >= 2
        self.points: list[LayerPoint] = []
        self.first_unit: float | None = None
        self.previous_step: int | None = None

    def add(
        self,
        index: int,
        ref: CheckpointRef,
        current: OpenCheckpoint,
        previous: OpenCheckpoint | None,
        snapshot: OptimizerSnapshot | None,
        options: InspectOptions,
        family: OptimizerFamily | None,
        warnings: list[str],
    ) -> None:
        name = self.verdict.name
        try:
            tensor = current.weights.get(name)
        except KeyError:
            raise CheckpointError(
                ref.weight_files[0],
                f"has no tensor '{name}' that earlier checkpoints had: the architecture changed",
            ) from None
        if tuple(tensor.shape) != self.verdict.shape:
            raise CheckpointError(
                ref.weight_files[0],
                f"tensor '{name}' has shape {tuple(tensor.shape)} here but "
                f"{self.verdict.shape} before: the architecture changed between checkpoints",
            )
        before = previous.weights.get(name) if previous is not None and self.points else None
        stats = tensor_stats(tensor, before, per_row=self.per_row)
        if stats.nonfinite:
            warnings.append(f"{ref.label}: tensor '{name}' has {stats.nonfinite} NaN/Inf values")
        rows = self.verdict.shape[0] if self.per_row else 1
        unit = _unit_norm(stats.norm, stats.row_norms, rows)
        if self.first_unit is None:
            self.first_unit = unit
        hyper = snapshot.per_param.get(name) if snapshot is not None else None
        lr = options.lr if options.lr is not None else (hyper.lr if hyper is not None else None)
        adaptive = family is not None and family.is_adaptive
        power = 1 if adaptive else 2
        invariant = self.verdict.kind is ParamKind.SCALE_INVARIANT
        # lr/|w|^2 (SGD) and lr/|w| (Adam) are the learning rates of the weight's direction,
        # which only means something for a scale-invariant weight.
        effective_lr = lr / unit**power if invariant and lr is not None and unit > 0 else None
        lr_factor = (self.first_unit / unit) ** power if invariant and unit > 0 else None
        steps_between = (
            ref.step - self.previous_step
            if ref.step is not None and self.previous_step is not None
            else None
        )
        relative_step = angle = None
        if before is not None and stats.diff_norm is not None:
            previous_norm = self.points[-1].norm
            relative_step = stats.diff_norm / previous_norm if previous_norm > 0 else None
            if stats.row_angles is not None:
                finite = stats.row_angles[torch.isfinite(stats.row_angles)]
                angle = float(finite.square().mean().sqrt()) if finite.numel() else None
            else:
                angle = stats.angle
        row_min = row_max = row_cv = None
        if stats.row_norms is not None:
            row_min = float(stats.row_norms.min())
            row_max = float(stats.row_norms.max())
            mean = float(stats.row_norms.mean())
            row_cv = float(stats.row_norms.std(unbiased=False)) / mean if mean > 0 else None
        self.points.append(
            LayerPoint(
                checkpoint=index,
                step=ref.step,
                norm=stats.norm,
                nonfinite=stats.nonfinite,
                row_norm_min=row_min,
                row_norm_max=row_max,
                row_norm_cv=row_cv,
                steps_between=steps_between,
                relative_step=relative_step,
                angular_update=angle,
                lr=lr,
                weight_decay=hyper.weight_decay if hyper is not None else None,
                effective_lr=effective_lr,
                lr_factor=lr_factor,
            )
        )
        self.previous_step = ref.step

    def finish(self) -> LayerDynamics:
        points = tuple(self.points)
        first, last = points[0], points[-1]
        steps = [p for p in points if p.relative_step is not None]
        rs_first = steps[0].relative_step if steps else None
        rs_last = steps[-1].relative_step if steps else None
        change = None
        if steps and rs_first:
            change = _per_step(steps[-1]) / _per_step(steps[0]) if _per_step(steps[0]) else None
        if first.effective_lr and last.effective_lr is not None:
            elr_change: float | None = last.effective_lr / first.effective_lr
        else:
            elr_change = last.lr_factor
        growth = last.norm / first.norm if first.norm > 0 else math.nan
        summary = LayerSummary(
            norm_first=first.norm,
            norm_last=last.norm,
            norm_growth=growth,
            relative_step_first=rs_first,
            relative_step_last=rs_last,
            relative_step_change=change,
            angular_update_last=steps[-1].angular_update if steps else None,
            effective_lr_change=elr_change,
        )
        return LayerDynamics(self.verdict.name, self.verdict.shape, self.verdict, points, summary)


def _per_step(point: LayerPoint) -> float:
    """Relative step per optimizer step, assuming steps add like a random walk (sqrt(k)).

    Between checkpoints k steps apart, independent steps of size d give sqrt(k)*d, not k*d
    (THEORY.md section 2). With no step counts the interval figure is used as it is.
    """
    value = point.relative_step or 0.0
    if point.steps_between:
        return value / math.sqrt(point.steps_between)
    return value


def layers_by_kind(layers: Sequence[LayerDynamics]) -> Mapping[ParamKind, list[LayerDynamics]]:
    grouped: dict[ParamKind, list[LayerDynamics]] = {kind: [] for kind in ParamKind}
    for layer in layers:
        grouped[layer.classification.kind].append(layer)
    return grouped
