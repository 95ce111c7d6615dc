"""collector.sockets against the real kernel: sockets a child process holds, found exactly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.sockets import HeldSocket, snapshot, socket_inodes

# Opens the sockets, reports their ports on stdout, then waits for stdin to close.
CHILD = r"""
import json, socket, sys
tcp4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp4.bind(("127.0.0.1", 0))
tcp4.listen(8)
tcp6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
tcp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
tcp6.bind(("::1", 0))
tcp6.listen(8)
udp4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp4.bind(("127.0.0.1", 0))
conn = socket.create_connection(("127.0.0.1", tcp4.getsockname()[1]))
print(json.dumps({
    "tcp4": tcp4.getsockname()[1],
    "tcp6": tcp6.getsockname()[1],
    "udp4": udp4.getsockname()[1],
    "conn": conn.getsockname()[1],
}), flush=True)
sys.stdin.read()
"""


class Child:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"child exited early with {self.proc.wait(timeout=10)}"
        self.ports: dict[str, int] = json.loads(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child([sys.executable, "-c", CHILD])
    try:
        yield c
    finally:
        c.stop()


def _without_inode(sockets: list[HeldSocket]) -> set[tuple[object, ...]]:
    return {
        (s.pid, s.protocol, s.family, s.state, s.laddr, s.lport, s.raddr, s.rport) for s in sockets
    }


@pytest.mark.kernel
def test_snapshot_finds_exactly_the_childs_sockets(child: Child) -> None:
    ports = child.ports
    pid = child.pid
    # a socket of this test process must not show up
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as mine:
        mine.bind(("127.0.0.1", 0))
        mine.listen(1)
        my_port = mine.getsockname()[1]

        held = snapshot({pid})

        assert _without_inode(held) == {
            (pid, "tcp", "ipv4", "listen", "127.0.0.1", ports["tcp4"], "0.0.0.0", 0),
            (pid, "tcp", "ipv6", "listen", "::1", ports["tcp6"], "::", 0),
            (pid, "udp", "ipv4", "unconnected", "127.0.0.1", ports["udp4"], "0.0.0.0", 0),
            (
                pid,
                "tcp",
                "ipv4",
                "established",
                "127.0.0.1",
                ports["conn"],
                "127.0.0.1",
                ports["tcp4"],
            ),
        }
        # the accepted end of the connection waits in the listen queue, owned by nobody
        assert len(held) == 4
        assert {s.inode for s in held} == socket_inodes(pid)
        assert all(s.lport != my_port for s in held)

        mine_held = snapshot({os.getpid()})
        assert any(s.lport == my_port and s.state == "listen" for s in mine_held)
        assert all(s.pid == os.getpid() for s in mine_held)

        both = snapshot({pid, os.getpid()})
        assert _without_inode(held) <= _without_inode(both)
        assert {s.pid for s in both if s.lport == my_port} == {os.getpid()}


@pytest.mark.kernel
def test_snapshot_of_gone_or_socketless_processes_is_empty(child: Child) -> None:
    sleeper = subprocess.Popen(["sleep", "1000"])
    try:
        assert snapshot({sleeper.pid}) == []
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)
    assert snapshot({sleeper.pid}) == []
    assert snapshot(set()) == []
    child.stop()
    assert snapshot({child.pid}) == []


@pytest.mark.kernel
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_snapshot_reads_the_tables_of_the_process_network_namespace() -> None:
    # the child gets a network namespace of its own (loopback only, brought up before
    # the exec); unshare and sh exec in turn, so the pid is the Python child's
    ip = shutil.which("ip")
    if ip is None:
        pytest.skip("needs ip(8)")
    script = f'{ip} link set lo up && exec "$0" -c "$1"'
    c = Child(["unshare", "--net", "sh", "-c", script, sys.executable, CHILD])
    try:
        assert Path(f"/proc/{c.pid}/ns/net").readlink() != Path("/proc/self/ns/net").readlink()
        held = snapshot({c.pid})
        assert {(s.protocol, s.family, s.state, s.lport) for s in held} == {
            ("tcp", "ipv4", "listen", c.ports["tcp4"]),
            ("tcp", "ipv6", "listen", c.ports["tcp6"]),
            ("udp", "ipv4", "unconnected", c.ports["udp4"]),
            ("tcp", "ipv4", "established", c.ports["conn"]),
        }
        assert {s.pid for s in held} == {c.pid}
        # this thread stayed in its own namespace
        assert Path("/proc/thread-self/ns/net").readlink() == Path("/proc/self/ns/net").readlink()
    finally:
        c.stop()


def test_socket_inodes_from_a_fake_proc(tmp_path: Path) -> None:
    fd = tmp_path / "77" / "fd"
    fd.mkdir(parents=True)
    (fd / "0").symlink_to("/dev/null")
    (fd / "3").symlink_to("socket:[12345]")
    (fd / "4").symlink_to("socket:[678]")
    (fd / "5").symlink_to("pipe:[999]")
    (fd / "6").symlink_to("anon_inode:[eventfd]")
    assert socket_inodes(77, tmp_path) == {12345, 678}
    assert socket_inodes(78, tmp_path) == set()
