"""`frozen_dataclass` against `dataclass(frozen=True)`: same signature, same instances, still frozen."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from bnwd_cli.metrics._frozen import frozen_dataclass
from bnwd_cli.metrics.dynamics import LayerPoint
from bnwd_cli.metrics.equilibrium import AngleSample, EquilibriumPrediction
from bnwd_cli.metrics.kernels import StepFormula, TensorStats
from bnwd_cli.metrics.optimizer import ParamHyper
from bnwd_cli.metrics.updates import ImpliedStep, StepPlan

FAST = [LayerPoint, AngleSample, EquilibriumPrediction, StepFormula, TensorStats, ParamHyper]
FAST += [ImpliedStep, StepPlan]


def twin(cls: type) -> type:
    """The same class built by `dataclass(frozen=True)` alone."""
    return dataclasses.make_dataclass(
        cls.__name__,
        [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(cls)],
        frozen=True,
    )


@pytest.mark.parametrize("cls", FAST, ids=lambda c: c.__name__)
def test_signature_is_the_dataclass_one(cls: type) -> None:
    want = inspect.signature(twin(cls).__init__)
    got = inspect.signature(cls.__init__)
    assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
        (p.name, p.kind, p.default) for p in want.parameters.values()
    ]


@frozen_dataclass
class Sample:
    a: int
    b: str = "x"
    c: tuple[int, ...] | None = None


def test_instances_as_the_dataclass_builds_them() -> None:
    reference = twin(Sample)
    for args, kwargs in [((1,), {}), ((1, "y"), {}), ((2,), {"c": (3,)}), ((), {"a": 4, "b": "z"})]:
        got, want = Sample(*args, **kwargs), reference(*args, **kwargs)
        assert dataclasses.astuple(got) == dataclasses.astuple(want)
        assert repr(got) == repr(want)
    assert Sample(1) == Sample(1, "x", None) != Sample(2)
    assert hash(Sample(1, "y")) == hash(Sample(1, "y"))
    assert dataclasses.replace(Sample(1), b="q") == Sample(1, "q")
    with pytest.raises(TypeError):
        Sample()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Sample(1, d=2)  # type: ignore[call-arg]


def test_still_frozen() -> None:
    sample = Sample(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.a = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del sample.b  # type: ignore[misc]


def test_defaults_are_not_shared_between_classes() -> None:
    @frozen_dataclass
    class Other:
        b: str = "other"

    assert Sample(1).b == "x" and Other().b == "other"


@pytest.mark.parametrize(
    "build",
    [
        lambda: dataclasses.field(default_factory=list),
        lambda: dataclasses.field(default=0, kw_only=True),
        lambda: dataclasses.field(default=0, init=False),
    ],
    ids=["default_factory", "kw_only", "init=False"],
)
def test_refuses_what_it_does_not_build(build: object) -> None:
    with pytest.raises(TypeError, match="only plain fields"):

        @frozen_dataclass
        class Bad:
            x: int = build()  # type: ignore[operator]


def test_refuses_post_init() -> None:
    with pytest.raises(TypeError, match="__post_init__"):

        @frozen_dataclass
        class Bad:
            x: int

            def __post_init__(self) -> None:
                pass
