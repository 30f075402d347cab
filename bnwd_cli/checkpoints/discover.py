"""Finding the checkpoints in a run folder and putting them in training-step order.

A run folder is what training code leaves behind: files from `torch.save`, safetensors files,
Lightning's `lightning_logs/version_N/checkpoints/`, Hugging Face Trainer `checkpoint-<step>/`
folders, timm's `checkpoint-<epoch>.pth.tar`. Order comes from the strongest source that every
checkpoint has: the step stored in or beside the file, then the epoch stored in it, then the
step or epoch in the file name, then the modification time. Duplicates (`last.*`, hard links,
symlinks, `model_best.*`) are dropped; files that are not checkpoints are skipped and listed.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import partial
from pathlib import Path

from bnwd_cli.checkpoints.formats import (
    CheckpointFormat,
    FileKind,
    interpret_payload,
    is_optimizer_state,
    read_safetensors_metadata,
    sniff,
)
from bnwd_cli.checkpoints.reader import CheckpointRef, shard_files
from bnwd_cli.checkpoints.safe_load import (
    PreloadedFiles,
    UnsafeCheckpointError,
    load_torch_file,
)
from bnwd_cli.errors import CheckpointError, UsageError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors", ".pkl", ".pyt")
"""Extensions under which a file that is not a checkpoint is reported as a problem."""

SIDE_FILES = {
    "training_args.bin": "Trainer arguments, not a checkpoint",
    "scheduler.pt": "learning-rate scheduler state, not a checkpoint",
    "scaler.pt": "AMP grad-scaler state, not a checkpoint",
    "optimizer.pt": "optimizer state only (read together with the weights beside it)",
    "trainer_state.json": "Trainer log (read for the step)",
}
SIDE_PATTERNS = (
    (re.compile(r"^rng_state.*\.pth$"), "random-number-generator state, not a checkpoint"),
    (
        re.compile(r".*\.(json|ya?ml|txt|log|csv|md|png|jpg|svg|html|py|sh|cfg|ini|toml)$"),
        "not a checkpoint",
    ),
    (re.compile(r"^events\.out\.tfevents.*"), "TensorBoard log, not a checkpoint"),
)
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
INDEX_FILE_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

NAME_STEP = re.compile(
    r"(?:^|[^a-z])(?:global_?step|step|iter(?:ation)?|checkpoint)[=_-]?(\d+)", re.I
)
NAME_EPOCH = re.compile(r"(?:^|[^a-z])epoch[=_-]?(\d+)", re.I)
MAX_DEPTH = 6


class OrderSource(StrEnum):
    STEP_METADATA = "step stored in the checkpoints"
    EPOCH_METADATA = "epoch stored in the checkpoints"
    NAME_STEP = "step in the file names"
    NAME_EPOCH = "epoch in the file names"
    MTIME = "file modification times"
    SINGLE = "a single checkpoint"


@dataclass(frozen=True)
class SkippedFile:
    """A file in the folder that is not a checkpoint of the run, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class CheckpointProblem:
    """A file that looks like a checkpoint but cannot be read; skipped unless --strict."""

    path: Path
    message: str


@dataclass(frozen=True)
class RunCheckpoints:
    """The checkpoints of one run, in training order."""

    root: Path
    checkpoints: tuple[CheckpointRef, ...]
    order_source: OrderSource
    skipped: tuple[SkippedFile, ...] = ()
    problems: tuple[CheckpointProblem, ...] = ()
    notes: tuple[str, ...] = ()
    preloaded: PreloadedFiles | None = field(default=None, repr=False, compare=False)
    """Torch files discovery read whole, for `open_checkpoint` to take instead of reading
    them again."""


@dataclass
class _Candidate:
    """A file or folder that may be a checkpoint, with what its name and contents say."""

    ref: CheckpointRef
    run_dir: Path
    name_step: int | None
    name_epoch: int | None
    identity: tuple[int, int]
    size: int


