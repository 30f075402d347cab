"""Per-tensor arithmetic of the streaming pass, in float64 accumulation.

Differences are taken element-wise (`w_t - w_{t-1}`), never recovered from norms and dot
products: a relative step of 1e-6 would drown in the cancellation of `|a|^2 + |b|^2 - 2<a,b>`.
The angle between a and b = a + d splits b into its parts along and across a,
    across = |d - (<d,a>/|a|^2) a|  (or the same of b, whichever of d, b is shorter),
    along = <b,a> / |a|,   angle = atan2(across, along),
which stays accurate for tiny angles (where `acos` of a cosine near 1 does not) and also when the
step is mostly a change of norm: the chord form `(|a-b|^2 - (|a|-|b|)^2) / (|a||b|)` cancels
there (a pure rescaling came out rotated, a vector flipped onto a tiny one not at all).

How it runs (the streaming pass spends its time here; see benchmarks/bench_inspect.py):
per row, four float64 sums are accumulated in one sweep over the pair, `|b|^2`, `|a|^2` (or
taken from the previous call), `|d|^2` and `<d,a>` (b current, a previous, d = b - a), in
cache-sized blocks: a block of each input is widened to float64 (exact for float32/16 and
bfloat16), `d` is subtracted in float64 (exact unless the exponents of a and b differ by more
than 29), and the products (exact: a product of two float32 values fits a float64) are
accumulated in float64. No float64 copy of a whole tensor is made. The sweep is compiled
(`_sweep.c`, built with the package, GIL released, a tensor split over all cores); where it is
not built, or for dtypes it does not take, the same blocks go through numpy (`_sweep_numpy`).
The streaming pass sweeps a window of consecutive checkpoints at once (`window_stats`): each
block of each checkpoint is widened once and serves as the previous block of the next pair.
When the caller knows the step d directly (an optimizer's update), a is never formed: the sweep
takes `<d,b>`, then `|a|^2 = |b|^2 - 2<d,b> + |d|^2` and `<d,a> = <d,b> - |d|^2`, which only
cancel when a is much shorter than b (`PREV_TINY`; such rows are recomputed explicitly).
The figures then follow from the sums: `along = (|a|^2 + <d,a>) / |a|`,
`across^2 = |d|^2 - <d,a>^2 / |a|^2`. Error bound: with `g` the relative error of a float64 sum of
exact products (below 1e-11 even for 65536-term blocks summed naively, about 1e-14 in practice),
`across^2` is off by at most `4 g |d|^2` (Cauchy-Schwarz on `<d,a>`), i.e. relatively by
`4 g / TAU` where `across^2 >= TAU |d|^2`. Rows where the step is almost purely radial
(`across^2 < TAU |d|^2`) or where b is shorter than d are recomputed with the explicit
projection above (`rotation_angle`), which has no such cancellation.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from bnwd_cli.checkpoints.arrays import as_array, tag_of, widened
from bnwd_cli.metrics.split import available_cores

if TYPE_CHECKING:  # imported where a pool is first made: two processes sweep a thread each
    from concurrent.futures import ThreadPoolExecutor

try:
    from bnwd_cli.metrics import _sweep as _compiled  # type: ignore[attr-defined]
except ImportError:  # not built (no C compiler at install time): the numpy sweep does the work
    _compiled = None


@dataclass(frozen=True, slots=True)
class TensorStats:
    """Figures of one tensor at one checkpoint (and its change since the previous one)."""

    norm: float
    sum_sq: float
    nonfinite: int
    row_norms: np.ndarray | None
    """Per-row norms (float64), for per-row invariant weights."""
    diff_norm: float | None = None
    angle: float | None = None
    """Whole-tensor angle between this and the previous checkpoint, radians."""
    row_angles: np.ndarray | None = None
    row_sq: np.ndarray | None = None
    """Per-row sums of squares (float64), to hand back as `previous_row_sq` with the next
    checkpoint: it saves one of the five sweeps over the pair."""
    previous_sum_sq: float | None = None
    """|previous|^2 (with a `step`, the previous tensor is never formed: this is its norm)."""
    step_stats: TensorStats | None = None
    """The figures for `with_step` (see `tensor_stats`)."""
    angular_update: float | None = None
    """The angle as reports give it: `angle`, or per row the root-mean-square of the finite
    `row_angles` (None when no row has one)."""
    row_norm_min: float | None = None
    row_norm_max: float | None = None
    row_norm_cv: float | None = None
    """Coefficient of variation (std / mean) of `row_norms`; None when the mean is 0."""


LINEAR, ADAM = 1, 2


@dataclass(frozen=True, slots=True)
class StepFormula:
    """A step `w_t - w_{t-1}` known element-wise from an optimizer's state, never formed whole:

    - `LINEAR`: `scale * x` (a given step: scale 1; heavy-ball SGD: `-lr * momentum_buffer`);
    - `ADAM`: `scale * ((x / c1) / (sqrt(y) / rc2 + eps) + decay * w_t)`, with x the first and
      y the second moment, in the order of operations of `torch.optim.Adam`.

    `x` and `y` have the weight's shape. The compiled sweep evaluates it per block in C, the
    numpy sweep with `fill`.
    """

    kind: int
    x: np.ndarray
    y: np.ndarray | None = None
    scale: float = 1.0
    c1: float = 1.0
    rc2: float = 1.0
    eps: float = 0.0
    decay: float = 0.0

    def rows(self, per_row: bool) -> StepFormula:
        y = None if self.y is None else as_rows(self.y, per_row)
        x = as_rows(self.x, per_row)
        return StepFormula(self.kind, x, y, self.scale, self.c1, self.rc2, self.eps, self.decay)

    def fill(
        self,
        r0: int,
        r1: int,
        c0: int,
        c1: int,
        w: np.ndarray,
        out: np.ndarray,
        scratch: np.ndarray,
    ) -> None:
        """The step for rows [r0, r1), columns [c0, c1) of the rows layout, into the float64
        block `out`; `w` holds the same block of the weight in float64."""
        cast_block(out, self.x, r0, r1, c0, c1)
        if self.kind == ADAM:
            assert self.y is not None
            cast_block(scratch, self.y, r0, r1, c0, c1)
            np.sqrt(scratch, out=scratch)
            scratch /= self.rc2
            scratch += self.eps
            out /= self.c1
            out /= scratch
            if self.decay:
                out += self.decay * w
        if self.scale != 1.0:
            out *= self.scale

    def evaluate(self, w: np.ndarray) -> np.ndarray:
        """The whole step in float64 for the rows-layout weight `w` (rare paths)."""
        rows, cols = w.shape
        out, scratch = np.empty((rows, cols)), np.empty((rows, cols))
        with np.errstate(all="ignore"):
            self.fill(0, rows, 0, cols, w.astype(np.float64), out, scratch)
        return out


def as_rows(t: np.ndarray, per_row: bool) -> np.ndarray:
    if t.ndim == 0:
        return t.reshape(1, 1)
    return t.reshape(t.shape[0], -1) if per_row and t.ndim >= 2 else t.reshape(1, -1)


def rotation_angle(prev: np.ndarray, diff: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Angle (radians) between each row of `prev` and of `cur = prev + diff` (float64 rows);
    NaN where either row is zero or not finite."""
    with np.errstate(all="ignore"):
        prev_sq = (prev * prev).sum(axis=1)
        cur_sq = (cur * cur).sum(axis=1)

        def across_prev(x: np.ndarray) -> np.ndarray:
            coef = (x * prev).sum(axis=1) / prev_sq
            return np.sqrt(np.square(x - coef[:, None] * prev).sum(axis=1))

        # The part across `prev` is the same for the step and for `cur`; take it from the
        # shorter of the two, whose rounding errors are the smaller.
        across = np.where((diff * diff).sum(axis=1) <= cur_sq, across_prev(diff), across_prev(cur))
        along = (cur * prev).sum(axis=1) / np.sqrt(prev_sq)
        angle = np.arctan2(across, along)
    valid = (prev_sq > 0) & (cur_sq > 0) & np.isfinite(angle)
    return np.where(valid, angle, np.nan)


