"""Standard streams at exec: real processes whose fds 0-2 the test set up, compared with
what the test knows they are (its ports, its paths)."""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from api.events import ExecEvent
from collector import records as R
from collector.assemble import Assembler, Scope
from collector.enrich import ExecEnricher
from collector.identity import Identities
from collector.sockets import HeldSocket, UnixSocket, find_socket
from collector.stdio import (
    MAX_DETAIL,
    UNKNOWN,
    PendingSocket,
    StdioReader,
    classify,
    describe,
    kernel_entry,
)
from probes import loader
from probes.btf import BTF, BTFError, stdio_offsets, word_bits
from tests.unit.test_assemble import pack


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
    """Return once `pid` runs sleep and sleeps (a loaded machine may take a while to exec;
    right after the exec the dynamic loader still opens libraries, on the lowest free
    descriptor: on fd 0 when stdin is closed)."""
    sleep = Path("/usr/bin/sleep").resolve().stat().st_ino
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/exe").stat().st_ino == sleep and "nanosleep" in (
                Path(f"/proc/{pid}/wchan").read_text()
            ):
                return
        except OSError:
            pass
        time.sleep(0.001)
    raise AssertionError(f"{pid} did not exec sleep and sleep within 20 s")


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


# -- streams as the exec probe captures them ---------------------------------------------


def dev(major: int, minor: int) -> int:
    return major << 20 | minor


def fd_of(  # noqa: PLR0917 - the table below reads best positionally
    mode: int = 0,
    flags: int = R.STDIO_F_OPEN,
    rdev: int = 0,
    family: int = 0,
    sock_type: int = 0,
    protocol: int = 0,
    addr: bytes = b"",
    port: int = 0,
    name: bytes = b"",
) -> tuple[R.StdioFd, bytes]:
    return R.StdioFd(
        7, addr.ljust(16, b"\0"), flags, mode, rdev, len(name), family, sock_type, protocol, port
    ), name


PATH = R.STDIO_F_OPEN | R.STDIO_F_PATH
PSEUDO = PATH | R.STDIO_F_PSEUDO
DNAME = PATH | R.STDIO_F_DNAME
CHR, REG, FIFO, SOCK = stat.S_IFCHR | 0o620, stat.S_IFREG | 0o644, stat.S_IFIFO, stat.S_IFSOCK
V4 = socket.inet_pton(socket.AF_INET, "192.0.2.1")
V6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
MAPPED = socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.1")
INET, INET6, UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX
STREAM, DGRAM, RAW = socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW


