"""connect() on unix sockets (the cgroup unix connect hook) against sockets the test made:
the exact path or abstract name, the socket type, and the process listening there."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.events import ConnectEvent
from tests.kernel.tracer import Tracer, of, python_exe

CONNECT = """
import socket, sys
kind = socket.SOCK_STREAM if sys.argv[2] == "stream" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_UNIX, kind)
print(s.connect_ex(sys.argv[1].replace("@", "\\0", 1)), flush=True)
"""


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[bytes, socket.socket]]:
    path = tmp_path / "docker.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(4)
    yield os.fsencode(path), s
    s.close()


def test_unix_connect_to_a_listener(tracer: Tracer, listener: tuple[bytes, socket.socket]) -> None:
    path, _ = listener
    with tracer.sandbox() as sb:
        pid, out, events = sb.python(CONNECT, os.fsdecode(path), "stream")
    assert out.split() == [b"0"]
    (ev,) = [e for e in of(events, "connect", pid) if e.family == "unix"]
    assert (ev.protocol, ev.path, ev.daddr, ev.dport) == ("unix", path, "", 0)
    assert (ev.peer_pid, ev.peer_exe) == (os.getpid(), python_exe())
    assert ev.process.pid == pid and ev.sandbox == sb.name


def test_unix_connect_to_nothing_and_to_an_abstract_name(tracer: Tracer, tmp_path: Path) -> None:
    """The hook runs before the lookup: a path no socket has is seen too (and fails)."""
    missing = tmp_path / "no-such.sock"
    name = f"@sandtrace-test-{os.getpid()}"
    with tracer.sandbox() as sb:
        pid1, out1, _ = sb.python(CONNECT, str(missing), "stream")
        pid2, out2, _ = sb.python(CONNECT, name, "dgram")
        events = sb.events()
    assert int(out1) != 0 and int(out2) != 0
    (ev1,) = of(events, "connect", pid1)
    (ev2,) = of(events, "connect", pid2)
    assert (ev1.path, ev1.peer_pid) == (os.fsencode(missing), 0)
    assert (ev2.path, ev2.peer_pid) == (name.encode(), 0)


def test_unix_connects_outside_the_sandbox_are_not_seen(
    tracer: Tracer, listener: tuple[bytes, socket.socket]
) -> None:
    path, _ = listener
    with tracer.sandbox() as sb:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(os.fsdecode(path))
        c.close()
        pid, _, events = sb.python(CONNECT, os.fsdecode(path), "stream")
    unix = [e for e in events if isinstance(e, ConnectEvent) and e.family == "unix"]
    assert [e.process.pid for e in unix] == [pid]
    assert not [
        e
        for e in tracer.events
        if isinstance(e, ConnectEvent) and e.path == path and e.process.pid == os.getpid()
    ]
