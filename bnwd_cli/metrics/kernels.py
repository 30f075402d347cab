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
cache-sized blocks: a block of each input is cast to float64 (exact for float32/16 and
bfloat16), `d` is subtracted in float64 (exact unless the exponents of a and b differ by more
than 29), and a BLAS dot per row (`numpy.vecdot`) multiplies (exactly: a product of two float32
values fits a float64) and accumulates in float64. No float64 copy of a whole tensor is made.
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

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass(frozen=True)
class TensorStats:
    """Figures of one tensor at one checkpoint (and its change since the previous one)."""

    norm: float
    sum_sq: float
    nonfinite: int
    row_norms: torch.Tensor | None
    """Per-row norms (float64), for per-row invariant weights."""
    diff_norm: float | None = None
    angle: float | None = None
    """Whole-tensor angle between this and the previous checkpoint, radians."""
    row_angles: torch.Tensor | None = None
    row_sq: torch.Tensor | None = None
    """Per-row sums of squares (float64), to hand back as `previous_row_sq` with the next
    checkpoint: it saves one of the five sweeps over the pair."""
    previous_sum_sq: float | None = None
    """|previous|^2 (with a `step`, the previous tensor is never formed: this is its norm)."""
    step_stats: TensorStats | None = None
    """The figures for `with_step` (see `tensor_stats`)."""


StepBlocks = Callable[[int, int, int, int, np.ndarray, np.ndarray, np.ndarray], None]
"""A step computed block by block: `fill(r0, r1, c0, c1, current, out, scratch)` writes
`current - previous` for rows [r0, r1) and columns [c0, c1) of the `as_rows` layout into the
float64 block `out`; `current` holds the same block of the current tensor in float64, `scratch`
is a float64 block of the same size to use freely. Called from worker threads."""


def as_rows(t: torch.Tensor, per_row: bool) -> torch.Tensor:
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.reshape(t.shape[0], -1) if per_row and t.dim() >= 2 else t.reshape(1, -1)


