"""Protocols and names on the wire: what a sandboxed flow speaks is named from its first
bytes, whatever the port and whatever the client is called, and the name a sandbox resolved
rides on its connect, done for real against the test hosts outside.

Each scenario runs `sandtrace run` as a real process (audit: nothing is blocked, the built-in
rule pack detects) with its command in the sandbox's network namespace; sshd, the mining
pool, the HTTP(S) host and the DNS server are real servers in the outside namespace, on port
443 where an evader would put them. Every expected value is one the test itself set up: the
ports and addresses of its servers, the names of its zone, the paths of its binaries.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import NetNS
from tests.e2e.test_incidents import Run, expect, sandtrace_run
from tests.e2e.testhosts import (
    DnsServer,
    MiningPool,
    SshServer,
    install_miner,
    run_dns_server,
    run_http_host,
    run_mining_pool,
    run_sshd,
)
from tests.tlsutil import make_tls

SSH_OUT = "97ca49f7-6dfb-412a-b475-bd383a8d31f6"  # protocol_ssh_out
STRATUM = "ba3fb083-3002-4b7c-8150-d4e25eb6a88d"  # protocol_stratum
HTTPS = 443
POOL_NAME = "pool.example.test"
WEB_NAME = "www.example.test"
SERIOUS = {"medium", "high", "critical"}


@pytest.fixture
def staging() -> Iterator[Path]:
    """A fresh directory under /tmp, where a dropper puts the binary it renamed."""
    path = Path("/tmp") / f"st-proto-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sshd_443(testnet: NetNS) -> Iterator[SshServer]:
    with run_sshd(testnet, port=HTTPS) as server:
        yield server


@pytest.fixture
def pool_443(testnet: NetNS) -> Iterator[MiningPool]:
    with run_mining_pool(testnet, port=HTTPS) as pool:
        yield pool


@pytest.fixture
def dns(testnet: NetNS) -> Iterator[DnsServer]:
    """The sandbox's resolver: pool.example.test and www.example.test are 198.51.100.1."""
    zone = {
        POOL_NAME: {"A": [testnet.outside_addr], "TTL": 300},
        WEB_NAME: {"A": [testnet.outside_addr], "TTL": 300},
    }
    with run_dns_server(testnet, zone) as server:
        yield server


def exec_pids(run: Run, exe: str) -> set[int]:
    return {
        e["process"]["pid"]
        for e in run.events
        if e["kind"] == "exec" and e["process"]["exe"] == exe
    }


def connects_to(run: Run, addr: str, port: int) -> list[dict[str, Any]]:
    return [
        e for e in run.events if e["kind"] == "connect" and (e["daddr"], e["dport"]) == (addr, port)
    ]


def by_rule(run: Run, rule_id: str) -> list[dict[str, Any]]:
    return [a for a in run.alerts if a["rule_id"] == rule_id]


def miner_config(path: Path, url: str, wallet: str) -> Path:
    path.write_text(json.dumps({"pools": [{"url": url, "user": wallet, "pass": "x"}]}))
    return path


def test_renamed_ssh_client_on_port_443_is_named_ssh(
    testnet: NetNS, sshd_443: SshServer, staging: Path, work: Path
) -> None:
    # The real OpenSSH client, copied under a name with no "ssh" in it, logs in (test key,
    # BatchMode) to the real sshd listening on 443, where HTTPS is expected.
    updater = staging / "updater"
    shutil.copy("/usr/bin/ssh", updater)
    opts = " ".join(sshd_443.client_argv()[1:])
    marker = f"st-{secrets.token_hex(4)}"
    script = f"{updater} {opts} -p {HTTPS} {sshd_443.destination} echo {marker} > out.txt"
    run = sandtrace_run(testnet, script, work)
    assert run.returncode == 0, run.stderr
    assert (work / "out.txt").read_text().split() == [marker], "the ssh session did not run"
    assert "Accepted publickey for root" in sshd_443.log_text()
    [pid] = exec_pids(run, str(updater))
    assert "ssh" not in updater.name
    [conn] = [c for c in connects_to(run, sshd_443.addr, HTTPS) if c["process"]["pid"] == pid]
    assert conn["outcome"] == "success"
    assert conn["app_protocol"] == "ssh"
    assert conn["app_detail"].startswith("SSH-2.0-OpenSSH_"), conn["app_detail"]
    assert (conn["hostname"], conn["sni"], conn["http_host"]) == ("", "", "")

    alerts = expect(run, "renamed ssh client on 443", "protocols")
    ssh_alerts = by_rule(run, SSH_OUT)
    assert ssh_alerts, sorted(a["rule_id"] for a in alerts)
    for alert in ssh_alerts:
        assert alert["level"] == "critical"
        assert (alert["process"]["pid"], alert["process"]["exe"]) == (pid, str(updater))
        assert [(e["daddr"], e["dport"]) for e in alert["events"]] == [(sshd_443.addr, HTTPS)]
    assert not by_rule(run, STRATUM)


