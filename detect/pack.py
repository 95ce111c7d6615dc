"""The built-in rule pack shipped with sandtrace, and the rules `run`, `watch` and `replay`
load: the pack plus the user's --rules. Nothing here prints: the refusals come back in the
RuleSet and the command says them its own way."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from api.resources import shipped
from detect.loader import load_paths
from detect.ruleset import RuleSet


class RulesPathError(ValueError):
    """A rules path that does not exist; the message names it."""


def builtin_rules() -> Path:
    """The directory of the built-in Sigma rules (their test cases in tests/ below it)."""
    return shipped(__file__, "rules")


def load_rules(user: Iterable[str], builtin: bool = True) -> RuleSet:
    """The built-in pack (unless `builtin` is false) and the user's rule files and
    directories; RulesPathError for the first path that does not exist, before any loads.
    A rule that cannot be evaluated is in the result's `refused`, not raised."""
    paths = ([builtin_rules()] if builtin else []) + [Path(r) for r in user]
    for path in paths:
        if not path.exists():
            raise RulesPathError(f"rules path {path} does not exist")
    return load_paths(paths)


def refusal_lines(rules: RuleSet) -> list[str]:
    """One line per refused rule (without the `sandtrace: ` prefix), in load order."""
    return [f"rule not loaded: {where}: {why}" for where, why in rules.refused]
