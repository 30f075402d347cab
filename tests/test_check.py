"""`bnwd check`: every rule fires on a run built to trigger it and stays silent on a healthy one,
thresholds at their edges, configuration precedence, each output format parsed back, and every
exit code through the CLI.

The runs are hand-built so that the expected numbers are known in closed form: a conv weight
whose norm is scaled by a chosen factor, a BatchNorm gamma scaled by another, an SGD state with
chosen learning rate and weight decay per group.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnwd_cli.check import build_config, evaluate_rules, run_check
from bnwd_cli.check.rules import Severity
from bnwd_cli.cli.app import app
from bnwd_cli.errors import ConfigError
from bnwd_cli.metrics.dynamics import InspectOptions, analyze_run

runner = CliRunner()

PARAMS = ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "head.weight", "head.bias")


def make_run(
    folder: Path,
    *,
    conv_scale: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
    gamma_scale: tuple[float, ...] | None = None,
    bn_decay: float = 0.0,
    conv_bias: bool = False,
    nan_at: int | None = None,
    lr: float = 0.1,
    steps_per_checkpoint: int = 100,
) -> Path:
    """Checkpoints of a conv -> BN -> head model with prescribed conv-norm and gamma factors.

    The conv weight at checkpoint t is conv_scale[t] * (w0 + 0.01 * t * noise) renormalized to
    |w0|, so the relative step per interval is about the same throughout (healthy) unless the
    scale changes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(8, 4, 3, 3, generator=generator)
    gamma_scale = gamma_scale or (1.0,) * len(conv_scale)
    for t, scale in enumerate(conv_scale):
        direction = w0 + 0.05 * t * torch.randn(8, 4, 3, 3, generator=generator)
        direction = direction * (w0.norm() / direction.norm())
        model = {
            "conv.weight": scale * direction,
            "bn.weight": torch.full((8,), gamma_scale[t]),
            "bn.bias": torch.full((8,), 0.1),
            "bn.running_mean": torch.zeros(8),
            "bn.running_var": torch.ones(8),
            "bn.num_batches_tracked": torch.tensor(t),
            "head.weight": torch.randn(3, 8, generator=generator),
            "head.bias": torch.zeros(3),
        }
        if conv_bias:
            model = {"conv.weight": model.pop("conv.weight"), "conv.bias": torch.zeros(8), **model}
        if nan_at is not None and t >= nan_at:
            model["head.weight"][0, 0] = float("nan")
        names = [
            n
            for n in model
            if n.split(".")[-1] not in ("running_mean", "running_var", "num_batches_tracked")
        ]
        bn_names = [n for n in names if n.startswith("bn.")]
        other = [n for n in names if n not in bn_names]
        optimizer = {
            "state": {},
            "param_groups": [
                {
                    "lr": lr,
                    "momentum": 0.9,
                    "dampening": 0,
                    "nesterov": False,
                    "weight_decay": 5e-4,
                    "params": list(range(len(other))),
                    "param_names": other,
                },
                {
                    "lr": lr,
                    "momentum": 0.9,
                    "dampening": 0,
                    "nesterov": False,
                    "weight_decay": bn_decay,
                    "params": list(range(len(other), len(names))),
                    "param_names": bn_names,
                },
            ],
        }
        torch.save(
            {"model": model, "optimizer": optimizer, "step": t * steps_per_checkpoint},
            folder / f"step_{t:04d}.pt",
        )
    return folder


def findings_of(folder: Path, **config: object) -> dict[str, list[str]]:
    run = analyze_run(folder, InspectOptions())
    outcomes = evaluate_rules(run, build_config({}, **config))  # type: ignore[arg-type]
    return {o.rule.id: [f.message for f in o.findings] for o in outcomes}


def test_healthy_run_has_no_error_or_warning_findings(tmp_path: Path) -> None:
    found = findings_of(make_run(tmp_path / "run"))
    assert {rule: msgs for rule, msgs in found.items() if msgs} == {}


