"""`bnwd suggest-groups` through the CLI: exit codes, stdout vs stderr, every format, and the
printed snippets run as a training script would run them."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from bnwd_cli.cli.app import app

MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build_model():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
        )

    def example_input():
        return torch.randn(2, 3, 8, 8)
    """
)
DECAY = ["8.weight"]
NO_DECAY = ["1.weight", "1.bias", "3.bias", "4.weight", "4.bias", "8.bias"]
INVARIANT = ["0.weight", "3.weight"]


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    return path


def run(*args: str) -> Any:
    return CliRunner().invoke(app, ["suggest-groups", *args])


def test_table_and_snippet_on_stdout(model_file: Path) -> None:
    result = run(str(model_file), "--weight-decay", "1e-4")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Parameter groups (weight decay 0.0001" in out
    for name in INVARIANT:
        assert name in out
    assert "bnwd_cli.param_groups(" in out
    assert "weight_decay=0.0001" in out
    assert result.stderr == ""  # no notes for a graph-analyzed model without frozen params


def test_json_document_and_the_literal_snippet_runs(model_file: Path) -> None:
    result = run(str(model_file), "--format", "json", "--snippet", "literal", "--wd", "0.01")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    groups = {g["role"]: g for g in document["groups"]}
    assert groups["decay"]["param_names"] == DECAY
    assert groups["no_decay"]["param_names"] == NO_DECAY
    assert groups["scale_invariant"]["param_names"] == INVARIANT
    assert groups["scale_invariant"]["weight_decay"] == 0.01
    assert groups["no_decay"]["weight_decay"] == 0.0
    # the snippet, run in a namespace holding the model file's factory, builds the optimizer
    namespace: dict[str, Any] = {}
    exec(compile(MODEL, "model.py", "exec"), namespace)
    exec(compile(document["snippet"], "snippet", "exec"), namespace)
    optimizer = namespace["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD)
    recorded = {n: g["weight_decay"] for g in optimizer.param_groups for n in g["param_names"]}
    assert recorded == {**dict.fromkeys(DECAY + INVARIANT, 0.01), **dict.fromkeys(NO_DECAY, 0.0)}


def test_bnwd_snippet_runs_and_exclude_policy(model_file: Path) -> None:
    result = run(
        str(model_file), "--format", "json", "--invariant-policy", "exclude", "--wd", "0.05"
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["invariant_policy"] == "exclude"
    namespace: dict[str, Any] = {}
    exec(compile(MODEL, "model.py", "exec"), namespace)
    exec(compile(document["snippet"], "snippet", "exec"), namespace)
    recorded = {
        n: g["weight_decay"] for g in namespace["optimizer"].param_groups for n in g["param_names"]
    }
    assert recorded["0.weight"] == 0.0 and recorded["8.weight"] == 0.05
    assert "exclude" in result.stderr  # the policy's consequence is noted on stderr


def test_markdown_csv_and_output_file(model_file: Path, tmp_path: Path) -> None:
    markdown = run(str(model_file), "--format", "markdown")
    assert markdown.exit_code == 0
    assert "| scale_invariant | 0.0005 | 2 |" in markdown.stdout
    assert "```python" in markdown.stdout
    csv_result = run(str(model_file), "--format", "csv")
    rows = csv_result.stdout.strip().splitlines()
    assert rows[0] == "parameter,shape,kind,group,weight_decay"
    assert "3.bias,6,dead-bias,no_decay,0.0" in rows
    target = tmp_path / "groups.json"
    written = run(str(model_file), "--format", "json", "--output", str(target))
    assert written.exit_code == 0 and written.stdout == ""
    assert json.loads(target.read_text())["schema_version"] >= 1


def test_errors_exit_2_on_stderr(tmp_path: Path) -> None:
    missing = run(str(tmp_path / "nope.py"))
    assert missing.exit_code == 2
    assert "no such model file" in missing.stderr
    assert missing.stdout == ""
    broken = tmp_path / "broken.py"
    broken.write_text("def build_model():\n    raise ValueError('boom')\n")
    failed = run(str(broken), "--input-shape", "1,3,8,8")
    assert failed.exit_code == 2
    assert "boom" in failed.stderr
    bad_policy = run(str(tmp_path / "nope.py"), "--invariant-policy", "sometimes")
    assert bad_policy.exit_code == 2


def test_help_describes_the_command() -> None:
    result = CliRunner().invoke(app, ["suggest-groups", "--help"])
    assert result.exit_code == 0
    assert "--invariant-policy" in result.stdout
