"""Turning result dataclasses into JSON-ready data: enums to values, NaN/Inf to null."""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from collections.abc import Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

_FIELDS: dict[type, tuple[str, ...]] = {}
"""Names of the fields `to_data` writes, per dataclass type (`dataclasses.fields` is slow to
ask 10^5 times: a long run's report has a point per layer per checkpoint)."""


def to_data(value: Any) -> Any:
    """A JSON-compatible copy of `value` (dataclasses, enums, paths, tuples, tensors)."""
    kind = type(value)  # exact types first: most values are plain numbers
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    names = _FIELDS.get(kind)
    if names is None and dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = _FIELDS[kind] = tuple(f.name for f in dataclasses.fields(value) if f.repr)
    if names is not None:
        data = {}
        for name in names:
            item = getattr(value, name)
            item_kind = type(item)
            if item_kind is float:
                data[name] = item if math.isfinite(item) else None
            elif item is None or item_kind is int or item_kind is str or item_kind is bool:
                data[name] = item
            else:
                data[name] = to_data(item)
        return data
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_data(v) for v in value]
    if isinstance(value, np.ndarray | np.generic):
        return to_data(value.tolist())
    return value


def _make_compact() -> Any:
    """One-line JSON of a value (NaN refused: `to_data` has made those null).

    The json module's C encoder, made once: `JSONEncoder.encode` builds a new one for every
    call, about a sixth of the time of encoding a report's point (a report has one per layer
    per checkpoint). Without the circular-reference check: documents here are trees. Where the
    C encoder is missing, the pure-Python one."""
    encoder = json.JSONEncoder(allow_nan=False, separators=(", ", ": "))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    c_encode = make(
        None, encoder.default, json.encoder.encode_basestring_ascii, None, ": ", ", ",
        False, False, False,
    )  # fmt: skip

    def compact(value: Any) -> str:
        if isinstance(value, str):
            return json.encoder.encode_basestring_ascii(value)
        return "".join(c_encode(value, 0))

    return compact


_compact = _make_compact()


