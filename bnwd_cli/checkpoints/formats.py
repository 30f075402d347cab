"""What a checkpoint file is (sniffed from its bytes) and where its weights, optimizer state
and step live inside it.

Formats are recognized by content, not by extension: a zip archive with `data.pkl` is a
`torch.save` file, a pickle stream is a legacy `torch.save` file, an 8-byte little-endian length
followed by a JSON header is safetensors. Which library wrote a torch file is read from its keys.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from bnwd_cli.checkpoints.safe_load import (
    PICKLE_PROTO,
    TRUST_FLAG,
    ZIP_MAGIC,
    UnsafeCheckpointError,
    unresolved_name,
)
from bnwd_cli.errors import CheckpointError


class FileKind(StrEnum):
    TORCH_ZIP = "torch zip"
    TORCH_LEGACY = "torch legacy pickle"
    SAFETENSORS = "safetensors"
    OTHER = "other"


class CheckpointFormat(StrEnum):
    """Which training stack wrote a checkpoint (shown to the user; decides key handling)."""

    TORCH = "torch.save"
    SAFETENSORS = "safetensors"
    SHARDED_SAFETENSORS = "sharded safetensors"
    LIGHTNING = "PyTorch Lightning"
    HF_TRAINER = "Hugging Face Trainer"
    TIMM = "timm"


MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors crate's own limit


def sniff(path: Path) -> FileKind:
    """Recognize a file's format from its first bytes."""
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
            size = path.stat().st_size
    except OSError:
        return FileKind.OTHER
    if head[:4] == ZIP_MAGIC:
        return FileKind.TORCH_ZIP
    if head[:1] == PICKLE_PROTO and len(head) > 1 and 2 <= head[1] <= 5:
        return FileKind.TORCH_LEGACY
    if len(head) == 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len <= min(size - 8, MAX_SAFETENSORS_HEADER):
            return FileKind.SAFETENSORS
    return FileKind.OTHER


MODEL_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "model_state", "network")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema", "ema_model")
OPTIMIZER_KEYS = (
    "optimizer_states",
    "optimizer",
    "optimizer_state_dict",
    "optimizer_state",
    "optim",
    "opt",
)
STEP_KEYS = ("global_step", "step", "iteration", "iter", "num_updates", "steps")
EPOCH_KEYS = ("epoch",)


@dataclass(frozen=True)
class Payload:
    """The parts of a loaded torch checkpoint that bnwd uses."""

    state_dict: Mapping[str, np.ndarray]
    model_key: str | None
    """Where the weights were found (`None`: the file is a bare state dict)."""
    optimizer_state: Mapping[str, Any] | None
    step: int | None
    epoch: int | None
    format: CheckpointFormat
    ema_key: str | None = None
    """An EMA copy of the weights that the file also holds (timm `state_dict_ema`, ...)."""
    notes: tuple[str, ...] = ()


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iu":
        return int(value.reshape(-1)[0])
    return None


def is_state_dict(obj: object) -> bool:
    """A mapping of names to tensors (extra-state entries and metadata aside)."""
    if not isinstance(obj, Mapping) or unresolved_name(obj) is not None or not obj:
        return False
    tensors = 0
    for key, value in obj.items():
        if not isinstance(key, str):
            return False
        if isinstance(value, np.ndarray):
            tensors += 1
        elif not key.endswith("_extra_state"):
            return False
    return tensors > 0


def is_optimizer_state(obj: object) -> bool:
    return isinstance(obj, Mapping) and "state" in obj and "param_groups" in obj


def interpret_payload(path: Path, obj: object, *, use_ema: bool = False) -> Payload:
    """Find the model weights, optimizer state, step and epoch in a loaded torch checkpoint."""
    placeholder = unresolved_name(obj)
    if placeholder is not None:
        raise UnsafeCheckpointError(
            path,
            f"is a pickled `{placeholder}` object, not a state dict; only full unpickling can "
            f"load it. If you trust this file, re-run with {TRUST_FLAG}",
        )
    if is_state_dict(obj):
        assert isinstance(obj, Mapping)
        return Payload(obj, None, None, None, None, CheckpointFormat.TORCH)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            path, f"holds a {type(obj).__name__}, not a state dict or a checkpoint dictionary"
        )
    ema_key = next((k for k in EMA_KEYS if is_state_dict(obj.get(k))), None)
    model_key = next((k for k in MODEL_KEYS if k in obj and _holds_weights(path, k, obj[k])), None)
    if use_ema:
        if ema_key is None:
            raise CheckpointError(
                path, "has no EMA weights (looked for " + ", ".join(EMA_KEYS) + ")"
            )
        model_key = ema_key
    if model_key is None:
        keys = ", ".join(sorted(map(str, obj.keys()))[:8])
        raise CheckpointError(path, f"holds no model weights (top-level keys: {keys})")
    weights = obj[model_key]
    optimizer_state, notes = _find_optimizer_state(obj)
    step = next((s for s in (_as_int(obj.get(k)) for k in STEP_KEYS) if s is not None), None)
    epoch = next((e for e in (_as_int(obj.get(k)) for k in EPOCH_KEYS) if e is not None), None)
    return Payload(
        state_dict=weights,
        model_key=model_key,
        optimizer_state=optimizer_state,
        step=step,
        epoch=epoch,
        format=_library_of(obj),
        ema_key=ema_key if ema_key != model_key else None,
        notes=notes,
    )


def _holds_weights(path: Path, key: str, value: object) -> bool:
    placeholder = unresolved_name(value)
    if placeholder is not None:
        raise UnsafeCheckpointError(
            path,
            f"stores its model under '{key}' as a pickled `{placeholder}` object; only full "
            f"unpickling can load it. If you trust this file, re-run with {TRUST_FLAG}",
        )
    return is_state_dict(value)


def _find_optimizer_state(
    obj: Mapping[str, Any],
) -> tuple[Mapping[str, Any] | None, tuple[str, ...]]:
    for key in OPTIMIZER_KEYS:
        value = obj.get(key)
        if isinstance(value, list | tuple):
            states = [v for v in value if is_optimizer_state(v)]
            if states:
                notes = (
                    (f"{len(states)} optimizers in '{key}'; bnwd reads the first",)
                    if len(states) > 1
                    else ()
                )
                return states[0], notes
        elif is_optimizer_state(value):
            return value, ()
    return None, ()


def _library_of(obj: Mapping[str, Any]) -> CheckpointFormat:
    if "pytorch-lightning_version" in obj or "optimizer_states" in obj:
        return CheckpointFormat.LIGHTNING
    if "arch" in obj and "state_dict" in obj:
        return CheckpointFormat.TIMM
    return CheckpointFormat.TORCH


_LEADING_METADATA = '{"__metadata__":'
_JSON = json.JSONDecoder()


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The free-form `__metadata__` of a safetensors header, read without loading tensors."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > MAX_SAFETENSORS_HEADER:
            raise CheckpointError(path, "has an implausible safetensors header length")
        try:
            text = handle.read(length).decode("utf-8")
            # The safetensors writers put `__metadata__` first: then only it is parsed (the
            # pass reads and checks the whole header when it opens the file).
            meta: object = None
            if text.startswith(_LEADING_METADATA):
                meta, end = _JSON.raw_decode(text, len(_LEADING_METADATA))
                if text[end : end + 1] not in (",", "}"):
                    raise json.JSONDecodeError("expected ',' or '}'", text, end)
            else:
                header = json.loads(text)
                meta = header.get("__metadata__") if isinstance(header, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(path, f"has a corrupt safetensors header ({exc})") from None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
