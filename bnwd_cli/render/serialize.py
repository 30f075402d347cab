"""Turning result dataclasses into JSON-ready data: enums to values, NaN/Inf to null."""

from __future__ import annotations

import dataclasses
import json
import math
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np


def to_data(value: Any) -> Any:
    """A JSON-compatible copy of `value` (dataclasses, enums, paths, tuples, tensors)."""
    kind = type(value)  # exact types first: most values are plain numbers (a report has ~1e5)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value) if f.repr
        }
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


def dumps(document: Any) -> str:
    return json.dumps(to_data(document), indent=2, allow_nan=False) + "\n"
