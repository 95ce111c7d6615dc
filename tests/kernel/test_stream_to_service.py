"""`sandtrace run --server`: a sandbox's events stream to a real `sandtrace serve`, which
raises the alert; over one POST per batch and over a WebSocket."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serving import ROOT_DIR, serving


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_run_streams_to_the_service_which_alerts(tmp_path: Path, transport: str) -> None:
    token, alerts = tmp_path / "token", tmp_path / "alerts.jsonl"
    token.write_text("t0ken")
    with serving(["--token-file", str(token), "--alerts", str(alerts)]) as svc:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "sandtrace",
                "run",
                "--json",
                "--no-tail",
                "--server",
                svc.url,
                "--server-token-file",
                str(token),
                "--server-transport",
                transport,
                "--",
                "/bin/sh",
                "-c",
                "echo stratum+tcp://198.51.100.1:3333 --donate-level=0 >/dev/null",
            ],
            cwd=ROOT_DIR,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        assert f"streaming to {svc.url}" in run.stderr
        assert "discarded 0; 0 batches left in the spool" in run.stderr
        local = [json.loads(ln) for ln in run.stdout.splitlines() if ln.startswith("{")]
        assert not [e for e in local if e["kind"] == "alert"]  # detection is the service's
        sh = next(e for e in local if e["kind"] == "exec")["process"]["pid"]
        deadline = time.monotonic() + 10
        while not alerts.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        found = [json.loads(line) for line in alerts.read_text().splitlines()]
        assert any(a["process"]["pid"] == sh for a in found), found
        assert svc.stop() == 0
