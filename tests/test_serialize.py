"""The JSON writer of every `--format json` (`render/serialize.py`), against the json module.

- `dumps` gives back the document it was handed (json.loads), for random documents;
- its layout: every object or array holding no object (nor an array of objects) is on one line,
  exactly as `json.dumps` writes it compactly; every other container spans several lines;
- `_compact` (the json module's C encoder, made once) equals `json.dumps` for any value, and
  refuses NaN and infinities as `json.dumps(allow_nan=False)` does;
- `to_data`: NaN and infinities become null, enums their values, paths strings, numpy arrays
  lists, dataclasses objects of their fields;
- `iter_dumps` (a document written in pieces, `Lazy` arrays item by item) joins to `dumps` of
  the same document with each `Lazy` a list, and makes each item only when it writes it; an
  item written ahead (`Raw(item_text(item))`, as a second process does) is copied in place;
- `RecordEncoder` (a report's points) writes exactly what `_compact(to_data(record))` writes,
  for any values, and `Rows` of its texts are laid out as the objects themselves.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnwd_cli.render.serialize import (
    Lazy,
    Raw,
    RecordEncoder,
    _compact,
    dumps,
    item_text,
    iter_dumps,
    rows,
    to_data,
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
documents = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=40,
)
# strings without brackets or braces, so that no string's text can look like a container's
plain = st.text(alphabet="abcxyz é", max_size=8)
plain_documents = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | plain,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(plain, inner, max_size=5),
    max_leaves=40,
)


def compact_reference(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "), allow_nan=False)


def is_flat(value: Any) -> bool:
    """The writer's rule: no item is an object, nor an array holding an object or array."""
    items = value.values() if isinstance(value, dict) else value
    for item in items:
        if isinstance(item, dict):
            return False
        if isinstance(item, list) and any(isinstance(v, dict | list) for v in item):
            return False
    return True


def containers(value: Any) -> list[Any]:
    found = []
    if isinstance(value, dict | list):
        found.append(value)
        for item in value.values() if isinstance(value, dict) else value:
            found += containers(item)
    return found


@settings(max_examples=300, deadline=None)
@given(documents)
def test_dumps_round_trips(document: Any) -> None:
    text = dumps(document)
    assert text.endswith("\n")
    assert json.loads(text) == document


@settings(max_examples=300, deadline=None)
@given(plain_documents)
def test_dumps_writes_flat_containers_on_one_line_and_no_other(document: Any) -> None:
    text = dumps(document)
    for container in containers(document):
        if not container:
            continue
        one_line = compact_reference(container)
        if is_flat(container):
            assert one_line in text
        else:
            assert one_line not in text  # spread over several lines


@settings(max_examples=300, deadline=None)
@given(documents)
def test_compact_equals_json_dumps(value: Any) -> None:
    assert _compact(value) == compact_reference(value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, [1.0, math.nan], {"x": math.inf}])
def test_compact_refuses_what_json_cannot_hold(bad: Any) -> None:
    with pytest.raises(ValueError):
        compact_reference(bad)
    with pytest.raises(ValueError):
        _compact(bad)


class Colour(Enum):
    RED = "red"


@dataclass(frozen=True)
class Point:
    step: int
    norm: float
    angle: float | None
    kind: Colour
    where: Path
    rows: np.ndarray
    betas: tuple[float, float] | None


def test_to_data_makes_json_values() -> None:
    point = Point(
        3, math.nan, -math.inf, Colour.RED, Path("runs/a"), np.array([1.5, 2.0]), (0.9, 0.999)
    )
    data = to_data([point, {"k": (1, math.inf)}, np.float64(0.25)])
    assert data == [
        {
            "step": 3,
            "norm": None,
            "angle": None,
            "kind": "red",
            "where": "runs/a",
            "rows": [1.5, 2.0],
            "betas": [0.9, 0.999],
        },
        {"k": [1, None]},
        0.25,
    ]
    assert json.loads(dumps(data)) == data


