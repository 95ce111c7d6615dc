"""End-to-end fixtures: test hosts in network namespaces this suite creates itself.

`testnet` yields the topology (see `tests.e2e.testhosts`): namespace `inside` at
198.51.100.2 and namespace `outside` at 198.51.100.1, 203.0.113.10 and 198.51.100.20-29,
joined by a veth pair and routed nowhere else. `sshd`, `mining_pool` and `http_host` start a
real service in `outside`, each already listening when the test starts. Every process,
namespace and temporary directory is removed after the test, also when it fails.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.testhosts import (
    HttpHost,
    MiningPool,
    NetNS,
    SshServer,
    make_testnet,
    run_http_host,
    run_mining_pool,
    run_sshd,
)

__all__ = ["HttpHost", "MiningPool", "NetNS", "SshServer"]


@pytest.fixture
def work() -> Iterator[Path]:
    """A sandbox's working directory: a project directory, not a staging location such as
    /tmp (running a program from /tmp is itself one of the behaviours the rules flag)."""
    path = Path("/srv") / f"sandtrace-e2e-{secrets.token_hex(4)}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def testnet() -> Iterator[NetNS]:
    with make_testnet() as net:
        yield net


@pytest.fixture
def sshd(testnet: NetNS) -> Iterator[SshServer]:
    """OpenSSH sshd on 198.51.100.1:22 and 203.0.113.10:2222, root login by test key."""
    with run_sshd(testnet) as server:
        yield server


@pytest.fixture
def mining_pool(testnet: NetNS) -> Iterator[MiningPool]:
    """Stratum pool on 198.51.100.1:3333 logging every request."""
    with run_mining_pool(testnet) as pool:
        yield pool


@pytest.fixture
def http_host(testnet: NetNS) -> Iterator[HttpHost]:
    """Static HTTP server on 198.51.100.1:8000 serving `http_host.root`."""
    with run_http_host(testnet) as host:
        yield host


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.e2e.report import lines  # noqa: PLC0415

    report = lines()
    if report:
        terminalreporter.section("time from syscall to alert, per incident scenario")
        for line in report:
            terminalreporter.write_line(line)
