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
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

from bnwd_cli.checkpoints.arrays import to_arrays
from bnwd_cli.checkpoints.mapped import NotMappableError, load_torch_zip
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


PRELOAD_FILES = 64
"""Torch zip files discovery reads whole and keeps for the pass (`PreloadedFiles`)."""


class PreloadedFiles:
    """Torch zip files that discovery has read whole, for the pass to take instead of reading
    them a second time.

    Discovery has to unpickle every torch file to find its step; the pass unpickles it again
    to read its tensors. Read by the memory-mapped reader, a file's tensors are views of its
    map whose pages nothing has touched, so keeping the result costs only its Python objects
    (peak RSS +6 MB for 40 ResNet-50 checkpoints with their optimizer state) and a map with nothing
    resident. The first `capacity` files discovered are kept (the pass opens them first; a
    longer run reads the rest twice, as before). A file that changed since it was read is
    read again.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = PRELOAD_FILES if capacity is None else capacity
        self._files: dict[Path, tuple[tuple[int, int, int, int] | None, Any]] = {}

    def load(self, path: Path) -> Any | None:
        """`load_torch_zip(path)`, kept for `take`; None when there is no room or the
        memory-mapped reader does not take the file (then read an outline instead)."""
        if len(self._files) >= self.capacity:
            return None
        stamp = _stamp(path)
        try:
            loaded = load_torch_zip(path)
        except NotMappableError:
            return None
        self._files[path] = (stamp, loaded)
        return loaded

    def take(self, path: Path) -> Any | None:
        """What `load` read from `path`, once; None when it did not, or the file changed."""
        stamp, loaded = self._files.pop(path, (None, None))
        if loaded is None or stamp is None or stamp != _stamp(path):
            return None
        return loaded

    def __len__(self) -> int:
        return len(self._files)

    def clear(self) -> None:
        self._files.clear()


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def load_torch_file(path: Path, *, trust_pickle: bool = False, outline: bool = False) -> Any:
    """Load a `torch.save` file lazily (memory-mapped when it is a zip archive), safely.

    Returns whatever object was saved, with tensors as numpy arrays (`checkpoints.arrays`) and
    harmless metadata objects replaced by placeholders (see `unresolved_name`). torch is only
    imported for files the restricted reader of `checkpoints.mapped` does not take. Raises
    `CheckpointError` for unreadable files and `UnsafeCheckpointError` when only full unpickling
    could load it. `outline`: see `mapped.load_torch_zip` (files it does not take load whole).
    """
    try:
        zipped = is_torch_zip(path)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from None
    if zipped:
        # The common case (state dicts, optimizer states, plain values) without torch.load's
        # Python unpickler; anything else, or any problem, is left to torch.load below.
        try:
            return load_torch_zip(path, outline=outline)
        except NotMappableError:
            pass
        import zipfile  # (here: a run of safetensors files never needs it)

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
    return to_arrays(_load_with_torch(path, zipped=zipped, trust_pickle=trust_pickle))


def _load_with_torch(path: Path, *, zipped: bool, trust_pickle: bool) -> Any:
    import torch

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
            f"{_unpickler_reason(first_error)}). If you trust this file, re-run with {TRUST_FLAG}",
        )
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (
        pickle.UnpicklingError,
        ValueError,
        RuntimeError,
        EOFError,
        KeyError,
        IndexError,
    ) as exc:
        raise CheckpointError(
            path, f"is not a readable PyTorch checkpoint: corrupt pickle data ({_short(exc)})"
        ) from None
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
                "holds pickled objects that only full unpickling can load "
                f"({_unpickler_reason(exc)}). "
                f"If you trust this file, re-run with {TRUST_FLAG}",
            ) from None


CORRUPT_PICKLE_SIGNS = (
    "Unsupported operand",
    "String is too long",
    "Can only append to lists",
    "unsupported persistent id",
)
"""What the safe unpickler says about bytes that are no pickle at all (as opposed to a pickle of
a class it will not build): such a file is corrupt, and --trust-pickle would not help."""


TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation", "(1)", "(2)")


def _unpickler_reason(exc: BaseException) -> str:
    """The restricted unpickler's own reason, out of torch's long weights_only message."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(TORCH_BOILERPLATE):
            # drop torch's advice on allow-listing: it is for library authors, not bnwd users
            return line.split(". Please use")[0][:200]
    return _short(exc)


def _load(path: Path, *, weights_only: bool, mmap: bool) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(exc)
        if weights_only and not any(sign in reason for sign in CORRUPT_PICKLE_SIGNS):
            raise
        raise CheckpointError(
            path, f"is not a readable PyTorch checkpoint: corrupt pickle data ({reason})"
        ) from None
    except (
        RuntimeError,
        EOFError,
        struct.error,  # a legacy file cut inside a length field
        OSError,
        ValueError,
        KeyError,
        AttributeError,
        ImportError,
        TypeError,
        IndexError,
        UnicodeDecodeError,
        OverflowError,  # a length field past the address space (random bytes)
        MemoryError,  # a length field that asks for more memory than there is
    ) as exc:
        # ImportError/AttributeError only arise with full unpickling (a class that moved).
        if weights_only and "weights_only" in str(exc):
            raise pickle.UnpicklingError(str(exc)) from None
        raise CheckpointError(
            path, f"is not a readable PyTorch checkpoint: truncated or corrupt ({_short(exc)})"
        ) from None
