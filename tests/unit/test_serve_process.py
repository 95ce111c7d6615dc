"""`sandtrace serve` as a real process on loopback: a collector's batch in, the alert out."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from api.wire import CONTENT_TYPE, encode_batch
from detect.testing import event_from_fields
from tests.serving import ROOT_DIR, free_port, serving

__all__ = ["ROOT_DIR", "free_port", "post", "wait_for_lines"]


def post(url: str, body: bytes, token: str) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(  # noqa: S310 - a test service on loopback
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": CONTENT_TYPE,
            "Authorization": f"Bearer {token}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - loopback
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for_lines(path: Path, n: int, timeout: float = 10) -> list[dict[str, Any]]:
    """The JSON lines of path once it has at least n (outputs write in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.02)


def test_serve_detects_a_posted_batch_and_stops_on_sigterm(tmp_path: Path) -> None:
    token_file, alerts = tmp_path / "token", tmp_path / "alerts.jsonl"
    token_file.write_text("t0ken\n")
    with serving(["--token-file", str(token_file), "--alerts", str(alerts)]) as svc:
        miner = event_from_fields(
            "process_creation",
            {
                "Image": "/tmp/.x/kworker",
                "ProcessId": 4321,
                "CommandLine": "kworker -o stratum+tcp://198.51.100.1:3333 -u W -p x",
            },
        )
        url = f"{svc.url}/v1/batches"
        assert post(url, encode_batch("c1", 0, [miner]), "t0ken") == (200, {"ack": 0})
        assert post(url, encode_batch("c1", 1, []), "wrong")[0] == 401
        # the acknowledgement waits for the alert output: the alerts are written already
        found = [json.loads(line) for line in alerts.read_text().splitlines()]
        assert found and {a["process"]["pid"] for a in found} == {4321}
        assert all(a["kind"] == "alert" and a["host"] == "testhost" for a in found)
        assert svc.stop() == 0
