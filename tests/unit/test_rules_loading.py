"""The one rules loader `run`, `watch` and `replay` share (detect.pack.load_rules): the
built-in pack plus --rules, a missing path refused before anything loads, and refused rules
said by each command in its own words."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from collector.cli import _engine
from detect.loader import load_paths
from detect.pack import RulesPathError, builtin_rules, load_rules, refusal_lines
from tests.unit.test_rules_cli import REFUSED, RULE, RULE_ID, sandtrace


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "good.yml").write_text(RULE)
    (rules / "refused.yml").write_text(REFUSED)
    return rules


def _said(rules_dir: Path) -> str:
    """The line every command says for the refused rule of `rules_dir`."""
    return (
        f"sandtrace: rule not loaded: {rules_dir / 'refused.yml'}: Names A Field Sandtrace "
        "Does Not Have: field 'RegistryKey' is not provided for this log source"
    )


def test_load_rules_is_the_pack_plus_the_users_rules(rules_dir: Path) -> None:
    pack = load_paths([builtin_rules()])
    both = load_rules([str(rules_dir)])
    assert [r.id for r in both.rules] == [r.id for r in pack.rules] + [RULE_ID]
    alone = load_rules([str(rules_dir)], builtin=False)
    assert [r.id for r in alone.rules] == [RULE_ID]
    [(where, why)] = alone.refused
    assert where == f"{rules_dir / 'refused.yml'}: Names A Field Sandtrace Does Not Have"
    assert ["sandtrace: " + line for line in refusal_lines(alone)] == [_said(rules_dir)]
    assert why == "field 'RegistryKey' is not provided for this log source"


def test_a_missing_path_is_refused_before_anything_loads(tmp_path: Path) -> None:
    missing = tmp_path / "none"
    with pytest.raises(RulesPathError, match=f"^rules path {missing} does not exist$"):
        load_rules([str(missing)])


def _run_args(rules: list[str]) -> argparse.Namespace:
    return argparse.Namespace(no_detect=False, server=None, no_builtin_rules=True, rules=rules)


def test_run_says_each_refusal_and_warns(
    rules_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _engine(_run_args([str(rules_dir)]))
    assert engine is not None
    assert capsys.readouterr().err.splitlines() == [
        _said(rules_dir),
        "sandtrace: WARNING: 1 rule(s) refused (listed above) will raise no alerts; fix or "
        "remove them",
    ]
    with pytest.raises(SystemExit) as exited:
        _engine(_run_args([str(tmp_path / "none")]))
    assert exited.value.code == f"sandtrace: rules path {tmp_path / 'none'} does not exist"


def test_replay_says_each_refusal_and_goes_on(rules_dir: Path, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("")
    run = sandtrace("replay", "--no-builtin-rules", "--rules", str(rules_dir), str(events))
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == [
        _said(rules_dir),
        "sandtrace: replayed 0 events: 0 alerts; 0 recorded alert lines skipped; "
        "0 malformed lines skipped",
    ]
