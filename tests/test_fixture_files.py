"""The fixtures under tests/fixtures are what they claim to be.

These tests read the files with torch, safetensors and json only (Lightning, 🤗 transformers and
timm are not installed in the project environment), so they check the on-disk formats
themselves: the keys each library writes, where step and epoch live, the optimiser state
layout, the pickled globals each file needs, and shard indexes. Every `torch.load` here uses
`weights_only=True`; the only classes allowed beyond PyTorch's list are named per file.

The expected key names come from the network the generator trains (scripts/make_fixtures.py):
Conv2d(3,4,3,bias=False), BatchNorm2d(4), ReLU, Conv2d(4,6,3), BatchNorm2d(6), ReLU,
AdaptiveAvgPool2d, Flatten, Linear(6,3), i.e. `nn.Sequential` indices 0, 1, 3, 4 and 8.
"""

from __future__ import annotations

import argparse
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"

SHAPES: dict[str, tuple[int, ...]] = {
    "0.weight": (4, 3, 3, 3),
    "1.weight": (4,),
    "1.bias": (4,),
    "1.running_mean": (4,),
    "1.running_var": (4,),
    "1.num_batches_tracked": (),
    "3.weight": (6, 4, 3, 3),
    "3.bias": (6,),
    "4.weight": (6,),
    "4.bias": (6,),
    "4.running_mean": (6,),
    "4.running_var": (6,),
    "4.num_batches_tracked": (),
    "8.weight": (3, 6),
    "8.bias": (3,),
}
# Trainable parameters in `model.parameters()` order (what a one-group optimiser indexes).
PARAMS = ["0.weight", "1.weight", "1.bias", "3.weight", "3.bias", "4.weight", "4.bias"]
PARAMS += ["8.weight", "8.bias"]
BN_PARAMS = {"1.weight", "1.bias", "4.weight", "4.bias"}

# numpy objects inside 🤗's rng_state.pth. `get_unsafe_globals_in_checkpoint` names only the
# first three; the restricted unpickler also needs the dtype's class to BUILD it.
NUMPY_RNG_GLOBALS = [
    np._core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def load(path: Path, allow: list[Any] | None = None, **kwargs: Any) -> Any:
    with torch.serialization.safe_globals(allow or []):
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)


def unsafe_globals(path: Path) -> set[str]:
    return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))


def strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    assert all(k.startswith(prefix) for k in state), sorted(state)
    return {k[len(prefix) :]: v for k, v in state.items()}


def assert_net_state(state: dict[str, torch.Tensor]) -> None:
    assert {k: tuple(v.shape) for k, v in state.items()} == SHAPES
    for key, value in state.items():
        expected = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        assert value.dtype == expected, key
        assert torch.isfinite(value.double()).all(), key


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def file_sizes() -> int:
    return sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- general


def test_fixture_tree_is_small_and_complete() -> None:
    folders = {p.name for p in FIXTURES.iterdir() if p.is_dir()}
    assert folders == {
        "lightning_run",
        "hf_trainer_run",
        "hf_trainer_bin_run",
        "timm_run",
        "plain_torch_run",
        "plain_state_dict_run",
        "prefixed_run",
        "safetensors_run",
        "sharded_run",
        "legacy_torch_run",
    }
    assert (FIXTURES / "README.md").is_file()
    assert (FIXTURES / "VERSIONS.txt").is_file()
    assert file_sizes() < 3_000_000


def test_no_absolute_paths_of_the_generating_machine() -> None:
    for path in FIXTURES.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"/work/" not in data and b"/tmp/" not in data, path


# --------------------------------------------------------------------------- Lightning

LIGHTNING_DIR = FIXTURES / "lightning_run" / "lightning_logs" / "version_0"
LIGHTNING_CKPTS = {
    "epoch=0-step=2.ckpt": (0, 2),
    "epoch=0-step=4.ckpt": (0, 4),
    "epoch=1-step=6.ckpt": (1, 6),
    "last.ckpt": (1, 6),
}


