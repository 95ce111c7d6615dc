"""`sandtrace replay` raises the alerts a live run raised: a real `sandtrace run` records the
events of a command that alerts (a program run from /dev/shm, three connects by one process
to a loopback listener this test started, which a user rule flags and the engine folds), then
`sandtrace replay` of that events file must raise the same alerts, repeat summary included."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.loopback import Listener, loopback_listener
from tests.e2e.runs import EVENTS, json_lines, record, sandtrace_cli

RULE_ID = "d2a5c6f0-7b1e-4b8e-9a0c-3f5e2d1c0b9a"


def _rule(port: int) -> str:
    return f"""title: Connect To The Test Listener
id: {RULE_ID}
status: experimental
description: A connect to the port of this test's loopback listener.
logsource: {{product: linux, category: network_connection}}
detection:
  selection:
    DestinationIp: 127.0.0.1
    DestinationPort: {port}
  condition: selection
level: high
tags: [attack.command-and-control]
"""


@pytest.fixture
def listener() -> Iterator[Listener]:
    with loopback_listener() as server:
        yield server


def _what(alert: dict[str, Any]) -> tuple[Any, ...]:
    """What must be the same live and replayed: not alert ids (fresh UUIDv7 each time, also
    in a summary's `folds`), nor raised_ns (when the engine raised it)."""
    return (
        alert["rule_id"],
        alert["title"],
        alert["level"],
        alert["process"]["pid"],
        alert["process"]["key"],
        alert["count"],
        alert["repeat"],
        alert["time_ns"],
        [(e["kind"], e["time_ns"]) for e in alert["events"]],
    )


def test_replay_of_a_recorded_run_raises_the_same_alerts(listener: Listener, work: Path) -> None:
    port, peers = listener.port, listener.peers
    rules = work / "rules"
    rules.mkdir()
    (rules / "listener.yml").write_text(_rule(port))
    staged = f"/dev/shm/st-replay-{secrets.token_hex(3)}"
    connect = (
        "import socket\n"
        "for _ in range(3):\n"
        f"    socket.create_connection(('127.0.0.1', {port})).close()\n"
    )
    script = (
        f'cp /usr/bin/true {staged} && {staged}; rm -f {staged}; /usr/bin/python3 -c "{connect}"'
    )
    run = record(work, "--alerts-only", "--rules", str(rules), "--", "/bin/sh", "-c", script)
    assert run.returncode == 0, run.stderr
    assert len(peers) == 3
    live = run.alerts
    recorded = run.events
    assert [a["alert_id"] for a in live] == [
        e["alert_id"] for e in recorded if e["kind"] == "alert"
    ]  # the events file holds the live alerts too: replay must skip them
    events, replayed_file = work / EVENTS, work / "replayed.jsonl"
    replay = sandtrace_cli(
        "replay", "--json", "--rules", str(rules), "--alerts", str(replayed_file), str(events),
        cwd=work,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    replayed = json_lines(replayed_file)
    assert [json.loads(line) for line in replay.stdout.splitlines()] == replayed
    assert sorted(map(_what, replayed)) == sorted(map(_what, live))
    # ... and they are the alerts the command called for: the staged program, and the three
    # connects of one process folded into an alert and a summary that counts them
    python = next(
        e["process"]["pid"]
        for e in recorded
        if e["kind"] == "exec" and e["process"]["exe"].startswith("/usr/bin/python3")
    )
    mine = [
        (a["process"]["pid"], a["count"], a["repeat"]) for a in replayed if a["rule_id"] == RULE_ID
    ]
    assert mine == [(python, 1, False), (python, 3, True)]
    folded = next(a for a in replayed if a["repeat"])
    assert folded["folds"] == next(a for a in replayed if a["rule_id"] == RULE_ID)["alert_id"]
    assert any(a["process"]["exe"] == staged for a in replayed)
    n_events = sum(1 for e in recorded if e["kind"] != "alert")
    assert replay.stderr.splitlines()[-1] == (
        f"sandtrace: replayed {n_events} events: {len(replayed)} alerts; {len(live)} recorded "
        "alert lines skipped; 0 malformed lines skipped"
    )
