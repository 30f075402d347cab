"""`checkpoints.safe_load`: harmless metadata loads without running code, pickled modules and
malicious pickles are refused (naming the file and `--trust-pickle`), corrupt files are reported
as corrupt (never as a raw exception, never as "needs --trust-pickle")."""

from __future__ import annotations

import argparse
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bn_cnn_state, save_torch

from bnwd_cli.checkpoints import discover_run, open_checkpoint
from bnwd_cli.checkpoints.formats import CheckpointFormat, interpret_payload
from bnwd_cli.checkpoints.safe_load import TRUST_FLAG, load_torch_file, unresolved_name
from bnwd_cli.errors import CheckpointError, UnsafeCheckpointError

SIDE_EFFECTS: list[str] = []


class RecordingArgs(argparse.Namespace):
    """Metadata whose unpickling would leave a trace if any of its code ran."""

    def __setstate__(self, state: dict[str, object]) -> None:
        SIDE_EFFECTS.append("setstate")
        self.__dict__.update(state)


class ShellCommand:
    """A pickle that runs a shell command when fully unpickled."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


class ExecCode:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (self.code,))


class TorchSaveWriter:
    """A pickle whose payload is a torch-owned callable (torch.save) writing a file."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[object, str]]:
        return (torch.save, ({"pwned": 1}, self.target))


def assert_same_values(array: object, tensor: torch.Tensor) -> None:
    """`array` is what bnwd read for `tensor`: a numpy array of the same dtype, shape and bits."""
    assert isinstance(array, np.ndarray)
    expected = tensor.detach().numpy()
    assert array.dtype == expected.dtype and array.shape == expected.shape
    assert np.array_equal(array, expected)


def tiny_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4))


# --------------------------------------------------------------------------- metadata


def test_argparse_namespace_beside_weights_loads_as_inert_placeholder(tmp_path: Path) -> None:
    state = bn_cnn_state()
    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save(
        {
            "epoch": 3,
            "arch": "tinycnn",
            "state_dict": state,
            "args": RecordingArgs(lr=0.1, model="tinycnn"),
            "plain_args": argparse.Namespace(lr=0.1),
        },
        path,
    )
    SIDE_EFFECTS.clear()
    loaded = load_torch_file(path)
    assert SIDE_EFFECTS == []  # no code from the file ran
    assert unresolved_name(loaded["args"]) == f"{__name__}.RecordingArgs"
    assert unresolved_name(loaded["plain_args"]) == "argparse.Namespace"
    assert not isinstance(loaded["plain_args"], argparse.Namespace)
    payload = interpret_payload(path, loaded)
    assert payload.format is CheckpointFormat.TIMM
    assert payload.epoch == 3
    assert set(payload.state_dict) == set(state)
    for name, tensor in state.items():
        assert_same_values(payload.state_dict[name], tensor)
    # Full unpickling, by contrast, runs the class's code: the check above has teeth.
    torch.load(path, weights_only=False)
    assert SIDE_EFFECTS == ["setstate"]