def test_lightning_layout() -> None:
    names = {p.name for p in (LIGHTNING_DIR / "checkpoints").iterdir()}
    assert names == set(LIGHTNING_CKPTS)
    assert (LIGHTNING_DIR / "hparams.yaml").is_file()


@pytest.mark.parametrize("name", sorted(LIGHTNING_CKPTS))
def test_lightning_checkpoint(name: str) -> None:
    path = LIGHTNING_DIR / "checkpoints" / name
    assert zipfile.is_zipfile(path)
    # Lightning 2.6 stores hyper-parameters as a plain dict: nothing outside torch's allow-list.
    assert unsafe_globals(path) == set()
    ckpt = load(path)
    epoch, step = LIGHTNING_CKPTS[name]
    assert ckpt["epoch"] == epoch
    assert ckpt["global_step"] == step
    assert re.fullmatch(r"\d+\.\d+\.\d+", ckpt["pytorch-lightning_version"])
    assert_net_state(strip(ckpt["state_dict"], "net."))
    assert ckpt["hyper_parameters"] == {"lr": 0.05, "weight_decay": 0.0005, "width": 6}
    assert ckpt["lr_schedulers"] == []
    assert "loops" in ckpt and "callbacks" in ckpt
    (opt,) = ckpt["optimizer_states"]
    (group,) = opt["param_groups"]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 0.0005
    assert group["params"] == list(range(len(PARAMS)))
    assert "param_names" not in group
    for index, key in enumerate(PARAMS):
        assert opt["state"][index]["momentum_buffer"].shape == SHAPES[key]


def test_lightning_last_is_a_copy_of_the_final_step() -> None:
    last = load(LIGHTNING_DIR / "checkpoints" / "last.ckpt")["state_dict"]
    final = load(LIGHTNING_DIR / "checkpoints" / "epoch=1-step=6.ckpt")["state_dict"]
    assert_same(last, final)


# --------------------------------------------------------------------------- 🤗 Trainer

HF_FILES = {"optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin"}
HF_FILES |= {"rng_state.pth", "config.json"}


@pytest.mark.parametrize(
    ("run", "weights"),
    [("hf_trainer_run", "model.safetensors"), ("hf_trainer_bin_run", "pytorch_model.bin")],
)
@pytest.mark.parametrize("step", [2, 4])
def test_hf_checkpoint(run: str, weights: str, step: int) -> None:
    folder = FIXTURES / run / f"checkpoint-{step}"
    assert {p.name for p in (FIXTURES / run).iterdir()} == {"checkpoint-2", "checkpoint-4"}
    assert {p.name for p in folder.iterdir()} == HF_FILES | {weights}

    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["global_step"] == step
    assert state["save_steps"] == 2
    assert [entry["step"] for entry in state["log_history"]] == list(range(1, step + 1))

    if weights.endswith(".safetensors"):
        with safe_open(folder / weights, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
        model = load_file(folder / weights)
    else:
        assert zipfile.is_zipfile(folder / weights)
        assert unsafe_globals(folder / weights) == set()
        model = load(folder / weights)
    assert_net_state(strip(model, "net."))

    # AdamW in two groups: names containing "bias"/"norm" undecayed; BN gammas ("net.1.weight")
    # match neither, so they are decayed. State indices run in group order, not module order.
    assert unsafe_globals(folder / "optimizer.pt") == set()
    opt = load(folder / "optimizer.pt")
    decay, no_decay = opt["param_groups"]
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert decay["params"] == [0, 1, 2, 3, 4] and no_decay["params"] == [5, 6, 7, 8]
    assert "param_names" not in decay
    decayed = [k for k in PARAMS if not k.endswith("bias")]
    undecayed = [k for k in PARAMS if k.endswith("bias")]
    for index, key in enumerate(decayed + undecayed):
        entry = opt["state"][index]
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}
        assert entry["exp_avg"].shape == SHAPES[key]
        assert float(entry["step"]) == step

    assert unsafe_globals(folder / "scheduler.pt") == set()
    assert load(folder / "scheduler.pt")["last_epoch"] == step

    assert unsafe_globals(folder / "rng_state.pth") == {
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
    }
    rng = load(folder / "rng_state.pth", NUMPY_RNG_GLOBALS)
    assert set(rng) >= {"python", "numpy", "cpu"}

    # training_args.bin is a pickled TrainingArguments: it cannot load without transformers.
    assert "transformers.training_args.TrainingArguments" in unsafe_globals(
        folder / "training_args.bin"
    )
    with pytest.raises(Exception, match=r"[Ww]eights only load failed"):
        load(folder / "training_args.bin")