@pytest.mark.parametrize(
    ("growth", "fires"),
    [(1.0 / math.sqrt(0.49), True), (1.0 / math.sqrt(0.51), False)],
)
def test_effective_lr_collapse_edge(tmp_path: Path, growth: float, fires: bool) -> None:
    # SGD: effective-LR factor = (|w0|/|wT|)^2. With four checkpoints the early window is the
    # second one (scale 1) and the late one the last (scale `growth`): 1/growth^2 vs 0.5.
    found = findings_of(make_run(tmp_path / "run", conv_scale=(1.0, 1.0, 1.0, growth)))
    assert bool(found["effective-lr-collapse"]) is fires
    if fires:
        assert "conv.weight" in found["effective-lr-collapse"][0]
        assert "0.49x" in found["effective-lr-collapse"][0]


@pytest.mark.parametrize(("growth", "fires"), [(1.06, True), (1.04, False)])
def test_norm_growth_edge(tmp_path: Path, growth: float, fires: bool) -> None:
    # The growth from init to the second checkpoint (x1.5) is the start-up transient the rule
    # ignores; what counts is second -> last against max-growth 1.05.
    found = findings_of(make_run(tmp_path / "run", conv_scale=(1.0, 1.5, 1.5, 1.5 * growth)))
    assert bool(found["norm-growth"]) is fires
    if fires:
        assert f"x{growth:.2f} from the early to the late part" in found["norm-growth"][0]


def test_norm_affine_decay_names_the_parameters(tmp_path: Path) -> None:
    found = findings_of(make_run(tmp_path / "run", bn_decay=1e-4))
    assert found["norm-affine-decay"] == [
        "weight decay 0.0001 on 2 normalization gamma/beta parameters"
    ]
    assert findings_of(make_run(tmp_path / "clean", bn_decay=0.0))["norm-affine-decay"] == []


@pytest.mark.parametrize(("fraction", "fires"), [(0.49, True), (0.51, False)])
def test_gamma_collapse_edge(tmp_path: Path, fraction: float, fires: bool) -> None:
    found = findings_of(make_run(tmp_path / "run", gamma_scale=(1.0, 0.9, 0.7, fraction)))
    assert bool(found["gamma-collapse"]) is fires


def test_dead_bias_and_nonfinite(tmp_path: Path) -> None:
    found = findings_of(make_run(tmp_path / "run", conv_bias=True, nan_at=2))
    assert len(found["dead-bias"]) == 1 and "conv.bias" in found["dead-bias"][0]
    assert len(found["nonfinite-weights"]) == 1
    assert "head.weight" in found["nonfinite-weights"][0]
    assert "step_0002.pt" in found["nonfinite-weights"][0]


def test_layer_include_exclude(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "run", conv_scale=(1.0, 1.5, 2.0, 3.0))
    assert findings_of(folder, exclude=[r"^conv\."])["norm-growth"] == []
    assert findings_of(folder, include=[r"^conv\."])["norm-growth"]


# --- configuration -------------------------------------------------------------------------


def test_config_precedence_defaults_file_flags() -> None:
    table = {
        "fail-on": "warning",
        "rules": {"norm-growth": {"max-growth": 3.0, "severity": "error"}},
    }
    from_file = build_config(table)
    assert from_file.fail_on is Severity.WARNING
    assert from_file.settings["norm-growth"].thresholds["max-growth"] == 3.0
    assert from_file.settings["norm-growth"].severity is Severity.ERROR
    flags = build_config(table, fail_on="info", overrides=["norm-growth.max-growth=4"])
    assert flags.fail_on is Severity.INFO
    assert flags.settings["norm-growth"].thresholds["max-growth"] == 4.0
    # a rule disabled in the file can be enabled again from the command line
    off = build_config({"disable": ["dead-bias"]})
    assert "dead-bias" not in off.settings
    assert "dead-bias" in build_config({"disable": ["dead-bias"]}, enable=["dead-bias"]).settings


