"""The weight-decay audit on short real runs whose decay settings are chosen per parameter, so
every finding's parameters and figures are known by construction (or recomputed here from the
saved tensors)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bnwd_cli.cli.app import app
from bnwd_cli.metrics.audit import AuditFinding, AuditSeverity
from bnwd_cli.metrics.dynamics import RunDynamics, analyze_run
from bnwd_cli.metrics.equilibrium import EquilibriumStatus

LR = 0.1
WD = 0.01
STEPS = 5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3)  # its bias is dead: bn2 follows
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


DECAYED = ("conv1.weight", "bn1.weight", "bn1.bias", "conv2.bias", "head.weight", "head.bias")
UNDECAYED = ("conv2.weight", "bn2.weight", "bn2.bias")


def write_run(folder: Path, optimizer: str = "sgd", *, with_state: bool = True) -> list[dict]:
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(0)
    model = Net()
    named = dict(model.named_parameters())
    groups: list[dict[str, Any]] = [
        {"params": [(n, named[n]) for n in DECAYED], "weight_decay": WD},
        {"params": [(n, named[n]) for n in UNDECAYED], "weight_decay": 0.0},
    ]
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(groups, lr=LR, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(groups, lr=1e-3)
    )
    states = []
    for step in range(1, STEPS + 1):
        x = torch.randn(8, 3, 8, 8, generator=data)
        y = torch.randint(0, 3, (8,), generator=data)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        payload: dict[str, Any] = {"model": model.state_dict(), "step": step}
        if with_state:
            payload["optimizer"] = opt.state_dict()
        torch.save(payload, folder / f"ckpt_{step}.pt")
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def by_id(report: RunDynamics) -> dict[str, AuditFinding]:
    return {f.id: f for f in report.audit}


def test_sgd_run_findings(tmp_path: Path) -> None:
    states = write_run(tmp_path)
    findings = by_id(analyze_run(tmp_path))
    assert set(findings) == {
        "wd-on-norm-affine",
        "wd-on-scale-invariant",
        "no-wd-on-scale-invariant",
        "dead-bias",
        "wd-on-bias",
        "wd-on-scale-sensitive",
    }
    affine = findings["wd-on-norm-affine"]
    assert affine.severity is AuditSeverity.WARNING
    assert set(affine.parameters) == {"bn1.weight", "bn1.bias"}
    gamma = {e.parameter: e.figures for e in affine.evidence}["bn1.weight"]
    first, last = states[0]["bn1.weight"].double(), states[-1]["bn1.weight"].double()
    assert gamma["rms_ratio"] == pytest.approx(float(last.norm() / first.norm()), rel=1e-6)
    assert gamma["rms_first"] == pytest.approx(float(first.norm()) / 2, rel=1e-6)  # 4 channels
    # decay alone over the 4 steps between the first and the last checkpoint, amplified by
    # momentum 0.9 in the steady state: (1 - lr·wd/(1 - 0.9))^4 = 0.99^4
    assert gamma["decay_only_ratio"] == pytest.approx(0.99**4, rel=1e-9)
    assert "gamma RMS" in affine.title

    inv = findings["wd-on-scale-invariant"]
    assert inv.severity is AuditSeverity.INFO
    assert inv.parameters == ("conv1.weight",)
    assert inv.evidence[0].figures["lr_x_wd"] == pytest.approx(LR * WD)
    # sqrt(2·lr·wd/(1+m)) = sqrt(2e-3/1.9)
    assert inv.evidence[0].figures["equilibrium_angle"] == pytest.approx(math.sqrt(2e-3 / 1.9))

    free = findings["no-wd-on-scale-invariant"]
    assert free.severity is AuditSeverity.WARNING
    assert free.parameters == ("conv2.weight",)
    w0, w1 = states[0]["conv2.weight"].double(), states[-1]["conv2.weight"].double()
    assert free.evidence[0].figures["norm_growth"] == pytest.approx(
        float(w1.norm() / w0.norm()), rel=1e-6
    )

    assert findings["dead-bias"].parameters == ("conv2.bias",)
    assert findings["wd-on-bias"].parameters == ("head.bias",)
    assert findings["wd-on-scale-sensitive"].parameters == ("head.weight",)
    assert all(f.why.endswith(".") for f in findings.values())


def test_coupled_adam_finding_and_no_equilibrium(tmp_path: Path) -> None:
    write_run(tmp_path, optimizer="adam")
    report = analyze_run(tmp_path)
    findings = by_id(report)
    assert "wd-on-scale-invariant" not in findings
    assert findings["coupled-l2-adam"].parameters == ("conv1.weight",)
    # coupled decay passes through Adam's normalization: no gradient-free shrink figure
    gamma = {e.parameter: e.figures for e in findings["wd-on-norm-affine"].evidence}
    assert gamma["bn1.weight"]["decay_only_ratio"] is None
    eq = {layer.name: layer.equilibrium for layer in report.layers if layer.equilibrium}
    assert eq["conv1.weight"].status is EquilibriumStatus.NO_EQUILIBRIUM  # coupled L2
    assert eq["conv2.weight"].status is EquilibriumStatus.NO_EQUILIBRIUM  # no decay
    assert "coupled" in (eq["conv1.weight"].prediction.reason or "")


def test_without_optimizer_state_decay_is_unknown(tmp_path: Path) -> None:
    write_run(tmp_path, with_state=False)
    findings = by_id(analyze_run(tmp_path))
    assert set(findings) == {"dead-bias", "decay-unknown"}
    unknown = findings["decay-unknown"]
    assert len(unknown.parameters) == 9
    assert "no optimizer state" in unknown.title


def test_inspect_shows_and_serializes_the_audit(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    write_run(run)
    runner = CliRunner()
    table = runner.invoke(app, ["inspect", str(run)])
    assert table.exit_code == 0, table.output
    assert "Weight-decay audit" in table.stdout
    assert "Optimizer and equilibrium" in table.stdout
    result = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    ids = {f["id"] for f in document["audit"]}
    assert "wd-on-norm-affine" in ids
    layers = {layer["name"]: layer for layer in document["layers"]}
    conv1 = layers["conv1.weight"]
    assert conv1["equilibrium"]["prediction"]["angle"] == pytest.approx(math.sqrt(2e-3 / 1.9))
    assert conv1["points"][-1]["implied_angle"] is not None
    assert layers["head.weight"]["equilibrium"] is None
    markdown = runner.invoke(app, ["inspect", str(run), "--format", "markdown"])
    assert "`wd-on-norm-affine`" in markdown.stdout
