"""`sandtrace serve` as a real process on loopback: a collector's batch in, the alert out."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from detect.testing import event_from_fields
from service.wire import CONTENT_TYPE, encode_batch

ROOT_DIR = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def post(url: str, body: bytes, token: str) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data=body, method="POST", headers={  # noqa: S310
        "Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {token}"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - loopback
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_detects_a_posted_batch_and_stops_on_sigterm(tmp_path: Path) -> None:
    token_file, alerts = tmp_path / "token", tmp_path / "alerts.jsonl"
    token_file.write_text("t0ken\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "serve", "--listen", f"127.0.0.1:{port}",
         "--token-file", str(token_file), "--alerts", str(alerts)],
        cwd=ROOT_DIR, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        assert "serving on" in proc.stderr.readline()
        miner = event_from_fields("process_creation", {
            "Image": "/tmp/.x/kworker", "ProcessId": 4321,
            "CommandLine": "kworker -o stratum+tcp://198.51.100.1:3333 -u W -p x"})  # fmt: skip
        url = f"http://127.0.0.1:{port}/v1/batches"
        assert post(url, encode_batch("c1", 0, [miner]), "t0ken") == (200, {"ack": 0})
        assert post(url, encode_batch("c1", 1, []), "wrong")[0] == 401
        found = [json.loads(line) for line in alerts.read_text().splitlines()]
        assert found and {a["process"]["pid"] for a in found} == {4321}
        assert all(a["kind"] == "alert" and a["host"] == "testhost" for a in found)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