def rotation_angle(prev: torch.Tensor, diff: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Angle (radians) between each row of `prev` and of `cur = prev + diff` (float64 rows);
    NaN where either row is zero or not finite."""
    prev_sq = (prev * prev).sum(dim=1)
    cur_sq = (cur * cur).sum(dim=1)

    def across_prev(x: torch.Tensor) -> torch.Tensor:
        return (x - ((x * prev).sum(dim=1) / prev_sq)[:, None] * prev).square().sum(dim=1).sqrt()

    # The part across `prev` is the same for the step and for `cur`; take it from the shorter
    # of the two, whose rounding errors are the smaller.
    across = torch.where((diff * diff).sum(dim=1) <= cur_sq, across_prev(diff), across_prev(cur))
    along = (cur * prev).sum(dim=1) / prev_sq.sqrt()
    angle = torch.atan2(across, along)
    valid = (prev_sq > 0) & (cur_sq > 0) & torch.isfinite(angle)
    return torch.where(valid, angle, torch.full_like(angle, float("nan")))


def tensor_stats(
    current: torch.Tensor,
    previous: torch.Tensor | None,
    *,
    per_row: bool,
    previous_row_sq: torch.Tensor | None = None,
    step: torch.Tensor | StepBlocks | None = None,
    with_step: StepBlocks | None = None,
) -> TensorStats:
    """Norms of `current`; with `previous`, also the step and the angle between them.

    `previous_row_sq`: the `row_sq` of `previous` from an earlier call (optional, saves a sweep).
    `step`: `current - previous` as the caller knows it directly (e.g. from an optimizer's
    state, where forming `previous` first and subtracting again would lose a small step to
    rounding), a tensor or a `StepBlocks`; given instead of `previous`, which is then
    `current - step`.
    `with_step`: a second, known step of `current` (the optimizer's last one), measured in the
    same sweep over `current` (one read of it instead of two); its figures, as
    `tensor_stats(current, None, step=with_step)` gives them, are in `step_stats`.
    """
    if step is not None:
        if previous is not None or with_step is not None:
            raise ValueError("give previous or step, and with_step only with previous")
        if isinstance(step, torch.Tensor) and tuple(step.shape) != tuple(current.shape):
            raise ValueError(f"step shape {tuple(step.shape)} != {tuple(current.shape)}")
    elif previous is not None and tuple(previous.shape) != tuple(current.shape):
        raise ValueError(f"shapes differ: {tuple(previous.shape)} vs {tuple(current.shape)}")
    tensors = [t for t in (current, previous, step) if isinstance(t, torch.Tensor)]
    if not all(_fast_dtype(t) for t in tensors):
        return _tensor_stats_slow(current, previous, step, with_step, per_row=per_row)
    cur = as_rows(current.detach(), per_row)
    rows = cur.shape[0]
    if previous is None and step is None:
        if with_step is None:
            return _stats_from_sums(cur, None, None, _row_sums(cur, None, None, need_prev_sq=False))
        sums = _row_sums(cur, None, with_step, need_prev_sq=False)[:4]
        norms = _stats_from_sums(cur, None, None, sums)
        return replace(norms, step_stats=_stats_from_sums(cur, None, with_step, sums))
    prev = as_rows(previous.detach(), per_row) if previous is not None else None
    diff: torch.Tensor | StepBlocks | None = step
    if isinstance(step, torch.Tensor):
        diff = as_rows(step.detach(), per_row)
    known_prev_sq = None
    if prev is not None and previous_row_sq is not None and previous_row_sq.numel() == rows:
        known_prev_sq = previous_row_sq.detach().cpu().to(torch.float64).reshape(-1).numpy()
    total = _row_sums(cur, prev, diff, need_prev_sq=known_prev_sq is None, extra=with_step)
    if known_prev_sq is not None:
        total[_AA] = known_prev_sq
    stats = _stats_from_sums(cur, prev, diff, total[:4])
    if with_step is None:
        return stats
    step_sums = _derive_previous(total, _EE, _EB)
    return replace(stats, step_stats=_stats_from_sums(cur, None, with_step, step_sums))


def _tensor_stats_slow(
    current: torch.Tensor,
    previous: torch.Tensor | None,
    step: torch.Tensor | StepBlocks | None,
    with_step: StepBlocks | None,
    *,
    per_row: bool,
) -> TensorStats:
    """Devices and dtypes the fast path does not take: whole float64 copies."""

    def materialized(fill: StepBlocks) -> torch.Tensor:
        return _materialize(as_rows(current.detach(), per_row), fill).reshape(current.shape)

    if step is not None and not isinstance(step, torch.Tensor):
        step = materialized(step)
    stats = _tensor_stats_reference(current, previous, step, per_row=per_row)
    if with_step is None:
        return stats
    extra = _tensor_stats_reference(current, None, materialized(with_step), per_row=per_row)
    return replace(stats, step_stats=extra)


# ----------------------------------------------------------------------------- fast path

_BB, _AA, _DD, _DA, _EE, _EB = 0, 1, 2, 3, 4, 5
_SUMS = 6
CHUNK = 1 << 15
"""Elements per block: one thread's float64 blocks (about 1 MiB) stay in its core's L2 cache.
Measured: 2^16 is no faster, 2^17 slower; smaller blocks pay more per-call overhead."""
PARALLEL_MIN = 1 << 18
"""Tensors at least this large are split over the worker threads (BNWD_THREADS > 1)."""
TAU = 1.0 / 16.0
"""Rows with across^2 < TAU |d|^2 (a step almost along the weight) take the explicit path."""
PREV_TINY = 1e-6
"""With a given step, rows where |a|^2 < PREV_TINY |b|^2 recompute their sums explicitly (the
derived |a|^2 is then accurate to about 4e-16 / PREV_TINY)."""
SPLIT = 4096
"""A long row is dotted in pieces of this length: BLAS may start threads of its own for one
long dot product, which fights the worker threads."""

_NUMPY_DTYPES = (torch.float64, torch.float32, torch.float16)
_CASTABLE = (*_NUMPY_DTYPES, torch.bfloat16)

_Blocks = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_local = threading.local()
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _workers() -> int:
    """Threads sharing one large tensor: BNWD_THREADS, default 1.

    Measured on 2 cores (benchmarks/bench_inspect.py): a second thread made the sweep slower,
    not faster; each block is a handful of short numpy calls, and two threads spend the gain
    handing the GIL back and forth. Larger blocks cut the hand-offs but fall out of the cache.
    """
    setting = os.environ.get("BNWD_THREADS", "")
    return int(setting) if setting.isdigit() and int(setting) > 0 else 1


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="bnwd-kernel")
        return _pool


def _fast_dtype(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _CASTABLE


def _blocks() -> _Blocks:
    """This thread's float64 scratch blocks (b, a, d, e, spare) and room for partial sums."""
    blocks: _Blocks | None = getattr(_local, "blocks", None)
    if blocks is None or blocks[0].size != CHUNK:
        e = np.empty
        fresh = (e(CHUNK), e(CHUNK), e(CHUNK), e(CHUNK), e(CHUNK), e(_SUMS))
        _local.blocks = fresh
        return fresh
    return blocks


_Item = tuple[int, int, int, int]  # rows [r0, r1), columns [c0, c1)


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
_dot_rows: Callable[[np.ndarray, np.ndarray], np.ndarray] = getattr(np, "vecdot", _einsum_rows)
_dot_rows_into = _vecdot_rows_into if hasattr(np, "vecdot") else _einsum_rows_into


def _sweep(
    items: list[_Item],
    b: torch.Tensor,
    a: torch.Tensor | None,
    d: torch.Tensor | StepBlocks | None,
    rows: int,
    need_prev_sq: bool,
    extra: StepBlocks | None = None,
) -> np.ndarray:
    """Row sums over `items` (one thread's share): |b|^2, |a|^2, |d|^2, <d,a> (with a given
    step d: <d,b> in place of <d,a>) and, for an `extra` step e, |e|^2 and <e,b>."""
    out = np.zeros((_SUMS, rows))
    buf_b, buf_a, buf_d, buf_e, spare, tmp = _blocks()
    src_b, src_a = block_source(b), (block_source(a) if a is not None else None)
    src_d = block_source(d) if isinstance(d, torch.Tensor) else None
    fill = d if d is not None and not isinstance(d, torch.Tensor) else None
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
            cast_block(blk_b, src_b, r0, r1, c0, c1)
            _row_dot(blk_b, blk_b, sums[_BB])
            blk_d = buf_d[:n].reshape(m, width)
            if src_a is not None:
                blk_a = buf_a[:n].reshape(m, width)
                cast_block(blk_a, src_a, r0, r1, c0, c1)
                np.subtract(blk_b, blk_a, out=blk_d)
                if need_prev_sq:
                    _row_dot(blk_a, blk_a, sums[_AA])
                _row_dot(blk_d, blk_d, sums[_DD])
                _row_dot(blk_d, blk_a, sums[_DA])
            elif d is not None:
                if src_d is not None:
                    cast_block(blk_d, src_d, r0, r1, c0, c1)
                else:
                    assert fill is not None
                    fill(r0, r1, c0, c1, blk_b, blk_d, spare[:n].reshape(m, width))
                # a = b - d is never formed: <d,b> here, |a|^2 and <d,a> after the sweep
                _row_dot(blk_d, blk_d, sums[_DD])
                _row_dot(blk_d, blk_b, sums[_DA])
            if extra is not None:
                blk_e = buf_e[:n].reshape(m, width)
                extra(r0, r1, c0, c1, blk_b, blk_e, spare[:n].reshape(m, width))
                _row_dot(blk_e, blk_e, sums[_EE])
                _row_dot(blk_e, blk_b, sums[_EB])
            if not whole_rows:  # a piece of a long row: add up
                out[:, r0:r1] += sums
    return out


def _derive_previous(total: np.ndarray, dd: int, db: int) -> np.ndarray:
    """The four sums for (b, a = b - d) from |b|^2, |d|^2 and <d,b> (rows `dd`, `db`):
    |a|^2 = |b|^2 - 2<d,b> + |d|^2 and <d,a> = <d,b> - |d|^2. They cancel only when a is much
    shorter than b; `_derived_prev_inexact` finds those rows."""
    sums = np.empty((4, total.shape[1]))
    sums[_BB] = total[_BB]
    sums[_AA] = total[_BB] - 2.0 * total[db] + total[dd]
    sums[_DD] = total[dd]
    sums[_DA] = total[db] - total[dd]
    return sums


_Source = np.ndarray | torch.Tensor


def block_source(t: torch.Tensor) -> _Source:
    """What `cast_block` reads from: a numpy view of a CPU tensor where numpy has its dtype
    (slicing that is cheaper than slicing the tensor), else the tensor."""
    return t.numpy() if t.dtype in _NUMPY_DTYPES else t


def cast_block(out: np.ndarray, src: _Source, r0: int, r1: int, c0: int, c1: int) -> None:
    """Copy rows [r0, r1), columns [c0, c1) of a `block_source` into the float64 block `out`,
    exactly (float32/16, bfloat16 and float64 values are all float64 values)."""
    if isinstance(src, np.ndarray):
        np.copyto(out, src[r0:r1, c0:c1], casting="safe")
    else:
        torch.from_numpy(out).copy_(src[r0:r1, c0:c1])


def _row_sums(
    b: torch.Tensor,
    a: torch.Tensor | None,
    d: torch.Tensor | StepBlocks | None,
    *,
    need_prev_sq: bool,
    extra: StepBlocks | None = None,
) -> np.ndarray:
    """Rows: |b|^2, |a|^2, |d|^2, <d,a> (a = b - d with a given step) and, with `extra`,
    |e|^2, <e,b> (see `_derive_previous`)."""
    rows, cols = b.shape
    items = _items(rows, cols)
    workers = _workers()
    args = (b, a, d, rows, need_prev_sq, extra)
    if b.numel() < PARALLEL_MIN or workers == 1 or len(items) < 2:
        total = _sweep(items, *args)
    else:
        share = -(-len(items) // workers)
        shares = [items[i : i + share] for i in range(0, len(items), share)]
        futures = [_executor().submit(_sweep, chunk, *args) for chunk in shares[1:]]
        total = _sweep(shares[0], *args)  # the caller takes a share
        for future in futures:
            total += future.result()
    if a is None and d is not None:
        total[:4] = _derive_previous(total, _DD, _DA)
    return total


def _materialize(cur: torch.Tensor, fill: StepBlocks) -> torch.Tensor:
    """The whole step of a `StepBlocks` as one float64 tensor in the rows layout (rare paths)."""
    rows, cols = cur.shape
    full = np.empty((rows, cols))
    spare = np.empty((rows, cols))
    current = np.empty((rows, cols))
    cast_block(current, block_source(cur), 0, rows, 0, cols)
    with np.errstate(all="ignore"):
        for r0, r1, c0, c1 in _items(rows, cols):
            fill(
                r0, r1, c0, c1,
                current[r0:r1, c0:c1], full[r0:r1, c0:c1], spare[r0:r1, c0:c1],
            )  # fmt: skip
    return torch.from_numpy(full)


def _stats_from_sums(
    cur: torch.Tensor,
    prev: torch.Tensor | None,
    step: torch.Tensor | StepBlocks | None,
    sums: np.ndarray,
) -> TensorStats:
    rows = cur.shape[0]
    row_sq = sums[_BB]
    with np.errstate(all="ignore"):
        sum_sq = float(row_sq.sum())
    finite = math.isfinite(sum_sq)
    nonfinite = 0 if finite else int((~torch.isfinite(cur)).sum())
    norm = math.sqrt(sum_sq) if finite else float("nan")
    row_norms = torch.from_numpy(np.sqrt(row_sq)) if rows > 1 else None
    if prev is None and step is None:
        return TensorStats(norm, sum_sq, nonfinite, row_norms, row_sq=torch.from_numpy(row_sq))
    previous_rows: torch.Tensor | None = None
    if prev is None:
        inexact = _derived_prev_inexact(sums)
        if inexact.any():
            previous_rows = _previous_rows(cur, prev, step)
            index = torch.from_numpy(np.flatnonzero(inexact))
            sums[:, inexact] = _explicit_sums(cur[index], previous_rows[index])
    whole = sums.sum(axis=1, keepdims=True)
    angle = float(_angles(whole)[0])
    if _needs_explicit(whole)[0]:
        previous_rows = _previous_rows(cur, prev, step)
        angle = float(_explicit_angles(cur.reshape(1, -1), previous_rows.reshape(1, -1))[0])
    row_angles = None
    if row_norms is not None:
        angles = _angles(sums)
        redo = _needs_explicit(sums)
        if redo.any():
            if previous_rows is None:
                previous_rows = _previous_rows(cur, prev, step)
            index = torch.from_numpy(np.flatnonzero(redo))
            angles[redo] = _explicit_angles(cur[index], previous_rows[index])
        row_angles = torch.from_numpy(angles)
    diff_sq = float(whole[_DD, 0])
    return TensorStats(
        norm,
        sum_sq,
        nonfinite,
        row_norms,
        diff_norm=math.sqrt(diff_sq) if diff_sq >= 0 else float("nan"),
        angle=angle,
        row_angles=row_angles,
        row_sq=torch.from_numpy(row_sq),
        previous_sum_sq=float(whole[_AA, 0]),
    )


def _previous_rows(
    cur: torch.Tensor, prev: torch.Tensor | None, step: torch.Tensor | StepBlocks | None
) -> torch.Tensor:
    if prev is not None:
        return prev
    assert step is not None
    if not isinstance(step, torch.Tensor):
        step = _materialize(cur, step)
    return cur.to(torch.float64) - step.to(torch.float64)


def _angles(sums: np.ndarray) -> np.ndarray:
    """Angles from the row sums (valid where `_needs_explicit` is False); NaN where undefined."""
    bb, aa, dd, da = sums[_BB], sums[_AA], sums[_DD], sums[_DA]
    with np.errstate(all="ignore"):
        along = (aa + da) / np.sqrt(aa)
        across = np.sqrt(np.maximum(dd - da * da / aa, 0.0))
        angle = np.arctan2(across, along)
    valid = (aa > 0) & (bb > 0) & np.isfinite(angle)
    return np.where(valid, angle, np.nan)


def _needs_explicit(sums: np.ndarray) -> np.ndarray:
    """Rows whose angle the sums cannot give to full accuracy (see the module docstring)."""
    bb, aa, dd, da = sums[_BB], sums[_AA], sums[_DD], sums[_DA]
    with np.errstate(all="ignore"):
        across_sq = dd - da * da / aa
        defined = (aa > 0) & (bb > 0) & np.isfinite(across_sq) & np.isfinite(bb)
        return defined & ((dd > bb) | (across_sq < TAU * dd))


def _derived_prev_inexact(sums: np.ndarray) -> np.ndarray:
    """Rows where |a|^2 derived from b and d may have cancelled: a much shorter than b (or
    not positive at all, which an exact |a|^2 never is unless a = 0)."""
    bb, aa = sums[_BB], sums[_AA]
    with np.errstate(all="ignore"):
        return np.isfinite(bb) & (bb > 0) & ~(aa >= PREV_TINY * bb)


def _explicit_sums(cur_rows: torch.Tensor, prev_rows: torch.Tensor) -> np.ndarray:
    """The four row sums from whole float64 rows (the few rows that need it)."""
    b = cur_rows.to(torch.float64)
    a = prev_rows.to(torch.float64)
    d = b - a
    return torch.stack([(b * b).sum(1), (a * a).sum(1), (d * d).sum(1), (d * a).sum(1)]).numpy()


def _explicit_angles(cur_rows: torch.Tensor, prev_rows: torch.Tensor) -> np.ndarray:
    prev = prev_rows.to(torch.float64)
    cur = cur_rows.to(torch.float64)
    return rotation_angle(prev, cur - prev, cur).numpy()


# ----------------------------------------------------------------------------- reference


def _tensor_stats_reference(
    current: torch.Tensor,
    previous: torch.Tensor | None,
    step: torch.Tensor | None,
    *,
    per_row: bool,
) -> TensorStats:
    """Whole-tensor float64 copies (for devices and dtypes the fast path does not take)."""
    cur = as_rows(current.detach(), per_row).to(torch.float64)
    row_sq = (cur * cur).sum(dim=1)
    sum_sq = float(row_sq.sum())
    nonfinite = 0 if math.isfinite(sum_sq) else int((~torch.isfinite(cur)).sum())
    norm = math.sqrt(sum_sq) if math.isfinite(sum_sq) else float("nan")
    row_norms = row_sq.sqrt() if per_row and cur.shape[0] > 1 else None
    if previous is None and step is None:
        return TensorStats(norm, sum_sq, nonfinite, row_norms, row_sq=row_sq.cpu())
    if previous is not None:
        prev = as_rows(previous.detach(), per_row).to(torch.float64)
        diff = cur - prev
    else:
        assert step is not None
        diff = as_rows(step.detach(), per_row).to(torch.float64)
        prev = cur - diff
    diff_sq = (diff * diff).sum()
    angle = float(rotation_angle(prev.reshape(1, -1), diff.reshape(1, -1), cur.reshape(1, -1))[0])
    row_angles = rotation_angle(prev, diff, cur) if row_norms is not None else None
    return TensorStats(
        norm,
        sum_sq,
        nonfinite,
        row_norms,
        diff_norm=float(diff_sq.sqrt()),
        angle=angle,
        row_angles=row_angles,
        row_sq=row_sq.cpu(),
        previous_sum_sq=float((prev * prev).sum()),
    )
