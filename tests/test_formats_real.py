"""Every fixture folder written by a real training stack (tests/fixtures/README.md) loads through
`discover_run` / `analyze_run` and through the CLI: in the right order, with the right steps,
normalized keys, duplicates dropped, and metrics equal to an independent float64 computation.

Independence: expected steps come from the fixtures' own metadata read here directly
(`trainer_state.json`, and `global_step` / `step` / `epoch` inside torch zip files read with the
small pickle reader below, which rebuilds tensors from the archive's raw storage bytes and never
goes through bnwd's loader), and reference tensors from `safetensors.torch.load_file`, that
reader, or `torch.load` for the legacy format.
"""

from __future__ import annotations

import csv
import io
import json
import math
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import folder_snapshot
from safetensors.torch import load_file
from typer.testing import CliRunner

from bnwd_cli.checkpoints import OrderSource, discover_run
from bnwd_cli.cli.app import app
from bnwd_cli.graph.classes import Granularity, ParamKind
from bnwd_cli.metrics.dynamics import InspectOptions, RunDynamics, analyze_run

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.skipif(
    not (FIXTURES / "plain_torch_run").is_dir(), reason="fixtures not generated"
)

# --------------------------------------------------------------------------- independent reader

STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Opaque(dict):  # type: ignore[type-arg]
    """Stands in for any pickled class: keeps its state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _rebuild_tensor(
    storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: Any
) -> np.ndarray:
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
    )
    return np.array(view)


class _ZipPickleReader(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.prefix = prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        return _Opaque

    def persistent_load(self, pid: Any) -> np.ndarray:
        _, storage_type, key, _location, _numel = pid
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        return np.frombuffer(raw, dtype=STORAGE_DTYPES[storage_type])


def read_torch_zip(path: Path) -> Any:
    """A zip-format `torch.save` file, tensors as numpy arrays (no torch.load involved)."""
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        prefix = pkl[: -len("/data.pkl")]
        return _ZipPickleReader(archive.read(pkl), archive, prefix).load()


def as_float64(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tensors.items():
        array = v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if np.issubdtype(array.dtype, np.floating):
            out[k] = array.astype(np.float64)
    return out


# --------------------------------------------------------------------------- expectations


@dataclass
class Expected:
    """What a fixture folder holds, from its own files."""

    folder: Path
    labels: list[str]
    steps: list[int | None]
    epochs: list[int | None]
    order_source: OrderSource
    weights: list[dict[str, np.ndarray]]
    """Per checkpoint: normalized name -> float64 tensor (BN buffers dropped)."""
    dropped: tuple[str, ...] = ()
    ema: list[dict[str, np.ndarray]] | None = None


BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
WRAPPERS = re.compile(r"(^|\.)(module|_orig_mod)\.")


def params(tensors: dict[str, np.ndarray], strip: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tensors.items():
        if k.rsplit(".", 1)[-1] in BUFFERS:
            continue
        name = WRAPPERS.sub(r"\1", WRAPPERS.sub(r"\1", k))  # nested: _orig_mod.module.
        out[name.removeprefix(strip)] = v
    return out


def plain_torch_run() -> Expected:
    folder = FIXTURES / "plain_torch_run"
    files = sorted(folder.glob("*.pt"), key=lambda p: read_torch_zip(p)["step"])
    raw = [read_torch_zip(p) for p in files]
    return Expected(
        folder,
        [p.name for p in files],
        [r["step"] for r in raw],
        [r["epoch"] for r in raw],
        OrderSource.STEP_METADATA,
        [params(as_float64(r["model"])) for r in raw],
    )


def legacy_torch_run() -> Expected:
    folder = FIXTURES / "legacy_torch_run"
    assert not zipfile.is_zipfile(next(folder.glob("*.pt")))
    loaded = {p: torch.load(p, weights_only=True) for p in folder.glob("*.pt")}
    files = sorted(loaded, key=lambda p: loaded[p]["step"])
    return Expected(
        folder,
        [p.name for p in files],
        [loaded[p]["step"] for p in files],
        [loaded[p]["epoch"] for p in files],
        OrderSource.STEP_METADATA,
        [params(as_float64(loaded[p]["model"])) for p in files],
    )


def epoch_named_run(folder: Path) -> Expected:
    number = {
        p: int(re.fullmatch(r"epoch(\d+)\.pth", p.name).group(1)) for p in folder.glob("*.pth")
    }  # type: ignore[union-attr]
    files = sorted(number, key=number.__getitem__)
    return Expected(
        folder,
        [p.name for p in files],
        [None] * len(files),
        [number[p] for p in files],
        OrderSource.NAME_EPOCH,
        [params(as_float64(read_torch_zip(p))) for p in files],
    )


def safetensors_run() -> Expected:
    folder = FIXTURES / "safetensors_run"
    number = {
        p: int(re.search(r"step-(\d+)", p.name).group(1)) for p in folder.glob("*.safetensors")
    }  # type: ignore[union-attr]
    files = sorted(number, key=number.__getitem__)
    return Expected(
        folder,
        [p.name for p in files],
        [number[p] for p in files],
        [None] * len(files),
        OrderSource.NAME_STEP,
        [params(as_float64(load_file(str(p)))) for p in files],
    )


def hf_run(name: str) -> Expected:
    folder = FIXTURES / name
    steps = {
        d: json.loads((d / "trainer_state.json").read_text())["global_step"]
        for d in folder.iterdir()
        if d.is_dir()
    }
    dirs = sorted(steps, key=steps.__getitem__)
    weights = []
    for d in dirs:
        if (d / "model.safetensors").exists():
            weights.append(params(as_float64(load_file(str(d / "model.safetensors")))))
        else:
            weights.append(params(as_float64(read_torch_zip(d / "pytorch_model.bin"))))
    return Expected(
        folder,
        [d.name for d in dirs],
        [steps[d] for d in dirs],
        [None] * len(dirs),
        OrderSource.STEP_METADATA,
        weights,
    )


def sharded_run() -> Expected:
    folder = FIXTURES / "sharded_run"
    ckpt = folder / "checkpoint-10"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    merged: dict[str, Any] = {}
    for shard in sorted(set(index["weight_map"].values())):
        merged.update(load_file(str(ckpt / shard)))
    assert set(merged) == set(index["weight_map"])
    return Expected(
        folder, ["checkpoint-10"], [10], [None], OrderSource.SINGLE, [params(as_float64(merged))]
    )


def lightning_run() -> Expected:
    folder = FIXTURES / "lightning_run"
    ckpts = folder / "lightning_logs" / "version_0" / "checkpoints"
    raw = {p: read_torch_zip(p) for p in ckpts.glob("*.ckpt") if p.name != "last.ckpt"}
    files = sorted(raw, key=lambda p: raw[p]["global_step"])
    return Expected(
        folder,
        [str(p.relative_to(folder)) for p in files],
        [raw[p]["global_step"] for p in files],
        [raw[p]["epoch"] for p in files],
        OrderSource.STEP_METADATA,
        [params(as_float64(raw[p]["state_dict"]), strip="net.") for p in files],
        dropped=("last.ckpt",),
    )


def timm_run() -> Expected:
    folder = FIXTURES / "timm_run"
    raw = {p: read_torch_zip(p) for p in folder.glob("checkpoint-*.pth.tar")}
    files = sorted(raw, key=lambda p: raw[p]["epoch"])
    return Expected(
        folder,
        [p.name for p in files],
        [None] * len(files),
        [raw[p]["epoch"] for p in files],
        OrderSource.EPOCH_METADATA,
        [params(as_float64(raw[p]["state_dict"])) for p in files],
        dropped=("last.pth.tar", "model_best.pth.tar"),
        ema=[params(as_float64(raw[p]["state_dict_ema"])) for p in files],
    )


RUNS = {
    "plain_torch_run": plain_torch_run,
    "legacy_torch_run": legacy_torch_run,
    "plain_state_dict_run": lambda: epoch_named_run(FIXTURES / "plain_state_dict_run"),
    "prefixed_run/dataparallel": lambda: epoch_named_run(
        FIXTURES / "prefixed_run" / "dataparallel"
    ),
    "prefixed_run/compiled": lambda: epoch_named_run(FIXTURES / "prefixed_run" / "compiled"),
    "prefixed_run/compiled_dataparallel": lambda: epoch_named_run(
        FIXTURES / "prefixed_run" / "compiled_dataparallel"
    ),
    "safetensors_run": safetensors_run,
    "sharded_run": sharded_run,
    "hf_trainer_run": lambda: hf_run("hf_trainer_run"),
    "hf_trainer_bin_run": lambda: hf_run("hf_trainer_bin_run"),
    "lightning_run": lightning_run,
    "timm_run": timm_run,
}


@pytest.fixture(scope="module")
def expected_runs() -> dict[str, Expected]:
    return {name: make() for name, make in RUNS.items()}


@pytest.fixture(scope="module")
def reports(expected_runs: dict[str, Expected]) -> dict[str, RunDynamics]:
    return {name: analyze_run(e.folder) for name, e in expected_runs.items()}


# --------------------------------------------------------------------------- reference metrics


def kahan_angle(a: np.ndarray, b: np.ndarray) -> float:
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    return float(2.0 * math.atan2(np.linalg.norm(ua - ub), np.linalg.norm(ua + ub)))


def assert_metrics(report: RunDynamics, weights: list[dict[str, np.ndarray]]) -> None:
    layers = {layer.name: layer for layer in report.layers}
    assert set(layers) == set(weights[0])
    for name, layer in layers.items():
        per_row = layer.classification.granularity is Granularity.PER_ROW
        for t, point in enumerate(layer.points):
            w = weights[t][name]
            assert point.norm == pytest.approx(float(np.sqrt(np.sum(w * w))), rel=1e-12)
            if t == 0:
                assert point.relative_step is None
                continue
            prev = weights[t - 1][name]
            expected_step = float(np.linalg.norm(w - prev) / np.linalg.norm(prev))
            assert point.relative_step == pytest.approx(expected_step, rel=1e-10)
            rows = w.reshape(w.shape[0], -1) if per_row else w.reshape(1, -1)
            prev_rows = prev.reshape(rows.shape)
            angles = [kahan_angle(prev_rows[r], rows[r]) for r in range(rows.shape[0])]
            rms = float(np.sqrt(np.mean(np.square(angles))))
            assert point.angular_update == pytest.approx(rms, rel=1e-9, abs=1e-15)


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", list(RUNS))
def test_order_steps_and_duplicates(
    name: str, expected_runs: dict[str, Expected], reports: dict[str, RunDynamics]
) -> None:
    expected, report = expected_runs[name], reports[name]
    run = report.run
    assert [c.label for c in run.checkpoints] == expected.labels
    assert run.order_source is expected.order_source
    assert [c.step for c in report.checkpoints] == expected.steps
    assert [c.epoch for c in report.checkpoints] == expected.epochs
    skipped = {s.path.name for s in run.skipped}
    for dropped in expected.dropped:
        assert dropped in skipped
    assert run.problems == ()
    assert report.warnings == ()


@pytest.mark.parametrize("name", list(RUNS))
def test_keys_are_normalized(name: str, reports: dict[str, RunDynamics]) -> None:
    names = [layer.name for layer in reports[name].layers]
    for prefix in ("module.", "_orig_mod.", "_fsdp_wrapped_module."):
        assert not any(prefix in n for n in names), names
    if name.startswith(("hf_", "sharded")):
        # 🤗 models keep their own attribute names (`net` is the model's, not a wrapper's)
        assert all(n.startswith("net.") for n in names)
    else:
        assert not any(n.startswith("net.") for n in names)
        assert {"0.weight", "3.weight", "8.weight"} <= set(names)


@pytest.mark.parametrize("name", list(RUNS))
def test_metrics_equal_independent_float64(
    name: str, expected_runs: dict[str, Expected], reports: dict[str, RunDynamics]
) -> None:
    assert_metrics(reports[name], expected_runs[name].weights)


@pytest.mark.parametrize("name", list(RUNS))
def test_classification_of_the_fixture_network(name: str, reports: dict[str, RunDynamics]) -> None:
    prefix = "net." if name.startswith(("hf_", "sharded")) else ""
    kinds = {
        layer.name.removeprefix(prefix): layer.classification for layer in reports[name].layers
    }
    assert kinds["0.weight"].kind is ParamKind.SCALE_INVARIANT
    assert kinds["0.weight"].granularity is Granularity.PER_ROW
    assert kinds["3.weight"].kind is ParamKind.SCALE_INVARIANT
    assert kinds["3.bias"].kind is ParamKind.DEAD_BIAS
    for norm in ("1.weight", "1.bias", "4.weight", "4.bias"):
        assert kinds[norm].kind is ParamKind.NORM_AFFINE
    assert kinds["8.weight"].kind is ParamKind.SCALE_SENSITIVE


def test_timm_ema_weights_are_selectable(expected_runs: dict[str, Expected]) -> None:
    expected = expected_runs["timm_run"]
    assert expected.ema is not None
    report = analyze_run(expected.folder, InspectOptions(use_ema=True))
    assert [c.label for c in report.checkpoints] == expected.labels
    assert_metrics(report, expected.ema)
    # and they are not the model's weights
    model = analyze_run(expected.folder)
    assert report.layers[0].points[-1].norm != model.layers[0].points[-1].norm


def test_same_weights_give_the_same_numbers_across_formats(
    expected_runs: dict[str, Expected], reports: dict[str, RunDynamics]
) -> None:
    # README: the SGD runs hold bit-identical weights at equal steps; check that independently,
    # then that bnwd reports identical norms for them whatever the file format.
    at_step: dict[int, list[tuple[str, int]]] = {}
    for name in ("plain_torch_run", "legacy_torch_run", "safetensors_run", "lightning_run"):
        for t, step in enumerate(expected_runs[name].steps):
            assert step is not None
            at_step.setdefault(step, []).append((name, t))
    compared = 0
    for entries in at_step.values():
        (first, t0), *others = entries
        for other, t in others:
            ref, cand = expected_runs[first].weights[t0], expected_runs[other].weights[t]
            assert all(np.array_equal(ref[k], cand[k]) for k in ref)
            norms_a = {layer.name: layer.points[t0].norm for layer in reports[first].layers}
            norms_b = {layer.name: layer.points[t].norm for layer in reports[other].layers}
            assert norms_a == norms_b
            compared += 1
    assert compared >= 4


def test_prefixed_runs_equal_the_plain_run(reports: dict[str, RunDynamics]) -> None:
    plain = {
        layer.name: [p.norm for p in layer.points]
        for layer in reports["plain_state_dict_run"].layers
    }
    for sub in ("dataparallel", "compiled", "compiled_dataparallel"):
        got = {
            layer.name: [p.norm for p in layer.points]
            for layer in reports[f"prefixed_run/{sub}"].layers
        }
        assert got == plain


def test_prefixed_run_root_holds_several_runs() -> None:
    result = CliRunner().invoke(app, ["inspect", str(FIXTURES / "prefixed_run")])
    assert result.exit_code == 2
    assert "different folders" in result.stderr and "one run" in result.stderr
    assert result.stdout == ""


def test_lightning_run_folder_is_found_from_any_level(expected_runs: dict[str, Expected]) -> None:
    expected = expected_runs["lightning_run"]
    deep = FIXTURES / "lightning_run" / "lightning_logs" / "version_0" / "checkpoints"
    run = discover_run(deep)
    assert [c.step for c in run.checkpoints] == expected.steps


@pytest.mark.parametrize("name", list(RUNS))
def test_cli_csv_for_every_fixture(name: str, expected_runs: dict[str, Expected]) -> None:
    expected = expected_runs[name]
    before = folder_snapshot(expected.folder)
    result = CliRunner().invoke(app, ["inspect", str(expected.folder), "--format", "csv"])
    assert folder_snapshot(expected.folder) == before  # nothing written into the fixture
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    layers = set(expected.weights[0])
    assert len(rows) == len(expected.labels) * len(layers)
    for row in rows:
        t = expected.labels.index(row["label"])
        assert row["step"] == ("" if expected.steps[t] is None else str(expected.steps[t]))
        w = expected.weights[t][row["layer"]]
        assert float(row["norm"]) == pytest.approx(float(np.sqrt(np.sum(w * w))), rel=1e-12)


def test_cli_timm_ema_flag(expected_runs: dict[str, Expected]) -> None:
    expected = expected_runs["timm_run"]
    assert expected.ema is not None
    result = CliRunner().invoke(app, ["inspect", str(expected.folder), "--format", "csv", "--ema"])
    assert result.exit_code == 0, result.stderr
    for row in csv.DictReader(io.StringIO(result.stdout)):
        w = expected.ema[expected.labels.index(row["label"])][row["layer"]]
        assert float(row["norm"]) == pytest.approx(float(np.sqrt(np.sum(w * w))), rel=1e-12)