def tensor_stats(
    current: Any,
    previous: Any | None,
    *,
    per_row: bool,
    previous_row_sq: np.ndarray | None = None,
    step: Any | StepFormula | None = None,
    with_step: StepFormula | None = None,
) -> TensorStats:
    """Norms of `current`; with `previous`, also the step and the angle between them.

    Arrays are numpy arrays (torch tensors are taken too, and viewed as arrays).
    `previous_row_sq`: the `row_sq` of `previous` from an earlier call (optional, saves a sweep).
    `step`: `current - previous` as the caller knows it directly (e.g. from an optimizer's
    state, where forming `previous` first and subtracting again would lose a small step to
    rounding), an array or a `StepFormula`; given instead of `previous`, which is then
    `current - step`.
    `with_step`: a second, known step of `current` (the optimizer's last one), measured in the
    same sweep over `current` (one read of it instead of two); its figures, as
    `tensor_stats(current, None, step=with_step)` gives them, are in `step_stats`.
    """
    current = as_array(current)
    previous = None if previous is None else as_array(previous)
    if step is not None and not isinstance(step, StepFormula):
        step = as_array(step)
    if step is not None:
        if previous is not None or with_step is not None:
            raise ValueError("give previous or step, and with_step only with previous")
        if isinstance(step, np.ndarray) and tuple(step.shape) != tuple(current.shape):
            raise ValueError(f"step shape {tuple(step.shape)} != {tuple(current.shape)}")
    elif previous is not None and tuple(previous.shape) != tuple(current.shape):
        raise ValueError(f"shapes differ: {tuple(previous.shape)} vs {tuple(current.shape)}")
    # Integer or boolean tensors (rare: the pass measures floating-point ones) as float64.
    current, previous = _as_floating(current), _as_floating(previous)
    if isinstance(step, np.ndarray):
        step = _as_floating(step)
    cur = as_rows(current, per_row)
    rows = cur.shape[0]
    extra = with_step.rows(per_row) if with_step is not None else None
    if previous is None and step is None:
        if extra is None:
            return _stats_from_sums(cur, None, None, _row_sums(cur, None, None, need_prev_sq=False))
        sums = _row_sums(cur, None, None, need_prev_sq=False, extra=extra)
        norms = _stats_from_sums(cur, None, None, sums[:4])
        step_sums = _derive_previous(sums, _EE, _EB)
        return replace(norms, step_stats=_stats_from_sums(cur, None, extra, step_sums))
    prev = as_rows(previous, per_row) if previous is not None else None
    diff: np.ndarray | StepFormula | None = None
    if isinstance(step, StepFormula):
        diff = step.rows(per_row)
    elif step is not None:
        diff = as_rows(step, per_row)
    known_prev_sq = None
    if prev is not None and previous_row_sq is not None and np.size(previous_row_sq) == rows:
        known_prev_sq = np.asarray(previous_row_sq, dtype=np.float64).reshape(-1)
    total = _row_sums(cur, prev, diff, need_prev_sq=known_prev_sq is None, extra=extra)
    if known_prev_sq is not None:
        total[_AA] = known_prev_sq
    stats = _stats_from_sums(cur, prev, diff, total[:4])
    if extra is None:
        return stats
    step_sums = _derive_previous(total, _EE, _EB)
    return replace(stats, step_stats=_stats_from_sums(cur, None, extra, step_sums))


