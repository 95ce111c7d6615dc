"""Packet sockets held by traced processes, looked up in /proc where the kernel has no
kprobes: a real packet socket held by a real process becomes one raw-socket event, once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.events import RawSocketEvent
from collector.assemble import Assembler, Scope
from collector.packet_sockets import PacketSocketPoller, parse_net_packet

HOLDER = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0806))
print(s.fileno(), flush=True)
sys.stdin.read()
"""


def test_parse_net_packet() -> None:
    text = (
        "sk               RefCnt Type Proto  Iface R Rmem   User   Inode\n"
        "ffff8f0f4b2c7800 3      3    0003   0     1 0      0      45123\n"
        "ffff8f0f4b2c8000 3      2    0806   2     1 0      1000   45124\n"
        "garbage\n"
    )
    assert parse_net_packet(text) == {45123: (3, 0x0003), 45124: (2, 0x0806)}


@pytest.fixture
def holder() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # the socket is made
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate()


def test_a_held_packet_socket_is_reported_once(holder: subprocess.Popen[str]) -> None:
    asm = Assembler([Scope("box", ["/"])], lambda _id: "/box", lambda _p: "", host="h")
    assert asm.procs.seed_from_proc(holder.pid) is not None
    poller = PacketSocketPoller(asm, Path("/sys/fs/cgroup"), interval=0.0)
    events = poller.poll()
    mine = [e for e in events if isinstance(e, RawSocketEvent) and e.process.pid == holder.pid]
    assert [(e.family, e.protocol, e.protocol_number) for e in mine] == [("packet", "arp", 0x0806)]
    assert mine[0].sandbox == "box"
    assert poller.poll() == []  # known now
    asm.procs.on_exit(holder.pid)
    assert poller.poll() == []


def test_a_process_outside_the_scopes_is_not_reported(holder: subprocess.Popen[str]) -> None:
    asm = Assembler([Scope("box", ["/no/such/cgroup"])], lambda _id: "/", lambda _p: "")
    asm.procs.seed_from_proc(holder.pid)
    poller = PacketSocketPoller(asm, Path("/sys/fs/cgroup"), interval=0.0)
    assert poller.poll() == []
