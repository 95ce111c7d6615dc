"""What a process's standard streams are at exec: fds 0, 1 and 2, one "type[:detail]" each.

    tty             a terminal: /dev/pts/N, /dev/ttyX, /dev/console
    null            /dev/null
    pipe            a pipe or FIFO's pipe end ("pipe:[inode]")
    file:PATH       anything else with a path (regular file, device, FIFO by name, memfd)
    tcp:ADDR:PORT   a TCP socket's peer (IPv6 in brackets); "tcp:" when it has none
    udp:ADDR:PORT   a connected UDP socket's peer; "udp:" when unconnected
    unix:PATH       a unix socket's path: the peer's when it has one, else its own (the
                    accepting side of /run/x.sock is "unix:/run/x.sock" too); "@name" for
                    an abstract name; "unix:" when neither has a name (a socketpair)
    socket          any other socket (netlink, packet, ...), or one that could not be found
    closed          the fd is not open
    unknown         the process is gone, or runs another program already

The common case is three readlinks of /proc/PID/fd/N. A socket's peer is looked up by the
socket's inode through sock_diag in the process's network namespace (collector/sockets.py),
in the collector's worker thread, and cached per socket: a reverse shell's every command
inherits the same socket.

Link targets come from the traced process (it names its files): they are decoded with
backslash escapes for bytes that are not UTF-8 and cut at MAX_DETAIL bytes.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import structlog

from collector.sockets import HeldSocket, SocketSnapshotError, UnixSocket, find_socket

log = structlog.get_logger("sandtrace.collector")

STDIO_FDS = (0, 1, 2)
MAX_DETAIL = 512
SOCKET_CACHE = 1024
UNKNOWN = ["unknown", "unknown", "unknown"]
_SOCKET = re.compile(rb"socket:\[(\d+)\]")
_TTY = re.compile(rb"/dev/(?:pts/\d+|tty[^/]*|console)")


def _text(raw: bytes) -> str:
    return raw[:MAX_DETAIL].decode("utf-8", "backslashreplace")


def classify(target: bytes) -> str | int:
    """The type of an fd from its /proc/PID/fd/N link; a socket's inode when it is a socket
    (its type needs a lookup)."""
    if target.startswith(b"pipe:"):
        return "pipe"
    if target.startswith(b"socket:"):
        m = _SOCKET.fullmatch(target)
        return int(m.group(1)) if m else "socket"
    if target == b"/dev/null":
        return "null"
    if _TTY.fullmatch(target):
        return "tty"
    return "file:" + _text(target)


def _unmapped(addr: str) -> str:
    return addr[7:] if addr.startswith("::ffff:") and "." in addr else addr


def describe(sock: HeldSocket | UnixSocket | None) -> str:
    """The stdio entry of a socket found by find_socket (None: not found)."""
    if sock is None:
        return "socket"
    if isinstance(sock, UnixSocket):
        return "unix:" + (sock.peer_name or sock.name)
    addr = _unmapped(sock.raddr)
    if not sock.rport or sock.state in ("listen", "unconnected"):
        return sock.protocol + ":"
    host = f"[{addr}]" if ":" in addr else addr
    return f"{sock.protocol}:{host}:{sock.rport}"


@dataclass(frozen=True, slots=True)
class PendingSocket:
    fd: int
    inode: int
    key: tuple[int, int]  # (network namespace inode, socket inode): the cache's key


@dataclass(slots=True)
class StdioStats:
    inspected: int = 0  # execs whose fds were read
    unknown: int = 0  # execs whose process was gone or had exec'd again
    socket_lookups: int = 0  # sock_diag lookups (cache misses)
    socket_failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "inspected": self.inspected,
            "unknown": self.unknown,
            "socket_lookups": self.socket_lookups,
            "socket_failures": self.socket_failures,
        }


class StdioReader:
    """Reads fds 0-2 of a process; resolves sockets with a per-socket cache."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self.stats = StdioStats()
        self._sockets: OrderedDict[tuple[int, int], str] = OrderedDict()  # (netns, inode)

    def read(self, pid: int) -> tuple[list[str], list[PendingSocket]]:
        """The three entries, with "" where a socket awaits `resolve_sockets`, and those
        sockets. All "unknown" when the process is gone."""
        out: list[str] = []
        sockets: list[PendingSocket] = []
        base = f"{self.proc}/{pid}/fd/".encode()
        for fd in STDIO_FDS:
            try:
                kind = classify(os.readlink(base + b"%d" % fd))  # noqa: PTH115 - bytes, hot
            except FileNotFoundError:
                kind = "closed"
            except OSError:
                kind = "unknown"
            if isinstance(kind, int):
                key = (self._netns(pid), kind)
                cached = self._sockets.get(key)
                if cached is not None:
                    kind = cached
                else:
                    sockets.append(PendingSocket(fd, kind, key))
                    kind = ""
            out.append(kind)
        if "closed" in out and not os.path.exists(f"{self.proc}/{pid}/exe"):  # noqa: PTH110
            # An exited process's fds read as missing too: it is gone, not its fds.
            self.stats.unknown += 1
            return list(UNKNOWN), []
        self.stats.inspected += 1
        return out, sockets

    def _netns(self, pid: int) -> int:
        try:
            return os.stat(f"{self.proc}/{pid}/ns/net").st_ino  # noqa: PTH116
        except OSError:
            return 0

    def resolve_sockets(
        self,
        pid: int,
        entries: list[str],
        sockets: list[PendingSocket],
        memo: dict[tuple[int, int], str],
    ) -> None:
        """Fill in the socket entries (in the worker thread: sock_diag round trips; the
        event loop waits for it, so the counters are not shared). `memo` holds what this
        batch looked up already: fds 0 and 1 are often one socket."""
        for pending in sockets:
            entry = memo.get(pending.key)
            if entry is None:
                self.stats.socket_lookups += 1
                try:
                    found = find_socket(pid, pending.inode)
                except SocketSnapshotError as exc:
                    self.stats.socket_failures += 1
                    log.warning(
                        "cannot look up a standard stream's socket", pid=pid, error=str(exc)
                    )
                    found = None
                entry = memo[pending.key] = describe(found)
            entries[pending.fd] = entry

    def remember(self, entries: list[str], sockets: list[PendingSocket]) -> None:
        """Cache the sockets that have a peer (on the event loop): it cannot change."""
        for pending in sockets:
            entry = entries[pending.fd]
            if entry == "socket" or entry.endswith(":"):  # no peer yet: it may still connect
                continue
            self._sockets[pending.key] = entry
            if len(self._sockets) > SOCKET_CACHE:
                self._sockets.popitem(last=False)
