"""UDP datagrams sent without connect() (cgroup_skb egress on the sandbox): the destination
once per socket and destination, the other sends counted, against the exact sends the
test's process made."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from api.events import ConnectEvent
from probes.loader import REPEAT_WINDOW_NS
from tests.kernel.tracer import Tracer, of

SENDS = """
import socket, sys
a, b = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(b"x", ("127.0.0.1", a))
s.sendto(b"y", ("127.0.0.1", b))
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s6.sendto(b"z", ("::1", a))
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.connect(("127.0.0.1", b))  # connected: reported by the connect hook, not as sends
for _ in range(3):
    c.send(b"w")
print("ok", flush=True)
"""


@pytest.fixture
def ports() -> Iterator[tuple[int, int]]:
    socks = [socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) for _ in range(2)]
    for s in socks:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
    yield socks[0].getsockname()[1], socks[1].getsockname()[1]
    for s in socks:
        s.close()


def test_unconnected_sends_once_per_socket_and_destination(
    tracer: Tracer, ports: tuple[int, int]
) -> None:
    a, b = ports
    with tracer.sandbox() as sb:
        pid, out, _ = sb.python(SENDS, str(a), str(b))
        tracer.probes.drain_repeats(time.monotonic_ns() + REPEAT_WINDOW_NS)
        tracer.collect()
        events = [e for e in of(sb.events(), "connect", pid) if isinstance(e, ConnectEvent)]
    assert out.split() == [b"ok"]
    sent = [(e.family, e.daddr, e.dport) for e in events if e.outcome == "sent"]
    assert sent == [("ipv4", "127.0.0.1", a), ("ipv4", "127.0.0.1", b), ("ipv6", "::1", a)]
    repeats = [(e.daddr, e.dport, e.repeats) for e in events if e.outcome == "repeated"]
    assert repeats == [("127.0.0.1", a, 4)]
    connected = [(e.daddr, e.dport) for e in events if e.outcome == "success"]
    assert connected == [("127.0.0.1", b)]
    assert all(e.protocol == "udp" and e.process.pid == pid for e in events)