objects = st.dictionaries(st.text(max_size=8), documents, min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(
    head=st.dictionaries(st.text(max_size=8), documents, max_size=4),
    items=st.lists(objects, max_size=5),
    tail=st.dictionaries(st.text(max_size=8), documents, max_size=3),
    run=objects,
)
def test_iter_dumps_joins_to_dumps(
    head: dict[str, Any], items: list[Any], tail: dict[str, Any], run: dict[str, Any]
) -> None:
    # a document as a report's: an object somewhere (it spans several lines), then a Lazy array
    document = {
        "run": run,
        **{f"{k}^": v for k, v in head.items()},
        "layers": items,
        **{f"{k}~": v for k, v in tail.items()},
    }
    lazy = {**document, "layers": Lazy(iter(items))}
    pieces = list(iter_dumps(lazy))
    assert "".join(pieces) == dumps(document)
    assert len(pieces) == len(items) + 1  # an item per piece, then the rest
    # items written ahead, every other one, give the same text
    ahead = [Raw(item_text(item)) if i % 2 else item for i, item in enumerate(items)]
    assert "".join(iter_dumps({**document, "layers": Lazy(iter(ahead))})) == dumps(document)


def test_iter_dumps_makes_each_item_when_it_writes_it() -> None:
    made: list[int] = []

    def items() -> Any:
        for i in range(3):
            made.append(i)
            yield {"i": i, "points": [{"x": 0.5}]}

    pieces = iter_dumps({"run": {"a": 1}, "layers": Lazy(items())})
    first = next(pieces)
    assert made == [0] and '"i": 0' in first and '"i": 1' not in first
    assert '"i": 1' in next(pieces) and made == [0, 1]


@dataclass(frozen=True)
class Record:
    """A report point's kind of record: a few fields, one left out of the JSON."""

    a: Any
    b: Any
    c: Any = None
    hidden: Any = field(default="not written", repr=False)


any_float = st.floats() | st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e-300, 1e300])
flat_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | any_float
    | st.tuples(any_float, any_float)
    | st.lists(st.integers(min_value=-5, max_value=5), max_size=3)
)
record_values = (
    flat_values
    | st.text(max_size=6)  # strings: `to_data`'s path
    | st.builds(np.float64, any_float)  # a float subclass, as the C encoder writes floats
    | st.builds(np.int64, st.integers(min_value=-(2**40), max_value=2**40))  # refused by it
    | st.just(Colour.RED)
    | st.lists(st.lists(any_float, max_size=2), max_size=2)  # arrays in arrays
)


@settings(max_examples=400, deadline=None)
@given(a=record_values, b=record_values, c=record_values)
def test_record_encoder_writes_what_to_data_and_compact_write(a: Any, b: Any, c: Any) -> None:
    record = Record(a, b, c)
    assert RecordEncoder(Record)(record) == _compact(to_data(record))


@settings(max_examples=200, deadline=None)
@given(records=st.lists(st.builds(Record, flat_values, flat_values, flat_values), max_size=4))
def test_rows_of_records_are_laid_out_as_the_records(records: list[Record]) -> None:
    encode = RecordEncoder(Record)
    plain = {"name": "layer", "points": [to_data(r) for r in records], "shape": [3, 4]}
    written = {**plain, "points": rows([encode(r) for r in records])}
    assert dumps(written) == dumps(plain)
    assert item_text(written) == item_text(plain)


def test_record_encoder_takes_the_shortcut_for_plain_numbers() -> None:
    """The fast path is taken (not only the general one): a record whose values the C encoder
    writes as `to_data` would comes out of the template, keys and all."""
    encode = RecordEncoder(Record)
    assert encode(Record(1, 0.5, (0.9, 0.999))) == '{"a": 1, "b": 0.5, "c": [0.9, 0.999]}'
    calls: list[Any] = []
    import bnwd_cli.render.serialize as serialize

    original = serialize.to_data
    try:
        serialize.to_data = lambda value: calls.append(value) or original(value)
        encode(Record(2, None, True))
        assert calls == []
        encode(Record(2, math.nan, True))
        assert len(calls) == 1
    finally:
        serialize.to_data = original
