"""The one rules loader `run`, `watch` and `replay` share (detect.pack.load_rules): the
built-in pack plus --rules, a missing path refused before anything loads, and refused rules
said by each command in its own words."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from collector.cli import _engine
from detect.loader import load_paths
from detect.pack import RulesPathError, builtin_rules, load_rules, refusal_lines

ROOT = Path(__file__).resolve().parents[2]
GOOD = """title: Connect To The Test Port
id: 0b5e0f8e-2222-4c1e-9a57-2f1d4c9a0001
logsource: {product: linux, category: network_connection}
detection:
  selection:
    DestinationPort: 47111
  condition: selection
level: high
"""
REFUSED = """title: Names A Field Sandtrace Does Not Have
id: 0b5e0f8e-2222-4c1e-9a57-2f1d4c9a0002
logsource: {product: linux, category: process_creation}
detection:
  selection:
    RegistryKey: HKLM
  condition: selection
level: low
"""


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "good.yml").write_text(GOOD)
    (rules / "refused.yml").write_text(REFUSED)
    return rules


def test_load_rules_is_the_pack_plus_the_users_rules(rules_dir: Path) -> None:
    pack = load_paths([builtin_rules()])
    both = load_rules([str(rules_dir)])
    assert [r.id for r in both.rules] == [r.id for r in pack.rules] + [
        "0b5e0f8e-2222-4c1e-9a57-2f1d4c9a0001"
    ]
    alone = load_rules([str(rules_dir)], builtin=False)
    assert [r.id for r in alone.rules] == ["0b5e0f8e-2222-4c1e-9a57-2f1d4c9a0001"]
    [(where, why)] = alone.refused
    assert where == f"{rules_dir / 'refused.yml'}: Names A Field Sandtrace Does Not Have"
    assert refusal_lines(alone) == [f"rule not loaded: {where}: {why}"]
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
    [line] = refusal_lines(load_rules([str(rules_dir)], builtin=False))
    assert capsys.readouterr().err.splitlines() == [
        f"sandtrace: {line}",
        "sandtrace: WARNING: 1 rule(s) refused (listed above) will raise no alerts; fix or "
        "remove them",
    ]
    with pytest.raises(SystemExit) as exited:
        _engine(_run_args([str(tmp_path / "none")]))
    assert exited.value.code == f"sandtrace: rules path {tmp_path / 'none'} does not exist"


def test_replay_says_each_refusal_and_goes_on(rules_dir: Path, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("")
    run = subprocess.run(
        [sys.executable, "-m", "sandtrace", "replay", "--no-builtin-rules", "--rules",
         str(rules_dir), str(events)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    [line] = refusal_lines(load_rules([str(rules_dir)], builtin=False))
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == [
        f"sandtrace: {line}",
        "sandtrace: replayed 0 events: 0 alerts; 0 recorded alert lines skipped; "
        "0 malformed lines skipped",
    ]
