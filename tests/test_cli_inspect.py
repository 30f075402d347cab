"""`bnwd inspect` through `typer.testing.CliRunner`: exit codes, stdout (data only) and stderr
(one-line messages, warnings) checked separately, every bad-input case of the issue, the output
formats parsed back, and the promise that bnwd never writes into a checkpoint folder (every
invocation below compares the run folder before and after).

The installed Typer keeps stderr apart from stdout in `Result` (`result.stdout`,
`result.stderr`), so no `mix_stderr` switch is needed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import stat
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from conftest import (
    BN_CNN_PARAMS,
    folder_snapshot,
    save_timm,
    training_states,
    write_run,
)
from typer.testing import CliRunner, Result

from bnwd_cli.cli.app import app

runner = CliRunner()

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 2, 3


def invoke(args: list[str], *, watch: Path | None = None) -> Result:
    """Run `bnwd ARGS`; with `watch`, prove that the folder is unchanged afterwards."""
    before = folder_snapshot(watch) if watch is not None and watch.exists() else None
    result = runner.invoke(app, [str(a) for a in args])
    if before is not None:
        assert watch is not None
        assert folder_snapshot(watch) == before, "bnwd wrote into the checkpoint folder"
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.stdout + result.stderr
    return result


def assert_one_line_error(result: Result, *needles: str) -> None:
    assert result.exit_code == EXIT_BAD_INPUT, (result.exit_code, result.stderr)
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def warnings_of(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


def ref_norm(tensor: torch.Tensor) -> float:
    return float(np.sqrt(np.sum(tensor.detach().numpy().astype(np.float64) ** 2)))


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture
def run3(tmp_path: Path) -> tuple[Path, list[dict[str, torch.Tensor]], list[Path]]:
    states = training_states(3, growth=1.1)
    folder = tmp_path / "run"
    files = write_run(folder, states)
    return folder, states, files


# --------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path: Path) -> None:
    result = invoke(["inspect", tmp_path / "nope"])
    assert_one_line_error(result, str(tmp_path / "nope"), "does not exist")


def test_empty_folder(tmp_path: Path) -> None:
    result = invoke(["inspect", tmp_path], watch=tmp_path)
    assert_one_line_error(result, str(tmp_path), "holds no checkpoint")


def test_folder_without_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# my run\n")
    (tmp_path / "train.log").write_text("loss 1.0\n")
    result = invoke(["inspect", tmp_path], watch=tmp_path)
    assert_one_line_error(result, "holds no checkpoint")


def test_truncated_file_is_skipped_with_a_warning(run3: tuple[Path, list, list[Path]]) -> None:
    folder, states, files = run3
    files[1].write_bytes(files[1].read_bytes()[: len(files[1].read_bytes()) // 2])
    result = invoke(["inspect", folder, "--format", "csv"], watch=folder)
    assert result.exit_code == EXIT_OK, result.stderr
    warned = [w for w in warnings_of(result) if str(files[1]) in w]
    assert len(warned) == 1 and "skipped" in warned[0]
    rows = csv_rows(result.stdout)
    assert {r["label"] for r in rows} == {"step_100.pt", "step_300.pt"}
    # the rest is analyzed, with the right numbers
    conv = {r["label"]: float(r["norm"]) for r in rows if r["layer"] == "conv1.weight"}
    assert conv["step_300.pt"] == pytest.approx(ref_norm(states[2]["conv1.weight"]), rel=1e-12)

    strict = invoke(["inspect", folder, "--strict"], watch=folder)
    assert_one_line_error(strict, str(files[1]), "truncated or corrupt")


def test_foreign_file_with_checkpoint_extension(run3: tuple[Path, list, list[Path]]) -> None:
    folder, _, _ = run3
    foreign = folder / "step_150.pt"
    foreign.write_text("these are not the weights you are looking for\n")
    result = invoke(["inspect", folder, "--format", "csv"], watch=folder)
    assert result.exit_code == EXIT_OK
    assert any(str(foreign) in w and "not a PyTorch" in w for w in warnings_of(result))
    assert len({r["label"] for r in csv_rows(result.stdout)}) == 3

    alone = invoke(["inspect", foreign], watch=folder)
    assert_one_line_error(alone, str(foreign), "not a PyTorch")


def test_architecture_change(tmp_path: Path) -> None:
    states = training_states(3)
    states[2]["head.weight"] = torch.randn(5, 6)
    folder = tmp_path / "run"
    files = write_run(folder, states)
    result = invoke(["inspect", folder], watch=folder)
    assert_one_line_error(result, str(files[2]), "head.weight", "(5, 6)", "architecture changed")


def test_nan_weights_warn_and_report(tmp_path: Path) -> None:
    states = training_states(2)
    states[1]["conv2.weight"][0, 0, 0, 0] = math.nan
    folder = tmp_path / "run"
    write_run(folder, states)
    result = invoke(["inspect", folder, "--format", "json"], watch=folder)
    assert result.exit_code == EXIT_OK
    warned = [w for w in warnings_of(result) if "conv2.weight" in w]
    assert len(warned) == 1 and "step_200.pt" in warned[0] and "NaN" in warned[0]
    doc = json.loads(result.stdout)
    conv = next(layer for layer in doc["layers"] if layer["name"] == "conv2.weight")
    assert conv["points"][1]["norm"] is None  # NaN is not valid JSON: null
    assert conv["points"][1]["nonfinite"] == 1


@pytest.mark.parametrize("wrapped", [False, True])
def test_pickled_module_needs_trust_pickle(tmp_path: Path, wrapped: bool) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4))
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / "model.pt"
    torch.save({"model": module, "step": 3} if wrapped else module, path)
    refused = invoke(["inspect", folder], watch=folder)
    assert_one_line_error(refused, str(path), "--trust-pickle")

    trusted = invoke(["inspect", folder, "--trust-pickle", "--format", "csv"], watch=folder)
    assert trusted.exit_code == EXIT_OK, trusted.stderr
    rows = {r["layer"]: r for r in csv_rows(trusted.stdout)}
    assert set(rows) == {"0.weight", "1.weight", "1.bias"}
    assert rows["0.weight"]["kind"] == "scale-invariant"
    assert float(rows["0.weight"]["norm"]) == pytest.approx(ref_norm(module[0].weight), rel=1e-12)


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    import os

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    folder = tmp_path / "run"
    folder.mkdir()
    torch.save({"model": training_states(1)[0], "x": Evil()}, folder / "ckpt.pt")
    result = invoke(["inspect", folder], watch=folder)
    assert_one_line_error(result, "ckpt.pt", "--trust-pickle")
    assert not (tmp_path / "PWNED").exists()


def test_internal_error_is_exit_3_without_traceback(
    run3: tuple[Path, list, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import bnwd_cli.metrics.dynamics as dynamics

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(dynamics, "analyze_run", broken)
    folder, _, _ = run3
    result = invoke(["inspect", folder], watch=folder)
    assert result.exit_code == EXIT_INTERNAL  # never 1 ("gate failed") nor 2 (user's fault)
    assert "internal error" in result.stderr and "ZeroDivisionError" in result.stderr


def test_brackets_in_paths_survive_in_messages(tmp_path: Path) -> None:
    # Rich would read `[lr=0.1]` as a style tag and drop it from the message
    missing = tmp_path / "sweep[lr=0.1]"
    assert_one_line_error(invoke(["inspect", missing]), str(missing))
    folder = tmp_path / "run"
    write_run(folder, training_states(2))
    broken = folder / "step_150[copy].pt"
    broken.write_bytes(b"PK\x03\x04 not a zip")
    result = invoke(["inspect", folder, "--format", "csv"], watch=folder)
    assert result.exit_code == EXIT_OK
    assert any(str(broken) in w for w in warnings_of(result)), result.stderr


def test_styled_messages_keep_brackets_and_plain_ones_carry_no_codes(tmp_path: Path) -> None:
    """On a terminal (forced here) Rich styles the label; piped, the line is plain text."""
    missing = tmp_path / "sweep[lr=0.1]"
    styled = runner.invoke(app, ["inspect", str(missing)], env={"FORCE_COLOR": "1"})
    assert styled.exit_code == EXIT_BAD_INPUT
    assert "\x1b[" in styled.stderr  # styled by Rich
    assert str(missing) in styled.stderr  # the path's brackets are not read as markup
    plain = runner.invoke(app, ["inspect", str(missing)], env={"FORCE_COLOR": ""})
    assert plain.stderr.startswith("error: ") and "\x1b" not in plain.stderr
    assert str(missing) in plain.stderr


def test_bad_option_value_is_a_usage_error(run3: tuple[Path, list, list[Path]]) -> None:
    folder, _, _ = run3
    result = invoke(["inspect", folder, "--format", "xml"], watch=folder)
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stdout == ""
    result = invoke(["inspect", folder, "--layers", "conv(["], watch=folder)
    assert_one_line_error(result, "--layers", "regular expression")


# --------------------------------------------------------------------------- output formats


def test_csv_is_tidy_and_matches_reference(run3: tuple[Path, list, list[Path]]) -> None:
    folder, states, _ = run3
    result = invoke(["inspect", folder, "--format", "csv"], watch=folder)
    assert result.exit_code == EXIT_OK
    rows = csv_rows(result.stdout)
    pairs = [(r["label"], r["layer"]) for r in rows]
    labels = ["step_100.pt", "step_200.pt", "step_300.pt"]
    assert sorted(pairs) == sorted((lbl, name) for lbl in labels for name in BN_CNN_PARAMS)
    required = {
        "checkpoint",
        "label",
        "step",
        "layer",
        "kind",
        "granularity",
        "shape",
        "norm",
        "relative_step",
        "angular_update_rad",
        "steps_between",
        "effective_lr",
        "lr_factor",
    }
    assert required <= set(rows[0])
    for row in rows:
        t = labels.index(row["label"])
        assert int(row["step"]) == 100 * (t + 1)
        tensor = states[t][row["layer"]]
        assert float(row["norm"]) == pytest.approx(ref_norm(tensor), rel=1e-12)
        assert row["shape"] == "x".join(map(str, tensor.shape))
        if t == 0:
            assert row["relative_step"] == "" and row["steps_between"] == ""
        else:
            prev = states[t - 1][row["layer"]].double()
            expected = float((tensor.double() - prev).norm() / prev.norm())
            assert float(row["relative_step"]) == pytest.approx(expected, rel=1e-10)
            assert int(row["steps_between"]) == 100
    assert "\x1b[" not in result.stdout  # no colour codes


def test_json_has_schema_version_and_numbers(run3: tuple[Path, list, list[Path]]) -> None:
    folder, states, _ = run3
    result = invoke(["inspect", folder, "--format", "json"], watch=folder)
    assert result.exit_code == EXIT_OK
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["run"]["order_source"] == "step stored in the checkpoints"
    assert [c["step"] for c in doc["run"]["checkpoints"]] == [100, 200, 300]
    layers = {layer["name"]: layer for layer in doc["layers"]}
    assert set(layers) == set(BN_CNN_PARAMS)
    for name, layer in layers.items():
        norms = [p["norm"] for p in layer["points"]]
        assert norms == pytest.approx([ref_norm(s[name]) for s in states], rel=1e-12)
    assert layers["conv1.weight"]["classification"]["kind"] == "scale-invariant"


def test_markdown_has_a_table_row_per_layer(run3: tuple[Path, list, list[Path]]) -> None:
    folder, states, _ = run3
    result = invoke(["inspect", folder, "--format", "markdown"], watch=folder)
    assert result.exit_code == EXIT_OK
    lines = result.stdout.splitlines()
    assert any(line.startswith("| layer |") for line in lines)
    for name in BN_CNN_PARAMS:
        row = next(line for line in lines if line.startswith(f"| `{name}` |"))
        first = format(ref_norm(states[0][name]), ".3g")
        last = format(ref_norm(states[-1][name]), ".3g")
        assert f"| {first} → {last} |" in row


def test_output_file_and_nothing_on_stdout(
    run3: tuple[Path, list, list[Path]], tmp_path: Path
) -> None:
    folder, _, _ = run3
    out = tmp_path / "report.json"
    result = invoke(["inspect", folder, "--format", "json", "--output", out], watch=folder)
    assert result.exit_code == EXIT_OK
    assert result.stdout == ""
    written = json.loads(out.read_text(encoding="utf-8"))
    on_stdout = json.loads(invoke(["inspect", folder, "--format", "json"]).stdout)
    assert written == on_stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report")] == []


def test_output_file_gets_the_permissions_open_would_give(
    run3: tuple[Path, list, list[Path]], tmp_path: Path
) -> None:
    """The report is written through a private temporary file (mode 0600); the file left
    behind is readable as any file the user creates (umask), and one it replaces keeps its
    mode."""
    folder, _, _ = run3
    fresh = tmp_path / "fresh.csv"
    old_umask = os.umask(0o022)
    try:
        assert invoke(["inspect", folder, "--format", "csv", "-o", fresh]).exit_code == EXIT_OK
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        os.umask(0o077)
        private = tmp_path / "private.csv"
        assert invoke(["inspect", folder, "--format", "csv", "-o", private]).exit_code == EXIT_OK
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)
    shared = tmp_path / "shared.csv"
    shared.write_text("old report\n")
    shared.chmod(0o664)
    assert invoke(["inspect", folder, "--format", "csv", "-o", shared]).exit_code == EXIT_OK
    assert stat.S_IMODE(shared.stat().st_mode) == 0o664
    assert shared.read_text().startswith("checkpoint,")


@pytest.mark.parametrize(
    ("argument", "where"),
    [(".", "report.csv"), (".", "sub/report.csv"), ("step_100.pt", "report.csv")],
    ids=["in-folder", "in-subfolder", "beside-a-checkpoint-file"],
)
def test_output_inside_the_checkpoint_folder_is_refused(
    run3: tuple[Path, list, list[Path]], argument: str, where: str
) -> None:
    folder, _, _ = run3
    (folder / "sub").mkdir()
    target = folder / where
    ckpt = folder / argument
    result = invoke(["inspect", ckpt, "--format", "csv", "--output", target], watch=folder)
    assert_one_line_error(result, "--output", "checkpoint folder")
    assert not target.exists()


def test_output_that_cannot_be_written_is_a_usage_error(
    run3: tuple[Path, list, list[Path]], tmp_path: Path
) -> None:
    folder, _, _ = run3
    elsewhere = tmp_path / "reports"
    elsewhere.mkdir()
    result = invoke(["inspect", folder, "--output", elsewhere], watch=folder)
    assert_one_line_error(result, "--output", str(elsewhere))
    assert list(elsewhere.iterdir()) == []  # no temporary file left behind
    result = invoke(["inspect", folder, "--output", tmp_path / "nope" / "r.csv"], watch=folder)
    assert_one_line_error(result, "--output", "does not exist")


def test_stdout_holds_only_data_even_with_warnings(run3: tuple[Path, list, list[Path]]) -> None:
    folder, _, files = run3
    files[0].write_bytes(b"PK\x03\x04 broken zip")
    (folder / "notes.txt").write_text("x")
    result = invoke(["inspect", folder, "--format", "json", "--list-skipped"], watch=folder)
    assert result.exit_code == EXIT_OK
    assert warnings_of(result)  # something was said, on stderr
    assert "notes.txt" in result.stderr  # --list-skipped goes to stderr too
    doc = json.loads(result.stdout)  # and stdout still parses
    assert len(doc["run"]["checkpoints"]) == 2


def test_per_checkpoint_table_lists_every_checkpoint(run3: tuple[Path, list, list[Path]]) -> None:
    folder, states, _ = run3
    result = invoke(["inspect", folder, "--per-checkpoint", "--layers", "^conv1"], watch=folder)
    assert result.exit_code == EXIT_OK
    for t, label in enumerate(("step_100.pt", "step_200.pt", "step_300.pt")):
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(label))
        assert format(ref_norm(states[t]["conv1.weight"]), ".4g") in line
    assert "head.weight" not in result.stdout


def test_ema_weights_are_selectable(tmp_path: Path) -> None:
    states = training_states(2, seed=1)
    emas = training_states(2, seed=2)
    folder = tmp_path / "run"
    for epoch in (0, 1):
        save_timm(
            folder / f"checkpoint-{epoch}.pth.tar", states[epoch], epoch=epoch, ema=emas[epoch]
        )
    model = csv_rows(invoke(["inspect", folder, "--format", "csv"], watch=folder).stdout)
    ema_result = invoke(["inspect", folder, "--format", "csv", "--ema"], watch=folder)
    assert ema_result.exit_code == EXIT_OK
    ema = csv_rows(ema_result.stdout)
    for rows, source in ((model, states), (ema, emas)):
        for row in rows:
            t = int(row["epoch"])
            assert float(row["norm"]) == pytest.approx(ref_norm(source[t][row["layer"]]), rel=1e-12)


def test_ema_on_checkpoints_without_ema_says_so(run3: tuple[Path, list, list[Path]]) -> None:
    folder, _, _ = run3
    result = invoke(["inspect", folder, "--ema"], watch=folder)
    assert result.exit_code == EXIT_BAD_INPUT
    assert "EMA" in result.stderr
    assert result.stdout == ""


# --------------------------------------------------------------------------- version and help


def test_version() -> None:
    result = invoke(["--version"])
    assert result.exit_code == EXIT_OK
    assert result.stdout.strip() == f"bnwd {metadata.version('bnwd-cli')}"


def test_python_dash_m_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bnwd_cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"bnwd {metadata.version('bnwd-cli')}"


def test_every_command_and_option_has_help() -> None:
    group = typer.main.get_command(app)
    assert group.help
    commands = group.commands  # type: ignore[attr-defined]
    assert "inspect" in commands
    for name, command in commands.items():
        assert command.help and command.help.strip(), f"command {name} has no help"
        for param in command.params:
            text = getattr(param, "help", None)
            assert text and text.strip(), f"{name}: {param.name} has no help"


def test_the_entry_point_builds_only_the_command_that_runs() -> None:
    """`main` hands Typer the command the first argument names, alone (building the others
    costs start-up time); anything else (help, a misspelt command) gets the whole group, and
    the app is left with every command."""
    from bnwd_cli.cli.app import _command_named

    registered = app.registered_commands
    assert len(registered) == 5
    for name in ("inspect", "check", "suggest-groups", "verify-invariance", "plot"):
        assert [c.name for c in _command_named([name, "x"], registered)] == [name]
    for args in ([], ["--help"], ["inspec"], ["--version", "inspect"], ["-h"]):
        assert _command_named(args, registered) is registered

    def bnwd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bnwd_cli", *args], capture_output=True, text=True,
            timeout=120, check=False, env={**os.environ, "COLUMNS": "120"},
        )  # fmt: skip

    listing = bnwd("--help")
    assert listing.returncode == 0
    assert all(name in listing.stdout for name in ("inspect", "check", "suggest-groups", "plot"))
    misspelt = bnwd("inspec")
    assert misspelt.returncode == EXIT_BAD_INPUT and "inspect" in misspelt.stderr
    one = bnwd("check", "--help")
    assert one.returncode == 0 and "--fail-on" in one.stdout


def test_the_entry_point_leaves_the_app_with_every_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bnwd_cli.cli import app as app_module

    registered = list(app.registered_commands)
    exits: list[int] = []
    monkeypatch.setattr(app_module, "_exit_now", exits.append)
    monkeypatch.setattr(sys, "argv", ["bnwd", "check", "--help"])
    with contextlib.suppress(SystemExit):  # (re-raised where coverage measures the run)
        app_module.main()
    assert "--fail-on" in capsys.readouterr().out
    assert app.registered_commands == registered


def test_inspect_help_exits_0() -> None:
    result = invoke(["inspect", "--help"])
    assert result.exit_code == EXIT_OK
    assert "--format" in result.stdout and "--trust-pickle" in result.stdout


# --------------------------------------------------------------------------- golden table

GOLDEN = Path(__file__).parent / "golden" / "inspect_table.txt"
NUMBER = r"[-+]?\d[\d.]*(?:e[-+]?\d+)?"


def test_table_golden_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, update_golden: bool
) -> None:
    states = training_states(3, seed=5, noise=0.04, growth=1.1)
    write_run(tmp_path / "run", states)
    monkeypatch.chdir(tmp_path)  # the header shows the run path: keep it short and fixed
    result = invoke(["inspect", "run"], watch=tmp_path / "run")
    assert result.exit_code == EXIT_OK
    text = result.stdout
    assert "\x1b[" not in text  # no colour when not on a terminal
    if update_golden:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    golden = GOLDEN.read_text(encoding="utf-8")
    assert text == golden, "table changed: review, then re-run pytest with --update-golden"

    # The golden file is not only a copy of the code's output: its figures are checked here
    # against the float64 reference, as the table formats them.
    for name in BN_CNN_PARAMS:
        line = next(
            line for line in golden.splitlines() if line.startswith(f" {name} ") and "→" in line
        )
        match = re.search(
            rf"({NUMBER}) → ({NUMBER})\s+\S*\s+×({NUMBER})\s+({NUMBER})\s+({NUMBER})°", line
        )
        assert match, line
        w = [s[name].double() for s in states]
        norms = [float(x.norm()) for x in w]
        rel_step = float((w[2] - w[1]).norm() / w[1].norm())
        assert match.group(1) == format(norms[0], ".3g"), name
        assert match.group(2) == format(norms[2], ".3g"), name
        assert match.group(3) == format(norms[2] / norms[0], ".2f"), name
        assert match.group(4) == format(rel_step, ".3g"), name
        # per-row layers (the convs, before BatchNorm): RMS of the rows' angles
        rows = [
            x.reshape(x.shape[0], -1)
            if name in ("conv1.weight", "conv2.weight")
            else x.reshape(1, -1)
            for x in w
        ]
        angles = [kahan_angle(rows[1][r], rows[2][r]) for r in range(rows[2].shape[0])]
        rms_degrees = math.degrees(math.sqrt(sum(a * a for a in angles) / len(angles)))
        assert match.group(5) == format(rms_degrees, ".3g"), name


def kahan_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    ua, ub = a / a.norm(), b / b.norm()
    return 2.0 * math.atan2(float((ua - ub).norm()), float((ua + ub).norm()))


# ----------------------------------------------------------------------------- the process

SAMPLE_RUN = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "sgd_no_conv_wd"


def run_bnwd(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """bnwd as a user runs it: a process of its own through the console-script entry point
    (`main`, which skips the interpreter's teardown), not `CliRunner`."""
    return subprocess.run(
        [sys.executable, "-c", "from bnwd_cli.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kwargs,
    )


def test_process_writes_all_of_its_stdout_before_it_exits() -> None:
    """The report reaches a pipe whole, however the process ends."""
    done = run_bnwd("inspect", str(SAMPLE_RUN), "--format", "json")
    assert done.returncode == EXIT_OK, done.stderr
    report = json.loads(done.stdout)  # a cut-off document would not parse
    assert [c["label"] for c in report["run"]["checkpoints"]] == sorted(
        p.name for p in SAMPLE_RUN.glob("step_*.pt")
    )
    csv_done = run_bnwd("inspect", str(SAMPLE_RUN), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(csv_done.stdout)))
    assert len(rows) == len(report["layers"]) * len(report["run"]["checkpoints"])


def test_process_exit_codes_and_messages() -> None:
    missing = run_bnwd("inspect", "/nonexistent/run")
    assert missing.returncode == EXIT_BAD_INPUT
    assert missing.stdout == ""
    assert "Traceback" not in missing.stderr and "/nonexistent/run" in missing.stderr


def test_process_reader_that_went_away() -> None:
    """`bnwd inspect RUN | head -c 100`: the reader leaves before the report is written. bnwd
    ends quietly, as a command killed by SIGPIPE does (exit 141), not with an "internal error"
    or Python's report of the failed flush of stdout."""
    process = subprocess.Popen(
        [sys.executable, "-c", "from bnwd_cli.cli import main; main()", "inspect",
         str(SAMPLE_RUN), "--format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before bnwd has written anything: its first write fails
    err = process.stderr.read()
    assert process.wait(timeout=120) == 141
    assert "error" not in err and "Exception" not in err and "Traceback" not in err


def test_process_under_a_profiler_exits_normally(tmp_path: Path) -> None:
    """bnwd skips the interpreter's teardown, except under a profiler or coverage, which write
    their data then: `python -m cProfile -o FILE -m bnwd_cli ...` must leave FILE."""
    stats = tmp_path / "bnwd.prof"
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(stats), "-m", "bnwd_cli", "inspect",
         str(SAMPLE_RUN), "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout.startswith("checkpoint,")
    assert stats.stat().st_size > 0


BLAS_PROBE = """
import os, sys
import bnwd_cli.cli.app
cli = sys.modules["bnwd_cli.cli.app"]
class Probe:  # in place of the Typer app: what a command finds once numpy is imported
    registered_commands = []
    def __call__(self):
        import numpy  # noqa: F401
        print(len(os.listdir("/proc/self/task")), os.environ.get("OPENBLAS_NUM_THREADS"))
        raise SystemExit(0)
cli.app = Probe()
cli.main()
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
@pytest.mark.parametrize(
    ("command", "user_setting", "expected"),
    [
        ("inspect", None, "1"),
        ("check", None, "1"),
        ("inspect", "2", "2"),  # the user's setting is kept
        ("verify-invariance", None, None),  # runs a model: torch's BLAS keeps its threads
    ],
)
def test_commands_without_linear_algebra_start_no_blas_threads(
    command: str, user_setting: str | None, expected: str | None
) -> None:
    """OpenBLAS starts a spinning thread per core when numpy is imported; `inspect` and
    `check` never call it, so the process keeps to its own threads."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
    }
    if user_setting is not None:
        env["OPENBLAS_NUM_THREADS"] = user_setting
    done = subprocess.run(
        [sys.executable, "-c", BLAS_PROBE, command, "RUN"],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    threads, setting = done.stdout.split()
    assert setting == str(expected)
    cores = len(os.sched_getaffinity(0))
    if expected == "1":
        assert threads == "1"
    elif cores > 1:  # numpy's OpenBLAS left alone starts threads: the check above can fail
        assert int(threads) > 1
