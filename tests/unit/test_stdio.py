"""Standard streams at exec: real processes whose fds 0-2 the test set up, compared with
what the test knows they are (its ports, its paths)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from collector.sockets import HeldSocket, UnixSocket, find_socket
from collector.stdio import UNKNOWN, PendingSocket, StdioReader, classify, describe


@pytest.mark.parametrize(
    ("link", "kind"),
    [
        (b"/dev/pts/3", "tty"),
        (b"/dev/tty", "tty"),
        (b"/dev/tty1", "tty"),
        (b"/dev/ttyS0", "tty"),
        (b"/dev/console", "tty"),
        (b"/dev/null", "null"),
        (b"pipe:[12345]", "pipe"),
        (b"socket:[777]", 777),
        (b"socket:[x]", "socket"),
        (b"/tmp/out.log", "file:/tmp/out.log"),
        (b"/tmp/gone (deleted)", "file:/tmp/gone (deleted)"),
        (b"/dev/pts/../sda", "file:/dev/pts/../sda"),
        (b"anon_inode:[eventfd]", "file:anon_inode:[eventfd]"),
        (b"/tmp/\xff\x1b[31m", "file:/tmp/\\xff\x1b[31m"),
        (b"/" + b"a" * 5000, "file:/" + "a" * 511),
    ],
)
def test_classify(link: bytes, kind: str | int) -> None:
    assert classify(link) == kind


def held(protocol: str, state: str, raddr: str, rport: int) -> HeldSocket:
    return HeldSocket(0, protocol, "ipv4", state, "0.0.0.0", 1, raddr, rport, 9)


@pytest.mark.parametrize(
    ("sock", "entry"),
    [
        (None, "socket"),
        (held("tcp", "established", "192.0.2.1", 4444), "tcp:192.0.2.1:4444"),
        (held("tcp", "established", "::ffff:192.0.2.1", 4444), "tcp:192.0.2.1:4444"),
        (held("tcp", "established", "2001:db8::1", 22), "tcp:[2001:db8::1]:22"),
        (held("tcp", "listen", "0.0.0.0", 0), "tcp:"),
        (held("udp", "unconnected", "0.0.0.0", 0), "udp:"),
        (held("udp", "established", "198.51.100.2", 53), "udp:198.51.100.2:53"),
        (UnixSocket(1, "", 2, "/run/x.sock"), "unix:/run/x.sock"),
        (UnixSocket(1, "/run/x.sock", 2, ""), "unix:/run/x.sock"),
        (UnixSocket(1, "", 2, "@abstract"), "unix:@abstract"),
        (UnixSocket(1, "", 0, ""), "unix:"),
    ],
)
def test_describe(sock: HeldSocket | UnixSocket | None, entry: str) -> None:
    assert describe(sock) == entry


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def spawn(stack: ExitStack, **fds: Any) -> int:
    """A sleeping process with the given stdin/stdout/stderr; killed at the end."""
    proc = subprocess.Popen(["/usr/bin/sleep", "60"], **fds)

    def stop() -> None:
        proc.kill()
        proc.communicate()  # and close the pipes

    stack.callback(stop)
    wait_exec(proc.pid)
    return proc.pid


def wait_exec(pid: int) -> None:
    """Return once `pid` runs sleep (a loaded machine may take a while to exec)."""
    sleep = Path("/usr/bin/sleep").resolve().stat().st_ino
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/exe").stat().st_ino == sleep:
                return
        except OSError:
            pass
        time.sleep(0.001)
    raise AssertionError(f"{pid} did not exec sleep within 20 s")


def read_all(reader: StdioReader, pid: int) -> list[str]:
    entries, sockets = reader.read(pid)
    if sockets:
        reader.resolve_sockets(pid, entries, sockets, {})
        reader.remember(entries, sockets)
    return entries


def test_null_pipe_file(stack: ExitStack, tmp_path: Path) -> None:
    out = stack.enter_context((tmp_path / "out\xe9.log").open("wb"))
    pid = spawn(stack, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=out)
    reader = StdioReader()
    assert read_all(reader, pid) == ["null", "pipe", f"file:{tmp_path}/out\xe9.log"]
    assert reader.stats.inspected == 1


def test_tty(stack: ExitStack) -> None:
    master, slave = os.openpty()
    stack.callback(os.close, master)
    stack.callback(os.close, slave)
    pid = spawn(stack, stdin=slave, stdout=slave, stderr=subprocess.DEVNULL)
    assert read_all(StdioReader(), pid) == ["tty", "tty", "null"]


def test_closed_fd_and_gone_process(stack: ExitStack) -> None:
    proc = subprocess.Popen(
        ["/bin/sh", "-c", "exec /usr/bin/sleep 60 <&- 2>&-"], stdout=subprocess.DEVNULL
    )
    stack.callback(proc.wait)
    stack.callback(proc.kill)
    wait_exec(proc.pid)
    reader = StdioReader()
    assert read_all(reader, proc.pid) == ["closed", "null", "closed"]
    proc.kill()
    proc.wait()
    assert read_all(reader, proc.pid) == UNKNOWN
    assert (reader.stats.inspected, reader.stats.unknown) == (1, 1)


def test_tcp_stdin_and_stdout_name_the_peer(stack: ExitStack) -> None:
    listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
    port = listener.getsockname()[1]
    client = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
    stack.enter_context(listener.accept()[0])
    pid = spawn(stack, stdin=client, stdout=client, stderr=subprocess.PIPE)
    reader = StdioReader()
    entries, sockets = reader.read(pid)
    assert entries == ["", "", "pipe"]
    inode = os.fstat(client.fileno()).st_ino
    assert [(s.fd, s.inode) for s in sockets] == [(0, inode), (1, inode)]
    reader.resolve_sockets(pid, entries, sockets, {})
    reader.remember(entries, sockets)
    want = f"tcp:127.0.0.1:{port}"
    assert entries == [want, want, "pipe"]
    assert reader.stats.socket_lookups == 1  # one socket behind fds 0 and 1
    # the next exec with that socket is answered from the cache
    assert reader.read(pid) == ([want, want, "pipe"], [])


def test_tcp6_and_udp(stack: ExitStack) -> None:
    listener = stack.enter_context(socket.create_server(("::1", 0), family=socket.AF_INET6))
    port6 = listener.getsockname()[1]
    tcp6 = stack.enter_context(socket.create_connection(("::1", port6)))
    stack.enter_context(listener.accept()[0])
    udp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    udp.connect(("127.0.0.1", 9))
    lone = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    lone.bind(("127.0.0.1", 0))
    pid = spawn(stack, stdin=tcp6, stdout=udp, stderr=lone)
    assert read_all(StdioReader(), pid) == [f"tcp:[::1]:{port6}", "udp:127.0.0.1:9", "udp:"]


def test_unix_sockets(stack: ExitStack, tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    server = stack.enter_context(socket.socket(socket.AF_UNIX))
    server.bind(path)
    server.listen()
    client = stack.enter_context(socket.socket(socket.AF_UNIX))
    client.connect(path)
    accepted = stack.enter_context(server.accept()[0])
    left, right = socket.socketpair()
    stack.enter_context(left)
    stack.enter_context(right)
    pid = spawn(stack, stdin=client, stdout=accepted, stderr=left)
    assert read_all(StdioReader(), pid) == [f"unix:{path}", f"unix:{path}", "unix:"]


def test_abstract_unix_and_other_families(stack: ExitStack) -> None:
    server = stack.enter_context(socket.socket(socket.AF_UNIX))
    server.bind(b"\0sandtrace-test-%d" % os.getpid())
    server.listen()
    client = stack.enter_context(socket.socket(socket.AF_UNIX))
    client.connect(b"\0sandtrace-test-%d" % os.getpid())
    stack.enter_context(server.accept()[0])
    netlink = stack.enter_context(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
    pid = spawn(stack, stdin=client, stdout=netlink, stderr=subprocess.DEVNULL)
    assert read_all(StdioReader(), pid) == [
        f"unix:@sandtrace-test-{os.getpid()}",
        "socket",
        "null",
    ]


def test_find_socket_of_a_gone_process_is_none() -> None:
    assert find_socket(2**22 + 12345, 1) is None


def test_pending_socket_key_is_namespace_and_inode(stack: ExitStack) -> None:
    a, b = socket.socketpair()
    stack.enter_context(a)
    stack.enter_context(b)
    pid = spawn(stack, stdin=a, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, sockets = StdioReader().read(pid)
    netns = Path(f"/proc/{pid}/ns/net").stat().st_ino
    inode = os.fstat(a.fileno()).st_ino
    assert sockets == [PendingSocket(0, inode, (netns, inode))]
