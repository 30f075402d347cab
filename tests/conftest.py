"""Shared builders for tests: tiny BatchNorm-CNN checkpoints written in `tmp_path`, in the formats
bnwd reads (plain `torch.save`, legacy non-zip `torch.save`, safetensors, Lightning-, Trainer- and
timm-shaped files), and the `--update-golden` option for golden-file tests.

The builders know nothing about bnwd: they write what the training stacks write, so tests can
compute expected numbers from the tensors they put in.

Import the helpers with `from conftest import ...` (pytest puts this folder on `sys.path`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

BN_CNN_PARAMS = (
    "conv1.weight",
    "bn1.weight",
    "bn1.bias",
    "conv2.weight",
    "conv2.bias",
    "bn2.weight",
    "bn2.bias",
    "head.weight",
    "head.bias",
)
"""Parameters of `bn_cnn_state`, in forward order (buffers excluded)."""
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="Rewrite golden files from the current output instead of comparing with them.",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


# --------------------------------------------------------------------------- state dicts


def bn_cnn_state(generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """`conv1(3->4, 3x3, no bias) -> bn1 -> relu -> conv2(4->6, 3x3) -> bn2 -> relu -> pool -> head
    Linear(6->3)`, as `nn.Module.state_dict()` lays it out (module order, buffers after params)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)

    def bn(channels: int) -> dict[str, torch.Tensor]:
        return {
            "weight": 1.0 + 0.1 * torch.randn(channels, generator=g),
            "bias": 0.1 * torch.randn(channels, generator=g),
            "running_mean": torch.zeros(channels),
            "running_var": torch.ones(channels),
            "num_batches_tracked": torch.tensor(0),
        }

    state: dict[str, torch.Tensor] = {"conv1.weight": torch.randn(4, 3, 3, 3, generator=g)}
    state.update({f"bn1.{k}": v for k, v in bn(4).items()})
    state["conv2.weight"] = torch.randn(6, 4, 3, 3, generator=g)
    state["conv2.bias"] = 0.1 * torch.randn(6, generator=g)
    state.update({f"bn2.{k}": v for k, v in bn(6).items()})
    state["head.weight"] = torch.randn(3, 6, generator=g)
    state["head.bias"] = 0.1 * torch.randn(3, generator=g)
    return state


def training_states(
    count: int, *, seed: int = 0, noise: float = 0.05, growth: float = 1.0
) -> list[dict[str, torch.Tensor]]:
    """`count` successive float32 state dicts of `bn_cnn_state`: between two of them every
    parameter gets Gaussian noise of relative size ~`noise` and is multiplied by `growth`
    (BN buffers and the step counter change too, as in training)."""
    g = torch.Generator().manual_seed(seed)
    state = bn_cnn_state(g)
    states = [state]
    for t in range(1, count):
        nxt: dict[str, torch.Tensor] = {}
        for name, value in state.items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "num_batches_tracked":
                nxt[name] = torch.tensor(t * 10)
            elif leaf in ("running_mean", "running_var"):
                nxt[name] = value + 0.01
            else:
                scale = value.norm() / max(value.numel(), 1) ** 0.5 + 1e-3
                nxt[name] = growth * (value + noise * scale * torch.randn(value.shape, generator=g))
        states.append(nxt)
        state = nxt
    return states


def params_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters (BN buffers dropped) of a state dict."""
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in BN_BUFFERS}


def sgd_state_dict(
    state: Mapping[str, torch.Tensor], *, lr: float, weight_decay: float = 0.0
) -> dict[str, Any]:
    """What `torch.optim.SGD(model.parameters(), lr, momentum=0).state_dict()` holds."""
    names = list(params_of(state))
    return {
        "state": {},
        "param_groups": [
            {
                "lr": lr,
                "momentum": 0.0,
                "dampening": 0.0,
                "weight_decay": weight_decay,
                "nesterov": False,
                "maximize": False,
                "foreach": None,
                "differentiable": False,
                "fused": None,
                "params": list(range(len(names))),
            }
        ],
    }


# --------------------------------------------------------------------------- writers


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def save_torch(
    path: Path,
    state: Mapping[str, torch.Tensor],
    *,
    step: int | None = None,
    epoch: int | None = None,
    optimizer: Mapping[str, Any] | None = None,
    model_key: str | None = "model",
    legacy: bool = False,
) -> Path:
    """A plain `torch.save` checkpoint: `{model_key: state, "optimizer": ..., "step": ...}`, or the
    bare state dict when `model_key` is None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: Any
    if model_key is None:
        payload = _contiguous(state)
    else:
        payload = {model_key: _contiguous(state)}
        if optimizer is not None:
            payload["optimizer"] = optimizer
        if step is not None:
            payload["step"] = step
        if epoch is not None:
            payload["epoch"] = epoch
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    return path


