"""The streaming pass of `bnwd inspect`: per layer, per checkpoint, what the weights did.

Checkpoints are visited in training order, a window of `kernels.WINDOW` at a time (plus the one
before it, for differences): each layer's tensor is swept once over the whole window, so each
checkpoint's bytes are read once. Memory does not grow with the length of the run: the files are
mapped, pages are handed back as the sweep is done with them, and a checkpoint held in memory
(a legacy, non-zip torch file) is swept on its own. Formulas and their sources:
shared/THEORY.md section 2.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bnwd_cli.checkpoints import (
    CheckpointFormat,
    OpenCheckpoint,
    RunCheckpoints,
    discover_run,
    open_checkpoint,
)
from bnwd_cli.checkpoints.arrays import is_floating
from bnwd_cli.checkpoints.mapped import release_all_pages, release_pages
from bnwd_cli.checkpoints.reader import DictTensorSource
from bnwd_cli.errors import CheckpointError, UsageError
from bnwd_cli.graph.classes import (
    ClassificationMethod,
    Granularity,
    ModelClassification,
    ParamClassification,
    ParamKind,
)
from bnwd_cli.graph.heuristic import TensorEntry, classify_state_dict, is_buffer_name
from bnwd_cli.metrics.audit import AuditFinding, audit_run
from bnwd_cli.metrics.equilibrium import (
    AngleSample,
    EquilibriumAssessment,
    EquilibriumPrediction,
    assess_equilibrium,
    predict_equilibrium,
)
from bnwd_cli.metrics.kernels import WINDOW, TensorStats, compiled, share_cores, window_stats
from bnwd_cli.metrics.optimizer import (
    LayoutHint,
    NameMapping,
    OptimizerFamily,
    OptimizerSnapshot,
    ParamHyper,
    param_state,
    read_optimizer_state,
)
from bnwd_cli.metrics.split import (
    SPLIT_MIN_BYTES,
    Fork,
    LayerShare,
    SplitFailedError,
    can_fork,
    shares,
)
from bnwd_cli.metrics.updates import ImpliedStep, StepPlan, implied_step, plan_step

Progress = Callable[[int, int, str], None]

RELEASE_BUDGET = 64 << 20
"""Bytes of a window's tensors swept between two `release_all_pages` (all the pages of the open
checkpoints handed back at once). A layer whose window holds more than this is released piece by
piece as it is swept instead (`window_stats(release=...)`), so resident memory stays near this
budget plus the pages the kernel maps around them, whatever the model and the run. Releasing
every piece of every layer, as before, cost 5-8% of a ResNet-50 analysis (torch files, 20
checkpoints: 0.86 s against 0.80 s), in system calls and in refaults of the 2 MiB stretches
around each piece, for a peak of 108 MB instead of about 165 MB (docs/performance.md)."""


@dataclass(frozen=True)
class InspectOptions:
    """What `analyze_run` is asked for (the options of `bnwd inspect`)."""

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
    processes: int = 1
    """Processes that share the layers of a large run (metrics/split.py); the command line
    uses `split.auto_processes()`. The results are the same whatever the number."""


@dataclass(frozen=True, slots=True)
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
    implied_relative_update: float | None = None
    """|w_t - w_{t-1}| / |w_{t-1}| of the last optimizer step, from the optimizer state."""
    implied_angle: float | None = None
    """Angle (radians) of the last optimizer step, from the optimizer state; per-row layers:
    RMS over rows. A per-step figure, unlike `angular_update` (THEORY.md section 2)."""
    implied_exact: bool | None = None
    """False where the implied step rests on an approximation (Nesterov, a scheduler's lr)."""
    optimizer_step: int | None = None
    """Adam's step count from the optimizer state."""
    equilibrium_angle: float | None = None
    """Predicted per-step angular update at equilibrium for this checkpoint's lr and decay
    (scale-invariant layers; THEORY.md section 3)."""
    optimizer_group: int | None = None
    """Index of the optimizer param group holding this parameter."""
    momentum: float | None = None
    dampening: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None


@dataclass(frozen=True)
class LayerSummary:
    """A layer over the whole run: first and last figures, and how they changed."""

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
    """One parameter over the run: its classification, a point per checkpoint, a summary."""

    name: str
    shape: tuple[int, ...]
    classification: ParamClassification
    points: tuple[LayerPoint, ...]
    summary: LayerSummary
    equilibrium: EquilibriumAssessment | None = None
    """Scale-invariant layers: the measured per-step angle against THEORY.md section 3."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint read: where it sits in the run and what its optimizer state says."""

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
    audit: tuple[AuditFinding, ...] = ()
    """Weight-decay audit findings (THEORY.md section 5)."""
    prerendered: Prerendered | None = field(default=None, repr=False, compare=False)
    """Layers' text made by the processes that analyzed them (`analyze_run(render_layer=)`)."""


LayerRenderer = Callable[[LayerDynamics, Sequence[CheckpointInfo]], str]
"""A layer's part of a report's text, from the layer and the run's checkpoints
(`render.dynamics.json_layer_text`, `csv_layer_text`)."""


@dataclass(frozen=True)
class Prerendered:
    """`renderer`'s text of some of a report's layers, made where they were analyzed."""

    renderer: LayerRenderer
    texts: tuple[str | None, ...]
    """Per layer, in the report's order; None: not made (render it from the layer)."""

    def of(self, renderer: LayerRenderer) -> tuple[str | None, ...] | None:
        """The texts, if `renderer` made them."""
        return self.texts if renderer is self.renderer else None


def analyze_run(
    path: Path,
    options: InspectOptions | None = None,
    progress: Progress | None = None,
    *,
    render_layer: LayerRenderer | None = None,
) -> RunDynamics:
    """Discover the checkpoints under `path` and compute every layer's dynamics.

    `render_layer`: when the layers are shared between two processes, each process also
    renders its layers with it (`RunDynamics.prerendered`), so that writing the report is
    shared too (the JSON of 20 ResNet-50 checkpoints took 0.04 s, all of it after both
    processes had finished). With it and the cut that counts the optimizer state
    (`_LayerAccumulator.swept_bytes`), `bnwd inspect --format json` of those runs took 0.658 s
    instead of 0.708 s for torch files and 0.431 s instead of 0.466 s for safetensors (medians
    of 11 and 15 interleaved runs).

    With `options.processes` 2, a large run's layers are shared with a second process
    (metrics/split.py): on 2 cores, 20 ResNet-50 checkpoints, the whole `bnwd inspect` took
    0.88 s instead of 1.07 s for torch files and 0.45 s instead of 0.59 s for safetensors
    (medians of 9 interleaved runs, `cat` of the same files 0.59 s and 0.26 s), for a peak of
    288 and 251 MB in both processes together instead of about 170 MB. If the processes do not
    both finish, the analysis is run again in one process, which gives the same report or
    raises what one process raises.
    """
    options = options or InspectOptions()
    if options.processes > 1:
        try:
            return _analyze(path, options, progress, render_layer)
        except SplitFailedError:
            return _analyze(path, replace(options, processes=1), progress, None)
    return _analyze(path, options, progress, None)


def _analyze(
    path: Path,
    options: InspectOptions,
    progress: Progress | None,
    render_layer: LayerRenderer | None,
) -> RunDynamics:
    pattern = _compile(options.layers)
    run = discover_run(path, trust_pickle=options.trust_pickle, strict=options.strict)
    # warnings in order, and where window k's layers' warnings go, k itself
    warnings: list[str | int] = [p.message + " (skipped)" for p in run.problems]
    notes = list(run.notes)

    accumulators: dict[str, _LayerAccumulator] = {}
    infos: list[CheckpointInfo] = []
    snapshots: list[OptimizerSnapshot | None] = []
    previous: OpenCheckpoint | None = None
    window: list[_Visit] = []
    classification: ModelClassification | None = options.classification
    family: OptimizerFamily | None = None
    total = len(run.checkpoints)
    windows = 0
    fork: Fork | None = None
    order: list[str] = []

    def sweep_window() -> None:
        """Measure every layer over the open window, then keep only its last checkpoint."""
        nonlocal previous, windows
        unreleased = 0
        warnings.append(windows)
        for acc in accumulators.values():
            swept = acc.add_window(
                window, previous, options, family, acc.window_warnings.setdefault(windows, [])
            )
            unreleased += swept
            if unreleased > RELEASE_BUDGET:
                release_all_pages()
                unreleased = 0
        for visit in window[:-1]:
            visit.checkpoint.close()
        if previous is not None:
            previous.close()
        previous = window.pop().checkpoint
        window.clear()
        windows += 1

    try:
        for position, ref in enumerate(run.checkpoints):
            if progress is not None:
                progress(position, total, ref.label)
            try:
                current = open_checkpoint(
                    ref,
                    trust_pickle=options.trust_pickle,
                    use_ema=options.use_ema,
                    preloaded=run.preloaded,
                )
            except CheckpointError as exc:
                if options.strict or "re-run with" in exc.problem:
                    raise
                warnings.append(f"{exc} (skipped)")
                continue
            if window and not current.memory_mapped:
                sweep_window()  # a checkpoint held in memory is swept on its own
            window.append(_Visit(len(infos), current))
            names = current.weights.names()
            if classification is None:
                classification = classify_state_dict(
                    [
                        TensorEntry(
                            n, current.weights.shape(n), is_floating(current.weights.get(n))
                        )
                        for n in names
                    ]
                )
            if not accumulators:
                accumulators = _start_layers(classification, names, current, pattern)
                if not accumulators:
                    raise UsageError(_no_layers_message(options.layers, path))
            snapshot = _snapshot(current, classification, options, notes)
            window[-1].snapshot = snapshot
            if not order:
                order = list(accumulators)
                fork, accumulators = _share(accumulators, window[-1], options, total)
                if fork is not None and fork.child:
                    progress = None  # the parent shows it
            snapshots.append(snapshot)
            if snapshot is not None and family is None:
                family = snapshot.family
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
            if len(window) >= WINDOW or not current.memory_mapped:
                sweep_window()
        if window:
            sweep_window()
        # each process finishes its own layers, and where they are shared renders them too,
        # before the parent waits for the child's
        rendering: tuple[LayerRenderer, Sequence[CheckpointInfo]] | None = None
        if fork is not None and render_layer is not None:
            rendering = (render_layer, tuple(infos))
        found = {name: acc.share(family, rendering) for name, acc in accumulators.items()}
        if fork is not None:
            if fork.child:
                fork.send(found)
            found.update(fork.receive())
    except BaseException as exc:
        if fork is not None:
            if fork.child:
                fork.fail()
            fork.abandon()
            if not isinstance(exc, KeyboardInterrupt | SystemExit):
                raise SplitFailedError(f"the first process stopped: {exc}") from exc
        raise
    finally:
        if fork is not None and not fork.child:
            share_cores(1)
        # a checkpoint may still be open when reading it failed half-way (e.g. a changed shape)
        for visit in window:
            visit.checkpoint.close()
        if previous is not None:
            previous.close()
        if run.preloaded is not None:
            run.preloaded.clear()  # what the pass did not take (skipped, duplicates)
    if progress is not None:
        progress(total, total, "")
    if not infos:
        # every checkpoint failed to open: say why, or the user is left guessing
        problems = [w for w in warnings if isinstance(w, str)]
        why = f" (last problem: {problems[-1].removesuffix(' (skipped)')})" if problems else ""
        raise CheckpointError(path, f"no checkpoint could be read{why}")
    assert classification is not None
    if options.classification is None:
        notes.extend(classification.notes)
    if set(found) != set(order):
        raise SplitFailedError("the two processes' layers do not add up to the run's layers")
    shared = [found[name] for name in order]
    finished = tuple(share.dynamics for share in shared)
    for share in shared:
        notes.extend(share.notes)
        notes.extend(
            f"no implied per-step update from the optimizer state (first at {label}): {reason}"
            for reason, label in share.no_step.items()
        )
    in_order = [
        warning
        for item in warnings
        for warning in (
            [item]
            if isinstance(item, str)
            else [w for share in shared for w in share.window_warnings.get(item, ())]
        )
    ]
    have_state = any(s is not None for s in snapshots)
    texts = tuple(share.text for share in shared)
    return RunDynamics(
        run=run,
        checkpoints=tuple(infos),
        layers=finished,
        classification_method=classification.method,
        optimizer_family=family,
        warnings=tuple(dict.fromkeys(in_order)),
        notes=tuple(dict.fromkeys(notes)),
        snapshots=tuple(snapshots),
        audit=audit_run(
            finished,
            family=family,
            have_optimizer_state=have_state,
            mapping_complete=_mapping_complete(snapshots),
        ),
        prerendered=Prerendered(render_layer, texts) if render_layer and any(texts) else None,
    )


def _share(
    layers: dict[str, _LayerAccumulator],
    first: _Visit,
    options: InspectOptions,
    checkpoints: int,
) -> tuple[Fork | None, dict[str, _LayerAccumulator]]:
    """Fork to share `layers` between two processes where `options` and the run call for it
    (metrics/split.py); this process's share of them (all of them where it did not fork)."""
    if (
        options.processes < 2
        or len(layers) < 2
        or checkpoints < 2
        or not first.checkpoint.memory_mapped
        or not compiled()
        or not can_fork()
    ):
        return None, layers
    sizes = {name: acc.swept_bytes(first) for name, acc in layers.items()}
    if sum(sizes.values()) < SPLIT_MIN_BYTES:
        return None, layers
    parent, child = shares(sizes)
    fork = Fork.start()
    share_cores(2)
    mine = child if fork.child else parent
    return fork, {name: acc for name, acc in layers.items() if name in mine}


def _mapping_complete(snapshots: Sequence[OptimizerSnapshot | None]) -> bool:
    """The last optimizer state named every id it holds."""
    last = next((s for s in reversed(snapshots) if s is not None), None)
    return last is not None and last.mapping is not NameMapping.AMBIGUOUS and not last.unmapped_ids


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
    aliases = _tied_aliases(ckpt, classification)
    params = [
        (p.name, p.shape)
        for p in classification.params
        if not is_buffer_name(p.name) and p.name not in aliases
    ]
    present = set(ckpt.weights.names())
    layernorm_like = {
        p.name
        for p in classification.params
        if p.kind is ParamKind.NORM_AFFINE
        and f"{p.name.rpartition('.')[0]}.running_mean" not in present
    }
    hint = {
        CheckpointFormat.HF_TRAINER: LayoutHint.TRANSFORMERS_TRAINER,
        CheckpointFormat.TIMM: LayoutHint.TIMM,
    }.get(ckpt.ref.format)
    snapshot = read_optimizer_state(
        state,
        params,
        family_hint=options.optimizer,
        aliases=aliases,
        original_names=getattr(ckpt.weights, "original_names", None),
        layout_hint=hint,
        layernorm_params=layernorm_like,
    )
    notes.extend(snapshot.notes)
    return snapshot


def _tied_aliases(ckpt: OpenCheckpoint, classification: ModelClassification) -> dict[str, str]:
    """Later names of tensors that share storage with an earlier one (tied parameters).

    `named_parameters()` lists a tied parameter once, under its first name, so the optimizer
    never sees the others. Only in-memory state dicts can share storage (safetensors files
    refuse shared tensors).
    """
    if not isinstance(ckpt.weights, DictTensorSource):
        return {}
    first: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    for p in classification.params:
        if is_buffer_name(p.name):
            continue
        try:
            tensor = ckpt.weights.get(p.name)
        except KeyError:
            continue
        if tensor.size == 0:
            continue
        key = (
            int(tensor.__array_interface__["data"][0]),
            tuple(tensor.shape),
            tuple(tensor.strides),
        )
        if key in first:
            aliases[p.name] = first[key]
        else:
            first[key] = p.name
    return aliases


def _unit_norm(stats_norm: float, row_norms: np.ndarray | None, rows: int) -> float:
    """Norm of the invariant unit: per-row layers use the root-mean-square row norm."""
    return stats_norm / math.sqrt(rows) if row_norms is not None else stats_norm


@dataclass
class _Visit:
    """A checkpoint of the window being swept."""

    index: int
    """Its position among the checkpoints read."""
    checkpoint: OpenCheckpoint
    snapshot: OptimizerSnapshot | None = None


class _LayerAccumulator:
    def __init__(self, verdict: ParamClassification) -> None:
        self.verdict = verdict
        self.per_row = verdict.granularity is Granularity.PER_ROW and len(verdict.shape) >= 2
        self.points: list[LayerPoint] = []
        self.first_unit: float | None = None
        self.previous_step: int | None = None
        self.samples: list[AngleSample] = []
        self.sample_source: set[str] = set()
        self.last_hyper: ParamHyper | None = None
        self.notes: list[str] = []
        self.no_step: dict[str, str] = {}
        """Why the optimizer state implied no step -> the first checkpoint where it did not."""
        self.window_warnings: dict[int, list[str]] = {}
        """Warnings by the window they came from."""

    def add_window(
        self,
        window: Sequence[_Visit],
        previous: OpenCheckpoint | None,
        options: InspectOptions,
        family: OptimizerFamily | None,
        warnings: list[str],
    ) -> int:
        """Add the checkpoints of `window` (consecutive, opened), `previous` the one before.
        Returns the bytes swept (a layer of more than `RELEASE_BUDGET` is released as it
        goes, and counts 0)."""
        name = self.verdict.name
        tensors: list[np.ndarray] = []
        plans: list[StepPlan | None] = []
        hypers: list[ParamHyper | None] = []
        inputs: list[_StepInputs | None] = []
        for visit in window:
            tensor = self._tensor(visit.checkpoint)
            hyper = visit.snapshot.per_param.get(name) if visit.snapshot is not None else None
            state = _step_inputs(visit.checkpoint, visit.snapshot, hyper, options)
            tensors.append(tensor)
            hypers.append(hyper)
            inputs.append(state)
            plans.append(self._plan(tensor, visit.snapshot, state, family))
        before = previous.weights.get(name) if previous is not None and self.points else None
        steps = [plan.fill if plan is not None else None for plan in plans]
        swept = sum(t.nbytes for t in tensors) + (before.nbytes if before is not None else 0)
        swept += sum(s.x.nbytes + (s.y.nbytes if s.y is not None else 0) for s in steps if s)
        piecewise = swept > RELEASE_BUDGET
        # One sweep over the window measures the steps between its checkpoints and the last
        # optimizer step each one's state implies (`plans`); each tensor is read once.
        found = window_stats(
            tensors,
            before,
            per_row=self.per_row,
            steps=steps,
            release=release_pages if piecewise else None,
        )
        for visit, tensor, hyper, state, plan, stats in zip(
            window, tensors, hypers, inputs, plans, found, strict=True
        ):
            self._record(visit, tensor, hyper, state, plan, stats, options, family, warnings)
        return 0 if piecewise else swept

    def swept_bytes(self, visit: _Visit) -> int:
        """About the bytes a sweep of this layer reads per checkpoint, `visit`'s hyper-parameters
        telling which optimizer state it reads with the weight, as `plan_step` would (that
        state may not be there yet: a checkpoint saved before the first step has none)."""
        nbytes = self._tensor(visit.checkpoint).nbytes
        snapshot = visit.snapshot
        hyper = snapshot.per_param.get(self.verdict.name) if snapshot is not None else None
        if snapshot is None or hyper is None:
            return nbytes
        if snapshot.family.is_sgd:
            return nbytes * (2 if hyper.momentum and not hyper.nesterov else 1)
        return nbytes * (3 if snapshot.family.is_adam else 1)

    def _tensor(self, ckpt: OpenCheckpoint) -> np.ndarray:
        name = self.verdict.name
        ref = ckpt.ref
        try:
            tensor = ckpt.weights.get(name)
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
        return tensor

    def _record(
        self,
        visit: _Visit,
        tensor: np.ndarray,
        hyper: ParamHyper | None,
        inputs: _StepInputs | None,
        plan: StepPlan | None,
        stats: TensorStats,
        options: InspectOptions,
        family: OptimizerFamily | None,
        warnings: list[str],
    ) -> None:
        """One checkpoint's point, from the figures of its sweep."""
        name = self.verdict.name
        index, current, snapshot = visit.index, visit.checkpoint, visit.snapshot
        ref = current.ref
        if stats.nonfinite:
            warnings.append(f"{ref.label}: tensor '{name}' has {stats.nonfinite} NaN/Inf values")
        rows = self.verdict.shape[0] if self.per_row else 1
        unit = _unit_norm(stats.norm, stats.row_norms, rows)
        if self.first_unit is None:
            self.first_unit = unit
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
        if self.points and stats.diff_norm is not None:
            previous_norm = self.points[-1].norm
            relative_step = stats.diff_norm / previous_norm if previous_norm > 0 else None
            angle = stats.angular_update
        implied = self._implied(tensor, current, snapshot, inputs, family, plan, stats.step_stats)
        predicted = None
        if invariant and hyper is not None:
            predicted = self._predict(family, hyper, lr).angle
        per_step = None
        if implied is not None and implied.angular_update is not None:
            per_step, source = implied.angular_update, "optimizer state (implied last step)"
        elif angle is not None and steps_between == 1:
            per_step, source = angle, "consecutive checkpoints one step apart"
        if invariant and per_step is not None and math.isfinite(per_step):
            self.samples.append(AngleSample(index, ref.step, per_step, predicted))
            self.sample_source.add(source)
        if hyper is not None:
            self.last_hyper = hyper
        self.points.append(
            LayerPoint(
                checkpoint=index,
                step=ref.step,
                norm=stats.norm,
                nonfinite=stats.nonfinite,
                row_norm_min=stats.row_norm_min,
                row_norm_max=stats.row_norm_max,
                row_norm_cv=stats.row_norm_cv,
                steps_between=steps_between,
                relative_step=relative_step,
                angular_update=angle,
                lr=lr,
                weight_decay=hyper.weight_decay if hyper is not None else None,
                effective_lr=effective_lr,
                lr_factor=lr_factor,
                implied_relative_update=implied.relative_update if implied else None,
                implied_angle=implied.angular_update if implied else None,
                implied_exact=implied.exact if implied else None,
                optimizer_step=implied.optimizer_step if implied else None,
                equilibrium_angle=predicted,
                optimizer_group=hyper.group if hyper is not None else None,
                momentum=hyper.momentum if hyper is not None else None,
                dampening=hyper.dampening if hyper is not None else None,
                betas=hyper.betas if hyper is not None else None,
                eps=hyper.eps if hyper is not None else None,
            )
        )
        self.previous_step = ref.step

    def _plan(
        self,
        tensor: np.ndarray,
        snapshot: OptimizerSnapshot | None,
        inputs: _StepInputs | None,
        family: OptimizerFamily | None,
    ) -> StepPlan | None:
        """How to compute the implied last step block by block, where `plan_step` can."""
        if inputs is None or snapshot is None:
            return None
        per_param, hyper = inputs
        return plan_step(tensor, per_param, hyper, family or snapshot.family, per_row=self.per_row)

    def _implied(
        self,
        tensor: np.ndarray,
        current: OpenCheckpoint,
        snapshot: OptimizerSnapshot | None,
        inputs: _StepInputs | None,
        family: OptimizerFamily | None,
        plan: StepPlan | None = None,
        measured: TensorStats | None = None,
    ) -> ImpliedStep | None:
        """The last optimizer step this checkpoint's state implies (THEORY.md section 4)."""
        if inputs is None or snapshot is None:
            return None
        per_param, hyper = inputs
        result = implied_step(
            tensor,
            per_param,
            hyper,
            family or snapshot.family,
            per_row=self.per_row,
            plan=plan,
            measured=measured,
        )
        if per_param is not None and plan is None:  # (the window sweep released the plan's)
            release_pages(*(v for v in per_param.values() if isinstance(v, np.ndarray)))
        if isinstance(result, ImpliedStep):
            if result.approximation:
                self.notes.append(f"implied per-step update approximate: {result.approximation}")
            return result
        if self.verdict.kind is ParamKind.SCALE_INVARIANT and result.reason not in self.no_step:
            self.no_step[result.reason] = current.ref.label
        return None

    def _predict(
        self, family: OptimizerFamily | None, hyper: ParamHyper, lr: float | None
    ) -> EquilibriumPrediction:
        rows = self.verdict.shape[0] if self.per_row else 1
        numel = math.prod(self.verdict.shape)
        return predict_equilibrium(
            family,
            lr,
            hyper.weight_decay,
            momentum=hyper.momentum,
            dampening=hyper.dampening,
            betas=hyper.betas,
            unit_size=numel // rows if rows else None,
        )

    def _assess(self, family: OptimizerFamily | None) -> EquilibriumAssessment | None:
        if self.verdict.kind is not ParamKind.SCALE_INVARIANT:
            return None
        last = self.points[-1]
        if self.last_hyper is None:
            prediction = predict_equilibrium(None if family is None else family, None, None)
        else:
            prediction = self._predict(family, self.last_hyper, last.lr)
        rows = self.verdict.shape[0] if self.per_row else 1
        unit = last.norm / math.sqrt(rows) if rows else last.norm
        elapsed = last.optimizer_step if last.optimizer_step is not None else last.step
        return assess_equilibrium(
            prediction,
            self.samples,
            measured_from=" and ".join(sorted(self.sample_source)),
            unit_norm=unit,
            steps_elapsed=elapsed,
            adaptive=family is not None and family.is_adaptive,
        )

    def share(
        self,
        family: OptimizerFamily | None,
        rendering: tuple[LayerRenderer, Sequence[CheckpointInfo]] | None = None,
    ) -> LayerShare:
        """The finished layer with what is reported beside it (notes, warnings), and its
        text where `rendering` (a renderer and the run's checkpoints) is given."""
        dynamics = self.finish(family)
        text = rendering[0](dynamics, rendering[1]) if rendering is not None else None
        return LayerShare(dynamics, self.notes, self.no_step, self.window_warnings, text)

    def finish(self, family: OptimizerFamily | None = None) -> LayerDynamics:
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
        return LayerDynamics(
            self.verdict.name,
            self.verdict.shape,
            self.verdict,
            points,
            summary,
            equilibrium=self._assess(family),
        )


_StepInputs = tuple[Mapping[str, Any] | None, ParamHyper]
"""A parameter's optimizer state and hyper-parameters (`--lr` applied): what the implied last
step is computed from."""


def _step_inputs(
    current: OpenCheckpoint,
    snapshot: OptimizerSnapshot | None,
    hyper: ParamHyper | None,
    options: InspectOptions,
) -> _StepInputs | None:
    """A parameter's optimizer state and hyper-parameters (--lr applied), when it has them."""
    state = current.optimizer_state
    if snapshot is None or hyper is None or state is None or hyper.optimizer_id is None:
        return None
    per_param = param_state(state, hyper.optimizer_id)
    return per_param, hyper if options.lr is None else replace(hyper, lr=options.lr)


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
