"""Standard streams captured in the kernel at exec: real processes in a sandbox, each gone
within a millisecond or so of its exec, their fds 0-2 set up by the test, and the exec
event's stdio compared with what the test made (its listener's port, its paths, its
sockets) or with what /proc/self/fd says of the test's own copy of the same file.

The events come straight from the assembler: nothing reads /proc/PID/fd, and the process
is reaped before its event is looked at, so only the exec record can have told.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from api.events import ExecEvent
from collector import cgroups
from collector.enrich import ExecEnricher
from collector.identity import Identities
from collector.stdio import StdioReader, classify
from probes import kernel, loader
from probes.btf import BTFError
from probes.loader import ProbeConfig, Probes
from tests.kernel.tracer import PYTHON, Sandbox, Tracer

TRUE = os.path.realpath("/bin/true")


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


@pytest.fixture
def sb(tracer: Tracer) -> Iterator[Sandbox]:
    with tracer.sandbox() as sandbox:
        yield sandbox


def exec_streams(sb: Sandbox, argv: list[str], exe: str = TRUE, **fds: Any) -> list[str]:
    """Run argv in the sandbox with the given stdin/stdout/stderr, reap it, and return the
    stdio of its exec of `exe`."""
    proc = sb.spawn(argv, **fds)
    proc.communicate(timeout=30)  # and close a pipe the test asked for
    assert proc.returncode == 0
    sb.wait_exit(proc.pid)
    assert not Path(f"/proc/{proc.pid}").exists()  # gone: /proc cannot tell any more
    execs = [
        e
        for e in sb.events()
        if isinstance(e, ExecEvent) and e.process.pid == proc.pid and e.process.exe == exe.encode()
    ]
    assert len(execs) == 1, execs
    return execs[0].stdio


def proc_view(fd: int) -> str:
    """What the /proc reader makes of the test's own fd: the entry the kernel's must equal."""
    kind = classify(os.fsencode(Path(f"/proc/self/fd/{fd}").readlink()))
    assert isinstance(kind, str)
    return kind


def test_tcp_stdin_and_stdout_of_a_process_that_exits_at_once(
    sb: Sandbox, stack: ExitStack
) -> None:
    listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
    port = listener.getsockname()[1]
    client = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
    stack.enter_context(listener.accept()[0])
    peer = f"tcp:127.0.0.1:{port}"
    got = exec_streams(sb, [TRUE], stdin=client, stdout=client, stderr=subprocess.DEVNULL)
    assert got == [peer, peer, "null"]


def test_tcp6_connected_and_unconnected_udp(sb: Sandbox, stack: ExitStack) -> None:
    listener = stack.enter_context(socket.create_server(("::1", 0), family=socket.AF_INET6))
    port6 = listener.getsockname()[1]
    tcp6 = stack.enter_context(socket.create_connection(("::1", port6)))
    stack.enter_context(listener.accept()[0])
    udp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    udp.connect(("127.0.0.1", 9))
    lone = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    lone.bind(("127.0.0.1", 0))
    got = exec_streams(sb, [TRUE], stdin=tcp6, stdout=udp, stderr=lone)
    assert got == [f"tcp:[::1]:{port6}", "udp:127.0.0.1:9", "udp:"]


def test_a_listening_socket_and_a_v4_mapped_peer(sb: Sandbox, stack: ExitStack) -> None:
    listener = stack.enter_context(
        socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    )
    port = listener.getsockname()[1]
    client = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
    accepted = stack.enter_context(listener.accept()[0])
    client_port = client.getsockname()[1]
    got = exec_streams(sb, [TRUE], stdin=listener, stdout=accepted, stderr=subprocess.DEVNULL)
    assert got == ["tcp:", f"tcp:127.0.0.1:{client_port}", "null"]


def test_null_pipe_and_a_file_by_its_exact_path(
    sb: Sandbox, stack: ExitStack, tmp_path: Path
) -> None:
    path = tmp_path / "out\xe9 \x1b[31m.log"
    out = stack.enter_context(path.open("wb"))
    got = exec_streams(sb, [TRUE], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=out)
    assert got == ["null", "pipe", f"file:{path}"]
    assert got[2] == proc_view(out.fileno())


def test_a_terminal(sb: Sandbox, stack: ExitStack) -> None:
    master, slave = os.openpty()
    stack.callback(os.close, master)
    stack.callback(os.close, slave)
    assert proc_view(slave) == "tty"
    got = exec_streams(sb, [TRUE], stdin=slave, stdout=slave, stderr=subprocess.DEVNULL)
    assert got == ["tty", "tty", "null"]


def test_unix_sockets_pair_bound_and_abstract(
    sb: Sandbox, stack: ExitStack, tmp_path: Path
) -> None:
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
    got = exec_streams(sb, [TRUE], stdin=client, stdout=accepted, stderr=left)
    assert got == [f"unix:{path}", f"unix:{path}", "unix:"]

    name = b"\0sandtrace-stdio-%d" % os.getpid()
    abstract = stack.enter_context(socket.socket(socket.AF_UNIX))
    abstract.bind(name)
    abstract.listen()
    to_abstract = stack.enter_context(socket.socket(socket.AF_UNIX))
    to_abstract.connect(name)
    stack.enter_context(abstract.accept()[0])
    netlink = stack.enter_context(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
    got = exec_streams(sb, [TRUE], stdin=to_abstract, stdout=netlink, stderr=abstract)
    want = f"unix:@sandtrace-stdio-{os.getpid()}"
    assert got == [want, "socket", want]


def test_closed_fds(sb: Sandbox) -> None:
    got = exec_streams(sb, ["/bin/sh", "-c", f"exec {TRUE} <&- 2>&-"], stdout=subprocess.DEVNULL)
    assert got == ["closed", "null", "closed"]


def test_pseudo_files_read_as_proc_shows_them(sb: Sandbox, stack: ExitStack) -> None:
    # A memfd and an eventfd on stdout and stderr, made by the process itself: each entry is
    # what /proc/self/fd says of the test's own memfd and eventfd of the same names.
    mine = os.memfd_create("stdio-test")
    stack.callback(os.close, mine)
    event = os.eventfd(0)
    stack.callback(os.close, event)
    code = (
        "import os\n"
        "os.dup2(os.memfd_create('stdio-test'), 1)\n"
        "os.dup2(os.eventfd(0), 2)\n"
        f"os.execv({TRUE!r}, ['true'])\n"
    )
    got = exec_streams(sb, [PYTHON, "-c", code], stdin=subprocess.DEVNULL)
    assert got == ["null", proc_view(mine), proc_view(event)]
    assert got[1:] == ["file:/memfd:stdio-test (deleted)", "file:anon_inode:[eventfd]"]


def test_a_deleted_file_and_a_named_fifo(sb: Sandbox, stack: ExitStack, tmp_path: Path) -> None:
    gone = stack.enter_context((tmp_path / "gone.log").open("wb"))
    (tmp_path / "gone.log").unlink()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    stack.callback(os.close, rd)
    got = exec_streams(sb, [TRUE], stdin=rd, stdout=gone, stderr=subprocess.DEVNULL)
    assert got == [f"file:{fifo}", f"file:{tmp_path}/gone.log (deleted)", "null"]
    assert got[:2] == [proc_view(rd), proc_view(gone.fileno())]


def test_a_path_longer_than_the_walk_keeps_its_leaf_end(
    sb: Sandbox, stack: ExitStack, tmp_path: Path
) -> None:
    deep = tmp_path
    for i in range(8):
        deep /= f"{i}" * 120
    deep.mkdir(parents=True)
    out = stack.enter_context((deep / "leaf.log").open("wb"))
    got = exec_streams(sb, [TRUE], stdin=subprocess.DEVNULL, stdout=out)
    assert got[1].startswith("file:.../"), got[1]
    tail = got[1].removeprefix("file:...")
    assert f"{deep}/leaf.log".endswith(tail)
    assert len(tail) > 400


def test_a_kernel_without_a_member_the_capture_reads_falls_back_to_proc(
    monkeypatch: pytest.MonkeyPatch, stack: ExitStack, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(_btf: object) -> None:
        raise BTFError("struct unix_sock has no member peer")

    monkeypatch.setattr(loader, "stdio_offsets", missing)
    probes = Probes(ProbeConfig(), kernel.check())  # compiled without HAVE_STDIO_CAPTURE
    stack.callback(probes.close)
    said = capsys.readouterr()  # at startup, in a log line (on stdout or stderr, as configured)
    assert "struct unix_sock has no member peer" in said.out + said.err
    tracer = Tracer(probes, cgroups.find_cgroup2_root())
    sb = stack.enter_context(tracer.sandbox())
    proc = sb.spawn(
        ["/usr/bin/sleep", "60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(proc.communicate)
    stack.callback(proc.kill)
    tracer.wait_for(lambda evs: any(isinstance(e, ExecEvent) for e in evs))
    [ev] = [e for e in sb.events() if isinstance(e, ExecEvent)]
    assert ev.process.pid == proc.pid
    assert ev.stdio == []  # not captured: left to the enricher
    enricher = ExecEnricher(Identities(None), StdioReader())
    stack.callback(enricher.close)
    events: list[Any] = [ev]
    batch = enricher.begin(events)
    if batch is not None:
        batch.work()
        batch.apply()
    assert events[0].stdio == ["null", "pipe", "null"]
    assert (enricher.stdio.stats.captured, enricher.stdio.stats.inspected) == (0, 1)
