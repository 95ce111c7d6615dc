"""The summary at the end of `sandtrace run`: a real command execs a few programs and
connects to a loopback listener this test started; the summary names exactly those
executables and that destination, on stderr and in the --summary JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.loopback import Listener, loopback_listener
from tests.e2e.runs import sandtrace_cli


@pytest.fixture
def listener() -> Iterator[Listener]:
    with loopback_listener() as server:
        yield server


def test_summary_names_the_executables_and_the_destination(listener: Listener, work: Path) -> None:
    port, peers = listener.port, listener.peers
    connect = (
        "import socket\n"
        "for _ in range(2):\n"
        f"    socket.create_connection(('127.0.0.1', {port})).close()\n"
    )
    script = f'/usr/bin/true; /usr/bin/env true; /usr/bin/python3 -c "{connect}"; echo done'
    summary_file = work / "summary.json"
    alerts_file = work / "alerts.jsonl"
    run = sandtrace_cli(
        "run",
        "--alerts-only",
        "--summary",
        str(summary_file),
        "--alerts",
        str(alerts_file),
        "--",
        "/bin/sh",
        "-c",
        script,
        cwd=work,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "done"
    assert len(peers) == 2  # the listener saw both connects
    summary = json.loads(summary_file.read_text())
    python = os.path.realpath("/usr/bin/python3")
    assert sorted((e["path"], e["count"]) for e in summary["executables"]) == sorted(
        [
            (os.path.realpath("/bin/sh"), 1),
            ("/usr/bin/true", 2),  # run by the shell, then by env
            ("/usr/bin/env", 1),
            (python, 1),
        ]
    )
    assert summary["destinations"] == [
        {
            "destination": f"127.0.0.1:{port}/tcp",
            "protocol": "tcp",
            "address": "127.0.0.1",
            "port": port,
            "connects": 2,
            "failed": 0,
        }
    ]
    assert summary["lost"] == {"kernel": 0, "user": 0, "spool": 0, "map_errors": 0}
    raised = [json.loads(line) for line in alerts_file.read_text().splitlines()]  # must exist
    assert summary["alerts"]["total"] == len([a for a in raised if not a["repeat"]])
    assert summary["detection"] is True
    # stderr says the same, after the totals
    err = run.stderr.splitlines()
    start = err.index("sandtrace: summary of the run:")
    assert err[start - 1].startswith("sandtrace: ")  # the totals and the rest come first
    said = err[start:]
    assert "sandtrace:   executables: 4 distinct, 5 execs" in said
    assert "sandtrace:        2  /usr/bin/true" in said
    assert f"sandtrace:        1  {python}" in said
    assert "sandtrace:   destinations: 1 distinct, 2 connects" in said
    assert f"sandtrace:        2  127.0.0.1:{port}/tcp" in said
    assert said[-1] == "sandtrace:   lost: nothing"


def test_summary_is_said_without_a_file_and_a_bad_file_is_said(work: Path) -> None:
    run = sandtrace_cli(
        "run", "--summary", str(work / "missing-dir" / "s.json"), "--", "/usr/bin/true", cwd=work
    )
    assert run.returncode == 0, run.stderr
    err = run.stderr.splitlines()
    assert "sandtrace:   executables: 1 distinct, 1 execs" in err
    assert "sandtrace:        1  /usr/bin/true" in err
    assert "sandtrace:   destinations: 0 distinct, 0 connects" in err
    assert err[-1].startswith(f"sandtrace: --summary {work}/missing-dir/s.json: cannot write: ")
    assert "Traceback" not in run.stderr
