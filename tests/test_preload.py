"""Torch files read once: discovery keeps the first ones it read whole (`PreloadedFiles`) and the
pass takes them instead of reading them again, with the same results."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import training_states, write_run

import bnwd_cli.checkpoints.reader as reader
import bnwd_cli.checkpoints.safe_load as safe_load
from bnwd_cli.checkpoints import discover_run
from bnwd_cli.checkpoints.safe_load import PreloadedFiles
from bnwd_cli.metrics.dynamics import analyze_run


def count_pass_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the pass reads itself (rather than taking them from discovery)."""
    reads: list[Path] = []
    real = reader.load_torch_file

    def counting(path: Path, **kwargs: Any) -> Any:
        reads.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(reader, "load_torch_file", counting)
    return reads


def points(report: Any) -> list[tuple[str, list[Any]]]:
    return [(layer.name, list(layer.points)) for layer in report.layers]


def test_the_pass_takes_what_discovery_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_run(tmp_path, training_states(5), lr=0.1)
    reads = count_pass_reads(monkeypatch)
    kept = analyze_run(tmp_path)
    assert reads == []  # every file read once, by discovery
    monkeypatch.setattr(safe_load, "PRELOAD_FILES", 2)
    reads.clear()
    partly = analyze_run(tmp_path)
    assert len(reads) == 3  # the first two discovered were kept, the pass read the rest
    monkeypatch.setattr(safe_load, "PRELOAD_FILES", 0)
    reads.clear()
    none = analyze_run(tmp_path)
    assert len(reads) == 5
    assert points(kept) == points(none) == points(partly)  # the very same figures


def test_only_checkpoints_of_the_run_are_kept(tmp_path: Path) -> None:
    write_run(tmp_path, training_states(3))
    torch.save({"state": {}, "param_groups": []}, tmp_path / "optimizer_only.pt")
    run = discover_run(tmp_path)
    assert len(run.checkpoints) == 3
    assert run.preloaded is not None and len(run.preloaded) == 3  # not the optimizer file


def test_a_file_changed_since_discovery_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "step_1.pt"
    torch.save({"model": {"w": torch.ones(3)}, "step": 1}, path)
    preloaded = PreloadedFiles()
    assert preloaded.load(path) is not None
    torch.save({"model": {"w": torch.zeros(3)}, "step": 1}, path)
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    assert preloaded.take(path) is None
    assert preloaded.load(path) is not None
    taken = preloaded.take(path)
    assert taken is not None and taken["model"]["w"].tolist() == [0.0, 0.0, 0.0]
    assert preloaded.take(path) is None  # taken once


def test_capacity_and_files_the_mapped_reader_refuses(tmp_path: Path) -> None:
    preloaded = PreloadedFiles(capacity=1)
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    for path in (first, second):
        torch.save({"w": torch.ones(2)}, path)
    assert preloaded.load(first) is not None
    assert preloaded.load(second) is None and len(preloaded) == 1  # full
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert PreloadedFiles().load(legacy) is None  # read into memory: never kept
