"""`bnwd check`: the analysis of `inspect` as a CI gate with rules, thresholds and exit codes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bnwd_cli.check.config import CheckConfig, build_config, load_table
from bnwd_cli.check.rules import RULES, RULES_BY_ID, Finding, Rule, RuleSettings, Severity
from bnwd_cli.metrics.dynamics import (
    InspectOptions,
    LayerDynamics,
    Progress,
    RunDynamics,
    analyze_run,
)

__all__ = [
    "RULES",
    "RULES_BY_ID",
    "CheckConfig",
    "CheckReport",
    "Finding",
    "Rule",
    "RuleOutcome",
    "RuleSettings",
    "Severity",
    "build_config",
    "evaluate_rules",
    "load_table",
    "run_check",
]


@dataclass(frozen=True)
class RuleOutcome:
    rule: Rule
    settings: RuleSettings | None
    """None when the rule is disabled."""
    findings: tuple[Finding, ...]

    def fails(self, fail_on: Severity) -> bool:
        return self.settings is not None and any(
            f.severity.rank >= fail_on.rank for f in self.findings
        )


@dataclass(frozen=True)
class CheckReport:
    run: RunDynamics
    outcomes: tuple[RuleOutcome, ...]
    config: CheckConfig

    @property
    def failed(self) -> tuple[RuleOutcome, ...]:
        return tuple(o for o in self.outcomes if o.fails(self.config.fail_on))

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def findings(self) -> tuple[Finding, ...]:
        return tuple(f for o in self.outcomes for f in o.findings)


def evaluate_rules(run: RunDynamics, config: CheckConfig) -> tuple[RuleOutcome, ...]:
    layers: Sequence[LayerDynamics] = [layer for layer in run.layers if config.selects(layer.name)]
    outcomes = []
    for rule in RULES:
        settings = config.settings.get(rule.id)
        findings = tuple(rule.evaluate(run, layers, settings, rule.id)) if settings else ()
        outcomes.append(RuleOutcome(rule, settings, findings))
    return tuple(outcomes)


def run_check(
    path: Path, config: CheckConfig, options: InspectOptions, progress: Progress | None = None
) -> CheckReport:
    """Analyze the run (unreadable checkpoints are fatal here) and apply the rules."""
    run = analyze_run(path, replace(options, strict=True), progress)
    return CheckReport(run, evaluate_rules(run, config), config)