def discover_run(path: Path, *, trust_pickle: bool = False, strict: bool = False) -> RunCheckpoints:
    """Find, read the position of, de-duplicate and order the checkpoints under `path`.

    Raises `CheckpointError` when nothing usable is found, or (with `strict`) when any
    checkpoint-looking file cannot be read.
    """
    if not path.exists():
        raise CheckpointError(path, "does not exist")
    skipped: list[SkippedFile] = []
    problems: list[CheckpointProblem] = []
    candidates: list[_Candidate] = []
    preloaded = PreloadedFiles()

    def consider(make: Callable[[], _Candidate | None], where: Path) -> None:
        try:
            candidate = make()
        except UnsafeCheckpointError:
            raise  # the user must decide; never silently skip a file we refused to unpickle
        except CheckpointError as exc:
            if strict:
                raise
            problems.append(CheckpointProblem(exc.path, str(exc)))
            return
        if candidate is not None:
            candidates.append(candidate)

    if path.is_file():
        consider(lambda: _file_candidate(path, path.parent, trust_pickle, skipped, preloaded), path)
    elif _is_checkpoint_folder(path) and not _has_checkpoint_subfolders(path):
        consider(lambda: _folder_candidate(path, path.parent, skipped), path)
    else:
        _walk(path, trust_pickle, consider, skipped, preloaded)

    if not candidates:
        detail = f" ({len(problems)} unreadable: {problems[0].message})" if problems else ""
        what = "holds no checkpoint" if path.is_dir() else "is not a checkpoint"
        raise CheckpointError(path, f"{what}{detail}")
    notes: list[str] = []
    candidates = _one_run(path, candidates, notes)
    candidates = _drop_duplicates(candidates, skipped)
    ordered, source = _order(candidates)
    return RunCheckpoints(
        root=path,
        checkpoints=tuple(_relabel(c.ref, path) for c in ordered),
        order_source=source,
        skipped=tuple(sorted(skipped, key=lambda s: str(s.path))),
        problems=tuple(problems),
        notes=tuple(notes),
        preloaded=preloaded,
    )


def _walk(
    root: Path,
    trust_pickle: bool,
    consider: Callable[[Callable[[], _Candidate | None], Path], None],
    skipped: list[SkippedFile],
    preloaded: PreloadedFiles | None = None,
) -> None:
    root_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and d not in ("__pycache__", "wandb")
        )
        if len(here.parts) - root_depth >= MAX_DEPTH:
            dirnames[:] = []
        has_subfolders = False
        for name in list(dirnames):
            sub = here / name
            if _is_checkpoint_folder(sub):
                has_subfolders = True
                dirnames.remove(name)
                consider(partial(_folder_candidate, sub, here, skipped), sub)
        # The Trainer's output folder holds `checkpoint-<step>/` folders and, after
        # `save_model()`, the final (or best) model beside them: not a step of the run.
        final_model = _folder_weight_names(here) if has_subfolders else set()
        for name in sorted(filenames):
            file = here / name
            if name in final_model:
                skipped.append(SkippedFile(file, "final model saved beside the checkpoint folders"))
                continue
            reason = _side_file_reason(name)
            if reason is not None:
                skipped.append(SkippedFile(file, reason))
                continue
            consider(partial(_file_candidate, file, here, trust_pickle, skipped, preloaded), file)


def _side_file_reason(name: str) -> str | None:
    if name in SIDE_FILES:
        return SIDE_FILES[name]
    for pattern, reason in SIDE_PATTERNS:
        if pattern.match(name):
            return reason
    return None


GENERIC_WEIGHT_NAMES = ("model.pt", "model.pth")


