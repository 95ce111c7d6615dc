"""`sandtrace run` end to end: a real command in a new sandbox and its own network
namespace fetches a page from a real HTTP server on a test host; the events the CLI prints
match what happened, exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import NetNS

ROOT_DIR = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"

FETCH = """
import sys, urllib.request
body = urllib.request.urlopen(sys.argv[1], timeout=10).read()
sys.stdout.write(body.decode())
"""


def wait_listening(net: NetNS, port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(
            net.in_outside("ss", "-Hltn", f"sport = :{port}"),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise AssertionError("the test HTTP server did not start")


def test_run_fetches_from_test_host_and_reports_it(testnet: NetNS, tmp_path: Path) -> None:
    (tmp_path / "page.txt").write_text("hello from the test host\n")
    server = subprocess.Popen(
        testnet.in_outside(
            PYTHON,
            "-m",
            "http.server",
            "--bind",
            testnet.outside_addr,
            "8080",
            "--directory",
            str(tmp_path),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_listening(testnet, 8080)
        url = f"http://{testnet.outside_addr}:8080/page.txt"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "sandtrace",
                "run",
                "--json",
                "--events",
                str(tmp_path / "events.jsonl"),
                "--",
                *testnet.in_inside(PYTHON, "-c", FETCH, url),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT_DIR,
            timeout=120,
            check=False,
        )
    finally:
        server.terminate()
        _, server_log = server.communicate(timeout=10)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    # The command's own output passes through, between the event lines.
    assert [ln for ln in lines if not ln.startswith("{")] == ["hello from the test host"]
    events: list[dict[str, Any]] = [json.loads(ln) for ln in lines if ln.startswith("{")]
    assert events == [json.loads(ln) for ln in (tmp_path / "events.jsonl").read_text().splitlines()]
    execs = [e for e in events if e["kind"] == "exec"]
    assert [e["argv"][:2] for e in execs] == [["ip", "netns"], [PYTHON, "-c"]]
    fetcher = execs[-1]["process"]["pid"]
    assert execs[-1]["argv"][-1] == url
    connects = [e for e in events if e["kind"] == "connect"]
    assert len(connects) == 1
    conn = connects[0]
    assert conn["process"]["pid"] == fetcher
    assert (conn["protocol"], conn["daddr"], conn["dport"], conn["outcome"]) == (
        "tcp",
        testnet.outside_addr,
        8080,
        "success",
    )
    assert conn["saddr"] == testnet.inside_addr
    # the server saw that very connection: its log names the client's address
    assert f"{testnet.inside_addr} - - " in server_log and "GET /page.txt" in server_log
    exits = {e["process"]["pid"]: e["exit_code"] for e in events if e["kind"] == "exit"}
    assert exits[fetcher] == 0
    assert "lost: kernel=0 user=0" in run.stderr
