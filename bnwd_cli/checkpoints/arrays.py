"""Checkpoint tensors as bnwd holds them: numpy arrays, so that reading a run needs no torch.

`bnwd inspect` and `bnwd check` on torch zip and safetensors files never import torch (importing
it takes about a second, longer than reading a few GB from the page cache). The readers in
`checkpoints.mapped` return numpy views of memory-mapped files; what only `torch.load` can read is
converted here (`to_arrays`), without copies.

numpy has no bfloat16 or float8 types. Such tensors are kept as their raw bits (uint16, uint8)
under a dtype tagged with the type's name (`BFLOAT16`, ...; numpy keeps the tag on every view),
and `widened` gives their values as float32 where arithmetic needs them (the compiled sweep
widens bfloat16 itself).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

TAG = "bnwd_dtype"
BFLOAT16 = np.dtype(np.uint16, metadata={TAG: "bfloat16"})
FLOAT8_E4M3FN = np.dtype(np.uint8, metadata={TAG: "float8_e4m3fn"})
FLOAT8_E5M2 = np.dtype(np.uint8, metadata={TAG: "float8_e5m2"})


def tag_of(dtype: np.dtype[Any]) -> str | None:
    """The name of a tagged (bfloat16 / float8) dtype, None for numpy's own."""
    metadata = dtype.metadata
    return metadata.get(TAG) if metadata else None


def dtype_name(array: np.ndarray) -> str:
    return tag_of(array.dtype) or array.dtype.name


def is_floating(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" or tag_of(array.dtype) is not None


def _e4m3fn_table() -> np.ndarray:
    table = np.empty(256, dtype=np.float32)
    for bits in range(256):
        sign = -1.0 if bits & 0x80 else 1.0
        exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
        if exponent == 0xF and mantissa == 0x7:
            table[bits] = np.nan
        elif exponent == 0:
            table[bits] = sign * mantissa / 8.0 * 2.0**-6
        else:
            table[bits] = sign * (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7)
    return table


_E4M3FN: np.ndarray | None = None


def widened(array: np.ndarray) -> np.ndarray:
    """The values of a floating array in a numpy float type (exactly; a copy only for tagged
    dtypes): bfloat16 and float8 as float32, float16/32/64 as they are."""
    global _E4M3FN
    tag = tag_of(array.dtype)
    if tag is None:
        return array
    bits = array.view(np.uint16 if array.itemsize == 2 else np.uint8)  # untagged raw bits
    if tag == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if tag == "float8_e5m2":  # the upper byte of a float16
        return (bits.astype(np.uint16) << 8).view(np.float16).astype(np.float32)
    if _E4M3FN is None:
        _E4M3FN = _e4m3fn_table()
    return _E4M3FN[bits]


_TORCH_TAGS: dict[str, np.dtype[Any]] = {
    "bfloat16": BFLOAT16,
    "float8_e4m3fn": FLOAT8_E4M3FN,
    "float8_e5m2": FLOAT8_E5M2,
}


def _is_torch(value: object, name: str) -> bool:
    """isinstance(value, torch.<name>) without importing torch (nothing is a tensor before)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, getattr(torch, name))


def from_torch(tensor: Any) -> np.ndarray:
    """A numpy view of a CPU torch tensor (bfloat16 / float8 as tagged raw bits)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.is_conj() or tensor.is_neg():
        tensor = tensor.resolve_conj().resolve_neg()
    name = str(tensor.dtype).removeprefix("torch.")
    tagged = _TORCH_TAGS.get(name)
    if tagged is not None:
        import torch

        raw = torch.int16 if tagged.itemsize == 2 else torch.uint8
        return tensor.view(raw).numpy().view(tagged)
    return tensor.numpy()


def as_array(value: Any) -> np.ndarray:
    """An array argument of the public API: a numpy array, a torch tensor or an array-like."""
    if isinstance(value, np.ndarray):
        return value
    if _is_torch(value, "Tensor"):
        return from_torch(value)
    return np.asarray(value)


def to_arrays(obj: Any) -> Any:
    """What `torch.load` returned, with every tensor replaced by a numpy view of it and every
    `nn.Module` (only with --trust-pickle) by its state dict. Containers are updated in place
    (a placeholder `OrderedDict` keeps its marker); tuples and lists are rebuilt."""
    if "torch" not in sys.modules:
        return obj
    return _convert(obj, {})


def _convert(obj: Any, seen: dict[int, Any]) -> Any:
    if _is_torch(obj, "Tensor"):
        return from_torch(obj)
    if id(obj) in seen:
        return seen[id(obj)]
    if _is_module(obj):
        result = _convert(dict(obj.state_dict()), seen)
    elif isinstance(obj, dict):
        seen[id(obj)] = obj
        for key, value in list(obj.items()):
            obj[key] = _convert(value, seen)
        return obj
    elif isinstance(obj, list):
        seen[id(obj)] = obj
        obj[:] = [_convert(v, seen) for v in obj]
        return obj
    elif isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        result = tuple(_convert(v, seen) for v in obj)
    else:
        return obj
    seen[id(obj)] = result
    return result


def _is_module(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def to_torch(array: np.ndarray) -> Any:
    """A torch tensor holding a copy of `array` (for API callers that load weights into a model)."""
    import torch

    tag = tag_of(array.dtype)
    copy = np.array(array, copy=True)
    if tag is None:
        return torch.from_numpy(copy)
    raw = torch.from_numpy(copy.view(np.int16 if copy.itemsize == 2 else np.uint8))
    return raw.view(getattr(torch, tag))
