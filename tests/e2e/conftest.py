"""End-to-end fixtures: test hosts in network namespaces this suite creates itself.

Topology: namespace `inside` (the sandbox's network) and namespace `outside` (a test host),
joined by a veth pair, 198.51.100.2/24 inside and 198.51.100.1/24 outside (documentation
range). Neither namespace has a route anywhere else. Everything is removed after the test,
also when it fails.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class NetNS:
    inside: str
    outside: str
    inside_addr: str = "198.51.100.2"
    outside_addr: str = "198.51.100.1"

    def in_inside(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.inside, *argv]

    def in_outside(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.outside, *argv]


@pytest.fixture
def testnet() -> Iterator[NetNS]:
    tag = secrets.token_hex(3)
    net = NetNS(inside=f"st-in-{tag}", outside=f"st-out-{tag}")
    made: list[str] = []
    try:
        for ns in (net.inside, net.outside):
            ip("netns", "add", ns)
            made.append(ns)
        ip("link", "add", f"vi{tag}", "netns", net.inside, "type", "veth",
           "peer", "name", f"vo{tag}", "netns", net.outside)  # fmt: skip
        for ns, dev, addr in (
            (net.inside, f"vi{tag}", net.inside_addr),
            (net.outside, f"vo{tag}", net.outside_addr),
        ):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield net
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