def _make_compact_with_nan() -> Any:
    """One-line JSON of an array, NaN and infinities written as the json module writes them
    (`RecordEncoder` looks for them and then takes `to_data`'s path); None: no C encoder."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    c_encode = make(
        None, None, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )  # fmt: skip

    def compact(values: tuple[Any, ...]) -> str:
        return "".join(c_encode(values, 0))

    return compact


_compact_with_nan = _make_compact_with_nan()


class RecordEncoder:
    """`_compact(to_data(record))` for instances of one dataclass whose fields hold numbers,
    None, booleans and arrays of them (a report's points), about twice as fast: the values
    of all the fields go through the json module's C encoder as one array, cut at the commas,
    into a template of the keys made once (1.6 of 3.5 µs went to writing the 24 keys of a
    point, every time). A record it cannot write so exactly (a string, NaN or an infinity, a
    value only `to_data` turns into JSON) takes `to_data`'s path."""

    def __init__(self, kind: type) -> None:
        names = tuple(f.name for f in dataclasses.fields(kind) if f.repr)
        self._kind = kind
        self._count = len(names)
        self._values = operator.attrgetter(*names) if len(names) > 1 else None
        self._template = "{" + ", ".join(_compact(name) + ": %s" for name in names) + "}"

    def __call__(self, record: Any) -> str:
        if self._values is None or _compact_with_nan is None or type(record) is not self._kind:
            return _compact(to_data(record))
        try:
            text = _compact_with_nan(self._values(record))
        except (TypeError, ValueError):  # (a value the C encoder refuses: `to_data` converts it)
            return _compact(to_data(record))
        if '"' in text or "N" in text or "I" in text:  # a string; NaN, Infinity
            return _compact(to_data(record))
        pieces = text[1:-1].split(", ")
        if len(pieces) != self._count:
            pieces = _rejoined(pieces)  # an array among the values was cut too
            if len(pieces) != self._count:
                return _compact(to_data(record))
        return self._template % tuple(pieces)


def _rejoined(pieces: list[str]) -> list[str]:
    """`pieces` of an array's text cut at every ", ", the cuts inside nested arrays undone
    (with no strings in the text, every bracket is the array's own)."""
    joined: list[str] = []
    held: list[str] = []
    depth = 0
    for piece in pieces:
        held.append(piece)
        depth += piece.count("[") - piece.count("]")
        if depth == 0:
            joined.append(", ".join(held))
            held = []
    return joined if not held else []


class Rows:
    """An array of objects already written on one line each (`RecordEncoder`), which `dumps`
    and `iter_dumps` lay out as they would the objects themselves where those are flat (no
    object, nor array of arrays, among their values: what `_write` puts on one line)."""

    __slots__ = ("texts",)

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts


def rows(texts: list[str]) -> Rows | list[str]:
    """`Rows` of `texts`, or an empty array (which `_write` puts on its parent's line)."""
    return Rows(texts) if texts else []


def dumps(document: Any) -> str:
    """`document` (JSON-compatible data, see `to_data`) as indented JSON, with every object or
    array that holds no object or array of objects on one line (a per-checkpoint point, a shape,
    a summary). Those lines go through the json module's C encoder; `json.dumps(indent=2)`
    encodes in pure Python, which took longer than the analysis for a long run."""
    parts: list[str] = []
    _write(document, "\n", parts)
    parts.append("\n")
    return "".join(parts)


class Lazy:
    """An array of a document's top level that `iter_dumps` writes item by item, each item
    made when it is written (the layers of a report: their points are most of its text), or
    made before as `item_text`."""

    __slots__ = ("items",)

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = items


class Raw(str):
    """An item of a `Lazy` already written (`item_text`): `iter_dumps` copies it as it is."""

    __slots__ = ()


_ITEM_NEWLINE = "\n    "
"""Where the lines of an item of a top-level array start: two levels in."""


def item_text(value: Any) -> str:
    """The text `iter_dumps` writes for `value` as an item of a `Lazy` (made elsewhere, e.g. in
    the process that computed it; wrap it in `Raw` to put it in a `Lazy`)."""
    parts: list[str] = []
    _write(value, _ITEM_NEWLINE, parts)
    return "".join(parts)


def iter_dumps(document: dict[str, Any]) -> Iterator[str]:
    """`dumps` of `document` (each `Lazy` a list of its items) in pieces, to the same text
    where that document spans several lines (a value of it holds an object; the items of a
    `Lazy` must be objects). A `Lazy` is written one item per piece, so that only one item's
    data and text are held at a time, not the whole document and its text (for 40 ResNet-50
    checkpoints, `dumps` took 14 MB at its peak for 3.8 MB of text, and both grow with the
    checkpoints)."""
    inner = "\n  "
    parts = ["{"]
    for i, (key, value) in enumerate(document.items()):
        parts.append(("," if i else "") + inner + _compact(str(key)) + ": ")
        if type(value) is not Lazy:
            _write(value, inner, parts)
            continue
        empty = True
        for item in value.items:
            parts.append(("[" if empty else ",") + _ITEM_NEWLINE)
            if type(item) is Raw:
                parts.append(item)
            else:
                _write(item, _ITEM_NEWLINE, parts)
            yield "".join(parts)
            parts.clear()
            empty = False
        parts.append("[]" if empty else inner + "]")
    parts.append("\n}\n")
    yield "".join(parts)


def _write(value: Any, newline: str, parts: list[str]) -> None:
    if type(value) is Rows:
        inner = newline + "  "
        parts.append("[" + inner + ("," + inner).join(value.texts) + newline + "]")
    elif isinstance(value, dict) and value and not _flat(value.values()):
        inner = newline + "  "
        parts.append("{")
        for i, (key, item) in enumerate(value.items()):
            parts.append(("," if i else "") + inner + _compact(str(key)) + ": ")
            _write(item, inner, parts)
        parts.append(newline + "}")
    elif isinstance(value, list) and value and not _flat(value):
        inner = newline + "  "
        parts.append("[")
        for i, item in enumerate(value):
            parts.append("," if i else "")
            parts.append(inner)
            _write(item, inner, parts)
        parts.append(newline + "]")
    else:
        parts.append(_compact(value))


_SCALARS = frozenset({float, int, str, bool, type(None)})


def _flat(items: Any) -> bool:
    """No item is an object, nor an array holding one: the container fits on one line."""
    for item in items:
        if type(item) in _SCALARS:
            continue
        if isinstance(item, dict) or type(item) is Rows:
            return False
        if isinstance(item, list) and any(isinstance(v, dict | list) for v in item):
            return False
    return True
