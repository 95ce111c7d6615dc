"""connect, bind and listen events against sockets and ports the test itself made."""

from __future__ import annotations

import errno
import socket
import subprocess
from collections.abc import Iterator

import pytest

from collector import cgroups
from probes import kernel
from probes.loader import ProbeConfig, Probes
from tests.kernel.tracer import PYTHON, Tracer, of, one


@pytest.fixture
def tcp_listener() -> Iterator[tuple[str, int, socket.socket]]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield "127.0.0.1", s.getsockname()[1], s
    s.close()


@pytest.fixture
def tcp6_listener() -> Iterator[tuple[str, int, socket.socket]]:
    s = socket.socket(socket.AF_INET6)
    s.bind(("::1", 0))
    s.listen(16)
    yield "::1", s.getsockname()[1], s
    s.close()


def closed_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    s = socket.socket(family)
    s.bind((host, 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


CONNECT = """
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
kind = socket.SOCK_STREAM if sys.argv[3] == "tcp" else socket.SOCK_DGRAM
s = socket.socket(fam, kind)
err = s.connect_ex((sys.argv[1], int(sys.argv[2])))
print(err, s.getsockname()[1], flush=True)
"""


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_connect_success(
    tracer: Tracer,
    tcp_listener: tuple[str, int, socket.socket],
    tcp6_listener: tuple[str, int, socket.socket],
    proto: str,
    v6: bool,
) -> None:
    host, port, _ = tcp6_listener if v6 else tcp_listener
    with tracer.sandbox() as sb:
        pid, out, events = sb.python(CONNECT, host, str(port), proto)
    err, sport = map(int, out.split())
    assert err == 0
    ev = one(events, "connect", pid)
    assert (ev.protocol, ev.family) == (proto, "ipv6" if v6 else "ipv4")
    assert (ev.daddr, ev.dport) == (host, port)
    assert ev.outcome == "success"
    if proto == "tcp":
        assert (ev.saddr, ev.sport) == (host, sport)
    assert ev.process.pid == pid


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_connect_refused(tracer: Tracer, v6: bool) -> None:
    host = "::1" if v6 else "127.0.0.1"
    port = closed_port(socket.AF_INET6 if v6 else socket.AF_INET, host)
    with tracer.sandbox() as sb:
        pid, out, events = sb.python(CONNECT, host, str(port), "tcp")
    assert int(out.split()[0]) == errno.ECONNREFUSED
    ev = one(events, "connect", pid)
    assert (ev.daddr, ev.dport) == (host, port)
    assert (ev.outcome, ev.errno, ev.errno_name) == ("error", errno.ECONNREFUSED, "ECONNREFUSED")


# A private network namespace with a veth pair and no peer host: a SYN to 198.51.100.2 goes nowhere,
# so the handshake can only be in progress. Nothing leaves the namespace.
NONBLOCK = """
import socket
s = socket.socket()
s.setblocking(False)
print(s.connect_ex(("198.51.100.2", 4444)), flush=True)
"""


def test_connect_nonblocking_in_progress(tracer: Tracer) -> None:
    setup = (
        "ip link add v0 type veth peer name v1 && ip addr add 198.51.100.1/24 dev v0 && "
        "ip link set v0 up && ip link set v1 up && exec " + PYTHON + ' -c "$0"'
    )
    with tracer.sandbox() as sb:
        proc = sb.spawn(["unshare", "-n", "sh", "-c", setup, NONBLOCK], stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        sb.wait_exit(proc.pid)
        events = sb.events()
    assert int(out) == errno.EINPROGRESS
    ev = one(events, "connect", proc.pid)
    assert (ev.daddr, ev.dport, ev.protocol) == ("198.51.100.2", 4444, "tcp")
    assert (ev.outcome, ev.errno_name, ev.nonblocking) == ("in_progress", "EINPROGRESS", True)


BIND = """
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
kind = socket.SOCK_STREAM if sys.argv[3] == "tcp" else socket.SOCK_DGRAM
s = socket.socket(fam, kind)
s.bind((sys.argv[1], int(sys.argv[2])))
if kind == socket.SOCK_STREAM:
    s.listen(4)
print(s.getsockname()[1], flush=True)
"""


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("fixed", [False, True], ids=["port0", "fixed"])
def test_bind_and_listen(tracer: Tracer, proto: str, v6: bool, fixed: bool) -> None:
    host = "::1" if v6 else "127.0.0.1"
    family = socket.AF_INET6 if v6 else socket.AF_INET
    want = closed_port(family, host) if fixed else 0
    with tracer.sandbox() as sb:
        pid, out, events = sb.python(BIND, host, str(want), proto)
    bound = int(out)
    if fixed:
        assert bound == want
    ev = one(events, "bind", pid)
    assert (ev.protocol, ev.family, ev.outcome) == (proto, "ipv6" if v6 else "ipv4", "success")
    assert (ev.requested_addr, ev.requested_port) == (host, want)
    assert (ev.addr, ev.port) == (host, bound)
    listens = of(events, "listen", pid)
    if proto == "tcp":
        assert len(listens) == 1
        assert (listens[0].addr, listens[0].port) == (host, bound)
    else:
        assert listens == []


def test_failed_bind_is_reported(
    tracer: Tracer, tcp_listener: tuple[str, int, socket.socket]
) -> None:
    host, port, _ = tcp_listener
    code = """
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as e:
    print(e.errno, flush=True)
"""
    with tracer.sandbox() as sb:
        pid, out, events = sb.python(code, str(port))
    assert int(out) == errno.EADDRINUSE
    ev = one(events, "bind", pid)
    assert (ev.outcome, ev.requested_addr, ev.requested_port) == ("error", host, port)


def test_tcp_connect_is_traced_without_connect_hooks(
    tcp_listener: tuple[str, int, socket.socket],
) -> None:
    """--no-connect-hook: TCP connects still come, from the TCP state tracepoint."""
    host, port, _ = tcp_listener
    probes = Probes(ProbeConfig(connect_hooks=False), kernel.check())
    try:
        t = Tracer(probes, cgroups.find_cgroup2_root())
        with t.sandbox() as sb:
            pid, out, events = sb.python(CONNECT, host, str(port), "tcp")
            udp_pid, _, _ = sb.python(CONNECT, host, str(port), "udp")
            events = sb.events()
    finally:
        probes.close()
    err, sport = map(int, out.split())
    assert err == 0
    ev = one(events, "connect", pid)
    assert (ev.daddr, ev.dport, ev.saddr, ev.sport) == (host, port, host, sport)
    assert ev.outcome == "success"
    assert of(events, "connect", udp_pid) == []  # the documented cost of the option


def test_listener_is_traced_without_bind_hooks() -> None:
    """--no-bind-hook: a TCP listener is still seen, from the TCP state tracepoint."""
    probes = Probes(ProbeConfig(connect_hooks=False, bind_hooks=False), kernel.check())
    try:
        t = Tracer(probes, cgroups.find_cgroup2_root())
        with t.sandbox() as sb:
            pid, out, events = sb.python(BIND, "127.0.0.1", "0", "tcp")
    finally:
        probes.close()
    port = int(out)
    assert of(events, "bind", pid) == []  # the documented cost of the option
    listen = one(events, "listen", pid)
    assert (listen.addr, listen.port) == ("127.0.0.1", port)
