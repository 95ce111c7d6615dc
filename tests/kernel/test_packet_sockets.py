"""Packet sockets (AF_PACKET, from the kprobe on packet_create): made in a sandbox they are
raw-socket events with family packet and their ethertype; made outside, nothing. On a kernel
without kprobes (some VM kernels) the probes report none, and the startup notes say that the
collector looks for them in /proc instead (tests/unit/test_packet_socket_poll.py)."""

from __future__ import annotations

import os
import socket

from api.events import RawSocketEvent
from probes import kernel
from tests.kernel.tracer import Tracer, of

PACKET = """
import socket
for kind, proto in [(socket.SOCK_RAW, 0x0003), (socket.SOCK_DGRAM, 0x0806), (socket.SOCK_RAW, 0)]:
    socket.socket(socket.AF_PACKET, kind, socket.htons(proto)).close()
socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 0).close()  # no packet socket: no event
print("ok", flush=True)
"""


def test_packet_sockets_are_reported_with_their_ethertype(tracer: Tracer) -> None:
    with tracer.sandbox() as sb:
        pid, out, events = sb.python(PACKET)
    assert out.split() == [b"ok"]
    raw = [e for e in of(events, "raw_socket", pid) if isinstance(e, RawSocketEvent)]
    features = kernel.check()
    if not features.packet_kprobe:  # not seen being made, and said
        assert raw == []
        said = "packet (AF_PACKET) sockets made in sandboxes are looked for in /proc"
        assert any(said in n for n in features.notes)
        return
    assert [(e.family, e.protocol, e.protocol_number) for e in raw] == [
        ("packet", "all", 0x0003),
        ("packet", "arp", 0x0806),
        ("packet", "none", 0),
    ]
    assert all(e.sandbox == sb.name and e.process.pid == pid for e in raw)


def test_packet_sockets_outside_the_sandbox_are_not_seen(tracer: Tracer) -> None:
    with tracer.sandbox() as sb:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)).close()
        sb.python("print(1)")  # its exit: every earlier record has been read
    assert of(tracer.events, "raw_socket", os.getpid()) == []
