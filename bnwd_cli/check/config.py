"""`bnwd check` configuration: `[tool.bnwd.check]` in pyproject.toml, `--config FILE`, flags.

Precedence, lowest first: rule defaults, the config file, command-line flags. Unknown rule ids
and unknown keys are errors that name the key: a typo must not silently disable a gate.

    [tool.bnwd.check]
    fail-on = "error"                 # error | warning | info
    include = ['^features\\.']        # layer-name regexes (re.search); default: all layers
    exclude = ['^head\\.']
    disable = ["dead-bias"]

    [tool.bnwd.check.rules.norm-growth]
    severity = "error"
    max-growth = 3.0
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnwd_cli.check.rules import RULES, RULES_BY_ID, RuleSettings, Severity
from bnwd_cli.errors import ConfigError

TOP_KEYS = ("fail-on", "include", "exclude", "disable", "rules")


@dataclass(frozen=True)
class CheckConfig:
    fail_on: Severity
    settings: Mapping[str, RuleSettings]
    """Enabled rules and their effective severity and thresholds."""
    disabled: frozenset[str]
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    source: str = "defaults"

    def selects(self, layer: str) -> bool:
        if self.include and not any(re.search(p, layer) for p in self.include):
            return False
        return not any(re.search(p, layer) for p in self.exclude)


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml from `start` upwards that has a [tool.bnwd.check] table."""
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            table = _read_toml(candidate).get("tool", {}).get("bnwd", {}).get("check")
            if table is not None:
                return candidate
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: is not valid TOML ({exc})") from None


def load_table(config_file: Path | None, start: Path) -> tuple[Mapping[str, Any], str]:
    """The raw check table and where it came from."""
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"--config {config_file}: file does not exist")
        document = _read_toml(config_file)
        table = document.get("tool", {}).get("bnwd", {}).get("check")
        if table is None:
            table = document.get("check", document)
        return table, str(config_file)
    pyproject = find_pyproject(start.resolve())
    if pyproject is None:
        return {}, "defaults"
    return _read_toml(pyproject)["tool"]["bnwd"]["check"], f"{pyproject} [tool.bnwd.check]"


def _severity(value: object, where: str) -> Severity:
    try:
        return Severity(str(value).lower())
    except ValueError:
        raise ConfigError(
            f"{where} = {value!r}: expected one of {', '.join(s.value for s in Severity)}"
        ) from None


def _rule_id(rule: str, where: str) -> str:
    if rule not in RULES_BY_ID:
        raise ConfigError(f"{where}: unknown rule '{rule}' (rules: {', '.join(RULES_BY_ID)})")
    return rule


def _patterns(value: object, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{where}: expected a list of regular expressions")
    for pattern in items:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(
                f"{where}: {pattern!r} is not a valid regular expression ({exc})"
            ) from None
    return tuple(items)


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{where} = {value!r}: expected a number")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{where} = {value!r}: expected a number") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{where} = {value!r}: expected a finite number >= 0")
    return number


def build_config(
    table: Mapping[str, Any],
    *,
    source: str = "defaults",
    fail_on: str | None = None,
    disable: Iterable[str] = (),
    enable: Iterable[str] = (),
    overrides: Iterable[str] = (),
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> CheckConfig:
    """Merge defaults, the config table and the command-line flags into one configuration."""
    prefix = "[tool.bnwd.check]"
    for key in table:
        if key not in TOP_KEYS:
            raise ConfigError(
                f"{source}: unknown key '{key}' in {prefix} (keys: {', '.join(TOP_KEYS)})"
            )
    severity = {rule.id: rule.severity for rule in RULES}
    thresholds = {rule.id: dict(rule.thresholds) for rule in RULES}
    disabled = {
        _rule_id(r, f"{prefix} disable")
        for r in _patterns(table.get("disable", []), f"{prefix} disable")
    }
    rules_table = table.get("rules", {})
    if not isinstance(rules_table, Mapping):
        raise ConfigError(f"{source}: {prefix} rules must be a table of rule ids")
    for rule, values in rules_table.items():
        where = f"{prefix} rules.{_rule_id(rule, f'{prefix} rules')}"
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: {where} must be a table")
        for key, value in values.items():
            _apply(rule, key, value, f"{source}: {where}", severity, thresholds, disabled)

    for rule in disable:
        disabled.add(_rule_id(rule, "--disable"))
    for rule in enable:
        disabled.discard(_rule_id(rule, "--enable"))
    for assignment in overrides:
        target, sep, value = assignment.partition("=")
        rule, dot, key = target.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(
                f"--set {assignment!r}: expected RULE.KEY=VALUE, e.g. norm-growth.max-growth=3"
            )
        _apply(
            _rule_id(rule, f"--set {assignment!r}"),
            key.strip(),
            value.strip(),
            f"--set {assignment!r}",
            severity,
            thresholds,
            disabled,
        )

    chosen = _severity(
        fail_on if fail_on is not None else table.get("fail-on", "error"),
        "--fail-on" if fail_on is not None else f"{prefix} fail-on",
    )
    return CheckConfig(
        fail_on=chosen,
        settings={
            rule.id: RuleSettings(severity[rule.id], thresholds[rule.id])
            for rule in RULES
            if rule.id not in disabled
        },
        disabled=frozenset(disabled),
        include=_patterns(table.get("include", []), f"{prefix} include") + tuple(include),
        exclude=_patterns(table.get("exclude", []), f"{prefix} exclude") + tuple(exclude),
        source=source,
    )


def _apply(
    rule: str,
    key: str,
    value: object,
    where: str,
    severity: dict[str, Severity],
    thresholds: dict[str, dict[str, float]],
    disabled: set[str],
) -> None:
    if key == "severity":
        severity[rule] = _severity(value, f"{where}.severity")
    elif key == "enabled":
        if not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
            raise ConfigError(f"{where}.enabled = {value!r}: expected true or false")
        on = value if isinstance(value, bool) else str(value).lower() == "true"
        (disabled.discard if on else disabled.add)(rule)
    elif key in thresholds[rule]:
        thresholds[rule][key] = _number(value, f"{where}.{key}")
    else:
        known = ", ".join(["severity", "enabled", *thresholds[rule]])
        raise ConfigError(f"{where}: unknown key '{key}' for rule {rule} (keys: {known})")