@pytest.mark.parametrize(
    ("table", "overrides", "named"),
    [
        ({"rules": {"no-such-rule": {}}}, [], "no-such-rule"),
        ({"rules": {"norm-growth": {"max-grwth": 2}}}, [], "max-grwth"),
        ({"fail_on": "error"}, [], "fail_on"),
        ({}, ["norm-growth.max-growth=abc"], "abc"),
        ({}, ["nonsense"], "RULE.KEY=VALUE"),
        ({"fail-on": "fatal"}, [], "fatal"),
        ({"disable": ["typo-rule"]}, [], "typo-rule"),
    ],
)
def test_config_errors_name_the_key(table: dict, overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        build_config(table, overrides=overrides)


def test_pyproject_found_from_current_folder_upwards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path / "runs" / "a", conv_scale=(1.0, 1.2, 1.4, 1.55))
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[tool.bnwd.check]\nfail-on = "warning"\n', encoding="utf-8"
    )
    monkeypatch.chdir(project / "sub")
    result = runner.invoke(app, ["check", str(run)])
    assert result.exit_code == 1  # the warning-level norm-growth finding fails the gate
    assert "norm-growth" in result.stdout
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["check", str(run)]).exit_code == 0


# --- outputs and exit codes ------------------------------------------------------------------


@pytest.fixture
def failing_run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "bad", conv_scale=(1.0, 1.5, 2.0, 2.5), bn_decay=1e-4)