def test_hf_runs_are_from_the_claimed_transformers_majors() -> None:
    new = json.loads((FIXTURES / "hf_trainer_run/checkpoint-2/config.json").read_text())
    old = json.loads((FIXTURES / "hf_trainer_bin_run/checkpoint-2/config.json").read_text())
    assert new["transformers_version"].startswith("5.")
    assert old["transformers_version"].startswith("4.")


# --------------------------------------------------------------------------- timm

TIMM_DIR = FIXTURES / "timm_run"
TIMM_FILES = ["checkpoint-0.pth.tar", "checkpoint-1.pth.tar", "last.pth.tar"]
TIMM_FILES += ["model_best.pth.tar"]


def load_timm(name: str) -> dict[str, Any]:
    return load(TIMM_DIR / name, [argparse.Namespace])


def test_timm_layout() -> None:
    assert sorted(p.name for p in TIMM_DIR.iterdir()) == sorted(TIMM_FILES)


@pytest.mark.parametrize("name", TIMM_FILES)
def test_timm_checkpoint(name: str) -> None:
    path = TIMM_DIR / name
    assert unsafe_globals(path) == {"argparse.Namespace"}
    ckpt = load_timm(name)
    assert set(ckpt) == {
        "epoch",
        "arch",
        "optimizer",
        "version",
        "args",
        "state_dict",
        "state_dict_ema",
        "metric",
        "saver",
    }
    assert isinstance(ckpt["args"], argparse.Namespace)
    assert ckpt["arch"] == ckpt["args"].model == "bnwd_tiny"
    assert ckpt["version"] == 2
    assert_net_state(ckpt["state_dict"])  # unwrapped model: no prefix
    assert_net_state(ckpt["state_dict_ema"])
    assert not torch.equal(ckpt["state_dict"]["0.weight"], ckpt["state_dict_ema"]["0.weight"])
    if name.startswith("checkpoint-"):
        assert ckpt["epoch"] == int(name.split("-")[1].split(".")[0])

    # timm's optimiser factory: a weight_decay=0 group of every 1-D parameter first.
    no_decay, decay = ckpt["optimizer"]["param_groups"]
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.0005
    assert no_decay["nesterov"] and decay["nesterov"]
    one_d = [k for k in PARAMS if len(SHAPES[k]) == 1]
    multi_d = [k for k in PARAMS if len(SHAPES[k]) > 1]
    assert no_decay["params"] == list(range(len(one_d)))
    assert set(one_d) >= BN_PARAMS
    for index, key in enumerate(one_d + multi_d):
        assert ckpt["optimizer"]["state"][index]["momentum_buffer"].shape == SHAPES[key]


def test_timm_last_and_best() -> None:
    last = load_timm("last.pth.tar")
    assert last["epoch"] == 1
    assert_same(last["state_dict"], load_timm("checkpoint-1.pth.tar")["state_dict"])
    best = load_timm("model_best.pth.tar")
    assert best["epoch"] == last["saver"]["best_epoch"]
    assert best["metric"] == last["saver"]["best_metric"]
    assert_same(best["state_dict"], load_timm(f"checkpoint-{best['epoch']}.pth.tar")["state_dict"])


# --------------------------------------------------------------------------- plain torch


@pytest.mark.parametrize(("step", "epoch"), [(2, 0), (4, 0), (6, 1)])
def test_plain_torch_checkpoint(step: int, epoch: int) -> None:
    path = FIXTURES / "plain_torch_run" / f"step_{step}.pt"
    assert unsafe_globals(path) == set()
    ckpt = load(path, mmap=True)
    assert set(ckpt) == {"model", "optimizer", "step", "epoch"}
    assert (ckpt["step"], ckpt["epoch"]) == (step, epoch)
    assert_net_state(ckpt["model"])
    (group,) = ckpt["optimizer"]["param_groups"]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 0.0005
    assert len(ckpt["optimizer"]["state"]) == len(PARAMS)


