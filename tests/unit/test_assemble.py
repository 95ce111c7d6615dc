"""The assembler, fed records packed exactly as the kernel lays them out (no root needed)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

import pytest

from api.events import ConnectEvent, ExecEvent, IoUringEvent, LostEvent, RawSocketEvent
from collector import records as R
from collector.assemble import CONNECT_HOLD_NS, Assembler, Scope
from collector.sockets import UnixListener, UnixListeners
from detect.egress import EgressPolicy
from detect.engine import LOSS_RULE_ID, Engine
from detect.ruleset import RuleSet

HOST_FIELDS = {
    "cgroup_id": 77,
    "start_ns": 5_000,
    "pid": 100,
    "tid": 100,
    "ns_pid": 1,
    "ppid": 99,
    "uid": 1000,
    "gid": 1000,
    "sandbox": 0,
    "comm": b"agent",
}


def pack(rtype: int, data: bytes = b"", **values: Any) -> bytes:
    """A record of type `rtype` as the kernel writes it: the fixed part, then `data`."""
    layout = R.layout(R.RECORD_CLASSES[rtype])
    header = {"type": rtype, "version": R.LAYOUT_VERSION, "ktime_ns": 1_000, **HOST_FIELDS}
    merged = header | values
    fixed = [
        merged.get(name, b"" if code.endswith("s") else 0) for name, code in layout.codes.items()
    ]
    return layout.struct.pack(*fixed) + data


def ip4(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, addr) + bytes(12)


@pytest.fixture
def asm() -> Assembler:
    return Assembler([Scope("box", ["/box"])], lambda _id: "/box/x", lambda _p: "", host="h")


def feed(asm: Assembler, *bufs: bytes) -> list[Any]:
    """Events (typed loosely, so tests read any kind's fields) for the given records."""
    events, errors = asm.feed_batches([list(bufs)])
    assert errors == []
    return events


def tcp_connect(cookie: int, port: int = 443) -> bytes:
    return pack(
        R.REC_CONNECT,
        cookie=cookie,
        daddr=ip4("192.0.2.7"),
        family=2,
        dport=port,
        sock_type=1,
        protocol=6,
    )


def state(cookie: int, old: int, new: int, **kw: Any) -> bytes:
    return pack(
        R.REC_TCP_STATE,
        cookie=cookie,
        family=2,
        oldstate=old,
        newstate=new,
        daddr=ip4("192.0.2.7"),
        dport=443,
        **kw,
    )


def test_tcp_connect_waits_for_its_outcome(asm: Assembler) -> None:
    assert feed(asm, tcp_connect(1), state(1, 7, 2)) == []
    (ev,) = feed(asm, state(1, 2, 1, saddr=ip4("198.51.100.2"), sport=40000))
    assert isinstance(ev, ConnectEvent)
    assert (ev.daddr, ev.dport, ev.saddr, ev.sport) == ("192.0.2.7", 443, "198.51.100.2", 40000)
    assert (ev.outcome, ev.nonblocking, ev.process.pid, ev.sandbox) == (
        "success",
        False,
        100,
        "box",
    )


def test_refused_connect_carries_errno(asm: Assembler) -> None:
    (ev,) = feed(asm, tcp_connect(2), state(2, 7, 2), state(2, 2, 7, err=errno.ECONNREFUSED))
    assert (ev.outcome, ev.errno, ev.errno_name) == ("error", errno.ECONNREFUSED, "ECONNREFUSED")


def test_nonblocking_connect_resolved_within_hold_reports_outcome(asm: Assembler) -> None:
    (ev,) = feed(asm, tcp_connect(3), state(3, 7, 2, flags=R.SOCK_F_NONBLOCK), state(3, 2, 1))
    assert (ev.outcome, ev.nonblocking) == ("success", True)


def test_unresolved_connects_after_the_hold(asm: Assembler) -> None:
    feed(asm, tcp_connect(4, port=1), state(4, 7, 2, flags=R.SOCK_F_NONBLOCK))
    feed(asm, tcp_connect(5, port=2), state(5, 7, 2))
    assert asm.expire(now_mono_ns=1_000 + CONNECT_HOLD_NS - 1) == []
    out = {
        e.dport: e
        for e in asm.expire(now_mono_ns=1_000 + CONNECT_HOLD_NS)
        if isinstance(e, ConnectEvent)
    }
    assert (out[1].outcome, out[1].errno_name, out[1].nonblocking) == (
        "in_progress",
        "EINPROGRESS",
        True,
    )
    assert (out[2].outcome, out[2].errno_name, out[2].nonblocking) == ("pending", "", False)
    assert asm.flush_all() == []


def test_exit_flushes_the_process_pending_connects(asm: Assembler) -> None:
    feed(asm, tcp_connect(7, port=3), state(7, 7, 2))
    connect, exit_ev = feed(asm, pack(R.REC_EXIT))
    assert isinstance(connect, ConnectEvent)
    assert (connect.dport, connect.outcome, exit_ev.kind) == (3, "pending", "exit")


def test_connect_closed_by_owner_before_handshake(asm: Assembler) -> None:
    (ev,) = feed(asm, tcp_connect(6), state(6, 7, 2, flags=R.SOCK_F_NONBLOCK), state(6, 2, 7))
    assert (ev.outcome, ev.errno_name) == ("in_progress", "EINPROGRESS")


def test_udp_connect_is_reported_at_once(asm: Assembler) -> None:
    (ev,) = feed(
        asm,
        pack(
            R.REC_CONNECT,
            cookie=9,
            daddr=ip4("192.0.2.53"),
            family=2,
            dport=53,
            sock_type=2,
            protocol=17,
        ),
    )
    assert (ev.protocol, ev.daddr, ev.dport, ev.outcome) == ("udp", "192.0.2.53", 53, "success")


def test_argv_head_and_tail_with_a_gap(asm: Assembler) -> None:
    """Padding before the arguments that matter: the tail's arguments are in argv, the cut
    arguments kept as far as captured, and the event says argv was cut."""
    head = b"xmrig\0" + b"A" * 10
    tail = b"AAA\0-o\0stratum+tcp://pool:3333\0"
    exe = b"xmrig\0tmp\0"
    rec = pack(
        R.REC_EXEC,
        head + tail + exe,
        flags=R.EXEC_F_ARGV_TRUNCATED,
        argv_size=len(head),
        argv_tail_size=len(tail),
        argv_full_size=20_000,
        exe_size=len(exe),
    )
    (ev,) = feed(asm, rec)
    assert ev.argv == [b"xmrig", b"A" * 10, b"AAA", b"-o", b"stratum+tcp://pool:3333"]
    assert ev.argv_truncated and ev.argv_size == 20_000
    assert ev.process.exe == b"/tmp/xmrig"


@pytest.mark.parametrize(
    ("head", "tail", "full", "argv"),
    [
        (b"a\0bb", b"b\0c\0", 7, [b"a", b"bbb", b"c"]),  # contiguous: joined
        (b"a\0b\0", b"c\0", 6, [b"a", b"b", b"c"]),
        (b"a\0b\0", b"x\0c\0", 100, [b"a", b"b", b"x", b"c"]),  # gap at argument bounds
        (b"a\0bb", b"yy", 100, [b"a", b"bb", b"yy"]),  # one long argument seen at both ends
        (b"a\0b\0", b"", 4, [b"a", b"b"]),
        (b"a\0bb", b"", 100, [b"a", b"bb"]),  # no tail read: the head's cut argument kept
    ],
)
def test_argv_of_head_and_tail(head: bytes, tail: bytes, full: int, argv: list[bytes]) -> None:
    assert R.argv_of(head, tail, full) == argv


def unix_connect(path: bytes, path_size: int) -> bytes:
    return pack(R.REC_UNIX_CONNECT, cookie=5, sock_type=1, path_size=path_size, path=path)


def test_unix_connect_names_the_path_and_its_listener() -> None:
    asked: list[tuple[int, bytes]] = []

    def listener(pid: int, path: bytes) -> UnixListener | None:
        asked.append((pid, path))
        return UnixListener(812, b"/usr/bin/dockerd") if path == b"/run/docker.sock" else None

    asm = Assembler(
        [Scope("box", ["/box"])],
        lambda _id: "/box/x",
        lambda _p: "",
        host="h",
        unix_listener=listener,
    )
    # what python's connect() gives: the path and its NUL; the rest of sun_path is stale
    (ev,) = feed(asm, unix_connect(b"/run/docker.sock\0junk", 17))
    assert (ev.family, ev.protocol, ev.daddr, ev.dport) == ("unix", "unix", "", 0)
    assert (ev.path, ev.peer_pid, ev.peer_exe) == (b"/run/docker.sock", 812, b"/usr/bin/dockerd")
    (ev,) = feed(asm, unix_connect(b"\0bus\0x", 4))  # abstract: only the bytes given count
    assert (ev.path, ev.peer_pid, ev.peer_exe) == (b"@bus", 0, b"")
    assert asked == [(100, b"/run/docker.sock"), (100, b"@bus")]
    (ev,) = feed(asm, unix_connect(b"x" * 108, 4000))  # a size past sun_path: cut to it
    assert ev.path == b"x" * 108


def test_unix_connect_is_not_egress() -> None:
    """An egress allow-list judges IP destinations; a unix socket's connect is local IPC
    (the runtime-socket rules judge those)."""
    policy = EgressPolicy.parse(["192.0.2.0/24"])
    engine = Engine(RuleSet(), egress=policy)
    asm = Assembler(
        [Scope("box", ["/box"])],
        lambda _id: "/box/x",
        lambda _p: "",
        host="h",
        unix_listener=lambda _pid, _path: None,
    )
    (ev,) = feed(asm, unix_connect(b"/tmp/app.sock\0", 14))
    assert engine.feed(ev) == []


def test_exec_record_parts_and_parent(asm: Assembler) -> None:
    argv = b"/bin/sh\0-c\0\0x y\0"
    exe = b"sh\0bin\0usr\0"  # leaf first
    cwd = b"work\0tmp\0"
    data = argv + exe + cwd + b"/bin/sh\0"
    parent = pack(
        R.REC_EXEC,
        argv + b"python3\0usr\0" + b"",
        pid=99,
        ppid=1,
        argv_size=len(argv),
        argv_full_size=len(argv),
        exe_size=12,
    )
    child = pack(
        R.REC_EXEC,
        data,
        argv_size=len(argv),
        argv_full_size=len(argv),
        exe_size=len(exe),
        cwd_size=len(cwd),
        filename_size=8,
    )
    _, ev = feed(asm, parent, child)
    assert isinstance(ev, ExecEvent)
    assert ev.argv == [b"/bin/sh", b"-c", b"", b"x y"]
    assert ev.process.exe == b"/usr/bin/sh"
    assert ev.cwd == b"/tmp/work"
    assert ev.filename == b"/bin/sh"
    assert ev.parent_exe == b"/usr/python3"
    assert ev.process.ancestry[0].pid == 99


def exec_of(exe: bytes, flags: int) -> bytes:
    """An exec record of argv ["x"] whose executable's components are `exe`."""
    return pack(
        R.REC_EXEC, b"x\0" + exe, argv_size=2, argv_full_size=2, exe_size=len(exe), flags=flags
    )


def test_memfd_exec_is_fileless(asm: Assembler) -> None:
    (ev,) = feed(asm, exec_of(b"memfd:payload\0", R.EXEC_F_UNLINKED | R.EXEC_F_MEMFD))
    assert isinstance(ev, ExecEvent)
    assert (ev.process.exe, ev.fileless, ev.deleted) == (b"/memfd:payload", True, False)


def test_deleted_file_named_like_a_memfd_is_not_fileless(asm: Assembler) -> None:
    """The kernel, not the path, tells a memfd: a deleted /memfd:x is a deleted file."""
    (ev,) = feed(asm, exec_of(b"memfd:x\0", R.EXEC_F_UNLINKED))
    assert isinstance(ev, ExecEvent)
    assert (ev.process.exe, ev.fileless, ev.deleted) == (b"/memfd:x", False, True)


def test_exit_code_and_signal_decoding(asm: Assembler) -> None:
    (a,) = feed(asm, pack(R.REC_EXIT, exit_code=3 << 8))
    (b,) = feed(asm, pack(R.REC_EXIT, exit_code=9 | 0x80, pid=101))
    assert (a.exit_code, a.signal, a.core_dumped) == (3, 0, False)
    assert (b.exit_code, b.signal, b.core_dumped) == (0, 9, True)


def test_failed_bind(asm: Assembler) -> None:
    (ev,) = feed(
        asm,
        pack(
            R.REC_BIND,
            family=2,
            req_addr=ip4("0.0.0.0"),
            req_port=22,
            sock_type=1,
            protocol=6,
            flags=R.BIND_F_FAILED | R.BIND_F_REQUEST_KNOWN,
        ),
    )
    assert (ev.outcome, ev.requested_addr, ev.requested_port, ev.port) == (
        "error",
        "0.0.0.0",
        22,
        0,
    )


def test_context_follows_exec(asm: Assembler) -> None:
    """The cached per-thread context is dropped when the table changes."""
    feed(asm, pack(R.REC_CONNECT, family=2, sock_type=2, protocol=17, dport=1))
    argv = b"/x\0"
    exe = b"x\0"
    feed(asm, pack(R.REC_EXEC, argv + exe, argv_size=3, argv_full_size=3, exe_size=2))
    (ev,) = feed(asm, pack(R.REC_CONNECT, family=2, sock_type=2, protocol=17, dport=2))
    assert ev.process.exe == b"/x"


def udp_connect(pid: int, ppid: int, start_ns: int, port: int) -> bytes:
    return pack(
        R.REC_CONNECT,
        pid=pid,
        tid=pid,
        ppid=ppid,
        start_ns=start_ns,
        family=2,
        sock_type=2,
        protocol=17,
        dport=port,
    )


def test_an_exec_renews_the_context_of_the_process_and_its_descendants(asm: Assembler) -> None:
    """A child's cached context shows its parent's program; the parent's exec changes it,
    a sibling's fork does not, and a fork leaves the parent's own context as it was."""

    def exec_as(pid: int, ppid: int, start_ns: int, name: bytes) -> bytes:
        argv = b"/" + name + b"\0"
        return pack(
            R.REC_EXEC,
            argv + name + b"\0",
            pid=pid,
            tid=pid,
            ppid=ppid,
            start_ns=start_ns,
            argv_size=len(argv),
            argv_full_size=len(argv),
            exe_size=len(name) + 1,
        )

    feed(asm, exec_as(200, 1, 1_000, b"first"))
    feed(asm, pack(R.REC_FORK, pid=200, tid=200, ppid=1, start_ns=1_000, child_pid=201,
                   child_start_ns=2_000))  # fmt: skip
    (before,) = feed(asm, udp_connect(201, 200, 2_000, 1))
    assert [a.exe for a in before.process.ancestry] == [b"/first"]
    feed(asm, pack(R.REC_FORK, pid=200, tid=200, ppid=1, start_ns=1_000, child_pid=202,
                   child_start_ns=3_000))  # fmt: skip
    (still,) = feed(asm, udp_connect(201, 200, 2_000, 2))
    assert [a.exe for a in still.process.ancestry] == [b"/first"]
    feed(asm, exec_as(200, 1, 1_000, b"second"))
    (after,) = feed(asm, udp_connect(201, 200, 2_000, 3))
    assert [a.exe for a in after.process.ancestry] == [b"/second"]
    (parent,) = feed(asm, udp_connect(200, 1, 1_000, 4))
    assert parent.process.exe == b"/second"


def test_a_child_seen_before_its_fork_gets_its_parent_once_the_fork_comes(
    asm: Assembler,
) -> None:
    """Records of a new process may come before its parent's fork record (other CPUs):
    its context is renewed when the fork makes its parent known."""
    feed(asm, pack(R.REC_EXEC, b"/p\0p\0", pid=300, tid=300, ppid=1, start_ns=1_000,
                   argv_size=3, argv_full_size=3, exe_size=2))  # fmt: skip
    feed(asm, pack(R.REC_FORK, pid=301, tid=301, ppid=300, start_ns=2_000, child_pid=302,
                   child_start_ns=3_000))  # fmt: skip
    (early,) = feed(asm, udp_connect(302, 301, 3_000, 1))
    assert early.process.ancestry == []
    feed(asm, pack(R.REC_FORK, pid=300, tid=300, ppid=1, start_ns=1_000, child_pid=301,
                   child_start_ns=2_000))  # fmt: skip
    (late,) = feed(asm, udp_connect(302, 301, 3_000, 2))
    assert [a.pid for a in late.process.ancestry] == [301, 300]


def test_bad_records_are_reported_not_fatal(asm: Assembler) -> None:
    events, errors = asm.feed_batches([[b"\x01", pack(R.REC_EXIT)[:20], b"\x63\x00\x01\x00"]])
    assert events == []
    assert len(errors) == 3


def test_unix_listeners_from_a_proc_tree(tmp_path: Path) -> None:
    """/proc/net/unix names the listening socket's inode; /proc/*/fd the process holding it;
    answers are cached for the ttl."""
    (tmp_path / "net").mkdir()
    table = tmp_path / "net" / "unix"
    table.write_bytes(
        b"Num       RefCount Protocol Flags    Type St Inode Path\n"
        b"0000000000000000: 00000002 00000000 00000000 0001 03 111 /run/docker.sock\n"
        b"0000000000000000: 00000002 00000000 00010000 0001 01 222 /run/docker.sock\n"
        b"0000000000000000: 00000002 00000000 00010000 0001 01 333 /tmp/with space.sock\n"
    )
    for pid, inode in ((40, 111), (41, 222)):
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        (tmp_path / str(pid) / "fd" / "3").symlink_to(f"socket:[{inode}]")
        (tmp_path / str(pid) / "exe").symlink_to(f"/usr/bin/server{pid}")
    peers = UnixListeners(tmp_path, ttl=10.0)
    assert peers.find(999, b"/run/docker.sock", now=0.0) == UnixListener(41, b"/usr/bin/server41")
    assert peers.find(999, b"/tmp/with space.sock", now=0.0) is None  # no holder
    assert peers.find(999, b"/nowhere", now=0.0) is None
    table.write_bytes(b"header\n")
    assert peers.find(999, b"/run/docker.sock", now=5.0) == UnixListener(41, b"/usr/bin/server41")
    assert peers.find(999, b"/run/docker.sock", now=11.0) is None


def test_raw_socket_and_io_uring_records(asm: Assembler) -> None:
    raw, ring = feed(
        asm,
        pack(R.REC_SOCK_CREATE, cookie=3, family=10, sock_type=3, protocol=58),
        pack(R.REC_IO_URING, fd=7, sq_entries=8, cq_entries=16, flags=1),
    )
    assert isinstance(raw, RawSocketEvent) and isinstance(ring, IoUringEvent)
    assert (raw.family, raw.protocol, raw.protocol_number) == ("ipv6", "icmpv6", 58)
    assert (ring.fd, ring.sq_entries, ring.cq_entries, ring.flags) == (7, 8, 16, 1)
    assert raw.process.pid == ring.process.pid == 100


# -- losses become alerts (detect.engine) -----------------------------------------------------


def lost(at_s: float, **counts: Any) -> LostEvent:
    return LostEvent(
        time_ns=int(at_s * 1e9),
        host="h",
        kernel=counts.pop("kernel", {}),
        user=counts.pop("user", 0),
        errors=counts.pop("errors", {}),
        **counts,
    )


def test_a_loss_is_an_alert_and_a_recurring_one_is_high() -> None:
    engine = Engine(RuleSet())
    assert engine.feed(lost(1.0)) == []  # nothing lost: nothing to say
    (first,) = engine.feed(lost(2.0, kernel={"connect": 1000, "exec": 2}, user=5))
    assert (first.rule_id, first.level, first.host) == (LOSS_RULE_ID, "medium", "h")
    assert first.description == (
        "events of traced processes were lost: kernel buffer full: connect 1000, exec 2; "
        "collector queue full: 5"
    )
    assert first.events[0].kernel == {"connect": 1000, "exec": 2}
    (again,) = engine.feed(lost(62.0, spool=3, collector="c1"))
    assert (again.level, again.title) == ("high", "Events were lost again")
    assert again.description.endswith("spool or buffer to the service full: 3 (collector c1)")
    (later,) = engine.feed(lost(62.0 + 601, errors={"traced_map_full": 1}))
    assert later.level == "medium"
    assert "probe state lost: traced_map_full 1" in later.description
    (named,) = engine.feed(lost(2000.0, kernel={"connect": 9}, sandboxes={"st-b": 2, "st-a": 7}))
    assert named.sandbox == "st-a,st-b"
    assert named.description.endswith("connect 9; in sandboxes: st-a 7, st-b 2")


def test_counted_repeats_ride_on_connects_and_on_reports(asm: Assembler) -> None:
    udp: dict[str, Any] = {
        "daddr": ip4("127.0.0.1"),
        "family": 2,
        "dport": 9,
        "sock_type": 2,
        "protocol": 17,
    }
    first, carried, report = feed(
        asm,
        pack(R.REC_CONNECT, cookie=1, **udp),
        pack(R.REC_CONNECT, cookie=1, repeats=41_000, **udp),
        pack(R.REC_CONNECT, cookie=1, repeats=7, flags=R.SOCK_F_REPEATS_ONLY, **udp),
    )
    assert [(e.outcome, e.repeats) for e in (first, carried, report)] == [
        ("success", 0),
        ("success", 41_000),
        ("repeated", 7),
    ]
    # a TCP report waits for no handshake
    (tcp,) = feed(
        asm,
        pack(
            R.REC_CONNECT,
            cookie=2,
            daddr=ip4("192.0.2.7"),
            family=2,
            dport=443,
            sock_type=1,
            protocol=6,
            repeats=3,
            flags=R.SOCK_F_REPEATS_ONLY,
        ),
    )
    assert (tcp.protocol, tcp.outcome, tcp.repeats) == ("tcp", "repeated", 3)


def test_a_datagram_sent_without_connect_is_a_connect_event_sent(asm: Assembler) -> None:
    (ev,) = feed(
        asm,
        pack(
            R.REC_CONNECT,
            cookie=4,
            daddr=ip4("198.51.100.5"),
            family=2,
            dport=3333,
            sock_type=2,
            protocol=17,
            flags=R.SOCK_F_UNCONNECTED,
        ),
    )
    assert (ev.protocol, ev.daddr, ev.dport, ev.outcome) == ("udp", "198.51.100.5", 3333, "sent")
    flags = R.SOCK_F_UNCONNECTED | R.SOCK_F_REPEATS_ONLY
    (ev,) = feed(
        asm,
        pack(
            R.REC_CONNECT,
            cookie=4,
            daddr=ip4("198.51.100.5"),
            family=2,
            dport=3333,
            sock_type=2,
            protocol=17,
            repeats=9,
            flags=flags,
        ),
    )
    assert (ev.outcome, ev.repeats) == ("repeated", 9)
