"""Loading `torch.save` files without running code from them.

`torch.load(weights_only=True)` refuses any pickled class outside PyTorch's allow-list. Real
checkpoints carry harmless metadata objects beside the weights (timm's `argparse.Namespace` args,
Lightning's `AttributeDict` hyper-parameters, `pathlib` paths). For those, bnwd registers inert
stand-ins under the recorded names: PyTorch's restricted unpickler then builds an empty
placeholder instead of importing or calling anything, so no code from the file ever runs. If the
weights themselves sit inside such an object (a whole pickled `nn.Module`), the file is refused
and the message names the flag that allows full unpickling.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from bnwd_cli.errors import CheckpointError, UnsafeCheckpointError

TRUST_FLAG = "--trust-pickle"
UNRESOLVED_ATTR = "_bnwd_unresolved"

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"


def unresolved_name(obj: object) -> str | None:
    """The class name a placeholder stands in for, or None for ordinary objects."""
    if type(obj) is OrderedDict:
        name = obj.__dict__.get(UNRESOLVED_ATTR)
        return name if isinstance(name, str) else None
    return None


def _stand_in(qualified_name: str) -> tuple[type, str]:
    class _Unresolved:
        # Returning a plain OrderedDict (not an instance of this class) is deliberate: the
        # restricted unpickler allows SETITEMS and BUILD on exactly that type, so dict
        # subclasses and objects with a __dict__ both load into an inert container.
        def __new__(cls, *args: object, **kwargs: object) -> Any:
            placeholder: OrderedDict[Any, Any] = OrderedDict()
            placeholder.__dict__[UNRESOLVED_ATTR] = qualified_name
            return placeholder

    return _Unresolved, qualified_name


def is_torch_zip(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == ZIP_MAGIC


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def load_torch_file(path: Path, *, trust_pickle: bool = False) -> Any:
    """Load a `torch.save` file lazily (memory-mapped when it is a zip archive), safely.

    Returns whatever object was saved, with harmless metadata objects replaced by placeholders
    (see `unresolved_name`). Raises `CheckpointError` for unreadable files and
    `UnsafeCheckpointError` when only full unpickling could load it.
    """
    try:
        zipped = is_torch_zip(path)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from None
    if zipped:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CheckpointError(
                path,
                f"is not a readable checkpoint: truncated or corrupt zip archive ({_short(exc)})",
            ) from None
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError(
                path, "is a zip archive but not a PyTorch checkpoint (no data.pkl)"
            )
    if trust_pickle:
        return _load(path, weights_only=False, mmap=zipped)
    try:
        return _load(path, weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        first_error = exc
    if not zipped:
        raise UnsafeCheckpointError(
            path,
            "holds pickled objects that only full unpickling can load (legacy, non-zip format; "
            f"{_short(first_error)}). If you trust this file, re-run with {TRUST_FLAG}",
        )
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    torch_owned = sorted(name for name in unsafe if name.split(".")[0] == "torch")
    if torch_owned:
        # Tensor subclasses and rebuild functions: a placeholder would silently drop weights.
        raise UnsafeCheckpointError(
            path,
            f"holds PyTorch objects outside the safe-load allow-list ({', '.join(torch_owned)}). "
            f"If you trust this file, re-run with {TRUST_FLAG}",
        )
    with torch.serialization.safe_globals([_stand_in(name) for name in unsafe]):
        try:
            return _load(path, weights_only=True, mmap=zipped)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                path,
                f"holds pickled objects that only full unpickling can load ({_short(exc)}). "
                f"If you trust this file, re-run with {TRUST_FLAG}",
            ) from None


def _load(path: Path, *, weights_only: bool, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError:
        raise
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        AttributeError,
        ImportError,
        TypeError,
        IndexError,
        UnicodeDecodeError,
    ) as exc:
        # ImportError/AttributeError only arise with full unpickling (a class that moved).
        if weights_only and "weights_only" in str(exc):
            raise pickle.UnpicklingError(str(exc)) from None
        raise CheckpointError(
            path, f"is not a readable PyTorch checkpoint: truncated or corrupt ({_short(exc)})"
        ) from None
