"""A collector that streams detects nothing itself: when it reports lost events, the service
raises the loss alert (medium, high when it recurs), in its outputs and its tails."""

from __future__ import annotations

import json
from pathlib import Path

from api.events import LostEvent
from detect.engine import LOSS_RULE_ID
from detect.testing import T0
from tests.unit.test_serve_process import free_port, wait_for_lines
from tests.unit.test_tail_service import processes, send, serve, tail


def lost(at_ns: int, ring: int) -> LostEvent:
    return LostEvent(
        time_ns=at_ns,
        host="node-7",
        kernel={"exec": ring},
        user=0,
        errors={},
        collector="c1",
        sandboxes={"sb-4": ring},
    )


def test_the_service_raises_loss_alerts_from_a_streaming_collector(tmp_path: Path) -> None:
    alerts = tmp_path / "alerts.jsonl"
    config = tmp_path / "service.toml"
    config.write_text(f'[[output]]\ntype = "jsonl"\npath = "{alerts}"\nwhat = "alerts"\n')
    port = free_port()
    with processes() as procs:
        serve(procs, tmp_path, port, "--config", str(config))
        out, _ = tail(procs, tmp_path, port, "--alerts-only", "-o", "json")
        send(port, 0, [lost(T0, 120)])
        send(port, 1, [lost(T0 + 60 * 10**9, 7)])  # a minute later: it recurs
        seen = [json.loads(out.next()) for _ in range(4)]  # --alerts-only shows losses too
        assert [x["kind"] for x in seen] == ["lost", "alert", "lost", "alert"]
        first, again = seen[1], seen[3]
        written = wait_for_lines(alerts, 2)
    assert [a["alert_id"] for a in written] == [first["alert_id"], again["alert_id"]]
    assert [(a["rule_id"], a["level"], a["host"], a["sandbox"]) for a in written] == [
        (LOSS_RULE_ID, "medium", "node-7", "sb-4"),
        (LOSS_RULE_ID, "high", "node-7", "sb-4"),
    ]
    assert "exec 120" in first["description"] and "sb-4 120" in first["description"]
    assert [e["kernel"] for e in again["events"]] == [{"exec": 7}]
