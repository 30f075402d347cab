"""The records the streaming pass builds per point are frozen dataclasses with slots: a report
holds one point (and the optimizer's settings) per layer per checkpoint, so a dict per record
would grow it by about a fifth (docs/performance.md)."""

from __future__ import annotations

import dataclasses
import pickle
import tracemalloc
from collections.abc import Callable

import pytest

from bnwd_cli.metrics.dynamics import LayerPoint
from bnwd_cli.metrics.equilibrium import AngleSample, EquilibriumPrediction
from bnwd_cli.metrics.kernels import StepFormula, TensorStats
from bnwd_cli.metrics.optimizer import ParamHyper
from bnwd_cli.metrics.updates import ImpliedStep, StepPlan

PER_POINT = [LayerPoint, AngleSample, EquilibriumPrediction, StepFormula, TensorStats]
PER_POINT += [ParamHyper, ImpliedStep, StepPlan]


def allocated(make: Callable[[], object], count: int = 2000) -> float:
    """Bytes allocated per object made by `make` (kept alive until measured)."""
    tracemalloc.start()
    try:
        kept = [make() for _ in range(count)]
        size = tracemalloc.get_traced_memory()[0] / count
    finally:
        tracemalloc.stop()
    del kept
    return size


@pytest.mark.parametrize("cls", PER_POINT, ids=lambda c: c.__name__)
def test_frozen_with_a_slot_per_field(cls: type) -> None:
    assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert tuple(cls.__slots__) == tuple(f.name for f in dataclasses.fields(cls))


def test_a_point_holds_no_dict_and_round_trips() -> None:
    point = LayerPoint(checkpoint=3, step=300, norm=1.5, relative_step=1e-3, betas=(0.9, 0.99))
    assert not hasattr(point, "__dict__")
    # smaller than the same record without slots (measured as allocated, values shared)
    plain = dataclasses.make_dataclass(
        "PlainPoint",
        [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(point)],
        frozen=True,
    )
    values = {f.name: getattr(point, f.name) for f in dataclasses.fields(point)}
    assert allocated(lambda: LayerPoint(**values)) < 0.9 * allocated(lambda: plain(**values))
    with pytest.raises(dataclasses.FrozenInstanceError):
        point.norm = 2.0  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(point)) == point
    assert dataclasses.replace(point, norm=2.0).norm == 2.0
    hyper = ParamHyper(lr=0.1, weight_decay=5e-4, group=0, momentum=0.9)
    assert not hasattr(hyper, "__dict__") and pickle.loads(pickle.dumps(hyper)) == hyper