def test_plain_torch_weights_change_between_steps() -> None:
    a = load(FIXTURES / "plain_torch_run" / "step_2.pt")["model"]
    b = load(FIXTURES / "plain_torch_run" / "step_4.pt")["model"]
    assert not torch.equal(a["0.weight"], b["0.weight"])


@pytest.mark.parametrize("epoch", [1, 2])
def test_plain_state_dict(epoch: int) -> None:
    path = FIXTURES / "plain_state_dict_run" / f"epoch{epoch}.pth"
    state = load(path)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert_net_state(state)
    assert int(state["1.num_batches_tracked"]) == 4 * epoch


PREFIXES = {
    "dataparallel": "module.",
    "compiled": "_orig_mod.",
    "compiled_dataparallel": "_orig_mod.module.",
}


@pytest.mark.parametrize("variant", sorted(PREFIXES))
def test_prefixed_state_dicts(variant: str) -> None:
    folder = FIXTURES / "prefixed_run" / variant
    assert sorted(p.name for p in folder.iterdir()) == ["epoch1.pth", "epoch2.pth"]
    for epoch in (1, 2):
        state = load(folder / f"epoch{epoch}.pth")
        stripped = strip(state, PREFIXES[variant])
        assert_net_state(stripped)
        # The wrappers change names only: the weights equal the unwrapped run's.
        assert_same(stripped, load(FIXTURES / "plain_state_dict_run" / f"epoch{epoch}.pth"))


# --------------------------------------------------------------------------- safetensors


def test_safetensors_run() -> None:
    folder = FIXTURES / "safetensors_run"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"step-{s:04d}.safetensors" for s in (1, 2, 3)]
    for name in names:
        assert_net_state(load_file(folder / name))
    # Same seed, data and optimiser as plain_torch_run: step 2 holds the same weights.
    assert_same(
        load_file(folder / "step-0002.safetensors"),
        load(FIXTURES / "plain_torch_run" / "step_2.pt")["model"],
    )


def test_sharded_index_maps_every_key_to_an_existing_shard() -> None:
    folder = FIXTURES / "sharded_run" / "checkpoint-10"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors = load_file(folder / shard)
        assert {k for k, s in index["weight_map"].items() if s == shard} == set(tensors)
        assert not merged.keys() & tensors.keys()
        merged.update(tensors)
    assert set(merged) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in merged.values()
    )
    state = strip(merged, "net.")
    assert_net_state(state)
    assert int(state["1.num_batches_tracked"]) == 10
    assert {p.name for p in folder.iterdir()} == {
        *shards,
        "model.safetensors.index.json",
        "config.json",
    }


# --------------------------------------------------------------------------- legacy format


@pytest.mark.parametrize("step", [1, 2])
def test_legacy_file_is_not_a_zip_and_cannot_be_mmapped(step: int) -> None:
    path = FIXTURES / "legacy_torch_run" / f"step_{step}.pt"
    assert not zipfile.is_zipfile(path)
    assert path.read_bytes()[:2] == b"\x80\x02"  # a bare pickle stream (protocol 2)
    with pytest.raises(RuntimeError, match="mmap"):
        load(path, mmap=True)
    ckpt = load(path)
    assert (ckpt["step"], ckpt["epoch"]) == (step, 0)
    assert_net_state(ckpt["model"])


def test_legacy_step_2_matches_the_zip_run() -> None:
    legacy = load(FIXTURES / "legacy_torch_run" / "step_2.pt")["model"]
    assert_same(legacy, load(FIXTURES / "plain_torch_run" / "step_2.pt")["model"])


def test_lightning_step_2_matches_the_plain_loop() -> None:
    lightning = load(LIGHTNING_DIR / "checkpoints" / "epoch=0-step=2.ckpt")["state_dict"]
    assert_same(strip(lightning, "net."), load(FIXTURES / "plain_torch_run" / "step_2.pt")["model"])
