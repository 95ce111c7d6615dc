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
    unknown         the process is gone, or runs another program already (read from
                    /proc), or the kernel could not read the fd

The exec probe captures them in the kernel, at exec (bpf/process.bpf.c, struct stdio_fd in
events.h): each fd's inode (type, device number), a socket's family, type, protocol and
peer, a unix socket's name (its peer's or its own) and a file's path from the same dentry
walk as the executable's. `from_record` turns that into the entries above with no /proc
read, so a process that is gone by the time its exec is read has its streams all the same.
Terminals are told by device number (major 4, 5:0 /dev/tty, 5:1 /dev/console, 136-143 pts;
another terminal device, such as /dev/ttyUSB0, by its path), /dev/null as the character
device 1:3; a pipe, and an anonymous inode ("file:anon_inode:[eventfd]"), by the name their
file system gives them; a memfd is "file:/memfd:NAME (deleted)", as readlink shows it.

What the kernel record cannot give as /proc/PID/fd does: a path the walk does not finish
within its budget (events.h STDIO_PATH_BUDGET: paths of up to 512 bytes always fit) keeps
its leaf end, after ".../"; " (deleted)" follows a file with no links left (readlink asks
whether its name was removed, which a rename over it also does); another file named by its
file system (a pidfd, a namespace file) shows the dentry's own name, not readlink's; paths
are relative to the root of the file's mount namespace, as the executable's are, not to
the collector's root.

`StdioReader` reads /proc/PID/fd/N instead, for kernels that lack a struct member the
capture reads (the loader then says so at startup, and the records come without
EXEC_F_STDIO): three readlinks, and a socket's peer looked up by the socket's inode through
sock_diag in the process's network namespace (collector/sockets.py), in the collector's
worker thread, cached per socket. A process that exited first is "unknown" there.

Names come from the traced process (it names its files and sockets): they are decoded with
backslash escapes for bytes that are not UTF-8 and cut at MAX_DETAIL bytes.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import stat
from collections import OrderedDict
from dataclasses import dataclass

import structlog

from collector import records as R
from collector.sockets import HeldSocket, SocketSnapshotError, UnixSocket, find_socket

log = structlog.get_logger("sandtrace.collector")

STDIO_FDS = (0, 1, 2)
MAX_DETAIL = 512
SOCKET_CACHE = 1024
STREAMS_CACHE = 1024  # sets of streams captured at exec, decoded
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


_MINOR_BITS = 20  # the kernel's dev_t: major << 20 | minor
_NULL = (1, 3)
_IPPROTO_TCP = 6
_IPPROTO_UDP = 17


def _is_tty(major: int, minor: int) -> bool:
    return major == 4 or (major == 5 and minor <= 1) or 136 <= major <= 143


def _path_entry(path: bytes) -> str:
    if path == b"/dev/null":
        return "null"
    if _TTY.fullmatch(path):
        return "tty"
    return "file:" + _text(path)


def _inet_entry(fd: R.StdioFd) -> str:
    if fd.sock_type == socket.SOCK_STREAM and fd.protocol == _IPPROTO_TCP:
        proto = "tcp"
    elif fd.sock_type == socket.SOCK_DGRAM and fd.protocol == _IPPROTO_UDP:
        proto = "udp"
    else:
        return "socket"
    if not fd.port:
        return proto + ":"
    if fd.family == socket.AF_INET:
        addr = socket.inet_ntop(socket.AF_INET, fd.addr[:4])
    else:
        addr = _unmapped(socket.inet_ntop(socket.AF_INET6, fd.addr))
    host = f"[{addr}]" if ":" in addr else addr
    return f"{proto}:{host}:{fd.port}"


def _unix_entry(name: bytes) -> str:
    if name.startswith(b"\0"):
        return "unix:@" + _text(name[1:])
    return "unix:" + _text(name.split(b"\0", 1)[0])


def _leaf_end(path: bytes, size: int) -> bytes:
    """The last whole components of `path` in at most `size` bytes (the last one, cut, if
    it alone is longer)."""
    if len(path) <= size:
        return path
    cut = path[-size:]
    slash = cut.find(b"/")
    return cut[slash:] if slash >= 0 else cut


def kernel_entry(fd: R.StdioFd, name: bytes) -> str:
    """The entry of one standard stream as the exec probe captured it (`name`: its bytes of
    the record's data, a path's components leaf first or a unix socket's sun_path)."""
    if fd.flags & R.STDIO_F_UNREADABLE:
        return "unknown"
    if not fd.flags & R.STDIO_F_OPEN:
        return "closed"
    kind = stat.S_IFMT(fd.mode)
    if kind == stat.S_IFSOCK:
        if fd.family in (socket.AF_INET, socket.AF_INET6):
            return _inet_entry(fd)
        return _unix_entry(name) if fd.family == socket.AF_UNIX else "socket"
    if kind == stat.S_IFCHR:
        dev = (fd.rdev >> _MINOR_BITS, fd.rdev & ((1 << _MINOR_BITS) - 1))
        if dev == _NULL:
            return "null"
        if _is_tty(*dev):
            return "tty"
    if fd.flags & R.STDIO_F_DNAME:  # named by its file system, as readlink shows it
        if kind == stat.S_IFIFO:
            return "pipe"
        leaf = name.rstrip(b"\0")
        if kind == 0:  # an anonymous inode has no file type: "anon_inode:[eventfd]"
            return "file:" + _text(b"anon_inode:" + leaf)
        if not fd.flags & R.STDIO_F_UNLINKED:  # a pidfd, a namespace file: its own name
            return "file:" + _text(leaf)
        path = b"/" + leaf  # a memfd or shared memory: "/memfd:NAME (deleted)"
    elif fd.flags & R.STDIO_F_PSEUDO:  # no path reaches it
        path = b"/" + name.rstrip(b"\0")
    else:
        path = R.join_components(name) or b"/"  # a whole walk of no components: the root
        if fd.flags & R.STDIO_F_TRUNCATED:  # its leaf end, which names the file
            path = b"..." + _leaf_end(path, MAX_DETAIL - 3)
    if fd.flags & R.STDIO_F_UNLINKED:
        path += b" (deleted)"
    return _path_entry(path)


def from_record(rec: R.ExecRecord, names: bytes) -> list[str]:
    """The three entries of an exec record that carries them (EXEC_F_STDIO; `names` from
    exec_parts); [] when it does not, for `StdioReader` to read /proc."""
    if not rec.flags & R.EXEC_F_STDIO:
        return []
    return list(_entries(rec.stdio, names))


@functools.lru_cache(maxsize=STREAMS_CACHE)
def _entries(stdio: bytes, names: bytes) -> tuple[str, ...]:
    """Cached on the record's bytes: a shell's children share its streams (the inode
    numbers tell one pipe or socket from the next), so most execs repeat one already seen."""
    fds = R.stdio_fds(stdio)
    return tuple(map(kernel_entry, fds, R.stdio_names(fds, names)))


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
    captured: int = 0  # execs whose streams the kernel captured (no /proc read)
    inspected: int = 0  # execs whose fds were read from /proc
    unknown: int = 0  # execs whose process was gone or had exec'd again
    socket_lookups: int = 0  # sock_diag lookups (cache misses)
    socket_failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "captured": self.captured,
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
