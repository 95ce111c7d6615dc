"""`--enforce` with `--server`: the collector holds its sandbox to the policy in the kernel and
streams; the detection service (a real `sandtrace serve`) receives the refused connect and
raises the egress_denied alert for the process that made it.

The sandbox resolves names through the test's DNS server and connects to a real HTTP host,
both in the outside namespace; the service listens on the host's loopback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import NetNS
from tests.e2e.testhosts import DnsServer, HttpHost, run_dns_server, run_http_host
from tests.serving import start_serve

DENIED = "ede89068-a3e8-4a81-a99b-d7010e689bfe"  # rules/enforcement.yml, egress_denied
PKG = "pkg.example.test"
OTHER = "other.example.test"
PORT = 8000
CURL = "/usr/bin/curl"


@pytest.fixture
def dns(testnet: NetNS) -> Iterator[DnsServer]:
    zone = {name: {"A": [testnet.outside_addr], "TTL": 300} for name in (PKG, OTHER)}
    with run_dns_server(testnet, zone) as server:
        yield server


@pytest.fixture
def http(testnet: NetNS) -> Iterator[HttpHost]:
    with run_http_host(testnet, port=PORT) as host:
        host.put("index.html", "ok\n")
        yield host


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_for(path: Path, found: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The lines of `path` once `found(lines)` holds (the service writes as it receives)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = _lines(path)
        if found(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_the_kernel_refuses_and_the_service_alerts_for_the_refused_pid(
    testnet: NetNS, dns: DnsServer, http: HttpHost, work: Path
) -> None:
    policy = work / "policy.toml"
    policy.write_text(f'[default]\nallow = ["{PKG}:{PORT}"]\nresolvers = ["{dns.addr}"]\n')
    served, alerts = work / "served.jsonl", work / "alerts.jsonl"
    svc = start_serve(["--events", str(served), "--alerts", str(alerts)])
    try:
        # OTHER first: nothing allows its address yet (PKG, the same address, is resolved
        # only after it), so the kernel refuses; then PKG, allowed by name, fetches.
        script = (
            f"{{ {CURL} -fsS http://{OTHER}:{PORT}/index.html > a.txt || echo refused > a.txt; "
            f"}} && {CURL} -fsS http://{PKG}:{PORT}/index.html > b.txt"
        )
        run = subprocess.run(
            [
                *(sys.executable, "-m", "sandtrace", "run", "--json", "--no-tail", "--enforce"),
                *("--server", svc.url, "--egress-policy", str(policy)),
                *("--", *testnet.in_inside("sh", "-c", script)),
            ],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        assert [(work / f).read_text() for f in ("a.txt", "b.txt")] == ["refused\n", "ok\n"]
        assert len(http.requests()) == 1  # the refused connect never reached the host
        written = _wait_for(alerts, lambda got: any(a["rule_id"] == DENIED for a in got))
        events = _wait_for(served, lambda got: any(e["kind"] == "exit" for e in got))
    finally:
        svc.stop()
    curls = sorted(
        (e for e in events if e["kind"] == "exec" and e["filename"] == CURL),
        key=lambda e: e["time_ns"],
    )
    first, second = (e["process"]["pid"] for e in curls)
    refused = [e for e in events if e["kind"] == "connect" and e["dport"] == PORT]
    assert [(e["process"]["pid"], e["denied"], e["errno_name"]) for e in refused] == [
        (first, True, "EPERM"),
        (second, False, ""),
    ]
    assert refused[0]["hostname"] == OTHER
    denied = [a for a in written if a["rule_id"] == DENIED and not a["repeat"]]
    assert [(a["process"]["pid"], a["level"]) for a in denied] == [(first, "high")], svc.log()