def save_safetensors(
    path: Path, state: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(state), str(path), metadata=dict(metadata) if metadata else None)
    return path


def save_lightning(
    path: Path,
    state: Mapping[str, torch.Tensor],
    *,
    step: int,
    epoch: int,
    attribute: str = "model",
    optimizer: Mapping[str, Any] | None = None,
) -> Path:
    """What Lightning's `ModelCheckpoint` writes for a LightningModule holding `self.<attribute>`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "epoch": epoch,
        "global_step": step,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"{attribute}.{k}": v for k, v in _contiguous(state).items()},
        "loops": {},
        "callbacks": {},
        "optimizer_states": [optimizer] if optimizer is not None else [],
        "lr_schedulers": [],
    }
    torch.save(payload, path)
    return path


def save_hf_checkpoint(
    folder: Path,
    state: Mapping[str, torch.Tensor],
    *,
    step: int,
    optimizer: Mapping[str, Any] | None = None,
    weights: str = "model.safetensors",
) -> Path:
    """A Hugging Face Trainer `checkpoint-<step>/` folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if weights.endswith(".safetensors"):
        save_safetensors(folder / weights, state, metadata={"format": "pt"})
    else:
        torch.save(_contiguous(state), folder / weights)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": 1.0}))
    (folder / "config.json").write_text("{}")
    torch.save({"lr_lambdas": [None]}, folder / "scheduler.pt")
    torch.save({"python": 1}, folder / "rng_state.pth")
    if optimizer is not None:
        torch.save(optimizer, folder / "optimizer.pt")
    return folder


def save_timm(
    path: Path,
    state: Mapping[str, torch.Tensor],
    *,
    epoch: int,
    ema: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """What timm's `CheckpointSaver` writes, with the argparse.Namespace of train.py."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "epoch": epoch,
        "arch": "tinycnn",
        "state_dict": _contiguous(state),
        "args": argparse.Namespace(lr=0.1, weight_decay=1e-4, model="tinycnn"),
        "version": 2,
        "metric": 50.0,
    }
    if ema is not None:
        payload["state_dict_ema"] = _contiguous(ema)
    torch.save(payload, path)
    return path


def write_run(
    folder: Path,
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    steps: Sequence[int] | None = None,
    fmt: str = "torch",
    lr: float | None = None,
) -> list[Path]:
    """A run folder with one checkpoint per state, at `steps` (default 100, 200, ...).

    fmt: "torch" (`step_<N>.pt`, step stored), "bare" (bare state dicts `step_<N>.pt`, step only
    in the name), "legacy" (non-zip `torch.save`), "safetensors" (`step_<N>.safetensors`),
    "lightning" (`epoch=E-step=N.ckpt`), "hf" / "hf-bin" (`checkpoint-<N>/` with
    `model.safetensors` / `pytorch_model.bin`). With `lr`, the torch,
    legacy and lightning files carry a plain-SGD optimizer state with that learning rate.
    """
    folder.mkdir(parents=True, exist_ok=True)
    steps = list(steps) if steps is not None else [100 * (i + 1) for i in range(len(states))]
    written = []
    for i, (state, step) in enumerate(zip(states, steps, strict=True)):
        opt = sgd_state_dict(state, lr=lr) if lr is not None else None
        if fmt == "torch":
            written.append(save_torch(folder / f"step_{step}.pt", state, step=step, optimizer=opt))
        elif fmt == "bare":
            written.append(save_torch(folder / f"step_{step}.pt", state, model_key=None))
        elif fmt == "legacy":
            written.append(
                save_torch(folder / f"step_{step}.pt", state, step=step, optimizer=opt, legacy=True)
            )
        elif fmt == "safetensors":
            written.append(save_safetensors(folder / f"step_{step}.safetensors", state))
        elif fmt == "lightning":
            written.append(
                save_lightning(
                    folder / f"epoch={i}-step={step}.ckpt", state, step=step, epoch=i, optimizer=opt
                )
            )
        elif fmt in ("hf", "hf-bin"):
            weights = "model.safetensors" if fmt == "hf" else "pytorch_model.bin"
            written.append(
                save_hf_checkpoint(folder / f"checkpoint-{step}", state, step=step, weights=weights)
            )
        else:
            raise ValueError(f"unknown fmt {fmt!r}")
    return written


def folder_snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and mtime (ns): to prove nothing was written."""
    return {
        str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def bn_run(tmp_path: Path) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    """A three-checkpoint plain-torch run (steps 100, 200, 300) and the states it holds."""
    states = training_states(3)
    folder = tmp_path / "run"
    write_run(folder, states)
    return folder, states