@pytest.mark.parametrize(
    ("fd", "entry"),
    [
        (fd_of(flags=0), "closed"),
        (fd_of(flags=R.STDIO_F_UNREADABLE), "unknown"),
        (fd_of(CHR, rdev=dev(1, 3)), "null"),
        (fd_of(stat.S_IFBLK, PATH, dev(1, 3), name=b"ram3\0dev\0"), "file:/dev/ram3"),
        (fd_of(CHR, rdev=dev(136, 4)), "tty"),
        (fd_of(CHR, rdev=dev(143, 0)), "tty"),
        (fd_of(CHR, rdev=dev(4, 64)), "tty"),
        (fd_of(CHR, rdev=dev(5, 0)), "tty"),
        (fd_of(CHR, rdev=dev(5, 1)), "tty"),
        (fd_of(CHR, PATH, dev(5, 2), name=b"ptmx\0dev\0"), "file:/dev/ptmx"),
        (fd_of(CHR, PATH, dev(188, 0), name=b"ttyUSB0\0dev\0"), "tty"),
        (fd_of(CHR, PATH, dev(1, 5), name=b"zero\0dev\0"), "file:/dev/zero"),
        (fd_of(FIFO, DNAME, name=b"\0"), "pipe"),
        (fd_of(FIFO, PATH, name=b"fifo\0tmp\0"), "file:/tmp/fifo"),
        (fd_of(REG, PATH, name=b"out.log\0tmp\0"), "file:/tmp/out.log"),
        (fd_of(REG, PATH, name=b"\xff\x1b[31m\0tmp\0"), "file:/tmp/\\xff\x1b[31m"),
        (fd_of(REG, PATH | R.STDIO_F_UNLINKED, name=b"x\0tmp\0"), "file:/tmp/x (deleted)"),
        (
            fd_of(REG, DNAME | R.STDIO_F_UNLINKED, name=b"memfd:p\0"),
            "file:/memfd:p (deleted)",
        ),
        (fd_of(REG, PSEUDO | R.STDIO_F_UNLINKED, name=b"x\0"), "file:/x (deleted)"),
        (fd_of(0o600, DNAME, name=b"[eventfd]\0"), "file:anon_inode:[eventfd]"),
        (fd_of(REG, DNAME, name=b"ns\0"), "file:ns"),
        (
            fd_of(REG, PATH | R.STDIO_F_TRUNCATED, name=b"leaf\0deep\0"),
            "file:.../deep/leaf",
        ),
        (fd_of(stat.S_IFDIR, PATH, name=b""), "file:/"),
        (fd_of(SOCK, family=INET, sock_type=STREAM, protocol=6, addr=V4, port=4444), None),
        (
            fd_of(SOCK, family=INET6, sock_type=STREAM, protocol=6, addr=V6, port=22),
            "tcp:[2001:db8::1]:22",
        ),
        (
            fd_of(SOCK, family=INET6, sock_type=STREAM, protocol=6, addr=MAPPED, port=4444),
            "tcp:192.0.2.1:4444",
        ),
        (fd_of(SOCK, family=INET, sock_type=STREAM, protocol=6), "tcp:"),
        (fd_of(SOCK, family=INET, sock_type=DGRAM, protocol=17), "udp:"),
        (
            fd_of(SOCK, family=INET, sock_type=DGRAM, protocol=17, addr=V4, port=53),
            "udp:192.0.2.1:53",
        ),
        (fd_of(SOCK, family=INET, sock_type=RAW, protocol=1, addr=V4, port=0), "socket"),
        (fd_of(SOCK, family=INET, sock_type=STREAM, protocol=262, addr=V4, port=80), "socket"),
        (fd_of(SOCK, family=socket.AF_NETLINK, sock_type=RAW), "socket"),
        (fd_of(SOCK, family=UNIX, sock_type=STREAM), "unix:"),
        (fd_of(SOCK, family=UNIX, name=b"/run/x.sock\0"), "unix:/run/x.sock"),
        (fd_of(SOCK, family=UNIX, name=b"\0agent\0x"), "unix:@agent\0x"),
        (fd_of(SOCK, family=UNIX, name=b"/tmp/\xff\x1b"), "unix:/tmp/\\xff\x1b"),
    ],
)
def test_kernel_entry(fd: tuple[R.StdioFd, bytes], entry: str | None) -> None:
    assert kernel_entry(*fd) == (entry or "tcp:192.0.2.1:4444")


def test_a_path_beyond_the_walk_keeps_whole_components_of_its_leaf_end() -> None:
    parts = [b"leaf.log", *(b"%d" % i * 100 for i in range(9))]
    entry = kernel_entry(*fd_of(REG, PATH | R.STDIO_F_TRUNCATED, name=b"\0".join(parts) + b"\0"))
    assert entry.startswith("file:.../")
    assert entry.endswith("/" + "/".join(p.decode() for p in reversed(parts[:5])))
    assert len(entry) <= len("file:") + MAX_DETAIL


def exec_record(flags: int, fds: list[tuple[R.StdioFd, bytes]], **values: Any) -> bytes:
    """An exec record of argv ["x"], its streams and their names after the file name."""
    stdio = b"".join(R.layout(R.StdioFd).struct.pack(*fd) for fd, _ in fds)
    names = b"".join(name for _, name in fds)
    return pack(
        R.REC_EXEC,
        b"x\0" + names,
        argv_size=2,
        argv_full_size=2,
        flags=flags,
        stdio=stdio.ljust(R.STDIO_FDS * 48, b"\0"),
        **values,
    )