def test_exit_codes(tmp_path: Path, failing_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    healthy = make_run(tmp_path / "good")
    assert runner.invoke(app, ["check", str(healthy)]).exit_code == 0
    assert runner.invoke(app, ["check", str(failing_run)]).exit_code == 1
    bad_usage = runner.invoke(app, ["check", str(healthy), "--disable", "nope"])
    assert bad_usage.exit_code == 2
    assert "unknown rule 'nope'" in bad_usage.stderr
    (healthy / "step_0009.pt").write_bytes(b"PK\x03\x04 truncated")
    unreadable = runner.invoke(app, ["check", str(healthy)])
    assert unreadable.exit_code == 2
    assert "step_0009.pt" in unreadable.stderr
    assert unreadable.stdout == ""

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("bnwd_cli.check.run_check", explode)
    internal = runner.invoke(app, ["check", str(failing_run)])
    assert internal.exit_code == 3  # a crash must not pass for "gate failed"
    assert "internal error" in internal.stderr and "Traceback" not in internal.stderr


def test_json_output(failing_run: Path) -> None:
    result = runner.invoke(app, ["check", str(failing_run), "--format", "json"])
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["schema_version"] == 1
    assert document["passed"] is False
    rules = {r["id"]: r for r in document["rules"]}
    assert rules["effective-lr-collapse"]["status"] == "FAIL"
    finding = rules["effective-lr-collapse"]["findings"][0]
    assert finding["layers"] == ["conv.weight"]
    # early window = second checkpoint (x1.5), late = last (x2.5): (1.5/2.5)^2
    assert finding["evidence"]["effective_lr_factor_change"] == pytest.approx(
        (1.5 / 2.5) ** 2,
        rel=1e-6,  # float32 weights
    )


def test_junit_output_counts_failures(failing_run: Path) -> None:
    result = runner.invoke(app, ["check", str(failing_run), "-f", "junit", "--fail-on", "warning"])
    assert result.exit_code == 1
    root = ET.fromstring(result.stdout)
    suite = root.find("testsuite")
    assert suite is not None
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    failed = {name for name, c in cases.items() if c.find("failure") is not None}
    assert failed == {"effective-lr-collapse", "norm-growth", "norm-affine-decay"}
    assert suite.get("failures") == "3"
    assert suite.get("tests") == str(len(cases)) == "7"


def test_markdown_and_github_outputs(failing_run: Path) -> None:
    md = runner.invoke(app, ["check", str(failing_run), "-f", "markdown"]).stdout
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(rows) == 7  # one row per rule
    assert any(r.startswith("| `effective-lr-collapse` | error | FAIL |") for r in rows)
    gh = runner.invoke(app, ["check", str(failing_run), "-f", "github"]).stdout.splitlines()
    assert gh[-1].startswith("::error title=bnwd check::FAILED")
    assert any(line.startswith("::error title=bnwd effective-lr-collapse") for line in gh)
    assert any(line.startswith("::warning title=bnwd norm-growth") for line in gh)


def test_disable_and_set_from_the_command_line(failing_run: Path) -> None:
    off = runner.invoke(app, ["check", str(failing_run), "--disable", "effective-lr-collapse"])
    assert off.exit_code == 0
    relaxed = runner.invoke(
        app, ["check", str(failing_run), "--set", "effective-lr-collapse.min-fraction=0.1"]
    )
    assert relaxed.exit_code == 0  # (1.5/2.5)^2 = 0.36 > 0.1
    stricter = runner.invoke(
        app,
        [
            "check",
            str(failing_run),
            "--set",
            "dead-bias.severity=error",
            "--disable",
            "effective-lr-collapse",
        ],
    )
    assert (
        stricter.exit_code == 0
    )  # no dead bias in this run, so raising its severity changes nothing


def test_run_check_is_strict(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "run")
    (folder / "step_0005.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(Exception, match=r"step_0005\.pt"):
        run_check(folder, build_config({}), InspectOptions())


SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


def test_defaults_pass_the_healthy_sample_and_fail_noconvl2() -> None:
    healthy = runner.invoke(app, ["check", str(SAMPLES / "sgd_wd_all"), "-f", "json"])
    assert healthy.exit_code == 0, healthy.stdout
    broken = runner.invoke(app, ["check", str(SAMPLES / "sgd_no_conv_wd"), "-f", "json"])
    assert broken.exit_code == 1
    rules = {r["id"]: r for r in json.loads(broken.stdout)["rules"]}
    collapsed = {f["layers"][0] for f in rules["effective-lr-collapse"]["findings"]}
    # the three conv weights are the ones trained without decay in the NoConvL2 run
    assert collapsed == {"conv1.weight", "conv2.weight", "conv3.weight"}


def rotating_run(folder: Path, angle_per_step: float, steps: range) -> Path:
    """Checkpoints one optimizer step apart whose conv rows each turn by `angle_per_step`.

    Plain SGD, lr 0.1, wd 0.1, no momentum: theory's equilibrium angle is sqrt(2*lr*wd) =
    0.1414 rad per step and its relaxation time (1-m)/(4*lr*wd) = 25 steps.
    """
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(8, 36, generator=generator)
    b = torch.randn(8, 36, generator=generator)
    a = a / a.norm(dim=1, keepdim=True)
    b = b - (b * a).sum(dim=1, keepdim=True) * a
    b = b / b.norm(dim=1, keepdim=True)
    names = ["conv.weight", "bn.weight", "bn.bias", "head.weight", "head.bias"]
    for step in steps:
        theta = angle_per_step * step
        conv = (math.cos(theta) * a + math.sin(theta) * b).reshape(8, 4, 3, 3)
        model = {
            "conv.weight": conv,
            "bn.weight": torch.ones(8),
            "bn.bias": torch.zeros(8),
            "bn.running_mean": torch.zeros(8),
            "bn.running_var": torch.ones(8),
            "head.weight": torch.ones(3, 8),
            "head.bias": torch.zeros(3),
        }
        group = {
            "lr": 0.1,
            "momentum": 0.0,
            "dampening": 0,
            "nesterov": False,
            "weight_decay": 0.1,
            "params": list(range(5)),
            "param_names": names,
        }
        torch.save(
            {"model": model, "optimizer": {"state": {}, "param_groups": [group]}, "step": step},
            folder / f"step_{step:04d}.pt",
        )
    return folder


@pytest.mark.parametrize(
    ("angle", "steps", "fires"),
    [
        (0.01, range(100, 106), True),  # x0.07 of the prediction, 4x the relaxation time
        (0.14, range(100, 106), False),  # at the prediction
        (0.01, range(30, 36), False),  # too early to judge: 1.4x the relaxation time
    ],
)
def test_equilibrium_rule(tmp_path: Path, angle: float, steps: range, fires: bool) -> None:
    found = findings_of(rotating_run(tmp_path / "run", angle, steps))
    assert bool(found["equilibrium"]) is fires
    if fires:
        assert "conv.weight" in found["equilibrium"][0]
        assert "8.1 deg" in found["equilibrium"][0]  # predicted sqrt(0.02) rad = 8.10 deg
