"""Startup snapshot of the TCP and UDP sockets that traced processes already hold.

The probes only see sockets made after tracing starts. For the ones that existed before,
the kernel's socket tables are read through sock_diag netlink (pyroute2's DiagSocket),
and each socket is tied to a process by its inode: ``/proc/PID/fd/N`` of a socket reads
``socket:[INODE]``.

Socket tables are per network namespace. The given processes are grouped by their
network namespace, and each namespace other than the caller's is queried from a
short-lived thread that joins it (setns affects only the calling thread), so sandboxes
in their own network namespaces are covered too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

_log = structlog.get_logger()

PYROUTE2_HINT = "install it with: pip install 'pyroute2>=0.9,<0.10'"

# TCP states as sock_diag reports them (include/net/tcp_states.h)
TCP_STATES: dict[int, str] = {
    1: "established",
    2: "syn_sent",
    3: "syn_recv",
    4: "fin_wait1",
    5: "fin_wait2",
    6: "time_wait",
    7: "close",
    8: "close_wait",
    9: "last_ack",
    10: "listen",
    11: "closing",
    12: "new_syn_recv",
    13: "bound_inactive",
}
_TCP_CLOSE = 7
_ALL_STATES = (1 << 14) - 1  # every state above (and 0)
_CLONE_NEWNET = 0x40000000
_SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")
_T = TypeVar("_T")


class SocketSnapshotError(Exception):
    """The socket tables could not be read; the message says why and what to do."""


@dataclass(slots=True)
class HeldSocket:
    pid: int
    protocol: str  # "tcp" | "udp"
    family: str  # "ipv4" | "ipv6"
    # TCP: "listen", "established", "syn_sent", ... (see TCP_STATES);
    # UDP: "unconnected" (bound only) or "established" (connected)
    state: str
    laddr: str
    lport: int
    raddr: str
    rport: int
    inode: int


def socket_inodes(pid: int, proc_root: Path = Path("/proc")) -> set[int]:
    """Inodes of the sockets process `pid` has open (empty when it is gone)."""
    try:
        fds = list((proc_root / str(pid) / "fd").iterdir())
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return set()
    inodes: set[int] = set()
    for fd in fds:
        try:
            target = str(fd.readlink())
        except OSError:  # fd closed meanwhile
            continue
        match = _SOCKET_LINK.fullmatch(target)
        if match:
            inodes.add(int(match.group(1)))
    return inodes


def _netns_of(pid: int, proc_root: Path) -> str | None:
    try:
        return str((proc_root / str(pid) / "ns" / "net").readlink())
    except OSError:
        return None


def _own_netns() -> str | None:
    try:
        return str(Path("/proc/thread-self/ns/net").readlink())
    except OSError:
        return None


_RawRow = tuple[str, str, int, str, int, str, int, int]
# (protocol, family, state, laddr, lport, raddr, rport, inode)


def _table_rows(diag: Any) -> Iterator[_RawRow]:
    """The TCP and UDP, IPv4 and IPv6 sockets that a bound DiagSocket sees, one table dump
    at a time (a caller that stops early saves the remaining dumps)."""
    for family, family_name in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        for proto, proto_name in ((socket.IPPROTO_TCP, "tcp"), (socket.IPPROTO_UDP, "udp")):
            messages: Iterable[Any] = diag.get_sock_stats(
                family=family, protocol=proto, states=_ALL_STATES
            )
            for msg in messages:
                yield (
                    proto_name,
                    family_name,
                    int(msg["idiag_state"]),
                    str(msg["idiag_src"]),
                    int(msg["idiag_sport"]),
                    str(msg["idiag_dst"]),
                    int(msg["idiag_dport"]),
                    int(msg["idiag_inode"]),
                )


def _diag_socket() -> Any:
    try:
        from pyroute2 import DiagSocket  # noqa: PLC0415 (heavy, only needed here)
    except ImportError as exc:
        raise SocketSnapshotError(f"pyroute2 is not available ({exc}); {PYROUTE2_HINT}") from exc
    return DiagSocket()


def _diag_failed(exc: Exception) -> SocketSnapshotError:
    return SocketSnapshotError(
        f"reading the socket tables through sock_diag netlink failed ({exc!r}); "
        "this needs a kernel with inet_diag/tcp_diag/udp_diag (CONFIG_INET_DIAG, "
        "CONFIG_INET_UDP_DIAG)"
    )


def _query_tables() -> list[_RawRow]:
    """All TCP and UDP, IPv4 and IPv6 sockets of the calling thread's network namespace."""
    try:
        with _diag_socket() as diag:
            diag.bind()
            return list(_table_rows(diag))
    except SocketSnapshotError:
        raise
    except Exception as exc:  # pyroute2 raises assorted types for netlink failures
        raise _diag_failed(exc) from exc


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _query_tables_in(netns_file: Path, query: Callable[[], _T]) -> _T | None:
    """`query` (`_query_tables`, `_find_socket_here`) run inside the network namespace at
    `netns_file`; None when the namespace is gone (its last process exited)."""
    try:
        fd = os.open(netns_file, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        raise SocketSnapshotError(f"cannot open network namespace {netns_file}: {exc}") from exc
    result: list[_T] = []
    failure: list[BaseException] = []

    def run() -> None:
        # This thread ends right after, taking its network namespace with it; the
        # caller's threads are not affected.
        try:
            _setns(fd)
            result.append(query())
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    try:
        thread = threading.Thread(target=run, name="sandtrace-sockdiag-netns", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if failure:
        error = failure[0]
        if isinstance(error, SocketSnapshotError):
            raise error
        raise SocketSnapshotError(
            f"cannot enter network namespace {netns_file} ({error}); this needs root "
            "(CAP_SYS_ADMIN)"
        ) from error
    return result[0]


def snapshot(
    pids: set[int],
    proc_root: Path = Path("/proc"),
) -> list[HeldSocket]:
    """The TCP and UDP sockets (IPv4 and IPv6) held by any of `pids`.

    A socket held by several of the processes (inherited across fork, passed over a unix
    socket) is reported once, for the lowest pid. Sockets without an owner (connections
    waiting in a listen queue, TIME_WAIT) are never reported. Processes that are gone are
    skipped. Raises SocketSnapshotError when the tables cannot be read.
    """
    owners: dict[str | None, dict[int, int]] = {}  # netns -> inode -> pid
    netns_pid: dict[str | None, int] = {}
    for pid in sorted(pids):
        inodes = socket_inodes(pid, proc_root)
        if not inodes:
            continue
        netns = _netns_of(pid, proc_root)
        by_inode = owners.setdefault(netns, {})
        netns_pid.setdefault(netns, pid)
        for inode in inodes:
            by_inode.setdefault(inode, pid)
    own = _own_netns()
    held: list[HeldSocket] = []
    for netns, by_inode in owners.items():
        rows: list[_RawRow] | None
        if netns is None or netns == own:
            rows = _query_tables()
        else:
            rows = _query_tables_in(proc_root / str(netns_pid[netns]) / "ns" / "net", _query_tables)
            if rows is None:
                continue
        seen: set[int] = set()
        for protocol, family, state, laddr, lport, raddr, rport, inode in rows:
            owner = by_inode.get(inode) if inode else None
            if owner is None or inode in seen:
                continue
            seen.add(inode)
            if protocol == "udp" and state == _TCP_CLOSE:
                state_name = "unconnected"
            else:
                state_name = TCP_STATES.get(state, f"state{state}")
            held.append(
                HeldSocket(
                    pid=owner,
                    protocol=protocol,
                    family=family,
                    state=state_name,
                    laddr=laddr,
                    lport=lport,
                    raddr=raddr,
                    rport=rport,
                    inode=inode,
                )
            )
    held.sort(key=lambda s: (s.pid, s.protocol, s.family, s.lport, s.inode))
    _log.debug("socket snapshot", processes=len(pids), sockets=len(held))
    return held


@dataclass(slots=True)
class UnixSocket:
    inode: int
    name: str  # the path it is bound to; "@name" for an abstract name; "" when unnamed
    peer: int  # the inode of the socket at the other end; 0 when not connected
    peer_name: str  # the peer's name, as `name`


def _unix_name(msg: Any) -> str:
    name = msg.get_attr("UNIX_DIAG_NAME")
    if not name:
        return ""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "backslashreplace")
    name = str(name)
    # pyroute2 drops an abstract name's leading NUL; a path is always absolute in practice
    return name if name.startswith("/") else "@" + name.lstrip("\0")


def _query_unix(diag: Any, inode: int) -> Any | None:
    """One unix socket by inode (sock_diag's exact lookup, not a dump), or None."""
    from pyroute2.netlink import NLM_F_REQUEST  # noqa: PLC0415
    from pyroute2.netlink.diag import (  # noqa: PLC0415
        SOCK_DIAG_BY_FAMILY,
        UDIAG_SHOW_NAME,
        UDIAG_SHOW_PEER,
        unix_diag_req,
    )

    req = unix_diag_req()
    req["sdiag_family"] = socket.AF_UNIX
    req["udiag_states"] = 0xFFFFFFFF
    req["udiag_ino"] = inode
    req["udiag_show"] = UDIAG_SHOW_NAME | UDIAG_SHOW_PEER
    req["udiag_cookie"] = 0xFFFFFFFFFFFFFFFF  # INET_DIAG_NOCOOKIE: match by inode alone
    for msg in diag.nlm_request(req, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST):
        if msg.get("udiag_ino") == inode:
            return msg
    return None


def _find_socket_here(inode: int) -> HeldSocket | UnixSocket | None:
    """The socket `inode` in the calling thread's network namespace: a unix socket by an
    exact lookup, else from the TCP and UDP tables (dumped until it is found); None when it
    is in neither (another family, or closed)."""
    try:
        with _diag_socket() as diag:
            diag.bind()
            msg = _query_unix(diag, inode)
            if msg is not None:
                peer = int(msg.get_attr("UNIX_DIAG_PEER") or 0)
                peer_msg = _query_unix(diag, peer) if peer else None
                return UnixSocket(
                    inode, _unix_name(msg), peer, _unix_name(peer_msg) if peer_msg else ""
                )
            for protocol, family, state, laddr, lport, raddr, rport, ino in _table_rows(diag):
                if ino == inode:
                    unconnected = protocol == "udp" and state == _TCP_CLOSE
                    return HeldSocket(
                        pid=0,
                        protocol=protocol,
                        family=family,
                        state="unconnected"
                        if unconnected
                        else TCP_STATES.get(state, f"state{state}"),
                        laddr=laddr,
                        lport=lport,
                        raddr=raddr,
                        rport=rport,
                        inode=ino,
                    )
    except SocketSnapshotError:
        raise
    except Exception as exc:  # pyroute2 raises assorted types for netlink failures
        raise _diag_failed(exc) from exc
    return None


def find_socket(
    pid: int, inode: int, proc_root: Path = Path("/proc")
) -> HeldSocket | UnixSocket | None:
    """The socket with `inode` that process `pid` holds, looked up in its network namespace
    (its pid field is `pid`); None when it is not a TCP, UDP or unix socket, or the process
    or its namespace is gone. Raises SocketSnapshotError when sock_diag cannot be used."""
    netns = _netns_of(pid, proc_root)
    if netns is None:
        return None
    if netns == _own_netns():
        found = _find_socket_here(inode)
    else:
        found = _query_tables_in(
            proc_root / str(pid) / "ns" / "net", lambda: _find_socket_here(inode)
        )
    if isinstance(found, HeldSocket):
        found.pid = pid
    return found


# -- who listens on a unix socket -------------------------------------------------------------

_UNIX_LISTENING = 0x00010000  # __SO_ACCEPTCON in /proc/net/unix's Flags column


@dataclass(slots=True)
class UnixListener:
    pid: int
    exe: bytes  # its executable, b"" when unreadable


class UnixListeners:
    """The process listening on a unix socket address, for unix connect events: the
    listening socket's inode from /proc/PID/net/unix (the network namespace of the
    connecting process PID, whose table names the sockets it can reach; the collector's own
    when that process is gone), and the process holding that inode from /proc/*/fd.

    Bounded: a lookup reads at most `max_procs` processes' fd tables, and answers (found or
    not) are kept `ttl` seconds, at most `max_cached` of them, so a sandbox connecting to
    the same socket again and again costs one lookup."""

    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        *,
        ttl: float = 30.0,
        max_procs: int = 4096,
        max_cached: int = 1024,
    ) -> None:
        self.proc_root = proc_root
        self.ttl = ttl
        self.max_procs = max_procs
        self.max_cached = max_cached
        self._cache: dict[tuple[int, bytes], tuple[float, UnixListener | None]] = {}

    def find(self, pid: int, address: bytes, now: float | None = None) -> UnixListener | None:
        """Who listens on `address` (a path, or "@name" for an abstract one) as process
        `pid` sees it; None when no one does or it cannot be told."""
        now = time.monotonic() if now is None else now
        table = self.proc_root / str(pid) / "net" / "unix"
        try:
            netns = (self.proc_root / str(pid) / "ns" / "net").stat().st_ino
        except OSError:
            table, netns = self.proc_root / "net" / "unix", 0
        key = (netns, address)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        inode = self._listening_inode(table, address)
        found = self._holder(inode) if inode else None
        if len(self._cache) >= self.max_cached:
            self._cache.clear()
        self._cache[key] = (now + self.ttl, found)
        return found

    @staticmethod
    def _listening_inode(table: Path, address: bytes) -> int:
        """The inode of the listening socket bound to `address` in a /proc/net/unix table."""
        try:
            lines = table.read_bytes().splitlines()[1:]
        except OSError:
            return 0
        for line in lines:
            # Num RefCount Protocol Flags Type St Inode [Path]; a path may hold spaces
            cols = line.split(None, 7)
            if len(cols) == 8 and cols[7] == address and int(cols[3], 16) & _UNIX_LISTENING:
                return int(cols[6])
        return 0

    def _holder(self, inode: int) -> UnixListener | None:
        link = f"socket:[{inode}]"
        try:
            pids = [e.name for e in os.scandir(self.proc_root) if e.name.isdigit()]
        except OSError:
            return None
        for name in pids[: self.max_procs]:
            fd_dir = self.proc_root / name / "fd"
            try:
                fds = list(fd_dir.iterdir())
            except OSError:
                continue
            for fd in fds:
                try:
                    if str(fd.readlink()) != link:
                        continue
                except OSError:
                    continue
                try:
                    exe = os.fsencode((self.proc_root / name / "exe").readlink())
                except OSError:
                    exe = b""
                return UnixListener(int(name), exe)
        return None