def test_an_exec_record_carries_its_streams() -> None:
    asm = Assembler([Scope("box", ["/box"])], lambda _id: "/box/x", lambda _p: "", host="h")
    fds = [
        fd_of(SOCK, family=UNIX, name=b"/run/a.sock\0"),
        fd_of(REG, PATH, name=b"o\0tmp\0"),
        fd_of(CHR, rdev=dev(1, 3)),
    ]
    events, errors = asm.feed_batches([[exec_record(R.EXEC_F_STDIO, fds), exec_record(0, [])]])
    assert errors == []
    captured, without = events
    assert isinstance(captured, ExecEvent) and isinstance(without, ExecEvent)
    assert captured.argv == [b"x"]
    assert captured.stdio == ["unix:/run/a.sock", "file:/tmp/o", "null"]
    assert without.stdio == []  # the kernel did not capture them: the enricher reads /proc

    # Names longer than the data the record holds are an error, not bytes made up.
    fd, _ = fd_of(REG, PATH, name=b"o\0tmp\0")
    short = exec_record(R.EXEC_F_STDIO, [(fd, b"o\0")])
    events, errors = asm.feed_batches([[short]])
    assert events == [] and len(errors) == 1 and "stdio names" in errors[0], errors


def test_the_enricher_reads_proc_only_for_streams_the_kernel_did_not_capture(
    stack: ExitStack,
) -> None:
    asm = Assembler([Scope("box", ["/box"])], lambda _id: "/box/x", lambda _p: "", host="h")
    pid = spawn(stack, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    gone = 2**22 + 4321  # no such process: /proc could not tell
    captured = exec_record(R.EXEC_F_STDIO, [fd_of(CHR, rdev=dev(136, 0))] * 3, pid=gone)
    events, errors = asm.feed_batches([[captured, exec_record(0, [], pid=pid)]])
    assert errors == []
    enricher = ExecEnricher(Identities(None), StdioReader())
    try:
        batch = enricher.begin(events)
        if batch is not None:
            batch.work()
            batch.apply()
    finally:
        enricher.close()
    first, second = events
    assert isinstance(first, ExecEvent) and isinstance(second, ExecEvent)
    assert first.stdio == ["tty", "tty", "tty"]
    assert second.stdio == ["null", "pipe", "null"]
    stats = enricher.stdio.stats
    assert (stats.captured, stats.inspected, stats.unknown) == (1, 1, 0)


# -- what the capture reads, found in BTF -------------------------------------------------


def btf_blob(sock_members: list[tuple[str, int, int]], kind_flag: bool) -> bytes:
    """A BTF blob with two integer types (1: u32, 2: u16) and a struct sock of the given
    members (name, type id, offset word as BTF stores it)."""
    strings = bytearray(b"\0")

    def name(text: str) -> int:
        strings.extend(text.encode() + b"\0")
        return len(strings) - len(text) - 1

    types = bytearray()
    types += struct.pack("<III", name("u32"), 1 << 24, 4) + struct.pack("<I", 32)
    types += struct.pack("<III", name("u16"), 1 << 24, 2) + struct.pack("<I", 16)
    info = 4 << 24 | len(sock_members) | (1 << 31 if kind_flag else 0)
    types += struct.pack("<III", name("sock"), info, 8)
    for member, type_id, offset in sock_members:
        types += struct.pack("<III", name(member), type_id, offset)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + bytes(types) + bytes(strings)


def test_sk_protocol_as_a_member_and_as_an_old_kernels_bitfield() -> None:
    # Linux 5.6+: u16 members; before, bitfields of one 32-bit word (sk_protocol:8 at bit 8,
    # sk_type:16 at bit 16).
    new = BTF(btf_blob([("sk_protocol", 2, 32 * 8), ("sk_type", 2, 34 * 8)], kind_flag=False))
    old = BTF(btf_blob([("sk_protocol", 1, 8 << 24 | 8), ("sk_type", 1, 16 << 24 | 16)], True))
    assert new.bits_of("sock", "sk_protocol") == (256, 16, False)
    assert new.bits_of("sock", "sk_type") == (272, 16, False)
    assert old.bits_of("sock", "sk_protocol") == (8, 8, True)
    assert old.bits_of("sock", "sk_type") == (16, 16, True)
    # (word's byte offset, shift, mask) the probe reads them through
    assert word_bits(256, 16) == (32, 0, 0xFFFF)
    assert word_bits(272, 16) == (32, 16, 0xFFFF)
    assert word_bits(8, 8) == (0, 8, 0xFF)
    with pytest.raises(BTFError, match="spans two"):
        word_bits(24, 16)


def test_a_kernel_without_a_member_the_capture_reads_falls_back_to_proc() -> None:
    btf = BTF(btf_blob([("sk_protocol", 2, 0)], kind_flag=False))
    with pytest.raises(BTFError, match="task_struct"):
        stdio_offsets(btf)
    assert loader.stdio_flags(btf) == []
