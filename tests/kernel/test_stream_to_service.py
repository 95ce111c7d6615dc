"""`sandtrace run --server`: a sandbox's events stream to a real `sandtrace serve`, which
raises the alert."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.serving import free_port

ROOT_DIR = Path(__file__).resolve().parents[2]


def test_run_streams_to_the_service_which_alerts(tmp_path: Path) -> None:
    token, alerts = tmp_path / "token", tmp_path / "alerts.jsonl"
    token.write_text("t0ken")
    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "serve", "--listen", f"127.0.0.1:{port}",
         "--token-file", str(token), "--alerts", str(alerts)],
        cwd=ROOT_DIR, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert serve.stderr is not None
        assert "serving on" in serve.stderr.readline()
        run = subprocess.run(
            [sys.executable, "-m", "collector.cli", "run", "--json", "--server",
             f"http://127.0.0.1:{port}", "--server-token-file", str(token), "--",
             "/bin/sh", "-c", "echo stratum+tcp://198.51.100.1:3333 --donate-level=0 >/dev/null"],
            cwd=ROOT_DIR, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "streaming to" in run.stderr
        local = [json.loads(ln) for ln in run.stdout.splitlines() if ln.startswith("{")]
        assert not [e for e in local if e["kind"] == "alert"]  # detection is the service's
        sh = next(e for e in local if e["kind"] == "exec")["process"]["pid"]
        deadline = time.monotonic() + 10
        while not alerts.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        found = [json.loads(line) for line in alerts.read_text().splitlines()]
        assert any(a["process"]["pid"] == sh for a in found), found
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=20) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        if serve.stderr is not None:
            serve.stderr.close()
