"""`sandtrace policy suggest`: the exact allow-list proposed from recorded connects, per
sandbox with counts, loopback and unix sockets left out with a note (a real run's: in
tests/e2e/test_policy_suggest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from api.events import ConnectEvent
from api.render import json_line
from sandtrace.cli import main
from tests.unit.test_schemas import common


def connect(sandbox: str, daddr: str, dport: int, **kw: Any) -> ConnectEvent:
    fields: dict[str, Any] = {
        "protocol": "tcp",
        "family": "ipv6" if ":" in daddr else "ipv4",
        "daddr": daddr,
        "dport": dport,
        "outcome": "success",
    }
    fields.update(kw)
    return ConnectEvent(**common(sandbox=sandbox), **fields)


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    events = [
        *[connect("box-a", "192.0.2.10", 443) for _ in range(3)],
        connect("box-a", "192.0.2.10", 80),
        connect("box-a", "192.0.2.10", 443, outcome="repeated", repeats=5),  # a kernel count
        connect("box-a", "192.0.2.20", 53, protocol="udp"),
        connect("box-a", "127.0.0.1", 8000),
        connect("box-a", "::ffff:127.0.0.1", 8000),
        connect("box-a", "", 0, protocol="unix", family="unix", path=b"/run/x.sock"),
        connect("box-b", "2001:db8::5", 8443),
        connect("box-b", "192.0.2.20", 53, protocol="udp", outcome="sent", repeats=1),
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json_line(e) + "\n" for e in events))
    return path


def test_suggests_per_sandbox_with_counts(
    recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "suggest", str(recorded)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "# sandbox box-a: 10 connects",
        "box-a=192.0.2.10:80,443  # 9 connects (tcp)",
        "box-a=192.0.2.20:53  # 1 connects (udp)",
        "# sandbox box-b: 3 connects",
        "box-b=192.0.2.20:53  # 2 connects (udp)",
        "box-b=[2001:db8::5]:8443  # 1 connects (tcp)",
    ]
    assert err == (
        "sandtrace: note: left out 2 loopback connects (allowed unless "
        "--egress-check-loopback) and 1 unix socket connects (not egress)\n"
    )


def test_flags_and_toml_for_any_sandbox(recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "suggest", "--any-sandbox", "--format", "flags", str(recorded)]) == 0
    out, _ = capsys.readouterr()
    assert out == (
        "--egress-allow 192.0.2.10:80,443 --egress-allow 192.0.2.20:53 "
        "--egress-allow [2001:db8::5]:8443\n"
    )
    assert main(["policy", "suggest", "--any-sandbox", "--format", "toml", str(recorded)]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines() == [
        "[detection]",
        "egress_allow = [",
        '    "192.0.2.10:80,443",  # 9 connects (tcp)',
        '    "192.0.2.20:53",  # 3 connects (udp)',
        '    "[2001:db8::5]:8443",  # 1 connects (tcp)',
        "]",
    ]


def test_the_suggestion_parses_as_an_allow_list(
    recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from detect.egress import EgressPolicies  # noqa: PLC0415

    assert main(["policy", "suggest", "--format", "flags", str(recorded)]) == 0
    entries = capsys.readouterr().out.split()[1::2]
    policies = EgressPolicies.parse(entries, allow_loopback=True)
    assert policies.per_sandbox["box-a"].allows("192.0.2.10", 443)
    assert not policies.per_sandbox["box-a"].allows("192.0.2.10", 22)
    assert policies.per_sandbox["box-b"].allows("2001:db8::5", 8443)


def test_bad_input_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "suggest", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("sandtrace: policy suggest: cannot read ")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('not json\n{"kind": "nope"}\n')
    assert main(["policy", "suggest", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"sandtrace: policy suggest: line skipped: {bad}:1: not JSON")
    assert err[1] == f"sandtrace: policy suggest: line skipped: {bad}:2: unknown event kind 'nope'"
    assert err[2] == "sandtrace: policy suggest: no connect to propose in 0 events"