WINDOW = 8
"""Checkpoints swept together by `window_stats` (the streaming pass keeps this many open). Each
block of a checkpoint's tensor is read once and serves as the previous block of the next pair
while it is in cache. Measured on this project's 2-core machine (ResNet-50 safetensors, maps
already faulted in, both cores): 9.9 / 8.9 / 11.4 ms per checkpoint with windows of 4 / 8 / 16
(16 is too many streams at once); on one core, 14.6 ms with 8 against 18 ms pair by pair."""


def window_stats(
    tensors: Sequence[Any],
    previous: Any | None,
    *,
    per_row: bool,
    steps: Sequence[StepFormula | None] | None = None,
    release: Callable[..., None] | None = None,
) -> list[TensorStats]:
    """`tensor_stats` of one tensor at consecutive checkpoints, in one sweep.

    Equal to `[tensor_stats(t[k], t[k - 1], per_row=per_row, with_step=steps[k]) for k ...]`
    with `t[-1] = previous` (None: the first checkpoint has no step), but each checkpoint's
    bytes are read once instead of twice, and the figures of all pairs are taken together
    (a ResNet-50 has 161 tensors; per-call costs would otherwise add up per checkpoint).
    `release`: called with the parts of every input as the sweep is done with them
    (`mapped.release_pages`), which keeps resident memory near `PIECE_BYTES` however large the
    tensors and the window (a single row longer than a piece is swept whole).
    """
    count = len(tensors)
    step_list: list[StepFormula | None] = list(steps) if steps is not None else [None] * count
    if len(step_list) != count:
        raise ValueError(f"{count} tensors but {len(step_list)} steps")
    arrays = [_as_floating(as_array(t)) for t in tensors]
    before = None if previous is None else _as_floating(as_array(previous))
    shape = tuple(arrays[0].shape) if arrays else ()
    for t in arrays[1:] + ([before] if before is not None else []):
        if tuple(t.shape) != shape:
            raise ValueError(f"shapes differ: {tuple(t.shape)} vs {shape}")
    chain = [before, *arrays]
    extras = [s.rows(per_row) if s is not None else None for s in step_list]
    # element kinds, once each (a reshape to the rows layout keeps a C-contiguous array's kind)
    kinds = tuple(_kind(t) for t in chain)
    step_kinds = [
        None if e is None else (_kind(e.x), _kind(e.y) if e.y is not None else None) for e in extras
    ]
    if (
        count == 0
        or count > WINDOW_MAX
        or arrays[0].size == 0
        or not compiled()
        or None in kinds
        or any(
            k[0] is None or (e.y is not None and k[1] is None)
            for e, k in zip(extras, step_kinds, strict=True)
            if e is not None and k is not None
        )
    ):
        return _window_by_pairs(arrays, before, per_row, step_list, release)
    rows_layout = [as_rows(t, per_row) if t is not None else None for t in chain]
    rows, cols = rows_layout[1].shape  # type: ignore[union-attr]
    out = np.zeros((count, _SUMS, rows))
    specs = tuple(_spec(e, k) for e, k in zip(extras, step_kinds, strict=True))
    inputs = [t for t in rows_layout if t is not None]
    for e in extras:
        if e is not None:
            inputs += [e.x] if e.y is None or e.kind != ADAM else [e.x, e.y]
    per_element = sum(t.itemsize for t in inputs)
    workers = _workers(True)
    for r0, r1, c0, c1 in _pieces(rows, cols, max(1, PIECE_BYTES // per_element)):
        _window_piece(out, (r0, r1, c0, c1), rows, cols, tuple(rows_layout), kinds, specs, workers)
        if release is not None:
            release(*(t[r0:r1, c0:c1] for t in inputs))
    return _window_figures(out, rows_layout, extras, release)


PIECE_BYTES = 16 << 20
"""A window is swept in pieces of about this many bytes of input (all checkpoints and optimizer
state together), each released before the next is read."""


def _pieces(rows: int, cols: int, elements: int) -> list[_Item]:
    """The rows layout in rectangles of about `elements` (whole rows, or parts of one row)."""
    if rows > 1 or cols <= elements:
        per = max(1, elements // max(cols, 1))
        return [(r, min(rows, r + per), 0, cols) for r in range(0, rows, per)]
    return [(0, 1, c, min(cols, c + elements)) for c in range(0, cols, elements)]


def _window_piece(
    out: np.ndarray,
    piece: _Item,
    rows: int,
    cols: int,
    *args: Any,
) -> None:
    """Add the window sums of one rectangle to `out`, split over the worker threads.

    With at least as many pairs as threads, each thread takes a run of consecutive
    checkpoints (the one where two runs meet is read by both): every thread then streams
    from about n/threads + 1 tensors at once instead of n + 1, which memory serves faster
    (measured on 2 cores, `window_stats` of 8 pairs of a 2048 x 4608 float32 tensor: 3.1 ms
    per checkpoint against 3.5 ms with the rows split). Each pair's sums are added up as in
    one thread, bit for bit.
    """
    assert _compiled is not None
    *shared, workers = args
    chain, kinds, specs = shared
    r0, r1, c0, c1 = piece
    size = (r1 - r0) * (c1 - c0) * len(chain)
    parts = workers if size >= PARALLEL_MIN and workers > 1 else 1
    pairs = len(specs)
    if parts > 1 and pairs >= parts:
        cuts = [pairs * i // parts for i in range(parts + 1)]
        runs: list[tuple[Any, ...]] = [
            (out[a:b], rows, cols, *piece, chain[a : b + 1], kinds[a : b + 1], specs[a:b])
            for a, b in itertools.pairwise(cuts)
        ]
        futures = [_executor(workers).submit(_compiled.window_sums, *run) for run in runs[1:]]
        _compiled.window_sums(*runs[0])
        for future in futures:
            future.result()
        return
    items = _split_rect(piece, parts)
    if len(items) == 1:
        _compiled.window_sums(out, rows, cols, *piece, *shared)
        return
    partials = [np.zeros_like(out) for _ in items[1:]]
    futures = [
        _executor(workers).submit(_compiled.window_sums, part, rows, cols, *item, *shared)
        for part, item in zip(partials, items[1:], strict=True)
    ]
    _compiled.window_sums(out, rows, cols, *items[0], *shared)
    for future, part in zip(futures, partials, strict=True):
        future.result()
        out += part


def _split_rect(piece: _Item, parts: int) -> list[_Item]:
    """`_split` of a rectangle of the rows layout."""
    r0, r1, c0, c1 = piece
    return [
        (r0 + a0, r0 + a1, c0 + b0, c0 + b1) for a0, a1, b0, b1 in _split(r1 - r0, c1 - c0, parts)
    ]


WINDOW_MAX = 64
"""The most checkpoints the compiled window sweep takes in one call (`MAX_WINDOW` in C)."""


def _window_by_pairs(
    arrays: list[np.ndarray],
    before: np.ndarray | None,
    per_row: bool,
    steps: list[StepFormula | None],
    release: Callable[..., None] | None = None,
) -> list[TensorStats]:
    """`window_stats` without the compiled sweep, pair by pair."""
    found: list[TensorStats] = []
    row_sq = None
    for tensor, step in zip(arrays, steps, strict=True):
        stats = tensor_stats(
            tensor, before, per_row=per_row, previous_row_sq=row_sq, with_step=step
        )
        found.append(stats)
        if release is not None:
            release(before, *((step.x, step.y) if step is not None else ()))
        before, row_sq = tensor, stats.row_sq
    if release is not None:
        release(before)
    return found


def _window_figures(
    out: np.ndarray,
    chain: list[np.ndarray | None],
    extras: list[StepFormula | None],
    release: Callable[..., None] | None = None,
) -> list[TensorStats]:
    """`_stats_from_sums` of every pair of a window, from its sums (pairs x sums x rows).

    The usual case is computed for all pairs at once; a pair with anything unusual (NaN/Inf,
    rows whose angle needs the explicit projection, a derived previous weight that may have
    cancelled) goes through `_stats_from_sums`, which handles it.
    """
    count, _, rows = out.shape
    with np.errstate(all="ignore"):
        whole = out.sum(axis=2) if rows > 1 else out[:, :, 0]
        whole_list = whole.tolist()
        per_row = rows > 1
        if per_row:
            with_step = any(e is not None for e in extras)
            figures = _compiled_row_figures if _has_row_figures else _row_figures
            row_norms, summaries, angles, redo, rms, *on_step = figures(out, with_step)
            if with_step:
                step_angles, step_redo, step_rms = on_step
    found: list[TensorStats] = []

    def reread(cur: np.ndarray, prev: np.ndarray | None, extra: StepFormula | None) -> None:
        """The slow path read these again: hand their pages back too."""
        if release is not None:
            release(cur, prev, *((extra.x, extra.y) if extra is not None else ()))

    for k in range(count):
        cur, prev, extra = chain[k + 1], chain[k], extras[k]
        assert cur is not None
        bb, aa, dd, da, ee, eb = whole_list[k]
        if not math.isfinite(bb):
            found.append(_pair_from_sums(cur, prev, extra, out[k]))
            reread(cur, prev, extra)
            continue
        if prev is not None:
            angle, explicit = _whole_angle(bb, aa, dd, da)
            if explicit or (per_row and redo[k]) or not (dd >= 0):
                found.append(_pair_from_sums(cur, prev, extra, out[k]))
                reread(cur, prev, extra)
                continue
        norm = math.sqrt(bb)
        lo = hi = cv = None
        norms_k, sq_k = None, out[k, _BB]
        if per_row:
            lo, hi, cv = summaries[k]
            norms_k = row_norms[k]
        step = None
        if extra is not None:
            step_aa, step_da = bb - 2.0 * eb + ee, eb - ee
            step_angle, explicit = _whole_angle(bb, step_aa, ee, step_da)
            inexact = not (step_aa >= PREV_TINY * bb)
            if explicit or inexact or (per_row and step_redo[k]) or not (ee >= 0):
                step = _stats_from_sums(cur, None, extra, _derive_previous(out[k], _EE, _EB))
                reread(cur, None, extra)
            else:
                step = TensorStats(
                    norm, bb, 0, norms_k, diff_norm=math.sqrt(ee), angle=step_angle,
                    row_angles=step_angles[k] if per_row else None, row_sq=sq_k,
                    previous_sum_sq=step_aa,
                    angular_update=step_rms[k] if per_row else step_angle,
                    row_norm_min=lo, row_norm_max=hi, row_norm_cv=cv,
                )  # fmt: skip
        if prev is None:
            stats = TensorStats(
                norm, bb, 0, norms_k, row_sq=sq_k, step_stats=step,
                row_norm_min=lo, row_norm_max=hi, row_norm_cv=cv,
            )  # fmt: skip
        else:
            stats = TensorStats(
                norm, bb, 0, norms_k,
                diff_norm=math.sqrt(dd), angle=angle,
                row_angles=angles[k] if per_row else None,
                row_sq=sq_k, previous_sum_sq=aa, step_stats=step,
                angular_update=rms[k] if per_row else angle,
                row_norm_min=lo, row_norm_max=hi, row_norm_cv=cv,
            )  # fmt: skip
        found.append(stats)
    return found


_RowFigures = tuple[Any, ...]
"""Per-row figures of a window's pairs: the row norms (pairs x rows), each pair's `_row_summary`,
the angles (pairs x rows), whether a pair has rows to redo, the root-mean-square of its finite
angles (None: none); then, with an optimizer step, the step's angles, rows to redo and rms."""


def _row_figures(out: np.ndarray, with_step: bool) -> _RowFigures:
    """The per-row figures of a window's sums (pairs x sums x rows), in numpy."""
    row_norms = np.sqrt(out[:, _BB, :])
    by_sum = out.transpose(1, 0, 2)
    angles, explicit_rows = _row_angles(by_sum)
    found = [
        row_norms, _row_summary(row_norms), angles, _any_per_row(explicit_rows),
        _rms_finite(angles),
    ]  # fmt: skip
    if with_step:
        step_sums = _previous_sums(by_sum[_BB], by_sum[_EE], by_sum[_EB])
        step_angles, step_explicit = _row_angles(step_sums)
        step_redo = _any_per_row(step_explicit | _derived_prev_inexact(step_sums))
        found += [step_angles, step_redo, _rms_finite(step_angles)]
    return tuple(found)


def _compiled_row_figures(out: np.ndarray, with_step: bool) -> _RowFigures:
    """`_row_figures` in three calls instead of about 40 (`_sweep.figure_terms`, one
    `numpy.arctan2`, `_sweep.finite_rms`): the same numbers bit for bit, NaN where it has NaN.
    Most layers of a network are small, and numpy's cost per call was most of their figures'
    time: a window of 8 pairs with an optimizer step, 64 rows 169 -> 75 us, 2048 rows
    694 -> 442 us; the whole `bnwd inspect` of a ResNet-50 run 6% faster (docs/performance.md)."""
    assert _compiled is not None
    count, _, rows = out.shape
    sets = 2 if with_step else 1
    terms = np.empty((2, sets * count, rows))
    row_norms = np.empty((count, rows))
    summary = np.empty((count, 6))
    _compiled.figure_terms(out, count, rows, with_step, terms, row_norms, summary)
    angles = np.arctan2(terms[0], terms[1], out=terms[1])
    rms = np.empty(sets * count)
    _compiled.finite_rms(angles, sets * count, rows, rms)
    rms_list = [None if v != v else v for v in rms.tolist()]
    summary_list = summary.tolist()
    summaries = [
        (lo, hi, sd / mean if mean > 0 else None) for lo, hi, mean, sd, _, _ in summary_list
    ]
    found = [
        row_norms, summaries, angles[:count], [bool(s[4]) for s in summary_list],
        rms_list[:count],
    ]  # fmt: skip
    if with_step:
        found += [angles[count:], [bool(s[5]) for s in summary_list], rms_list[count:]]
    return tuple(found)


_has_row_figures = _compiled is not None and hasattr(_compiled, "figure_terms")
"""An older build of the sweep has no figure functions: numpy then does that part."""


def _any_per_row(mask: np.ndarray) -> list[bool]:
    return [bool(v) for v in np.asarray(mask.any(axis=1))]


def _pair_from_sums(
    cur: np.ndarray, prev: np.ndarray | None, extra: StepFormula | None, sums: np.ndarray
) -> TensorStats:
    """One pair of a window the usual case does not cover, as `tensor_stats` computes it."""
    stats = _stats_from_sums(cur, prev, None, sums[:4].copy())
    if extra is None:
        return stats
    step = _stats_from_sums(cur, None, extra, _derive_previous(sums, _EE, _EB))
    return replace(stats, step_stats=step)


def _as_floating(t: Any) -> Any:
    if isinstance(t, np.ndarray) and t.dtype.kind != "f" and tag_of(t.dtype) is None:
        return t.astype(np.float64)
    return t


# ----------------------------------------------------------------------------- the sweep

_BB, _AA, _DD, _DA, _EE, _EB = 0, 1, 2, 3, 4, 5
_SUMS = 6
_FourSums = np.ndarray | Sequence[np.ndarray]
"""|b|^2, |a|^2, |d|^2 and <d,a> per row: the first four of the sums, or four arrays."""
CHUNK = 1 << 15
"""Elements per block of the numpy sweep: one thread's float64 blocks (about 1 MiB) stay in its
core's L2 cache. Measured: 2^16 is no faster, 2^17 slower; smaller blocks pay more per call."""
PARALLEL_MIN = 1 << 18
"""Tensors at least this large are split over the worker threads."""
TAU = 1.0 / 16.0
"""Rows with across^2 < TAU |d|^2 (a step almost along the weight) take the explicit path."""
PREV_TINY = 1e-6
"""With a given step, rows where |a|^2 < PREV_TINY |b|^2 recompute their sums explicitly (the
derived |a|^2 is then accurate to about 4e-16 / PREV_TINY)."""
SPLIT = 4096
"""A long row is dotted in pieces of this length: BLAS may start threads of its own for one
long dot product, which fights the worker threads."""

# Element kinds of the compiled sweep.
_KINDS = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}
_BF16_KIND = 2

_local = threading.local()
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def compiled() -> bool:
    """Whether the compiled sweep is in use (BNWD_NO_COMPILED=1 turns it off)."""
    return _compiled is not None and os.environ.get("BNWD_NO_COMPILED", "") in ("", "0")


def _workers(compiled_sweep: bool) -> int:
    """Threads sharing one large tensor: BNWD_THREADS, else all cores for the compiled sweep
    (it releases the GIL) and 1 for the numpy sweep.

    Measured on 2 cores (benchmarks/bench_inspect.py): the compiled sweep of a ResNet-50-sized
    pair takes 19 ms on one thread, 10 ms on two. A second thread made the numpy sweep slower:
    each block is a handful of short numpy calls, and two threads spend the gain handing the
    GIL back and forth.
    """
    setting = os.environ.get("BNWD_THREADS", "")
    if setting.isdigit() and int(setting) > 0:
        return int(setting)
    return max(1, _CORES // _sharing) if compiled_sweep else 1


_sharing = 1
"""Processes sweeping at once (`share_cores`): each takes its part of the cores."""


def share_cores(processes: int) -> None:
    """Give this process's sweeps 1/`processes` of the cores (metrics/split.py: the layers of a
    run shared between processes); `share_cores(1)` gives them all back."""
    global _sharing
    _sharing = max(1, processes)


_CORES = min(available_cores(), 8)


def _executor(workers: int) -> ThreadPoolExecutor:
    from concurrent.futures import ThreadPoolExecutor

    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bnwd-sweep")
        return _pool


def _kind(t: np.ndarray | None) -> int | None:
    """The compiled sweep's element kind of `t` (None: it does not take `t`)."""
    if t is None:
        return 0
    if not t.flags.c_contiguous:
        return None
    if tag_of(t.dtype) == "bfloat16":
        return _BF16_KIND
    return _KINDS.get(t.dtype) if t.dtype.isnative else None


def _spec(
    step: np.ndarray | StepFormula | None,
    kinds: tuple[int | None, int | None] | None = None,
) -> tuple[Any, ...] | None:
    """The compiled sweep's tuple for a step (`kinds`: those of its x and y, if known)."""
    if step is None:
        return None
    if isinstance(step, np.ndarray):
        step = StepFormula(LINEAR, step)
    y = step.y if step.y is not None else step.x  # (a linear step has no y: x stands in)
    if kinds is None:
        x_kind, y_kind = _kind(step.x), _kind(y)
    else:
        x_kind = kinds[0]
        y_kind = kinds[1] if step.y is not None else x_kind
    return (
        step.kind, step.x, x_kind, y, y_kind,
        step.scale, step.c1, step.rc2, step.eps, step.decay,
    )  # fmt: skip


def _takes_compiled(
    b: np.ndarray,
    a: np.ndarray | None,
    d: np.ndarray | StepFormula | None,
    extra: StepFormula | None,
) -> bool:
    if not compiled():
        return False
    inputs: list[np.ndarray | None] = [b, a]
    for step in (d, extra):
        if isinstance(step, StepFormula):
            inputs += [step.x, step.y]
        elif step is not None:
            inputs.append(step)
    return all(_kind(t) is not None for t in inputs)


_Item = tuple[int, int, int, int]  # rows [r0, r1), columns [c0, c1)


def _split(rows: int, cols: int, parts: int) -> list[_Item]:
    """The rows layout cut into `parts` rectangles of about equal size (by rows when there are
    enough of them, else by columns of the single row)."""
    if rows >= parts:
        cuts = [rows * i // parts for i in range(parts + 1)]
        return [(cuts[i], cuts[i + 1], 0, cols) for i in range(parts)]
    if rows == 1:
        cuts = [cols * i // parts for i in range(parts + 1)]
        return [(0, 1, cuts[i], cuts[i + 1]) for i in range(parts)]
    return [(r, r + 1, 0, cols) for r in range(rows)]


def _row_sums(
    b: np.ndarray,
    a: np.ndarray | None,
    d: np.ndarray | StepFormula | None,
    *,
    need_prev_sq: bool,
    extra: StepFormula | None = None,
) -> np.ndarray:
    """Rows: |b|^2, |a|^2, |d|^2, <d,a> (with a given step d: <d,b> in the place of <d,a>, then
    `_derive_previous`) and, with `extra`, |e|^2 and <e,b>."""
    rows, cols = b.shape
    use_compiled = _takes_compiled(b, a, d, extra)
    workers = _workers(use_compiled)
    if use_compiled:
        args = (
            b, _kind(b), a, _kind(a) if a is not None else 0,
            _spec(d) if a is None else None, _spec(extra),
        )  # fmt: skip

        def run(item: _Item) -> np.ndarray:
            assert _compiled is not None
            out = np.zeros((_SUMS, rows))
            _compiled.row_sums(out, rows, cols, *item, *args)
            return out

        parts = workers if b.size >= PARALLEL_MIN and workers > 1 else 1
        items = _split(rows, cols, parts)
        if len(items) == 1:
            total = run(items[0])
        else:
            futures = [_executor(workers).submit(run, item) for item in items[1:]]
            total = run(items[0])  # the caller takes a share
            for future in futures:
                total += future.result()
    else:
        items = _items(rows, cols)
        sweep_args = (b, a, d, rows, need_prev_sq, extra)
        if b.size < PARALLEL_MIN or workers == 1 or len(items) < 2:
            total = _sweep_numpy(items, *sweep_args)
        else:
            share = -(-len(items) // workers)
            shares = [items[i : i + share] for i in range(0, len(items), share)]
            futures = [
                _executor(workers).submit(_sweep_numpy, chunk, *sweep_args) for chunk in shares[1:]
            ]
            total = _sweep_numpy(shares[0], *sweep_args)
            for future in futures:
                total += future.result()
    if a is None and d is not None:
        total[:4] = _derive_previous(total, _DD, _DA)
    return total


# ----------------------------------------------------------------------------- numpy sweep

_Blocks = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _blocks() -> _Blocks:
    """This thread's float64 scratch blocks (b, a, d, e, spare) and room for partial sums."""
    blocks: _Blocks | None = getattr(_local, "blocks", None)
    if blocks is None or blocks[0].size != CHUNK:
        e = np.empty
        fresh = (e(CHUNK), e(CHUNK), e(CHUNK), e(CHUNK), e(CHUNK), e(_SUMS))
        _local.blocks = fresh
        return fresh
    return blocks


def _items(rows: int, cols: int) -> list[_Item]:
    if cols <= CHUNK:
        per_block = max(1, CHUNK // max(cols, 1))
        return [(r, min(rows, r + per_block), 0, cols) for r in range(0, rows, per_block)]
    return [(r, r + 1, c, min(cols, c + CHUNK)) for r in range(rows) for c in range(0, cols, CHUNK)]


def _row_dot(x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    """out[i] = <x[i], y[i]>, products and sums in float64."""
    rows, width = x.shape
    if rows == 1 and width > SPLIT:
        pieces = width // SPLIT
        head = pieces * SPLIT
        total = _dot_rows(x[0, :head].reshape(pieces, SPLIT), y[0, :head].reshape(pieces, SPLIT))
        out[0] = total.sum() + _dot_rows(x[:, head:], y[:, head:])[0]
    else:
        _dot_rows_into(x, y, out)


def _einsum_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, y)


def _einsum_rows_into(x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    np.einsum("ij,ij->i", x, y, out=out)


def _vecdot_rows_into(x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    np.vecdot(x, y, out=out)


# numpy >= 2: a BLAS dot per row, about 40% faster than einsum's loop.
_dot_rows = getattr(np, "vecdot", _einsum_rows)
_dot_rows_into = _vecdot_rows_into if hasattr(np, "vecdot") else _einsum_rows_into


def _sweep_numpy(
    items: list[_Item],
    b: np.ndarray,
    a: np.ndarray | None,
    d: np.ndarray | StepFormula | None,
    rows: int,
    need_prev_sq: bool,
    extra: StepFormula | None = None,
) -> np.ndarray:
    """Row sums over `items` (one thread's share), as the compiled sweep computes them."""
    out = np.zeros((_SUMS, rows))
    buf_b, buf_a, buf_d, buf_e, spare, tmp = _blocks()
    cols = b.shape[1]
    with np.errstate(all="ignore"):  # NaN/Inf in a checkpoint are counted, not warned about
        for r0, r1, c0, c1 in items:
            m, width = r1 - r0, c1 - c0
            n = m * width
            if n == 0:
                continue
            whole_rows = width == cols
            sums = out[:, r0:r1] if whole_rows else tmp[: _SUMS * m].reshape(_SUMS, m)
            if not whole_rows:
                sums[:] = 0.0
            blk_b = buf_b[:n].reshape(m, width)
            cast_block(blk_b, b, r0, r1, c0, c1)
            _row_dot(blk_b, blk_b, sums[_BB])
            blk_d = buf_d[:n].reshape(m, width)
            if a is not None:
                blk_a = buf_a[:n].reshape(m, width)
                cast_block(blk_a, a, r0, r1, c0, c1)
                np.subtract(blk_b, blk_a, out=blk_d)
                if need_prev_sq:
                    _row_dot(blk_a, blk_a, sums[_AA])
                _row_dot(blk_d, blk_d, sums[_DD])
                _row_dot(blk_d, blk_a, sums[_DA])
            elif d is not None:
                if isinstance(d, StepFormula):
                    d.fill(r0, r1, c0, c1, blk_b, blk_d, spare[:n].reshape(m, width))
                else:
                    cast_block(blk_d, d, r0, r1, c0, c1)
                # a = b - d is never formed: <d,b> here, |a|^2 and <d,a> after the sweep
                _row_dot(blk_d, blk_d, sums[_DD])
                _row_dot(blk_d, blk_b, sums[_DA])
            if extra is not None:
                blk_e = buf_e[:n].reshape(m, width)
                extra.fill(r0, r1, c0, c1, blk_b, blk_e, spare[:n].reshape(m, width))
                _row_dot(blk_e, blk_e, sums[_EE])
                _row_dot(blk_e, blk_b, sums[_EB])
            if not whole_rows:  # a piece of a long row: add up
                out[:, r0:r1] += sums
    return out


def cast_block(out: np.ndarray, src: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> None:
    """Copy rows [r0, r1), columns [c0, c1) of a rows-layout array into the float64 block `out`,
    exactly (float16/32/64, bfloat16 and float8 values are all float64 values)."""
    np.copyto(out, widened(src[r0:r1, c0:c1]), casting="safe")


def _derive_previous(total: np.ndarray, dd: int, db: int) -> np.ndarray:
    """The four sums for (b, a = b - d) from |b|^2, |d|^2 and <d,b> (rows `dd`, `db`):
    |a|^2 = |b|^2 - 2<d,b> + |d|^2 and <d,a> = <d,b> - |d|^2. They cancel only when a is much
    shorter than b; `_derived_prev_inexact` finds those rows."""
    sums = np.empty((4, total.shape[1]))
    sums[:] = _previous_sums(total[_BB], total[dd], total[db])
    return sums


def _previous_sums(
    bb: np.ndarray, d_sq: np.ndarray, d_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`_derive_previous` as four arrays, |b|^2 and |d|^2 not copied."""
    with np.errstate(all="ignore"):  # non-finite checkpoints are counted, not warned about
        return bb, bb - 2.0 * d_b + d_sq, d_sq, d_b - d_sq


# ----------------------------------------------------------------------------- figures


def _float64(rows: np.ndarray) -> np.ndarray:
    return widened(rows).astype(np.float64)


def _stats_from_sums(
    cur: np.ndarray,
    prev: np.ndarray | None,
    step: np.ndarray | StepFormula | None,
    sums: np.ndarray,
) -> TensorStats:
    rows = cur.shape[0]
    row_sq = sums[_BB]
    with np.errstate(all="ignore"):
        sum_sq = float(row_sq.sum())
    finite = math.isfinite(sum_sq)
    nonfinite = 0 if finite else int((~np.isfinite(widened(cur))).sum())
    norm = math.sqrt(sum_sq) if finite else float("nan")
    row_norms = np.sqrt(row_sq) if rows > 1 else None
    summary = _row_summary(row_norms[None, :])[0] if row_norms is not None else (None,) * 3
    if prev is None and step is None:
        return TensorStats(
            norm, sum_sq, nonfinite, row_norms, row_sq=row_sq,
            row_norm_min=summary[0], row_norm_max=summary[1], row_norm_cv=summary[2],
        )  # fmt: skip
    previous_rows: np.ndarray | None = None
    if prev is None:
        inexact = _derived_prev_inexact(sums)
        if inexact.any():
            previous_rows = _previous_rows(cur, prev, step)
            index = np.flatnonzero(inexact)
            sums[:, inexact] = _explicit_sums(cur[index], previous_rows[index])
    whole = sums.sum(axis=1, keepdims=True) if rows > 1 else sums
    angle, explicit = _whole_angle(*(float(v) for v in whole[:4, 0]))
    if explicit:
        previous_rows = _previous_rows(cur, prev, step)
        angle = float(_explicit_angles(cur.reshape(1, -1), previous_rows.reshape(1, -1))[0])
    row_angles = None
    if row_norms is not None:
        angles, redo = _row_angles(sums)
        if redo.any():
            if previous_rows is None:
                previous_rows = _previous_rows(cur, prev, step)
            index = np.flatnonzero(redo)
            angles[redo] = _explicit_angles(cur[index], previous_rows[index])
        row_angles = angles
    diff_sq = float(whole[_DD, 0])
    return TensorStats(
        norm,
        sum_sq,
        nonfinite,
        row_norms,
        diff_norm=math.sqrt(diff_sq) if diff_sq >= 0 else float("nan"),
        angle=angle,
        row_angles=row_angles,
        row_sq=row_sq,
        previous_sum_sq=float(whole[_AA, 0]),
        angular_update=angle if row_angles is None else _rms_finite(row_angles[None, :])[0],
        row_norm_min=summary[0],
        row_norm_max=summary[1],
        row_norm_cv=summary[2],
    )


def _rms_finite(angles: np.ndarray) -> list[float | None]:
    """Root-mean-square of the finite values of each row of `angles` (None: no finite value)."""
    finite = np.isfinite(angles)
    count = finite.sum(axis=1)
    with np.errstate(all="ignore"):
        rms = np.sqrt(np.square(np.where(finite, angles, 0.0)).sum(axis=1) / count)
    return [float(v) if c else None for v, c in zip(rms.tolist(), count.tolist(), strict=True)]


def _row_summary(row_norms: np.ndarray) -> list[tuple[float, float, float | None]]:
    """Min, max and coefficient of variation (std / mean, None where the mean is 0) of each row
    of `row_norms` (one row per checkpoint)."""
    with np.errstate(all="ignore"):
        low, high = row_norms.min(axis=1).tolist(), row_norms.max(axis=1).tolist()
        mean = row_norms.mean(axis=1)
        cv = (row_norms.std(axis=1) / mean).tolist()
    return [
        (lo, hi, c if m > 0 else None)
        for lo, hi, c, m in zip(low, high, cv, mean.tolist(), strict=True)
    ]


def _previous_rows(
    cur: np.ndarray, prev: np.ndarray | None, step: np.ndarray | StepFormula | None
) -> np.ndarray:
    if prev is not None:
        return prev
    assert step is not None
    with np.errstate(all="ignore"):
        if isinstance(step, StepFormula):
            return _float64(cur) - step.evaluate(_float64(cur))
        return _float64(cur) - _float64(step)


def _row_angles(sums: _FourSums) -> tuple[np.ndarray, np.ndarray]:
    """Angles from the row sums, NaN where undefined, and the rows whose angle the sums cannot
    give to full accuracy (see the module docstring), which the caller recomputes. One pass of
    numpy calls for both (they share `|d|^2 - <d,a>^2/|a|^2`), in place where it can: for the
    large layers this is most of the figures' time."""
    bb, aa, dd, da = sums[_BB], sums[_AA], sums[_DD], sums[_DA]
    with np.errstate(all="ignore"):
        across_sq = da * da
        across_sq /= aa
        np.subtract(dd, across_sq, out=across_sq)
        along = aa + da
        along /= np.sqrt(aa)
        across = np.maximum(across_sq, 0.0)
        np.sqrt(across, out=across)
        angle = np.arctan2(across, along, out=along)
        positive = aa > 0
        positive &= bb > 0
        redo = positive & np.isfinite(across_sq)
        redo &= np.isfinite(bb)
        steep = dd > bb
        steep |= across_sq < TAU * dd
        redo &= steep
        positive &= np.isfinite(angle)
        angle[~positive] = np.nan
    return angle, redo


def _whole_angle(bb: float, aa: float, dd: float, da: float) -> tuple[float, bool]:
    """`_row_angles` of one row, in plain floats (most tensors are small: numpy's per-call cost
    would dominate)."""
    if not (aa > 0.0 and bb > 0.0 and math.isfinite(bb)):
        return math.nan, False
    across_sq = dd - da * da / aa
    if not math.isfinite(across_sq):
        return math.nan, False
    angle = math.atan2(math.sqrt(max(across_sq, 0.0)), (aa + da) / math.sqrt(aa))
    return angle, dd > bb or across_sq < TAU * dd


def _derived_prev_inexact(sums: _FourSums) -> np.ndarray:
    """Rows where |a|^2 derived from b and d may have cancelled: a much shorter than b (or
    not positive at all, which an exact |a|^2 never is unless a = 0)."""
    bb, aa = sums[_BB], sums[_AA]
    with np.errstate(all="ignore"):
        return np.isfinite(bb) & (bb > 0) & ~(aa >= PREV_TINY * bb)


def _explicit_sums(cur_rows: np.ndarray, prev_rows: np.ndarray) -> np.ndarray:
    """The four row sums from whole float64 rows (the few rows that need it)."""
    b = _float64(cur_rows)
    a = _float64(prev_rows)
    with np.errstate(all="ignore"):
        d = b - a
        return np.stack([(b * b).sum(1), (a * a).sum(1), (d * d).sum(1), (d * a).sum(1)])


def _explicit_angles(cur_rows: np.ndarray, prev_rows: np.ndarray) -> np.ndarray:
    prev = _float64(prev_rows)
    cur = _float64(cur_rows)
    return rotation_angle(prev, cur - prev, cur)
