"""What the probes used not to see, end to end through `sandtrace run`: a sandbox talking to a
container runtime's API on a unix socket."""

from __future__ import annotations

import json
import os
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

ROOT_DIR = Path(__file__).resolve().parents[2]
RUNTIME_SOCKET_RULE = "63544065-6ab1-4983-842d-139018aa0203"


class DockerLikeAPI(BaseHTTPRequestHandler):
    """The first call a docker client makes, answered as dockerd would (an empty list)."""

    def do_GET(self) -> None:
        body = b"[]\n" if self.path == "/containers/json" else b'{"message":"page not found"}\n'
        self.send_response(200 if body == b"[]\n" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Api-Version", "1.47")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        self.server.requests.append(self.requestline)  # type: ignore[attr-defined]


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    requests: list[str]


@pytest.fixture
def docker_sock(tmp_path: Path) -> Iterator[tuple[Path, UnixHTTPServer]]:
    path = tmp_path / "docker.sock"
    server = UnixHTTPServer(str(path), DockerLikeAPI)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield path, server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_curl_to_a_docker_socket_alerts_with_its_path(
    docker_sock: tuple[Path, UnixHTTPServer], tmp_path: Path
) -> None:
    path, server = docker_sock
    alerts_file = tmp_path / "alerts.jsonl"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sandtrace",
            "run",
            "--json",
            "--alerts",
            str(alerts_file),
            "--",
            "curl",
            "-sS",
            "--unix-socket",
            str(path),
            "http://docker/containers/json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT_DIR,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "[]" in run.stderr.splitlines()  # curl's output: with --json, on stderr
    assert server.requests == ["GET /containers/json HTTP/1.1"]
    events = [json.loads(ln) for ln in run.stdout.splitlines()]
    curl = next(e for e in events if e["kind"] == "exec" and e["argv"][0] == "curl")
    # curl's other unix connects (glibc asking nscd for the host name) raise nothing
    connects = [
        e
        for e in events
        if e["kind"] == "connect" and e["family"] == "unix" and e["path"] == str(path)
    ]
    assert [c["process"]["pid"] for c in connects] == [curl["process"]["pid"]]
    assert (connects[0]["peer_pid"], connects[0]["peer_exe"]) == (
        os.getpid(),
        os.path.realpath(sys.executable),
    )
    alerts = [json.loads(ln) for ln in alerts_file.read_text().splitlines()]
    runtime = [a for a in alerts if a.get("rule_id") == RUNTIME_SOCKET_RULE]
    assert len(runtime) == 1, alerts
    assert runtime[0]["level"] == "high"
    assert runtime[0]["process"]["pid"] == curl["process"]["pid"]
    assert [e["path"] for e in runtime[0]["events"]] == [str(path)]
    assert "lost: kernel=0 user=0" in run.stderr
