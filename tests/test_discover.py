"""`checkpoints.discover`: finding checkpoints, ordering them by the strongest source every one of
them has (and saying which), de-duplication, skipped side files, and the bad-folder cases.

Each ordering case is built so that every weaker source would give a different order: names
and modification times contradict the stored step, and so on.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    save_hf_checkpoint,
    save_lightning,
    save_safetensors,
    save_torch,
    training_states,
    write_run,
)

from bnwd_cli.checkpoints import OrderSource, discover_run
from bnwd_cli.errors import CheckpointError, UsageError

STATES = training_states(4)


def set_mtimes(paths: list[Path], seconds: list[int]) -> None:
    for path, t in zip(paths, seconds, strict=True):
        os.utime(path, (t, t))


def labels(folder: Path) -> list[str]:
    return [c.label for c in discover_run(folder).checkpoints]


# --------------------------------------------------------------------------- ordering sources


def test_stored_step_wins_over_names_and_mtimes(tmp_path: Path) -> None:
    # names say c < b < a (epoch numbers), mtimes say a < b < c, stored steps say b < c < a
    files = [
        save_torch(tmp_path / "epoch3_a.pt", STATES[0], step=300),
        save_torch(tmp_path / "epoch2_b.pt", STATES[1], step=100),
        save_torch(tmp_path / "epoch1_c.pt", STATES[2], step=200),
    ]
    set_mtimes(files, [1000, 2000, 3000])
    run = discover_run(tmp_path)
    assert run.order_source is OrderSource.STEP_METADATA
    assert [c.label for c in run.checkpoints] == ["epoch2_b.pt", "epoch1_c.pt", "epoch3_a.pt"]
    assert [c.step for c in run.checkpoints] == [100, 200, 300]
    assert all(c.step_from_metadata for c in run.checkpoints)


def test_stored_epoch_when_no_step_is_stored(tmp_path: Path) -> None:
    files = [
        save_torch(tmp_path / "x.pt", STATES[0], epoch=7),
        save_torch(tmp_path / "y.pt", STATES[1], epoch=2),
        save_torch(tmp_path / "z.pt", STATES[2], epoch=11),
    ]
    set_mtimes(files, [3000, 2000, 1000])
    run = discover_run(tmp_path)
    assert run.order_source is OrderSource.EPOCH_METADATA
    assert [c.label for c in run.checkpoints] == ["y.pt", "x.pt", "z.pt"]
    assert [c.epoch for c in run.checkpoints] == [2, 7, 11]


def test_step_in_trainer_state_json_beside_the_weights(tmp_path: Path) -> None:
    # folder names carry no number; trainer_state.json says which came first
    save_hf_checkpoint(tmp_path / "ckpt-late", STATES[0], step=20)
    save_hf_checkpoint(tmp_path / "ckpt-early", STATES[1], step=10)
    run = discover_run(tmp_path)
    assert run.order_source is OrderSource.STEP_METADATA
    assert [(c.label, c.step) for c in run.checkpoints] == [("ckpt-early", 10), ("ckpt-late", 20)]


def test_step_in_safetensors_metadata(tmp_path: Path) -> None:
    files = [
        save_safetensors(tmp_path / "a.safetensors", STATES[0], metadata={"step": "30"}),
        save_safetensors(tmp_path / "b.safetensors", STATES[1], metadata={"step": "4"}),
    ]
    set_mtimes(files, [1000, 2000])
    run = discover_run(tmp_path)
    assert run.order_source is OrderSource.STEP_METADATA
    assert [(c.label, c.step) for c in run.checkpoints] == [
        ("b.safetensors", 4),
        ("a.safetensors", 30),
    ]


def test_step_in_names_is_numeric_not_lexicographic(tmp_path: Path) -> None:
    files = [
        save_torch(tmp_path / f"step_{n}.pt", STATES[i], model_key=None)
        for i, n in enumerate((10, 9, 100))
    ]
    set_mtimes(files, [3000, 2000, 1000])
    run = discover_run(tmp_path)
    assert run.order_source is OrderSource.NAME_STEP
    assert [c.label for c in run.checkpoints] == ["step_9.pt", "step_10.pt", "step_100.pt"]
    assert [c.step for c in run.checkpoints] == [9, 10, 100]
    assert not any(c.step_from_metadata for c in run.checkpoints)


def test_epoch_in_names(tmp_path: Path) -> None:
    files = [
        save_torch(tmp_path / f"epoch{n}.pth", STATES[i], model_key=None)
        for i, n in enumerate((2, 10, 1))
    ]
    set_mtimes(files, [1000, 2000, 3000])
    run = discover_run(tmp_path)
    assert run.order_source is OrderSource.NAME_EPOCH
    assert [c.epoch for c in run.checkpoints] == [1, 2, 10]
    assert [c.step for c in run.checkpoints] == [None, None, None]


def test_modification_time_when_nothing_else_orders(tmp_path: Path) -> None:
    files = [
        save_torch(tmp_path / f"{name}.pt", STATES[i], model_key=None)
        for i, name in enumerate(("alpha", "beta", "gamma"))
    ]
    set_mtimes(files, [2000, 3000, 1000])
    run = discover_run(tmp_path)
    assert run.order_source is OrderSource.MTIME
    assert [c.label for c in run.checkpoints] == ["gamma.pt", "alpha.pt", "beta.pt"]


def test_stored_step_on_only_some_files_falls_back_to_names(tmp_path: Path) -> None:
    save_torch(tmp_path / "step_5.pt", STATES[0], step=999)
    save_torch(tmp_path / "step_7.pt", STATES[1], model_key=None)
    run = discover_run(tmp_path)
    assert run.order_source is OrderSource.NAME_STEP
    assert [c.label for c in run.checkpoints] == ["step_5.pt", "step_7.pt"]
    # the stored step stays what the file says; the other one's comes from its name
    assert [c.step for c in run.checkpoints] == [999, 7]


def test_single_checkpoint_gets_its_step_from_the_name(tmp_path: Path) -> None:
    save_hf_checkpoint(tmp_path / "checkpoint-10", STATES[0], step=10)
    (tmp_path / "checkpoint-10" / "trainer_state.json").unlink()
    run = discover_run(tmp_path)
    assert run.order_source is OrderSource.SINGLE
    assert [(c.label, c.step) for c in run.checkpoints] == [("checkpoint-10", 10)]


@pytest.mark.parametrize(
    ("template", "step", "epoch"),
    [
        ("step={n}.ckpt", True, False),
        ("model-step={n}.pt", True, False),
        ("checkpoint-{n}.pt", True, False),
        ("global_step{n}.pt", True, False),
        ("iter_{n}.pth", True, False),
        ("epoch{n}.pt", False, True),
        ("epoch_{n}.pth", False, True),
        ("epoch={n}-step={m}.ckpt", True, True),
    ],
)
def test_name_patterns(tmp_path: Path, template: str, step: bool, epoch: bool) -> None:
    numbers = [(12, 1200), (3, 300), (40, 4000)]
    for i, (n, m) in enumerate(numbers):
        save_torch(tmp_path / template.format(n=n, m=m), STATES[i], model_key=None)
    run = discover_run(tmp_path)
    ordered = sorted(numbers)
    if step:
        assert run.order_source is OrderSource.NAME_STEP
        expected = [m if "{m}" in template else n for n, m in ordered]
        assert [c.step for c in run.checkpoints] == expected
    else:
        assert run.order_source is OrderSource.NAME_EPOCH
    if epoch:
        assert [c.epoch for c in run.checkpoints] == [n for n, _ in ordered]
    else:
        assert [c.epoch for c in run.checkpoints] == [None, None, None]


def test_timm_checkpoint_number_is_an_epoch(tmp_path: Path) -> None:
    import argparse

    for i, n in enumerate((1, 0)):
        torch.save(
            {
                "arch": "net",
                "state_dict": STATES[i],
                "args": argparse.Namespace(lr=0.1),
                "version": 2,
            },
            tmp_path / f"checkpoint-{n}.pth.tar",
        )
    run = discover_run(tmp_path)
    assert run.order_source is OrderSource.NAME_EPOCH
    assert [(c.label, c.epoch, c.step) for c in run.checkpoints] == [
        ("checkpoint-0.pth.tar", 0, None),
        ("checkpoint-1.pth.tar", 1, None),
    ]


# --------------------------------------------------------------------------- de-duplication


def three_step_run(folder: Path) -> list[Path]:
    return write_run(folder, STATES[:3], steps=[100, 200, 300], fmt="bare")


def skipped_reasons(folder: Path) -> dict[str, str]:
    return {s.path.name: s.reason for s in discover_run(folder).skipped}


def test_hard_link_is_dropped(tmp_path: Path) -> None:
    files = three_step_run(tmp_path)
    os.link(files[1], tmp_path / "step_200_copy.pt")
    assert labels(tmp_path) == ["step_100.pt", "step_200.pt", "step_300.pt"]
    reason = skipped_reasons(tmp_path)["step_200_copy.pt"]
    assert "same file as" in reason and reason.endswith("step_200.pt")


def test_symlink_is_dropped(tmp_path: Path) -> None:
    files = three_step_run(tmp_path)
    (tmp_path / "step_300_link.pt").symlink_to(files[2])
    assert labels(tmp_path) == ["step_100.pt", "step_200.pt", "step_300.pt"]
    assert "step_300_link.pt" in skipped_reasons(tmp_path)


def test_last_equal_to_newest_is_dropped_by_content(tmp_path: Path) -> None:
    files = three_step_run(tmp_path)
    shutil.copyfile(files[2], tmp_path / "last.pt")  # a copy, not a link: same bytes
    assert labels(tmp_path) == ["step_100.pt", "step_200.pt", "step_300.pt"]
    assert "same checkpoint as" in skipped_reasons(tmp_path)["last.pt"]


def test_last_with_the_newest_stored_step_is_dropped(tmp_path: Path) -> None:
    for i, step in enumerate((2, 4, 6)):
        save_lightning(tmp_path / f"epoch=0-step={step}.ckpt", STATES[i], step=step, epoch=0)
    # Lightning re-saves last.ckpt: different bytes, same step
    save_lightning(tmp_path / "last.ckpt", STATES[2], step=6, epoch=0, attribute="model")
    run = discover_run(tmp_path)
    assert [c.label for c in run.checkpoints] == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
        "epoch=0-step=6.ckpt",
    ]
    assert any(s.path.name == "last.ckpt" for s in run.skipped)


def test_last_newer_than_all_is_kept(tmp_path: Path) -> None:
    for i, step in enumerate((100, 200, 300)):
        save_torch(tmp_path / f"step_{step}.pt", STATES[i], step=step)
    save_torch(tmp_path / "last.pt", STATES[3], step=350)
    run = discover_run(tmp_path)
    assert [(c.label, c.step) for c in run.checkpoints] == [
        ("step_100.pt", 100),
        ("step_200.pt", 200),
        ("step_300.pt", 300),
        ("last.pt", 350),
    ]


def test_model_best_is_dropped(tmp_path: Path) -> None:
    files = three_step_run(tmp_path)
    shutil.copyfile(files[0], tmp_path / "model_best.pth.tar")
    assert labels(tmp_path) == ["step_100.pt", "step_200.pt", "step_300.pt"]
    assert "best" in skipped_reasons(tmp_path)["model_best.pth.tar"]


# --------------------------------------------------------------------------- side files


def test_side_files_are_skipped_and_listed(tmp_path: Path) -> None:
    three_step_run(tmp_path)
    torch.save({"output_dir": "x"}, tmp_path / "training_args.bin")
    torch.save({"rng": torch.zeros(3)}, tmp_path / "rng_state_0.pth")
    torch.save({"last_epoch": 3, "_step_count": 4}, tmp_path / "scheduler.pt")
    (tmp_path / "train.log").write_text("epoch 1 loss 0.3\n")
    (tmp_path / "events.out.tfevents.1700000000.host").write_bytes(b"\x00\x01")
    (tmp_path / "hparams.yaml").write_text("lr: 0.1\n")
    (tmp_path / "metrics.csv").write_text("step,loss\n")
    run = discover_run(tmp_path)
    assert [c.label for c in run.checkpoints] == ["step_100.pt", "step_200.pt", "step_300.pt"]
    assert run.problems == ()
    skipped = {s.path.name for s in run.skipped}
    assert skipped == {
        "training_args.bin",
        "rng_state_0.pth",
        "scheduler.pt",
        "train.log",
        "events.out.tfevents.1700000000.host",
        "hparams.yaml",
        "metrics.csv",
    }
    assert all(s.reason for s in run.skipped)


def test_trainer_folder_side_files_are_listed(tmp_path: Path) -> None:
    save_hf_checkpoint(
        tmp_path / "checkpoint-5", STATES[0], step=5, optimizer={"state": {}, "param_groups": []}
    )
    save_hf_checkpoint(tmp_path / "checkpoint-9", STATES[1], step=9)
    run = discover_run(tmp_path)
    assert [c.label for c in run.checkpoints] == ["checkpoint-5", "checkpoint-9"]
    assert run.checkpoints[0].optimizer_file == tmp_path / "checkpoint-5" / "optimizer.pt"
    assert run.checkpoints[1].optimizer_file is None
    skipped = {str(s.path.relative_to(tmp_path)) for s in run.skipped}
    for folder in ("checkpoint-5", "checkpoint-9"):
        for name in ("scheduler.pt", "rng_state.pth", "config.json", "trainer_state.json"):
            assert f"{folder}/{name}" in skipped


def test_trainer_output_with_final_model_beside_checkpoint_folders(tmp_path: Path) -> None:
    # `trainer.save_model()` writes model.safetensors into output_dir next to checkpoint-N/
    save_hf_checkpoint(tmp_path / "checkpoint-5", STATES[0], step=5)
    save_hf_checkpoint(tmp_path / "checkpoint-10", STATES[1], step=10)
    save_safetensors(tmp_path / "model.safetensors", STATES[1])
    (tmp_path / "config.json").write_text("{}")
    run = discover_run(tmp_path)
    assert [(c.label, c.step) for c in run.checkpoints] == [
        ("checkpoint-5", 5),
        ("checkpoint-10", 10),
    ]
    assert "model.safetensors" in {s.path.name for s in run.skipped if s.path.parent == tmp_path}


def test_final_model_pt_beside_step_checkpoints_does_not_hide_them(tmp_path: Path) -> None:
    files = three_step_run(tmp_path)
    final = save_torch(tmp_path / "model.pt", STATES[3], model_key=None)
    set_mtimes([*files, final], [1000, 2000, 3000, 4000])
    run = discover_run(tmp_path)
    assert [c.label for c in run.checkpoints] == [
        "step_100.pt",
        "step_200.pt",
        "step_300.pt",
        "model.pt",
    ]


def test_folder_with_model_pt_and_optimizer_pt_is_one_checkpoint(tmp_path: Path) -> None:
    for step in (1, 2):
        folder = tmp_path / f"step_{step}"
        save_torch(folder / "model.pt", STATES[step], model_key=None)
        torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    run = discover_run(tmp_path)
    assert [(c.label, c.step) for c in run.checkpoints] == [("step_1", 1), ("step_2", 2)]
    assert all(c.optimizer_file is not None for c in run.checkpoints)


def test_optimizer_only_file_is_skipped(tmp_path: Path) -> None:
    three_step_run(tmp_path)
    torch.save({"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, tmp_path / "opt_300.pt")
    run = discover_run(tmp_path)
    assert len(run.checkpoints) == 3
    assert "opt_300.pt" in {s.path.name for s in run.skipped}


# --------------------------------------------------------------------------- folders


def test_several_run_folders_are_a_usage_error(tmp_path: Path) -> None:
    write_run(tmp_path / "run_a", STATES[:2])
    write_run(tmp_path / "run_b", STATES[:2])
    with pytest.raises(UsageError) as info:
        discover_run(tmp_path)
    message = str(info.value)
    assert "run_a" in message and "run_b" in message
    assert "one run" in message


def test_several_lightning_versions_use_the_newest(tmp_path: Path) -> None:
    for version, steps in ((0, (2, 4)), (2, (6, 8)), (10, (10, 12))):
        folder = tmp_path / "lightning_logs" / f"version_{version}" / "checkpoints"
        for i, step in enumerate(steps):
            save_lightning(folder / f"epoch=0-step={step}.ckpt", STATES[i], step=step, epoch=0)
    run = discover_run(tmp_path)
    assert [c.step for c in run.checkpoints] == [10, 12]  # version_10, not version_2
    assert all("version_10" in c.label for c in run.checkpoints)
    assert any("version_10" in note for note in run.notes)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        discover_run(tmp_path / "nope")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="holds no checkpoint") as info:
        discover_run(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_folder_without_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    (tmp_path / "config.yaml").write_text("a: 1")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        discover_run(tmp_path)


def test_unreadable_file_is_a_problem_and_fatal_when_strict(tmp_path: Path) -> None:
    files = three_step_run(tmp_path)
    files[1].write_bytes(files[1].read_bytes()[:100])  # truncated
    run = discover_run(tmp_path)
    assert [c.label for c in run.checkpoints] == ["step_100.pt", "step_300.pt"]
    assert [p.path for p in run.problems] == [files[1]]
    assert str(files[1]) in run.problems[0].message
    with pytest.raises(CheckpointError) as info:
        discover_run(tmp_path, strict=True)
    assert info.value.path == files[1]


def test_every_checkpoint_unreadable_says_why(tmp_path: Path) -> None:
    (tmp_path / "a.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as info:
        discover_run(tmp_path)
    assert "a.pt" in str(info.value) and "holds no checkpoint" in str(info.value)


def test_labels_are_relative_to_the_run_folder(tmp_path: Path) -> None:
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    save_lightning(folder / "epoch=0-step=2.ckpt", STATES[0], step=2, epoch=0)
    save_lightning(folder / "epoch=0-step=4.ckpt", STATES[1], step=4, epoch=0)
    assert labels(tmp_path) == [
        "lightning_logs/version_0/checkpoints/epoch=0-step=2.ckpt",
        "lightning_logs/version_0/checkpoints/epoch=0-step=4.ckpt",
    ]


# --------------------------------------------------------------------------- outline reads


def test_step_stored_as_a_tensor_is_read_by_the_outline_load(tmp_path: Path) -> None:
    """Discovery reads torch files in outline (large tensors left unread); a step or epoch saved
    as a 0-d tensor is small, so it is still read, and orders the run."""
    paths = []
    for step, name in zip([300, 100, 200], ["a.pt", "b.pt", "c.pt"], strict=True):
        path = tmp_path / name
        torch.save({"model": STATES[0], "step": torch.tensor(step), "epoch": torch.tensor(7)}, path)
        paths.append(path)
    run = discover_run(tmp_path)
    assert run.order_source is OrderSource.STEP_METADATA
    assert [c.step for c in run.checkpoints] == [100, 200, 300]
    assert [c.label for c in run.checkpoints] == ["b.pt", "c.pt", "a.pt"]
    assert {c.epoch for c in run.checkpoints} == {7}


def test_outline_load_leaves_large_tensors_unread(tmp_path: Path) -> None:
    from bnwd_cli.checkpoints.mapped import OUTLINE_MAX, load_torch_zip

    big = torch.arange(OUTLINE_MAX + 1, dtype=torch.float64)
    small = torch.arange(OUTLINE_MAX, dtype=torch.int32)
    path = tmp_path / "x.pt"
    torch.save({"big": big, "small": small, "step": torch.tensor(5)}, path)
    outline = load_torch_zip(path, outline=True)
    whole = load_torch_zip(path)
    assert outline["big"].size == 0 and outline["big"].dtype == whole["big"].dtype
    assert outline["small"].tolist() == whole["small"].tolist() == list(range(OUTLINE_MAX))
    assert int(outline["step"]) == 5
    assert whole["big"].tolist() == big.tolist()


def _safetensors_with_header(path: Path, header: bytes) -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        # written by the safetensors library: metadata first, only it is parsed
        (
            b'{"__metadata__":{"step":"7","note":"a, b}"},"w":{"dtype":"F32"}}',
            {"step": "7", "note": "a, b}"},
        ),
        (b'{"__metadata__":{"step":"7"}}', {"step": "7"}),
        # anywhere else in the header: the whole header is parsed
        (b'{"w":{"dtype":"F32"},"__metadata__":{"epoch":"2"}}', {"epoch": "2"}),
        (b'{"w":{"dtype":"F32"}}', {}),
    ],
)
def test_safetensors_metadata_is_read_wherever_it_stands(
    tmp_path: Path, header: bytes, expected: dict[str, str]
) -> None:
    from bnwd_cli.checkpoints.formats import read_safetensors_metadata

    assert (
        read_safetensors_metadata(_safetensors_with_header(tmp_path / "m.st", header)) == expected
    )


@pytest.mark.parametrize(
    "header",
    [
        b'{"__metadata__":{"step":"7"',
        b'{"__metadata__":{"step":"7"}x',
        b'{"__metadata__":',
        b"{\xff}",
    ],
)
def test_corrupt_safetensors_metadata_names_the_file(tmp_path: Path, header: bytes) -> None:
    from bnwd_cli.checkpoints.formats import read_safetensors_metadata

    path = _safetensors_with_header(tmp_path / "bad.safetensors", header)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*corrupt safetensors header"):
        read_safetensors_metadata(path)