def test_miner_configured_by_file_speaks_stratum_to_port_443(
    testnet: NetNS, pool_443: MiningPool, staging: Path, work: Path
) -> None:
    # A miner under a harmless name, its pool only in a config file: argv names neither the
    # pool nor a miner, and the pool listens on 443.
    miner = install_miner(staging / "syncd")
    wallet = f"WALLET-{secrets.token_hex(4)}"
    url = f"stratum+tcp://{pool_443.addr}:{HTTPS}"
    config = miner_config(staging / "settings.json", url, wallet)
    run = sandtrace_run(testnet, f"{miner} -c {config}", work)
    assert run.returncode == 0, run.stderr
    assert pool_443.wallets() == [wallet]
    execs = [e for e in run.events if e["kind"] == "exec" and e["filename"] == str(miner)]
    [pid] = {e["process"]["pid"] for e in execs}
    assert not any(pool_443.addr in " ".join(e["argv"]) for e in run.events if "argv" in e)
    [conn] = connects_to(run, pool_443.addr, HTTPS)
    assert conn["process"]["pid"] == pid
    assert (conn["outcome"], conn["app_protocol"], conn["app_detail"]) == (
        "success",
        "stratum",
        "login",
    )

    expect(run, "stratum on 443, pool in a config file", "protocols")
    stratum = by_rule(run, STRATUM)
    assert stratum
    for alert in stratum:
        assert alert["level"] == "critical"
        assert alert["process"]["pid"] == pid
        assert [(e["daddr"], e["dport"]) for e in alert["events"]] == [(pool_443.addr, HTTPS)]
    assert not by_rule(run, SSH_OUT)


def test_pool_name_resolved_by_the_sandbox_is_on_its_connect(
    testnet: NetNS, pool_443: MiningPool, dns: DnsServer, staging: Path, work: Path
) -> None:
    # The config file names the pool; the miner resolves it through the system resolver
    # (glibc, the namespace's resolv.conf naming the test's DNS server) and connects.
    miner = install_miner(staging / "syncd")
    wallet = f"WALLET-{secrets.token_hex(4)}"
    config = miner_config(staging / "c.json", f"stratum+tcp://{POOL_NAME}:{HTTPS}", wallet)
    run = sandtrace_run(testnet, f"{miner} -c {config}", work)
    assert run.returncode == 0, run.stderr
    assert pool_443.wallets() == [wallet]
    asked = [(q["name"], q["peer"]) for q in dns.queries() if q["type"] == 1]
    assert asked == [(POOL_NAME, testnet.inside_addr)]
    [pid] = {e["process"]["pid"] for e in run.events if e.get("filename") == str(miner)}

    answers = [e for e in run.events if e["kind"] == "dns" and e["query_type"] == "A"]
    assert [
        (e["process"]["pid"], e["query_name"], e["addresses"], e["resolver"], e["resolver_port"])
        for e in answers
    ] == [(pid, POOL_NAME, [testnet.outside_addr], dns.addr, dns.port)]
    [conn] = connects_to(run, pool_443.addr, HTTPS)
    assert conn["process"]["pid"] == pid
    assert (conn["hostname"], conn["hostname_source"]) == (POOL_NAME, "dns")
    assert conn["app_protocol"] == "stratum"

    expect(run, "stratum to a resolved pool name", "protocols")
    [alert] = [a for a in by_rule(run, STRATUM) if not a["repeat"]]
    assert [e["hostname"] for e in alert["events"]] == [POOL_NAME]


def test_https_and_plain_http_raise_nothing_serious(
    testnet: NetNS, dns: DnsServer, staging: Path, work: Path
) -> None:
    tls = make_tls(staging / "tls", [WEB_NAME])
    with (
        run_http_host(testnet, port=HTTPS, tls=(tls.cert, tls.key)) as https,
        run_http_host(testnet, port=8000) as http,
    ):
        https.put("index.html", "secure\n")
        http.put("index.html", "plain\n")
        script = (
            f"curl -fsS --cacert {tls.ca} https://{WEB_NAME}/index.html > s.txt && "
            f"curl -fsS http://{WEB_NAME}:{http.port}/index.html > p.txt"
        )
        run = sandtrace_run(testnet, script, work)
        served = [(r["path"], r["status"]) for r in https.requests() + http.requests()]
    assert run.returncode == 0, run.stderr
    assert (work / "s.txt").read_text() == "secure\n"
    assert (work / "p.txt").read_text() == "plain\n"
    assert served == [("/index.html", 200), ("/index.html", 200)]

    [tls_conn] = connects_to(run, https.addr, HTTPS)
    assert (tls_conn["app_protocol"], tls_conn["sni"], tls_conn["http_host"]) == (
        "tls",
        WEB_NAME,
        "",
    )
    assert (tls_conn["hostname"], tls_conn["hostname_source"]) == (WEB_NAME, "dns")
    [http_conn] = connects_to(run, http.addr, http.port)
    assert http_conn["app_protocol"] == "http"
    assert http_conn["http_host"] == f"{WEB_NAME}:{http.port}"
    assert http_conn["app_detail"] == "GET /index.html HTTP/1.1"
    assert (http_conn["hostname"], http_conn["hostname_source"]) == (WEB_NAME, "dns")

    serious = [a for a in run.alerts if a["level"] in SERIOUS]
    assert serious == [], [f"{a['level']} {a['title']}" for a in serious]
