"""`sandtrace rules check`, `sandtrace rules test` and `sandtrace replay`, run as the user runs
them (the real entry point, in a subprocess where the exit code and both streams matter),
over the shipped pack and over rule directories written here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api.events import ExecEvent
from api.render import json_line
from detect.engine import Engine
from detect.loader import load_paths
from detect.pack import builtin_rules
from detect.testing import Case, event_from_fields, load_cases, rules_of, run_case
from sandtrace.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
RULE_ID = "0b5e0f8e-1111-4c1e-9a57-2f1d4c9a0001"
RULE = f"""title: Connect To The Test Port
id: {RULE_ID}
status: experimental
description: A connect to port 47111.
logsource: {{product: linux, category: network_connection}}
detection:
  selection:
    DestinationPort: 47111
  condition: selection
level: high
tags: [attack.command-and-control]
"""
REFUSED = """title: Names A Field Sandtrace Does Not Have
id: 0b5e0f8e-1111-4c1e-9a57-2f1d4c9a0002
logsource: {product: linux, category: process_creation}
detection:
  selection:
    RegistryKey: HKLM
  condition: selection
level: low
"""
CASES = f"""cases:
  - rule: '{RULE_ID}'
    fire: true
    name: a connect to the port
    events:
      - category: network_connection
        fields: {{DestinationIp: 127.0.0.1, DestinationPort: 47111}}
  - rule: '{RULE_ID}'
    fire: true
    name: deliberately wrong, another port
    events:
      - category: network_connection
        fields: {{DestinationPort: 80}}
