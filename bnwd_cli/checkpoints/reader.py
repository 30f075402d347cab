"""Opening one logical checkpoint (a file, or a folder of shards) for lazy tensor reads.

Nothing here reads a whole checkpoint into memory: files are memory-mapped and a tensor's
bytes are only touched when an operation reads the tensor `get` returns. Torch zip files and
safetensors go through `checkpoints.mapped` (zero-copy views, a fast restricted unpickler); what
that path does not take falls back to `torch.load(mmap=True)` and `safe_open`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bnwd_cli.checkpoints.arrays import from_torch, to_torch
from bnwd_cli.checkpoints.formats import (
    CheckpointFormat,
    FileKind,
    Payload,
    interpret_payload,
    is_optimizer_state,
    sniff,
)
from bnwd_cli.checkpoints.keys import normalize_keys
from bnwd_cli.checkpoints.mapped import NotMappableError, SafetensorsFile
from bnwd_cli.checkpoints.safe_load import PreloadedFiles, load_torch_file
from bnwd_cli.errors import CheckpointError


class TensorSource(Protocol):
    """Named tensors of one checkpoint, read on demand."""

    def names(self) -> list[str]:
        """Normalized parameter/buffer names, in the order the file stores them."""
        ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...

    def close(self) -> None: ...


class DictTensorSource:
    """Tensors of a loaded (memory-mapped) state dict, under normalized names."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], *, strip_common_prefix: bool) -> None:
        tensor_keys = [k for k, v in state_dict.items() if isinstance(v, np.ndarray)]
        mapping = normalize_keys(tensor_keys, strip_common_prefix=strip_common_prefix)
        self._tensors: dict[str, np.ndarray] | None = {
            mapping[k]: state_dict[k] for k in tensor_keys
        }
        self.original_names = {mapping[k]: k for k in tensor_keys}

    def _live(self) -> dict[str, np.ndarray]:
        if self._tensors is None:
            raise RuntimeError("checkpoint already closed")
        return self._tensors

    def names(self) -> list[str]:
        return list(self._live())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._live()[name].shape)

    def get(self, name: str) -> np.ndarray:
        return self._live()[name]

    def close(self) -> None:
        # Dropping the references releases the memory map.
        self._tensors = None


class SafetensorsSource:
    """Tensors spread over one or more safetensors files (a sharded save)."""

    def __init__(self, files: tuple[Path, ...]) -> None:
        self._handles: list[Any] = []
        owner: dict[str, tuple[int, str]] = {}
        for index, file in enumerate(files):
            self._handles.append(_open_safetensors(file))
            handle = self._handles[-1]
            for key in handle.keys():  # noqa: SIM118 (safe_open handles have no __iter__)
                owner[key] = (index, key)
        mapping, ordered = _key_order(tuple(owner))
        self._owner = {mapping[k]: owner[k] for k in ordered}
        self._files = files
        self.original_names = {mapping[k]: k for k in ordered}

    def names(self) -> list[str]:
        return list(self._owner)

    def shape(self, name: str) -> tuple[int, ...]:
        index, key = self._owner[name]
        handle = self._handles[index]
        if isinstance(handle, SafetensorsFile):
            return handle.entries[key].shape
        return tuple(handle.get_slice(key).get_shape())

    def get(self, name: str) -> np.ndarray:
        index, key = self._owner[name]
        handle = self._handles[index]
        try:
            if isinstance(handle, SafetensorsFile):
                return handle.get_tensor(key)
            tensor = from_torch(handle.get_tensor(key))
        except _read_errors() as exc:
            raise CheckpointError(
                self._files[index], f"tensor '{key}' cannot be read ({exc})"
            ) from None
        return tensor

    def close(self) -> None:
        self._handles.clear()


@functools.lru_cache(maxsize=4)
def _key_order(keys: tuple[str, ...]) -> tuple[dict[str, str], tuple[str, ...]]:
    """Normalized names of a safetensors checkpoint's keys, and the keys in module order
    (remembered: every checkpoint of a run has the same keys)."""
    mapping = normalize_keys(keys)
    # safetensors stores keys sorted as strings (`features.10` before `features.2`); numeric
    # components in numeric order give back the module order of a Sequential / ModuleList,
    # which the state-dict heuristic reads. (Named siblings stay alphabetical: lost order.)
    return mapping, tuple(sorted(keys, key=lambda k: _natural_key(mapping[k])))


def _natural_key(name: str) -> list[tuple[int, int, str]]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def _open_safetensors(file: Path) -> Any:
    """A zero-copy memory-mapped reader; the safetensors library's (which copies every tensor)
    for files the mapped reader does not take (and to report what is wrong with a broken one)."""
    try:
        return SafetensorsFile(file)
    except NotMappableError:
        pass
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except _read_errors() as exc:
        raise CheckpointError(file, f"is not a readable safetensors file ({exc})") from None


def _read_errors() -> tuple[type[Exception], ...]:
    """What reading a safetensors file can raise. The library is imported only where its reader
    is used: the mapped reader takes every well-formed file."""
    from safetensors import SafetensorError

    return (SafetensorError, OSError, ValueError, RuntimeError)


