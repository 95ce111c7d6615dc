"""Raw IP sockets (the cgroup sock_create hook) and io_uring instances (io_uring_create),
against the exact family, type, protocol and ring sizes the test's processes used."""

from __future__ import annotations

import os
import socket

from api.events import IoUringEvent, RawSocketEvent
from tests.kernel.tracer import Tracer, of

SOCKETS = """
import socket
for fam, kind, proto in [(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                         (socket.AF_INET6, socket.SOCK_RAW, 255),
                         (socket.AF_INET, socket.SOCK_DGRAM, 0),
                         (socket.AF_INET, socket.SOCK_STREAM, 0)]:
    socket.socket(fam, kind, proto).close()
print("ok", flush=True)
"""

# io_uring_setup(2) through libc's syscall(): x86_64 number 425, a zeroed io_uring_params
IO_URING = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
fd = libc.syscall(425, 8, params)
assert fd >= 0, os.strerror(ctypes.get_errno())
print(fd, flush=True)
os.close(fd)
"""


def test_raw_sockets_are_reported_with_their_family_and_protocol(tracer: Tracer) -> None:
    with tracer.sandbox() as sb:
        pid, out, events = sb.python(SOCKETS)
    assert out.split() == [b"ok"]
    raw = [e for e in of(events, "raw_socket", pid) if isinstance(e, RawSocketEvent)]
    assert [(e.family, e.protocol, e.protocol_number) for e in raw] == [
        ("ipv4", "icmp", socket.IPPROTO_ICMP),
        ("ipv6", "raw", 255),
    ]
    assert all(e.sandbox == sb.name and e.process.pid == pid for e in raw)


def test_raw_sockets_outside_the_sandbox_are_not_seen(tracer: Tracer) -> None:
    with tracer.sandbox() as sb:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
        sb.python("print(1)")  # its exit: every earlier record has been read
    assert of(tracer.events, "raw_socket", os.getpid()) == []


def test_io_uring_setup_is_reported_with_its_sizes(tracer: Tracer) -> None:
    with tracer.sandbox() as sb:
        pid, out, events = sb.python(IO_URING)
    fd = int(out)
    (ev,) = [e for e in of(events, "io_uring", pid) if isinstance(e, IoUringEvent)]
    assert (ev.fd, ev.sq_entries, ev.cq_entries, ev.flags) == (fd, 8, 16, 0)
    assert ev.sandbox == sb.name
