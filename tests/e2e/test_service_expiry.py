"""A running `sandtrace serve` closes fold windows on its own: the summary of a rule's
repeats reaches its JSON-lines output and a live tail while it keeps running, not at its
shutdown, and without waiting for the host's next event."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import msgspec.structs

from api.events import AnyEvent
from detect.testing import T0
from tests.unit.test_serve_process import free_port, wait_for_lines
from tests.unit.test_tail_service import miner, processes, send, serve, tail

FOLD_SECONDS = 1


def repeats(n: int) -> list[AnyEvent]:
    """`n` execs of one process a tenth of a second apart, each raising the same rule."""
    event = miner(4321, "node-3", "sb-1")
    return [msgspec.structs.replace(event, time_ns=T0 + i * 100_000_000) for i in range(n)]


def test_a_summary_reaches_the_outputs_and_a_tail_while_the_service_runs(
    tmp_path: Path,
) -> None:
    alerts = tmp_path / "alerts.jsonl"
    config = tmp_path / "service.toml"
    config.write_text(
        f"[detection]\nfold_seconds = {FOLD_SECONDS}\n\n"
        f'[[output]]\ntype = "jsonl"\npath = "{alerts}"\nwhat = "alerts"\n'
    )
    port = free_port()
    with processes() as procs:
        serve(procs, tmp_path, port, "--config", str(config))
        out, _ = tail(procs, tmp_path, port, "--alerts-only", "-o", "json")
        sent = repeats(5)
        send(port, 0, sent)
        first = json.loads(out.next())
        assert (first["repeat"], first["count"], first["folds"]) == (False, 1, "")
        # No other batch comes: the service's own clock closes the window (1 s of the
        # host's time, 2 s of grace for events on their way, a timer each second).
        started = time.monotonic()
        summary = json.loads(out.next(timeout=15))
        waited = time.monotonic() - started
        assert (summary["repeat"], summary["count"]) == (True, 5)
        assert summary["folds"] == first["alert_id"] != summary["alert_id"]
        assert [e["time_ns"] for e in summary["events"]] == [e.time_ns for e in sent]
        assert summary["omitted"] == 0
        assert waited < 8, waited
        written = wait_for_lines(alerts, 2)
        assert [(a["alert_id"], a["repeat"]) for a in written] == [
            (first["alert_id"], False),
            (summary["alert_id"], True),
        ]
        service = procs[0]
        assert service.poll() is None  # it is still serving
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert resp.status == 200
        assert out.quiet(1.5), out.buf  # one summary, not one per second