def _is_checkpoint_folder(folder: Path) -> bool:
    """A folder whose files together form one checkpoint (Trainer output, sharded save)."""
    if not folder.is_dir():
        return False
    if any(
        (folder / n).is_file()
        for n in (*WEIGHT_FILE_NAMES, *INDEX_FILE_NAMES)
        if n not in GENERIC_WEIGHT_NAMES
    ):
        return True
    if not any((folder / n).is_file() for n in GENERIC_WEIGHT_NAMES):
        return False
    # A `model.pt` beside other checkpoint files (`step_100.pt`, ...) is one file of a run
    # folder, not a folder that is one checkpoint: the others must not be ignored.
    return not any(
        f.name not in GENERIC_WEIGHT_NAMES
        and f.name.lower().endswith(CHECKPOINT_SUFFIXES)
        and _side_file_reason(f.name) is None
        and f.is_file()
        for f in folder.iterdir()
    )


def _has_checkpoint_subfolders(folder: Path) -> bool:
    return any(
        _is_checkpoint_folder(sub) for sub in folder.iterdir() if not sub.name.startswith(".")
    )


def _folder_weight_names(folder: Path) -> set[str]:
    """Names of the files that make up the model saved directly in `folder` (shards included)."""
    names = {n for n in (*WEIGHT_FILE_NAMES, *INDEX_FILE_NAMES) if (folder / n).is_file()}
    for index in INDEX_FILE_NAMES:
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
                names.update(str(v) for v in weight_map.values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass  # an unreadable index: its shards are then reported one by one
    return names


def _name_position(name: str, *, step_means_epoch: bool = False) -> tuple[int | None, int | None]:
    step_match = NAME_STEP.search(name)
    epoch_match = NAME_EPOCH.search(name)
    step = int(step_match.group(1)) if step_match else None
    epoch = int(epoch_match.group(1)) if epoch_match else None
    if step_means_epoch and step is not None and epoch is None:
        step, epoch = None, step
    return step, epoch


def _identity(path: Path) -> tuple[tuple[int, int], int, float]:
    st = path.stat()  # follows symlinks: a link and its target share an identity
    return (st.st_dev, st.st_ino), st.st_size, st.st_mtime


def _file_candidate(
    file: Path,
    run_dir: Path,
    trust_pickle: bool,
    skipped: list[SkippedFile] | None = None,
    preloaded: PreloadedFiles | None = None,
) -> _Candidate | None:
    kind = sniff(file)
    if kind is FileKind.OTHER:
        if file.name.lower().endswith(CHECKPOINT_SUFFIXES):
            raise CheckpointError(
                file,
                "has a checkpoint extension but is not a PyTorch, "
                "Lightning or safetensors checkpoint (unrecognized content)",
            )
        if skipped is not None:
            skipped.append(SkippedFile(file, "not a checkpoint (unrecognized content)"))
        return _NOT_A_CHECKPOINT
    identity, size, mtime = _identity(file)
    if kind is FileKind.SAFETENSORS:
        meta = read_safetensors_metadata(file)
        step = _int_or_none(meta.get("step") or meta.get("global_step"))
        epoch = _int_or_none(meta.get("epoch"))
        fmt = CheckpointFormat.SAFETENSORS
        name_step, name_epoch = _name_position(file.name)
    else:
        # Only what the file holds and its step are needed here. The first files are read
        # whole and kept for the pass (`PreloadedFiles`); the others in outline, a third
        # faster, and the pass reads them whole.
        keep = preloaded if kind is FileKind.TORCH_ZIP else None
        loaded = keep.load(file) if keep is not None else None
        if loaded is None:
            keep = None
            loaded = load_torch_file(file, trust_pickle=trust_pickle, outline=True)
        try:
            position = _torch_position(file, loaded, skipped)
        except CheckpointError:
            if keep is not None:
                keep.take(file)  # refused: nothing to keep it for
            raise
        if position is None:
            if keep is not None:
                keep.take(file)  # skipped: likewise
            return _NOT_A_CHECKPOINT
        step, epoch, fmt = position
        name_step, name_epoch = _name_position(
            file.name, step_means_epoch=fmt is CheckpointFormat.TIMM
        )
    ref = CheckpointRef(
        label=str(file),
        weight_files=(file,),
        format=fmt,
        step=step,
        epoch=epoch,
        mtime=mtime,
        step_from_metadata=step is not None,
    )
    return _Candidate(ref, run_dir, name_step, name_epoch, identity, size)


def _torch_position(
    file: Path, loaded: object, skipped: list[SkippedFile] | None
) -> tuple[int | None, int | None, CheckpointFormat] | None:
    """Step, epoch and format of a loaded torch file; None for a file that holds no model
    weights (recorded in `skipped`)."""
    if is_optimizer_state(loaded):
        if skipped is not None:
            skipped.append(SkippedFile(file, "optimizer state only, no model weights"))
        return None
    try:
        payload = interpret_payload(file, loaded)
    except UnsafeCheckpointError:
        raise
    except CheckpointError as exc:
        if "holds no model weights" in exc.problem or "holds a " in exc.problem:
            if skipped is not None:
                skipped.append(SkippedFile(file, exc.problem))
            return None
        raise
    return payload.step, payload.epoch, payload.format


_NOT_A_CHECKPOINT = None  # a skipped file; its reason is already recorded


def _folder_candidate(folder: Path, run_dir: Path, skipped: list[SkippedFile]) -> _Candidate:
    index = next((folder / n for n in INDEX_FILE_NAMES if (folder / n).is_file()), None)
    if index is not None:
        files = shard_files(index)
        fmt = CheckpointFormat.SHARDED_SAFETENSORS
    else:
        weight = next(folder / n for n in WEIGHT_FILE_NAMES if (folder / n).is_file())
        files = (weight,)
        fmt = CheckpointFormat.HF_TRAINER
    for file in files:
        if sniff(file) is FileKind.OTHER:
            raise CheckpointError(
                file, "is not a PyTorch or safetensors file (unrecognized content)"
            )
    step = None
    trainer_state = folder / "trainer_state.json"
    if trainer_state.is_file():
        fmt = CheckpointFormat.HF_TRAINER
        try:
            step = _int_or_none(
                json.loads(trainer_state.read_text(encoding="utf-8")).get("global_step")
            )
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(trainer_state, f"is not valid JSON ({exc})") from None
    used = {f.name for f in files} | set(INDEX_FILE_NAMES)
    for extra in sorted(folder.iterdir()):
        if extra.name not in used and extra.is_file():
            reason = _side_file_reason(extra.name) or "beside the weights, not read"
            skipped.append(SkippedFile(extra, reason))
    optimizer = folder / "optimizer.pt"
    identity, size, mtime = _identity(files[0])
    name_step, name_epoch = _name_position(folder.name)
    ref = CheckpointRef(
        label=str(folder),
        weight_files=files,
        format=fmt,
        step=step,
        optimizer_file=optimizer if optimizer.is_file() else None,
        mtime=mtime,
        step_from_metadata=step is not None,
    )
    return _Candidate(ref, run_dir, name_step, name_epoch, identity, size)


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


LIGHTNING_VERSION = re.compile(r"^version_(\d+)$")


def _one_run(root: Path, candidates: list[_Candidate], notes: list[str]) -> list[_Candidate]:
    """Keep the checkpoints of a single run; several Lightning versions -> the newest."""
    run_dirs = sorted({c.run_dir for c in candidates}, key=str)
    if len(run_dirs) == 1:
        return candidates
    versions: dict[Path, int] = {}
    for run_dir in run_dirs:
        parent = run_dir.parent if run_dir.name == "checkpoints" else run_dir
        match = LIGHTNING_VERSION.match(parent.name)
        if match is None:
            break
        versions[run_dir] = int(match.group(1))
    else:
        newest = max(versions, key=lambda d: versions[d])
        notes.append(
            f"{len(versions)} Lightning versions found; analyzing the newest, "
            f"{newest.relative_to(root) if newest.is_relative_to(root) else newest}"
        )
        return [c for c in candidates if c.run_dir == newest]
    listed = ", ".join(str(d) for d in run_dirs[:5])
    raise UsageError(
        f"{root}: holds checkpoints in {len(run_dirs)} different folders ({listed}); "
        "point bnwd at the folder of one run"
    )


def _is_last(ref: CheckpointRef) -> bool:
    return Path(ref.label).name.split(".")[0] in ("last", "latest")


def _is_best(ref: CheckpointRef) -> bool:
    stem = Path(ref.label).name.split(".")[0]
    return stem in ("model_best", "best", "best_model") or stem.startswith("model_best")


def _drop_duplicates(candidates: list[_Candidate], skipped: list[SkippedFile]) -> list[_Candidate]:
    # Prefer the informative name when two entries are the same file: checkpoint-9 over last.
    candidates = sorted(candidates, key=lambda c: (_is_last(c.ref) or _is_best(c.ref), c.ref.label))
    kept: list[_Candidate] = []
    seen: dict[tuple[int, int], _Candidate] = {}
    for c in candidates:
        if c.identity in seen:
            skipped.append(
                SkippedFile(Path(c.ref.label), f"same file as {seen[c.identity].ref.label}")
            )
            continue
        seen[c.identity] = c
        kept.append(c)
    if len(kept) > 1:
        for best in [c for c in kept if _is_best(c.ref)]:
            kept.remove(best)
            skipped.append(
                SkippedFile(Path(best.ref.label), "best-metric copy of another checkpoint")
            )
    others = [c for c in kept if not _is_last(c.ref)]
    for last in [c for c in kept if _is_last(c.ref)]:
        twin = _same_point(last, others)
        if twin is not None:
            kept.remove(last)
            skipped.append(
                SkippedFile(Path(last.ref.label), f"same checkpoint as {twin.ref.label}")
            )
    return kept


def _same_point(last: _Candidate, others: list[_Candidate]) -> _Candidate | None:
    if last.ref.step is not None:
        return next((o for o in others if o.ref.step == last.ref.step), None)
    if last.ref.epoch is not None:
        same = [o for o in others if o.ref.epoch == last.ref.epoch]
        if same:
            return same[0]
    for other in others:
        if other.size == last.size and all(
            filecmp.cmp(a, b, shallow=False)
            for a, b in zip(last.ref.weight_files, other.ref.weight_files, strict=False)
        ):
            return other
    return None


def _order(candidates: list[_Candidate]) -> tuple[list[_Candidate], OrderSource]:
    if len(candidates) == 1:
        return [_with_position(candidates[0], OrderSource.SINGLE)], OrderSource.SINGLE
    sources: list[tuple[OrderSource, Callable[[_Candidate], float | None]]] = [
        (OrderSource.STEP_METADATA, lambda c: c.ref.step),
        (OrderSource.EPOCH_METADATA, lambda c: c.ref.epoch),
        (OrderSource.NAME_STEP, lambda c: c.name_step),
        (OrderSource.NAME_EPOCH, lambda c: c.name_epoch),
    ]
    for source, key in sources:
        values = [key(c) for c in candidates]
        if all(v is not None for v in values) and len(set(values)) == len(values):
            ordered = sorted(candidates, key=lambda c: key(c))  # type: ignore[arg-type, return-value]
            return [_with_position(c, source) for c in ordered], source
    ordered = sorted(candidates, key=lambda c: (c.ref.mtime, c.ref.label))
    return [_with_position(c, OrderSource.MTIME) for c in ordered], OrderSource.MTIME


def _with_position(c: _Candidate, source: OrderSource) -> _Candidate:
    """Fill the step (and epoch) from the file name when the file itself did not store it."""
    ref = c.ref
    if ref.step is None and c.name_step is not None:
        ref = replace(ref, step=c.name_step)
    if ref.epoch is None and c.name_epoch is not None:
        ref = replace(ref, epoch=c.name_epoch)
    return replace(c, ref=ref) if ref is not c.ref else c


def _relabel(ref: CheckpointRef, root: Path) -> CheckpointRef:
    label = Path(ref.label)
    base = root if root.is_dir() else root.parent
    if label.is_relative_to(base) and label != base:
        return replace(ref, label=str(label.relative_to(base)))
    return replace(ref, label=label.name)
