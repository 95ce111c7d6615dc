"""Alert ids are unique across runs and restarts: two `sandtrace run` of the same alerting
command, and a `sandtrace serve` restarted between two identical batches, never give one id
twice (they used to count from 1 in every engine)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec.structs

from api.wire import encode_batch
from detect.testing import event_from_fields
from tests.serving import ROOT_DIR, start_serve
from tests.unit.test_serve_process import post, wait_for_lines

MINER_RULE = "Stratum Mining Pool URL In Command Line"
MINER_ARGV = ["-o", "stratum+tcp://192.0.2.1:3333", "-u", "WALLET", "-p", "x"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def is_uuid7(text: str) -> bool:
    value = uuid.UUID(text)
    return str(value) == text and value.version == 7 and value.variant == uuid.RFC_4122


def test_two_runs_of_one_command_raise_alerts_with_different_ids(tmp_path: Path) -> None:
    ids = []
    for n in (1, 2):
        alerts = tmp_path / f"alerts-{n}.jsonl"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "sandtrace",
                "run",
                "--alerts",
                str(alerts),
                "--",
                "/bin/true",
                *MINER_ARGV,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT_DIR,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        (alert,) = [a for a in read_jsonl(alerts) if a["title"] == MINER_RULE]
        ids.append(alert["alert_id"])
    assert ids[0] != ids[1]
    assert all(is_uuid7(i) for i in ids), ids


def test_a_restarted_service_raises_new_ids_for_the_same_events(tmp_path: Path) -> None:
    token, alerts = tmp_path / "token", tmp_path / "alerts.jsonl"
    token.write_text("t0ken\n")
    args = ["--token-file", str(token), "--state-dir", str(tmp_path / "state")]
    args += ["--alerts", str(alerts)]
    miner = event_from_fields(
        "process_creation",
        {"Image": "/tmp/.x/kworker", "ProcessId": 4321, "Argv": ["kworker", *MINER_ARGV]},
    )
    miner = msgspec.structs.replace(miner, host="node-7")
    port = 0
    for seq in (0, 1):  # the collector's next batch after the restart, with the same event
        svc = start_serve(args, port=port or None)
        port = svc.port
        try:
            url = f"{svc.url}/v1/batches"
            assert post(url, encode_batch("c1", seq, [miner]), "t0ken") == (200, {"ack": seq})
        finally:
            assert svc.stop() == 0
    found = [a for a in wait_for_lines(alerts, 2) if a["title"] == MINER_RULE]
    assert [a["host"] for a in found] == ["node-7", "node-7"]
    assert found[0]["alert_id"] != found[1]["alert_id"]
    assert all(is_uuid7(a["alert_id"]) for a in found)
