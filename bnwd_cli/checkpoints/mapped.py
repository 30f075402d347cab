"""Zero-copy reads of torch zip and safetensors files through one memory map per file.

Every tensor is a read-only numpy view into a read-only map of its file, so a tensor's bytes
are read only when an operation touches them, straight from the page cache, and never copied
into the heap. Three costs of the general-purpose readers are avoided:

- importing torch at all (about a second; `checkpoints.arrays`);
- `safetensors.safe_open(...).get_tensor` copies every tensor it returns;
- `torch.load(weights_only=True)` runs a pure-Python unpickler, about 0.1 s for a ResNet-50
  checkpoint with its optimizer state, more than reading its 200 MB from the page cache takes.

`load_torch_zip` unpickles `data.pkl` with the C unpickler instead, restricted to the four globals
that a `torch.save` of state dicts and optimizer states uses (an `OrderedDict`, a tensor rebuild
function, a parameter rebuild function and the typed-storage classes, all on the allow-list of
`torch.load(weights_only=True)`), replaced by functions of this module. Anything else in the file
(another global, a sparse or quantized tensor, tensor metadata, backward hooks, a big-endian
archive, a compressed record) raises `NotMappableError` and the caller uses `torch.load` as before, so
this path never accepts a file that the weights-only loader would refuse, and never decides how a
refused file is reported. Bounds are checked by `numpy.frombuffer` (record inside the file) and
here (view inside its record).

Resident memory: pages of a map count towards the process's RSS once touched. `release_pages`
hands them back (`madvise(MADV_DONTNEED)`: the file's pages stay in the page cache, a later read
faults them in again), which keeps a streaming pass at about one checkpoint's weights however long
the run. It only ever acts on memory inside a map made here.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import mmap
import operator
import os
import pickle
import struct
import sys
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    from numpy import byte_bounds  # type: ignore[attr-defined,no-redef]

from bnwd_cli.checkpoints.arrays import BFLOAT16, FLOAT8_E4M3FN, FLOAT8_E5M2

PAGE = mmap.PAGESIZE
RELEASE_MIN = 1 << 18
"""Tensors smaller than this (bytes) keep their pages until their file is unmapped: the
system call costs more than their pages weigh (a ResNet-50 checkpoint holds about 1 MB of them)."""
RELEASE_ALIGN = 1 << 21
"""`release_pages` drops whole 2 MiB stretches (the largest page-cache folio on x86-64)."""
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors crate's own limit

SAFETENSORS_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": BFLOAT16,
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": FLOAT8_E4M3FN,
    "F8_E5M2": FLOAT8_E5M2,
}


class NotMappableError(Exception):
    """This file needs the general-purpose reader (the message says why, for debugging)."""


# Live maps by base address. Weak: a map lives as long as a tensor viewing it (or its
# MappedFile) does; `release_pages` must never act on memory that is no longer one of them.
_LIVE: dict[int, tuple[weakref.ref[mmap.mmap], int]] = {}
_LIVE_LOCK = threading.Lock()


class MappedFile:
    """One file, mapped read-only (views of it are read-only arrays)."""

    def __init__(self, path: Path) -> None:
        if sys.byteorder != "little":
            raise NotMappableError("big-endian host")
        if not hasattr(os, "pread"):
            raise NotMappableError("no os.pread on this platform")
        self.path = path
        # Kept open while the header is parsed: small reads go through pread, not through the
        # map (a page fault per scattered zip header costs more than a system call).
        self._fd: int | None = os.open(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError) as exc:  # empty file, or a file system without mmap
            self.finish_reading()
            raise NotMappableError(str(exc)) from None
        self.size = len(self._map)
        self.base = _address(np.frombuffer(self._map, dtype=np.uint8, count=1))
        with _LIVE_LOCK:
            for base in [b for b, (ref, _) in _LIVE.items() if ref() is None]:
                del _LIVE[base]
            _LIVE[self.base] = (weakref.ref(self._map), self.size)

    def view(self, offset: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """The tensor stored at byte `offset` (contiguous, little-endian), without a copy."""
        numel = math.prod(shape)
        if numel == 0:
            return _read_only(np.empty(shape, dtype=dtype))
        itemsize = dtype.itemsize
        if (self.base + offset) % itemsize:
            # Misaligned (safetensors does not pad between tensors of different widths): copy.
            raw = np.frombuffer(self._map, dtype=np.uint8, count=numel * itemsize, offset=offset)
            return _read_only(raw.copy().view(dtype).reshape(shape))
        return np.frombuffer(self._map, dtype=dtype, count=numel, offset=offset).reshape(shape)

    def bytes_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size or self._fd is None:
            raise NotMappableError(f"read of {length} bytes at {offset} past the end of the file")
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise NotMappableError(f"short read at {offset} (file changed while read?)")
        return data

    def finish_reading(self) -> None:
        """Close the descriptor used by `bytes_at` (the map stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def release_pages(*tensors: np.ndarray | None) -> None:
    """Drop the pages backing `tensors` from this process's resident set.

    Only arrays that view a live `MappedFile` are affected (others are left alone); their data
    stays valid and is faulted back in from the page cache when next read. The range dropped
    is widened to `RELEASE_ALIGN` boundaries: a fault can map a whole large folio of the page
    cache, neighbours included (measured: sweeping a 1 MB tensor of each of 9 files mapped
    18 MB), and those neighbours refault just the same when they are read.
    """
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    large = [t for t in tensors if isinstance(t, np.ndarray) and t.nbytes >= RELEASE_MIN]
    if not large:
        return
    with _LIVE_LOCK:
        live = [(base, ref(), size) for base, (ref, size) in _LIVE.items()]
    for tensor in large:
        start, end = byte_bounds(tensor)
        nbytes = end - start
        for base, mapping, size in live:
            if mapping is not None and base <= start and start + nbytes <= base + size:
                first = (start - base) // RELEASE_ALIGN * RELEASE_ALIGN
                last = min(size, -(-(start + nbytes - base) // RELEASE_ALIGN) * RELEASE_ALIGN)
                mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
                break


def release_all_pages() -> None:
    """`release_pages` for every live map at once: also the pages of tensors too small to be
    released one by one, and the neighbours the kernel mapped along with them (a fault maps up
    to 16 pages around the one touched). The streaming pass calls it every few layers, so that
    the pages of the checkpoints it holds open do not pile up over a window."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    with _LIVE_LOCK:
        live = [(ref(), size) for ref, size in _LIVE.values()]
    for mapping, size in live:
        if mapping is not None and not mapping.closed:
            mapping.madvise(mmap.MADV_DONTNEED, 0, size)


# ----------------------------------------------------------------------------- safetensors


class SafetensorsEntry(NamedTuple):
    """One tensor of a safetensors header (a named tuple: a header has hundreds, and a run
    repeats them in every checkpoint; a frozen dataclass took a third of the parse)."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the tensor's data in the file."""


class SafetensorsFile:
    """A safetensors file: header validated as the format's reference reader does, tensors mapped."""

    def __init__(self, path: Path) -> None:
        self.file = MappedFile(path)
        try:
            self.entries, self.metadata = _parse_safetensors_header(self.file)
        finally:
            self.file.finish_reading()

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_tensor(self, key: str) -> np.ndarray:
        """The tensor stored under `key` (as `safe_open(...).get_tensor`, without the copy)."""
        entry = self.entries[key]
        return self.file.view(entry.offset, entry.shape, entry.dtype)


def _parse_safetensors_header(
    file: MappedFile,
) -> tuple[dict[str, SafetensorsEntry], dict[str, str]]:
    if file.size < 8:
        raise NotMappableError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", file.bytes_at(0, 8))
    if length > MAX_SAFETENSORS_HEADER or 8 + length > file.size:
        raise NotMappableError("implausible header length")
    try:
        header = json.loads(file.bytes_at(8, length))
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotMappableError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise NotMappableError("header is not a JSON object")
    data_start, data_len = 8 + length, file.size - 8 - length
    metadata_raw = header.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(v, str) for v in metadata_raw.values()
    ):
        raise NotMappableError("__metadata__ is not a string-to-string map")
    entries: dict[str, SafetensorsEntry] = {}
    spans: list[tuple[int, int]] = []
    for key, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise NotMappableError(
                f"entry {key!r} is malformed or of an unsupported dtype"
            ) from None
        for size in (*shape, begin, end):  # (a loop: a generator in all() cost a third)
            if type(size) is not int or size < 0:
                raise NotMappableError(
                    f"entry {key!r} has a non-integer or negative size or offset"
                )
        itemsize = dtype.itemsize
        if not begin <= end <= data_len or end - begin != math.prod(shape) * itemsize:
            raise NotMappableError(f"entry {key!r}: data offsets do not match its shape and dtype")
        entries[key] = SafetensorsEntry(dtype, shape, data_start + begin)
        spans.append((begin, end))
    # Like the reference reader: the tensors tile the data section, without gaps or overlaps.
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise NotMappableError("tensor data overlaps or leaves gaps")
        position = end
    if position != data_len:
        raise NotMappableError("data section does not end with the last tensor")
    return entries, {str(k): v for k, v in metadata_raw.items()}


# ----------------------------------------------------------------------------- torch zip


class _StorageType:
    """What `find_class` gives for `torch.FloatStorage` etc.: the element type, inert."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype[Any]) -> None:
        self.dtype = dtype


_STORAGE_ELEMENTS: dict[str, np.dtype[Any] | str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": BFLOAT16,
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_STORAGE_DTYPES = {name: _StorageType(np.dtype(dtype)) for name, dtype in _STORAGE_ELEMENTS.items()}


OUTLINE_MAX = 16
"""In an outline load, storages of more elements than this come back as empty placeholders."""
_INT_ONLY = frozenset({int})


_ZipRecord = tuple[int, int, int, int]
"""A zip member as `_zip_directory` lists it: local header offset, size, compression, flags."""

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_LOCAL_HEADER = struct.Struct("<4s22xHH")
"""A local file header: its signature, and the lengths of the name and extra field after it."""
_MAX_COMMENT = 0xFFFF
_MAX_EXTRACT_VERSION = 63  # zipfile.MAX_EXTRACT_VERSION
_ZIP_STORED = 0  # zipfile.ZIP_STORED


def _zip_directory(file: MappedFile) -> dict[str, _ZipRecord] | None:
    """The central directory of a zip archive, read with two `pread`s and `struct`, or None
    where anything is unusual (a comment that does not end the file, bytes before the
    archive, several disks, a malformed entry): `zipfile` then reads it. A `torch.save`
    archive lists a record per tensor, and `zipfile.ZipFile` builds a `ZipInfo` object for
    each (0.7 ms for a ResNet-50 checkpoint with its optimizer state, against 0.3 ms here);
    a run's files are listed in discovery, and again by the pass past the ones discovery
    keeps (`safe_load.PreloadedFiles`)."""
    size = file.size
    tail_len = min(size, _EOCD.size + _MAX_COMMENT)
    tail = file.bytes_at(size - tail_len, tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > tail_len:
        return None
    _, disk, cd_disk, _, entries, cd_size, cd_offset, comment_len = _EOCD.unpack_from(tail, at)
    if disk or cd_disk or at + _EOCD.size + comment_len != tail_len:
        return None
    eocd = size - tail_len + at
    end = eocd
    # Where a zip64 end record precedes the end record (torch's writer always writes one), its
    # figures are the ones that count, as in zipfile.
    if eocd >= _EOCD64_LOCATOR.size + _EOCD64.size:
        sig, locator_disk, eocd64, disks = _EOCD64_LOCATOR.unpack(
            file.bytes_at(eocd - _EOCD64_LOCATOR.size, _EOCD64_LOCATOR.size)
        )
        if sig == b"PK\x06\x07":
            end = eocd - _EOCD64_LOCATOR.size - _EOCD64.size
            if locator_disk or disks > 1 or eocd64 != end:
                return None
            sig, _, _, _, _, _, _, entries, cd_size, cd_offset = _EOCD64.unpack(
                file.bytes_at(end, _EOCD64.size)
            )
            if sig != b"PK\x06\x06":
                return None
    if cd_offset + cd_size != end:  # bytes before the archive, or a gap: zipfile's business
        return None
    directory = file.bytes_at(cd_offset, cd_size)
    records: dict[str, _ZipRecord] = {}
    position = 0
    unpack = _CENTRAL.unpack_from
    for _ in range(entries):
        if position + _CENTRAL.size > cd_size:
            return None
        (sig, _, needed, flags, method, _, _, _, packed, unpacked, name_len, extra_len,
         comment_len, _, _, _, offset) = unpack(directory, position)  # fmt: skip
        start = position + _CENTRAL.size
        if sig != b"PK\x01\x02" or needed > _MAX_EXTRACT_VERSION:
            return None
        if extra_len:
            extra = directory[start + name_len : start + name_len + extra_len]
            wide = _zip64_fields(extra) if len(extra) == extra_len else None
            if wide is None:
                return None
            # zipfile's order: size, packed size, offset, each only where the short one is full
            if unpacked == 0xFFFFFFFF:
                unpacked = wide.pop(0) if wide else -1
            if packed == 0xFFFFFFFF:
                packed = wide.pop(0) if wide else -1
            if offset == 0xFFFFFFFF:
                offset = wide.pop(0) if wide else -1
            if min(unpacked, packed, offset) < 0:
                return None
        elif unpacked == 0xFFFFFFFF or packed == 0xFFFFFFFF or offset == 0xFFFFFFFF:
            return None
        try:
            name = directory[start : start + name_len].decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            return None
        if "\x00" in name or (os.sep != "/" and os.sep in name):  # names zipfile rewrites
            return None
        records[name] = (offset, unpacked, method, flags)
        position = start + name_len + extra_len + comment_len
    if position != cd_size or len(records) != entries:
        return None
    return records


def _zip64_fields(extra: bytes) -> list[int] | None:
    """The 8-byte values of an entry's zip64 extra field (id 1), in order, [] without one;
    None where the extra fields are malformed (zipfile refuses those)."""
    position, found = 0, []
    while len(extra) - position >= 4:
        kind, length = struct.unpack_from("<HH", extra, position)
        if position + 4 + length > len(extra):
            return None
        if kind == 1:
            body = extra[position + 4 : position + 4 + length]
            found = [v for (v,) in struct.iter_unpack("<Q", body[: length // 8 * 8])]
        position += 4 + length
    return found


class _TorchZip:
    def __init__(self, file: MappedFile, *, outline: bool = False) -> None:
        import zipfile  # (here: a run of safetensors files never needs it)

        self.file = file
        self.outline = outline
        try:
            records = _zip_directory(file)
            if records is None:
                with zipfile.ZipFile(file.path) as archive:
                    records = {
                        i.filename: (i.header_offset, i.file_size, i.compress_type, i.flag_bits)
                        for i in archive.infolist()
                    }
        except (zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:
            raise NotMappableError(f"zip directory unreadable ({exc})") from None
        pickles = [name for name in records if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise NotMappableError("not exactly one data.pkl")
        self.prefix = pickles[0][: -len("data.pkl")]
        self.records = {n: r for n, r in records.items() if n.startswith(self.prefix)}
        byteorder = self.records.get(self.prefix + "byteorder")
        if byteorder is not None and self._record("byteorder", byteorder) != b"little":
            raise NotMappableError("not a little-endian archive")
        self.pickle = self._record("data.pkl", self.records[pickles[0]])
        self.data_prefix = self.prefix + "data/"
        self.storages: dict[str, np.ndarray] = {}
        self.storage_ids: set[int] = set()

    def _data_offset(self, name: str, record: _ZipRecord) -> int:
        header_offset, _, compress_type, flag_bits = record
        if compress_type != _ZIP_STORED or flag_bits & 0x1:
            raise NotMappableError(f"record {name} is compressed or encrypted")
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(
            self.file.bytes_at(header_offset, _LOCAL_HEADER.size)
        )
        if signature != b"PK\x03\x04":
            raise NotMappableError(f"record {name} has no local header")
        return header_offset + _LOCAL_HEADER.size + name_len + extra_len

    def _record(self, name: str, record: _ZipRecord) -> bytes:
        return self.file.bytes_at(self._data_offset(name, record), record[1])

    def storage(self, saved_id: object) -> np.ndarray:
        """`persistent_load`: a 1-D view of one storage record."""
        # Exact types (the restricted unpickler can build no subclass of them), checked first
        # because this runs once per tensor: 473 times for a ResNet-50 with its SGD state.
        if type(saved_id) is not tuple or len(saved_id) != 5 or saved_id[0] != "storage":
            raise NotMappableError(f"unexpected persistent id {saved_id!r:.80}")
        _, storage_type, key, _location, numel = saved_id
        if type(storage_type) is not _StorageType or type(key) is not str:
            raise NotMappableError("malformed storage reference")
        if type(numel) is not int or numel < 0:
            raise NotMappableError("malformed storage size")
        dtype = storage_type.dtype
        known = self.storages.get(key)
        if known is not None:
            if known.dtype != dtype or known.size != numel:
                raise NotMappableError(f"storage {key} referenced with two dtypes or sizes")
            return known
        record = self.records.get(self.data_prefix + key)
        if record is None:
            raise NotMappableError(f"no record for storage {key}")
        itemsize = dtype.itemsize
        if record[1] < numel * itemsize:
            raise NotMappableError(f"record of storage {key} is shorter than the storage")
        if numel == 0 or (self.outline and numel > OUTLINE_MAX):
            view = np.empty((0,), dtype=dtype)
        else:
            offset = self._data_offset(key, record)
            if (self.file.base + offset) % itemsize:
                raise NotMappableError(f"storage {key} is misaligned")
            view = np.frombuffer(self.file._map, dtype=dtype, count=numel, offset=offset)
        self.storages[key] = view
        self.storage_ids.add(id(view))
        return view

    def rebuild_tensor(
        self,
        storage: object,
        storage_offset: object,
        size: object,
        stride: object,
        requires_grad: object,
        backward_hooks: object,
        metadata: object = None,
    ) -> np.ndarray:
        """`torch._utils._rebuild_tensor_v2` for plain dense tensors."""
        if id(storage) not in self.storage_ids:  # ids of the storages' views, alive in .storages
            raise NotMappableError("tensor rebuilt from something that is not a storage")
        if metadata or backward_hooks or type(requires_grad) is not bool:
            raise NotMappableError("tensor with metadata or hooks")
        if not (
            type(storage_offset) is int
            and type(size) is tuple
            and type(stride) is tuple
            and len(size) == len(stride)
            and set(map(type, size + stride)) <= _INT_ONLY
        ):
            raise NotMappableError("malformed tensor geometry")
        assert isinstance(storage, np.ndarray)
        if self.outline and storage.size == 0:
            return storage  # a placeholder (or an empty tensor's storage)
        return strided_view(storage, storage_offset, size, stride)

    def rebuild_parameter(
        self, data: object, requires_grad: object, backward_hooks: object
    ) -> np.ndarray:
        if not isinstance(data, np.ndarray) or backward_hooks:
            raise NotMappableError("parameter with hooks")
        return data


@functools.lru_cache(maxsize=1024)
def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of `size`, in elements."""
    strides, expected = [], 1
    for n in reversed(size):
        strides.append(expected)
        expected *= n
    return tuple(reversed(strides))


def strided_view(
    storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> np.ndarray:
    """The tensor `storage[offset:]` viewed with torch's `size` and `stride` (in elements),
    refused unless every element it reaches lies inside `storage`."""
    if len(size) != len(stride):
        raise NotMappableError("tensor size and stride of different lengths")
    if stride == _contiguous_strides(size) and min(size, default=1) > 0 and offset >= 0:
        # the usual tensor (dense, row-major, not empty): it ends at offset + numel
        numel = math.prod(size)
        if offset == 0 and numel == storage.size:
            return storage.reshape(size)  # most often the whole of its storage: no slice
        if offset + numel > storage.size:
            raise NotMappableError("tensor reaches past the end of its storage")
        return storage[offset : offset + numel].reshape(size)
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise NotMappableError("negative tensor size, stride or offset")
    numel = math.prod(size)
    if numel == 0:
        return np.empty(size, dtype=storage.dtype)
    last = offset + sum(map(operator.mul, map(operator.sub, size, itertools.repeat(1)), stride))
    if last >= storage.size:
        raise NotMappableError("tensor reaches past the end of its storage")
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:],
        shape=size,
        strides=tuple(s * itemsize for s in stride),
        writeable=False,
    )


class _RestrictedUnpickler(pickle.Unpickler):
    """The C unpickler, able to build nothing but containers, scalars and plain tensors."""

    def __init__(self, archive: _TorchZip) -> None:
        super().__init__(io.BytesIO(archive.pickle), encoding="utf-8")
        self._archive = archive

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._archive.rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return self._archive.rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # an inert marker: neither callable nor buildable
        raise NotMappableError(f"global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return self._archive.storage(pid)


def load_torch_zip(path: Path, *, outline: bool = False) -> Any:
    """`torch.load(path, mmap=True, weights_only=True)` for the common case, faster.

    Raises `NotMappableError` whenever the file holds anything beyond state dicts, optimizer states,
    plain Python values and dense CPU-layout tensors; then use `torch.load`.
    `outline`: tensors of more than `OUTLINE_MAX` elements come back as empty arrays of their
    dtype, unchecked. Enough to tell what the file holds and to read its step (even a tensor
    one), in a third of the time: discovery reads every file this way, the pass reads them whole.
    """
    file = MappedFile(path)
    try:
        return _RestrictedUnpickler(_TorchZip(file, outline=outline)).load()
    except NotMappableError:
        raise
    except Exception as exc:  # any failure: let the general reader decide and report
        raise NotMappableError(f"{type(exc).__name__}: {exc}") from None
    finally:
        file.finish_reading()
