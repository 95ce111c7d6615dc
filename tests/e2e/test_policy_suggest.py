"""`sandtrace policy suggest` of a real run's recording: a connect to a loopback listener is
left out, with a note, and nothing is proposed."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.e2e.runs import sandtrace_cli


def test_a_real_runs_loopback_connect_is_left_out(tmp_path: Path) -> None:
    """e2e: `run --events` of a command connecting to a loopback listener; the suggestion
    leaves the connect out, with a note."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    events = tmp_path / "events.jsonl"
    try:
        run = sandtrace_cli(
            "run",
            "--no-tail",
            "--no-detect",
            "--json",
            "--events",
            str(events),
            "--",
            "/usr/bin/python3",
            "-c",
            f"import socket; socket.create_connection(('127.0.0.1', {port})).close()",
        )
    finally:
        listener.close()
    assert run.returncode == 0, run.stderr
    suggest = sandtrace_cli("policy", "suggest", str(events), timeout=60)
    assert suggest.returncode == 1
    assert suggest.stdout == ""
    lines = suggest.stderr.splitlines()
    assert lines[0] == (
        "sandtrace: note: left out 1 loopback connects (allowed unless --egress-check-loopback)"
    )
    assert lines[1].startswith("sandtrace: policy suggest: no connect to propose in ")
