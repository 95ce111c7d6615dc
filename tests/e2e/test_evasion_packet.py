"""A packet (AF_PACKET) socket made in a sandbox - a sniffer, an ARP spoofer - raises the
raw-socket rule: seen being made where the kernel has kprobes, else found held in /proc
within a second. Its traffic is not seen either way, and the startup notes say so."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import NetNS
from tests.e2e.test_evasion import by_rule
from tests.e2e.test_incidents import expect, sandtrace_run
from tests.e2e.testhosts import PYTHON

RAW_SOCKET = "b3821069-e59d-446b-97ac-d28742dfd0ab"  # sandbox_raw_socket

SNIFFER = """\
import socket, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.settimeout(2.5)
try:
    s.recv(65535)
except OSError:
    pass
time.sleep(1)
"""


def test_a_sniffer_in_the_sandbox_raises_the_raw_socket_rule(testnet: NetNS, work: Path) -> None:
    (work / "capture.py").write_text(SNIFFER)
    run = sandtrace_run(testnet, f"{PYTHON} capture.py", work)
    assert run.returncode == 0, run.stderr
    assert "packet (AF_PACKET) sockets" in run.stderr  # what is and is not seen, said
    [sniffer] = [e for e in run.events if e["kind"] == "exec" and e["argv"][1:2] == ["capture.py"]]
    made = [
        e
        for e in run.events
        if e["kind"] == "raw_socket" and e["process"]["pid"] == sniffer["process"]["pid"]
    ]
    assert [(e["family"], e["protocol"], e["protocol_number"]) for e in made] == [
        ("packet", "all", 3)
    ]
    expect(run, "a packet socket", "sockets")
    alerts = by_rule(run, RAW_SOCKET)
    assert {a["process"]["pid"] for a in alerts} == {sniffer["process"]["pid"]}
    assert alerts[0]["events"][0]["kind"] == "raw_socket"