@dataclass(frozen=True)
class CheckpointRef:
    """One point of a run: where its weights (and optimizer state) are, and its position."""

    label: str
    """What the user sees: the path relative to the run folder."""
    weight_files: tuple[Path, ...]
    format: CheckpointFormat
    step: int | None = None
    epoch: int | None = None
    optimizer_file: Path | None = None
    """A separate optimizer state file (the Hugging Face Trainer's `optimizer.pt`)."""
    mtime: float = 0.0
    step_from_metadata: bool = False


@dataclass
class OpenCheckpoint:
    """A checkpoint opened for reading. Use as a context manager, or call `close`."""

    ref: CheckpointRef
    weights: TensorSource
    _optimizer_state: Mapping[str, Any] | None = None
    _trust_pickle: bool = False
    notes: tuple[str, ...] = ()
    has_ema: bool = False
    memory_mapped: bool = True
    """Its tensors are views of mapped files (cheap to keep open: only the pages read count),
    not copies in memory (legacy, non-zip torch files)."""
    _optimizer_loaded: bool = field(default=False, repr=False)

    @property
    def optimizer_state(self) -> Mapping[str, Any] | None:
        """The optimizer's `state_dict()`, read on first access (it may be a separate file)."""
        if not self._optimizer_loaded:
            self._optimizer_loaded = True
            if self._optimizer_state is None and self.ref.optimizer_file is not None:
                loaded = load_torch_file(self.ref.optimizer_file, trust_pickle=self._trust_pickle)
                if is_optimizer_state(loaded):
                    self._optimizer_state = loaded
        return self._optimizer_state

    def close(self) -> None:
        self.weights.close()
        self._optimizer_state = None

    def __enter__(self) -> OpenCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(
    ref: CheckpointRef,
    *,
    trust_pickle: bool = False,
    use_ema: bool = False,
    preloaded: PreloadedFiles | None = None,
) -> OpenCheckpoint:
    """Open a discovered checkpoint for lazy reads (`preloaded`: what discovery already read,
    `RunCheckpoints.preloaded`)."""
    kinds = {sniff(f) for f in ref.weight_files}
    if kinds == {FileKind.SAFETENSORS}:
        if use_ema:
            raise CheckpointError(ref.weight_files[0], "safetensors weights carry no EMA copy")
        return OpenCheckpoint(ref, SafetensorsSource(ref.weight_files), _trust_pickle=trust_pickle)
    payloads = [
        _load_payload(f, trust_pickle=trust_pickle, use_ema=use_ema, preloaded=preloaded)
        for f in ref.weight_files
    ]
    merged: dict[str, np.ndarray] = {}
    for payload in payloads:
        merged.update(payload.state_dict)
    first = payloads[0]
    source = DictTensorSource(
        merged, strip_common_prefix=first.format is CheckpointFormat.LIGHTNING
    )
    return OpenCheckpoint(
        ref,
        source,
        _optimizer_state=first.optimizer_state,
        _trust_pickle=trust_pickle,
        notes=first.notes,
        has_ema=first.ema_key is not None,
        memory_mapped=kinds == {FileKind.TORCH_ZIP}
        and (ref.optimizer_file is None or sniff(ref.optimizer_file) is FileKind.TORCH_ZIP),
    )


def _load_payload(
    path: Path, *, trust_pickle: bool, use_ema: bool, preloaded: PreloadedFiles | None = None
) -> Payload:
    kind = sniff(path)
    if kind not in (FileKind.TORCH_ZIP, FileKind.TORCH_LEGACY):
        raise CheckpointError(path, "is not a PyTorch or safetensors checkpoint")
    loaded = preloaded.take(path) if preloaded is not None else None
    if loaded is None:
        loaded = load_torch_file(path, trust_pickle=trust_pickle)
    return interpret_payload(path, loaded, use_ema=use_ema)


def shard_files(index_file: Path) -> tuple[Path, ...]:
    """The shard files a `*.index.json` names, in first-appearance order."""
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        names = list(dict.fromkeys(str(v) for v in weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(index_file, f"is not a valid shard index ({exc})") from None
    files = tuple(index_file.parent / n for n in names)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            index_file, f"names shard files that do not exist: {', '.join(missing)}"
        )
    return files


def read_state_dict(path: Path, *, trust_pickle: bool = False) -> dict[str, Any]:
    """Load the model weights of one checkpoint (a file or a checkpoint folder), names normalized.

    For callers that need the tensors themselves (e.g. to load trained weights into a model):
    torch tensors, copies. The analysis commands stream numpy views through `open_checkpoint`.
    """
    from bnwd_cli.checkpoints.discover import discover_run

    run = discover_run(path, trust_pickle=trust_pickle, strict=True)
    if len(run.checkpoints) != 1:
        raise CheckpointError(path, f"holds {len(run.checkpoints)} checkpoints; name one file")
    with open_checkpoint(
        run.checkpoints[0], trust_pickle=trust_pickle, preloaded=run.preloaded
    ) as ckpt:
        return {name: to_torch(ckpt.weights.get(name)) for name in ckpt.weights.names()}


def iter_open(
    refs: tuple[CheckpointRef, ...], *, trust_pickle: bool = False, use_ema: bool = False
) -> Iterator[OpenCheckpoint]:
    """Open checkpoints one after another; the caller closes each when done with it."""
    for ref in refs:
        yield open_checkpoint(ref, trust_pickle=trust_pickle, use_ema=use_ema)