# --------------------------------------------------------------------------- pickled modules


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare-module", "module-in-dict"])
def test_pickled_module_is_refused_naming_file_and_flag(tmp_path: Path, wrapped: bool) -> None:
    module = tiny_module()
    path = tmp_path / "model.pt"
    torch.save({"model": module, "step": 5} if wrapped else module, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        discover_run(path)
    assert str(path) in str(info.value)
    assert TRUST_FLAG in str(info.value)

    run = discover_run(path, trust_pickle=True)
    with open_checkpoint(run.checkpoints[0], trust_pickle=True) as ckpt:
        names = ckpt.weights.names()
        assert set(names) == set(module.state_dict())
        for name, tensor in module.state_dict().items():
            assert_same_values(ckpt.weights.get(name), tensor)


def test_legacy_pickled_module_is_refused_and_loads_with_trust(tmp_path: Path) -> None:
    module = tiny_module()
    path = tmp_path / "model.pt"
    torch.save(module, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_torch_file(path)
    message = str(info.value)
    assert str(path) in message and TRUST_FLAG in message
    assert "Sequential" in message  # says what it refused
    loaded = load_torch_file(path, trust_pickle=True)
    # a trusted pickled module comes back as its state dict, tensors as numpy arrays
    assert isinstance(loaded, dict)
    assert set(loaded) == set(module.state_dict())
    for name, tensor in module.state_dict().items():
        assert_same_values(loaded[name], tensor)


# --------------------------------------------------------------------------- malicious pickles


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind", ["os.system", "exec", "torch.save"])
def test_malicious_pickle_is_refused_and_never_runs(
    tmp_path: Path, kind: str, legacy: bool
) -> None:
    marker = tmp_path / "PWNED"
    evil: object
    if kind == "os.system":
        evil = ShellCommand(f"touch {marker}")
    elif kind == "exec":
        evil = ExecCode(f"open({str(marker)!r}, 'w').close()")
    else:
        evil = TorchSaveWriter(str(marker))
    path = tmp_path / "ckpt" / "evil.pt"
    path.parent.mkdir()
    torch.save(evil, path, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()

    with pytest.raises(UnsafeCheckpointError) as info:
        discover_run(path.parent)
    assert not marker.exists()
    assert str(path) in str(info.value) and TRUST_FLAG in str(info.value)


def test_code_calling_object_beside_weights_stays_inert(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    state = bn_cnn_state()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "step": 1, "hook": ExecCode(f"open({str(marker)!r}, 'w')")}, path)
    run = discover_run(path)
    with open_checkpoint(run.checkpoints[0]) as ckpt:
        assert_same_values(ckpt.weights.get("conv1.weight"), state["conv1.weight"])
    loaded = load_torch_file(path)
    assert unresolved_name(loaded["hook"]) == "builtins.exec"
    assert not marker.exists()


def test_os_call_beside_weights_is_refused(tmp_path: Path) -> None:
    # torch never builds anything from os/posix/sys, not even as a stand-in: the whole file is
    # refused, with the culprit named
    marker = tmp_path / "PWNED"
    path = tmp_path / "ckpt.pt"
    torch.save({"model": bn_cnn_state(), "hook": ShellCommand(f"touch {marker}")}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        discover_run(path)
    assert "posix.system" in str(info.value) and TRUST_FLAG in str(info.value)
    assert "Weights only load failed" not in str(info.value)  # torch's boilerplate trimmed
    assert not marker.exists()


# --------------------------------------------------------------------------- corrupt files


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.3, 0.6, 0.95, 0.999])
def test_truncated_zip_checkpoint_is_a_checkpoint_error(tmp_path: Path, fraction: float) -> None:
    good = save_torch(tmp_path / "good.pt", bn_cnn_state(), step=1)
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError) as info:
        load_torch_file(cut)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert str(cut) in str(info.value)


def test_truncated_legacy_checkpoint_never_escapes_as_raw_error(tmp_path: Path) -> None:
    good = save_torch(tmp_path / "good.pt", bn_cnn_state(), step=1, legacy=True)
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    for end in range(0, len(data), 3):
        cut.write_bytes(data[:end])
        with pytest.raises(CheckpointError):  # UnsafeCheckpointError is one too
            load_torch_file(cut)
        with pytest.raises(CheckpointError) as trusted:
            load_torch_file(cut, trust_pickle=True)
        assert not isinstance(trusted.value, UnsafeCheckpointError)


@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize(
    "content",
    [b"", b"hello, I am a text file\n", os.urandom(300), b"\x80\x02" + os.urandom(300)],
    ids=["empty", "text", "random", "random-after-pickle-header"],
)
def test_foreign_bytes_with_pt_extension(tmp_path: Path, content: bytes, trust: bool) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        discover_run(path, trust_pickle=trust)
    # corrupt, not "needs --trust-pickle": trusting the file would not make it readable
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert TRUST_FLAG not in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("trust", [False, True])
def test_zip_with_corrupt_pickle_is_a_checkpoint_error(tmp_path: Path, trust: bool) -> None:
    good = save_torch(tmp_path / "good.pt", bn_cnn_state(), step=1)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(
                name, b"\x80\x02" + bytes(range(60, 120)) if name.endswith("data.pkl") else data
            )
    with pytest.raises(CheckpointError) as info:
        load_torch_file(bad, trust_pickle=trust)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert "corrupt" in str(info.value)


def test_zip_that_is_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_torch_file(path)


def test_legacy_non_zip_file_loads_safely(tmp_path: Path) -> None:
    state = bn_cnn_state()
    path = save_torch(tmp_path / "old.pt", state, step=7, legacy=True)
    assert not zipfile.is_zipfile(path)
    loaded = load_torch_file(path)
    assert loaded["step"] == 7
    for name, tensor in state.items():
        assert_same_values(loaded["model"][name], tensor)