"""


def sandtrace(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandtrace", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        input=stdin,
        timeout=120,
        check=False,
    )


@pytest.fixture
def user_rules(tmp_path: Path) -> Path:
    rules = tmp_path / "my-rules"
    (rules / "tests").mkdir(parents=True)
    (rules / "port.yml").write_text(RULE)
    (rules / "tests" / "port.yml").write_text(CASES)
    return rules


# -- rules test -----------------------------------------------------------------------------


def test_the_shipped_pack_passes_its_own_cases() -> None:
    shipped = builtin_rules()
    cases = [c for f in sorted((shipped / "tests").glob("*.yml")) for c in load_cases(f)]
    files = len(list((shipped / "tests").glob("*.yml")))
    run = sandtrace("rules", "test", str(shipped))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines() == [
        f"sandtrace: {len(cases)} cases in {files} files: {len(cases)} passed, 0 failed; "
        "0 case files unreadable, 0 rules refused"
    ]
    assert len(cases) > 300


def test_a_failing_case_is_named_with_what_was_expected_and_got(user_rules: Path) -> None:
    run = sandtrace("rules", "test", str(user_rules))
    assert run.returncode == 1, run.stderr
    case_file = user_rules / "tests" / "port.yml"
    assert run.stdout.splitlines() == [
        f"FAIL {case_file}: deliberately wrong, another port: rule {RULE_ID} "
        "(Connect To The Test Port): expected fire, got silent",
        "sandtrace: 2 cases in 1 files: 1 passed, 1 failed; 0 case files unreadable, "
        "0 rules refused",
    ]


def test_passing_cases_exit_zero_and_json_lists_failures(user_rules: Path) -> None:
    case_file = user_rules / "tests" / "port.yml"
    case_file.write_text(
        CASES.replace("fire: true\n    name: deliberately", "fire: false\n    name: deliberately")
    )
    run = sandtrace("rules", "test", str(user_rules))
    assert run.returncode == 0, run.stdout
    assert "2 passed, 0 failed" in run.stdout
    # the same case made to fail on a silent rule, reported as JSON with what fired
    case_file.write_text(CASES.replace("DestinationPort: 80", "DestinationPort: 47111"))
    case_file.write_text(
        case_file.read_text().replace(
            "fire: true\n    name: deliberately", "fire: false\n    name: deliberately"
        )
    )
    run = sandtrace("rules", "test", "--json", str(user_rules))
    assert run.returncode == 1
    report = json.loads(run.stdout)
    assert report["cases"] == 2 and report["passed"] == 1
    assert report["failed"] == [
        {
            "file": str(case_file),
            "case": "deliberately wrong, another port",
            "rule": RULE_ID,
            "title": "Connect To The Test Port",
            "expected": "silent",
            "got": "fired",
            "fired": [RULE_ID],
        }
    ]


def test_cases_beside_a_rule_file_and_given_with_cases(user_rules: Path, tmp_path: Path) -> None:
    run = sandtrace("rules", "test", str(user_rules / "port.yml"))
    assert run.returncode == 1 and "2 cases in 1 files" in run.stdout
    more = tmp_path / "more.yml"
    more.write_text(CASES.split("  - rule:", maxsplit=2)[1].join(["cases:\n  - rule:", ""]))
    run = sandtrace("rules", "test", str(user_rules), "--cases", str(more))
    assert "3 cases in 2 files: 2 passed, 1 failed" in run.stdout


def test_a_case_for_a_rule_not_loaded_fails_even_when_it_expects_silence(
    user_rules: Path,
) -> None:
    (user_rules / "tests" / "port.yml").write_text(
        "cases:\n"
        + "  - rule: 'no-such-rule'\n    fire: false\n    name: typo\n    events:\n"
        + "      - category: network_connection\n        fields: {DestinationPort: 80}\n"
    )
    run = sandtrace("rules", "test", str(user_rules))
    assert run.returncode == 1
    assert run.stdout.splitlines()[0] == (
        f"FAIL {user_rules / 'tests' / 'port.yml'}: typo: rule no-such-rule: expected silent, "
        "got no such rule loaded"
    )


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("cases: [", "not YAML"),
        ("- a list", "expected a map with `cases:`"),
        (f"cases:\n  - rule: '{RULE_ID}'\n    fire: yes please\n    events: []\n", "`fire`"),
        (f"cases:\n  - rule: '{RULE_ID}'\n    fire: true\n    events: []\n", "`events`"),
        (
            f"cases:\n  - rule: '{RULE_ID}'\n    fire: true\n    events:\n"
            "      - category: network_connection\n        fields: {Registry: x}\n",
            "test case fields not supported: ['Registry']",
        ),
        (
            f"cases:\n  - rule: '{RULE_ID}'\n    fire: true\n    events:\n"
            "      - category: network_connection\n        fields: {DestinationPort: http}\n",
            "event 0: invalid literal",
        ),
    ],
)
def test_a_case_file_that_cannot_run_is_an_error_not_a_traceback(
    user_rules: Path, text: str, said: str
) -> None:
    (user_rules / "tests" / "port.yml").write_text(text)
    run = sandtrace("rules", "test", str(user_rules))
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    first = run.stdout.splitlines()[0]
    assert first.startswith(f"ERROR {user_rules / 'tests' / 'port.yml'}: ") and said in first
    assert "1 case files unreadable" in run.stdout


def test_no_cases_and_bad_paths_exit_two(tmp_path: Path) -> None:
    (tmp_path / "port.yml").write_text(RULE)
    run = sandtrace("rules", "test", str(tmp_path))
    assert run.returncode == 2
    assert run.stderr.startswith("sandtrace: no test cases: put case files in a tests/ directory")
    for argv in (
        ["rules", "test", str(tmp_path / "missing")],
        ["rules", "check", str(tmp_path / "missing")],
        ["rules", "test", str(tmp_path), "--cases", str(tmp_path / "missing.yml")],
    ):
        run = sandtrace(*argv)
        assert run.returncode == 2, argv
        assert run.stderr.startswith("sandtrace: ") and "missing" in run.stderr
        assert "Traceback" not in run.stderr


def test_each_case_runs_over_the_rules_that_decide_it() -> None:
    """rules test runs a case over rules_of(pack, its rule), not the whole pack: whether the
    rule alerts is the same (the shipped pack passes through the command above, and through
    an engine over every rule in test_rule_pack), a building block stays silent because the
    correlations that count it come along, and a failing case names all that alerted."""
    pack = load_paths([builtin_rules()])
    for block in Engine(pack).silent:
        assert block in Engine(rules_of(pack, block)).silent
    for corr in pack.correlations:
        scope = rules_of(pack, corr.id)
        assert corr in scope.correlations
        assert {r.name for r in scope.rules} | {r.id for r in scope.rules} >= set(corr.rules)
    cases = [c for f in sorted((builtin_rules() / "tests").glob("*.yml")) for c in load_cases(f)]
    hit = next(c for c in cases if c.fire and c.rule not in Engine(pack).silent)
    other = next(r.id for r in pack.rules if r.id != hit.rule and r.category == "network_listen")
    wrong = Case(rule=other, fire=True, name="x", events=hit.events, source="x.yml")
    result = run_case(pack, wrong, rules_of(pack, other))
    assert not result.passed
    assert hit.rule in result.fired  # not in the scope of `other`: from the whole pack


# -- rules check ----------------------------------------------------------------------------


def test_check_lists_what_loaded_and_what_was_refused(user_rules: Path) -> None:
    (user_rules / "bad.yml").write_text(REFUSED)
    run = sandtrace("rules", "check", str(user_rules))
    assert run.returncode == 1, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["ID", "LEVEL", "LOG", "SOURCE", "TITLE"]
    assert lines[1].split(None, 3) == [
        RULE_ID,
        "high",
        "network_connection",
        "Connect To The Test Port",
    ]
    assert lines[2].startswith(
        f"REFUSED {user_rules / 'bad.yml'}: Names A Field Sandtrace Does Not Have: "
    )
    assert "RegistryKey" in lines[2]
    assert lines[3] == "sandtrace: 1 rules and 0 correlations loaded, 1 refused"
    run = sandtrace("rules", "check", "--json", str(user_rules))
    report = json.loads(run.stdout)
    assert [(r["id"], r["level"], r["logsource"], r["alerts"]) for r in report["rules"]] == [
        (RULE_ID, "high", {"product": "linux", "category": "network_connection"}, True)
    ]
    assert [r["where"] for r in report["refused"]] == [
        f"{user_rules / 'bad.yml'}: Names A Field Sandtrace Does Not Have"
    ]


def test_check_of_the_shipped_pack_loads_everything() -> None:
    pack = load_paths([builtin_rules()])
    run = sandtrace("rules", "check", "--json", str(builtin_rules()))
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert [r["id"] for r in report["rules"]] == [r.id for r in pack.rules]
    assert [c["id"] for c in report["correlations"]] == [c.id for c in pack.correlations]
    assert report["refused"] == []
    silent = Engine(pack).silent
    assert {r["id"] for r in report["rules"] if not r["alerts"]} == silent


def test_a_directory_without_rules_is_a_usage_error(tmp_path: Path) -> None:
    run = sandtrace("rules", "check", str(tmp_path))
    assert run.returncode == 2
    assert run.stderr == f"sandtrace: no .yml/.yaml rule files in {tmp_path}\n"


# -- replay ---------------------------------------------------------------------------------


def _connect(pid: int, at: float, port: int = 47111) -> str:
    fields = {"ProcessId": pid, "DestinationIp": "127.0.0.1", "DestinationPort": port}
    return json_line(event_from_fields("network_connection", fields, at=at))


def test_replay_raises_folds_and_skips_what_is_not_an_event(
    user_rules: Path, tmp_path: Path
) -> None:
    """Three connects by one process fold into an alert and a repeat summary at the end, one
    by another process is an alert of its own; the recorded alert line is skipped, and every
    malformed line is named by its number while the rest is replayed."""
    shm = event_from_fields("process_creation", {"ProcessId": 7, "Image": "/dev/shm/x"}, 0.5)
    assert isinstance(shm, ExecEvent)
    recorded = json.loads(_connect(1, 0))
    lines = [
        _connect(100, 0.0),
        "not json",
        _connect(100, 1.0),
        json.dumps({"kind": "alert", "title": "recorded at the time"}),
        '{"kind": "connect", "time_ns": "soon"}',
        _connect(100, 2.0),
        "",
        json.dumps({**recorded, "process": {**recorded["process"], "argv": ["\\xff"]}}),
        _connect(200, 3.0),
        json_line(shm),
        "[1, 2",
    ]
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(lines) + "\n")
    alerts = tmp_path / "alerts.jsonl"
    run = sandtrace(
        "replay", "--no-builtin-rules", "--rules", str(user_rules), "--alerts", str(alerts),
        "--json", str(events),
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    got = [json.loads(ln) for ln in run.stdout.splitlines()]
    assert got == [json.loads(ln) for ln in alerts.read_text().splitlines()]
    assert [(a["rule_id"], a["process"]["pid"], a["count"], a["repeat"]) for a in got] == [
        (RULE_ID, 100, 1, False),
        (RULE_ID, 1, 1, False),
        (RULE_ID, 200, 1, False),
        (RULE_ID, 100, 3, True),
    ]
    assert got[3]["folds"] == got[0]["alert_id"]
    assert run.stderr.splitlines() == [
        f"sandtrace: {events}:2: skipped, not JSON: Expecting value: line 1 column 1 (char 0)",
        f"sandtrace: {events}:5: skipped, not an event: connect event has no mono_ns",
        f"sandtrace: {events}:11: skipped, not JSON: "
        "Expecting ',' delimiter: line 1 column 6 (char 5)",
        "sandtrace: replayed 6 events: 4 alerts; 1 recorded alert lines skipped; 3 malformed "
        f"lines skipped ({events}:2, {events}:5, {events}:11)",
    ]


def test_replay_reads_stdin_and_prints_text_with_the_built_in_pack(tmp_path: Path) -> None:
    shm = event_from_fields("process_creation", {"ProcessId": 7, "Image": "/dev/shm/x"}, 0.5)
    run = sandtrace(
        "replay", "--color", "never", "--width", "120", "-", stdin=json_line(shm) + "\n"
    )
    assert run.returncode == 0, run.stderr
    header, line, detail = run.stdout.splitlines()  # an alert: its line and what it did
    assert detail.split() == ["cmd:", "/dev/shm/x"]
    assert header.split() == ["TIME", "KIND", "PID", "COMM", "DETAIL"]
    assert line.split()[1:4] == ["ALERT", "7", "test"]
    assert "[medium] Execution From A Temporary" in line
    assert run.stderr.endswith("replayed 1 events: 1 alerts; 0 recorded alert lines skipped; "
                               "0 malformed lines skipped\n")  # fmt: skip


def test_replay_egress_allow_list_and_usage_errors(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(_connect(5, 0, port=443).replace("127.0.0.1", "192.0.2.9") + "\n")
    run = sandtrace("replay", "--json", "--egress-allow", "198.51.100.0/24", str(events))
    assert [json.loads(ln)["rule_id"] for ln in run.stdout.splitlines()] == [
        "sandtrace-egress-allow-list"
    ]
    for argv, said in (
        (["replay", str(tmp_path / "gone.jsonl")], "events file"),
        (["replay", "--rules", str(tmp_path / "none"), str(events)], "rules path"),
        (["replay", "--egress-allow", "not a net", str(events)], "egress allow-list entry"),
        (["replay", "-", "-"], "stdin (-) can be read only once"),
        (["replay", "--width", "0", str(events)], "--width"),
    ):
        run = sandtrace(*argv)
        assert run.returncode == 2, argv
        assert run.stderr.startswith("sandtrace: ") and said in run.stderr, run.stderr
        assert "Traceback" not in run.stderr


def test_the_top_level_parser_knows_the_subcommands() -> None:
    parser = build_parser()
    args = parser.parse_args(["rules", "test", "d", "--cases", "c.yml", "--json"])
    assert (args.command, args.rules_command, args.paths, args.cases) == (
        "rules",
        "test",
        ["d"],
        ["c.yml"],
    )
    args = parser.parse_args(["replay", "-", "--no-builtin-rules", "--rules", "r"])
    assert (args.files, args.no_builtin_rules, args.rules) == (["-"], True, ["r"])
