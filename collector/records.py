"""The kernel-to-user records of bpf/include/events.h, as declared classes, and their decoding.

Each record type is a NamedTuple whose fields are the C struct's, in order, each annotated
with the struct-module code of its C type (U32 is a __u32, Addr a __u8[16]). The class is
both the record's type and its layout: the decoder's struct format follows from the
annotations, with the padding events.h makes explicit (integers at their natural alignment,
byte arrays at a multiple of 8, every struct a multiple of 8 bytes). tests/unit/test_layout.py
compiles events.h with the host compiler and checks every member, size and offset, and every
constant below, against these classes.

Decoding is pure: bytes in, a record out, one struct unpack per record. It never trusts a
length from the record beyond the bytes actually received.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterable
from typing import Annotated, Any, NamedTuple, cast, get_type_hints

LAYOUT_VERSION = 7

REC_UNDEFINED = 0
REC_EXEC = 1
REC_FORK = 2
REC_EXIT = 3
REC_CONNECT = 4
REC_TCP_STATE = 5
REC_BIND = 6
REC_CGROUP_MOVE = 7
REC_UNIX_CONNECT = 8
REC_SOCK_CREATE = 9
REC_IO_URING = 10
REC_FLOW = 11
REC_DNS = 12
REC_MAX = 13

RECORD_NAMES = {
    REC_EXEC: "exec",
    REC_FORK: "fork",
    REC_EXIT: "exit",
    REC_CONNECT: "connect",
    REC_TCP_STATE: "tcp_state",
    REC_BIND: "bind",
    REC_CGROUP_MOVE: "cgroup_move",
    REC_UNIX_CONNECT: "unix_connect",
    REC_SOCK_CREATE: "sock_create",
    REC_IO_URING: "io_uring",
    REC_FLOW: "flow",
    REC_DNS: "dns",
}

# enum error_counter: slots of the kernel's per-CPU `errors` map.
ERR_TRACED_MAP_FULL = 0
ERR_STASH_MAP_FULL = 1
ERR_SCRATCH = 2
ERR_MAX = 3

ERROR_NAMES = {
    ERR_TRACED_MAP_FULL: "traced_map_full",
    ERR_STASH_MAP_FULL: "stash_map_full",
    ERR_SCRATCH: "scratch_unavailable",
}

EXEC_F_ARGV_TRUNCATED = 1 << 0
EXEC_F_EXE_TRUNCATED = 1 << 1
EXEC_F_CWD_TRUNCATED = 1 << 2
EXEC_F_FILENAME_TRUNCATED = 1 << 3
EXEC_F_MEMFD = 1 << 4
EXEC_F_UNLINKED = 1 << 5
EXEC_F_NO_MM = 1 << 6
EXEC_F_STDIO = 1 << 7
EXEC_F_FILE_KEY = 1 << 8

STDIO_F_OPEN = 1 << 0
STDIO_F_UNREADABLE = 1 << 1
STDIO_F_PATH = 1 << 2
STDIO_F_PSEUDO = 1 << 3
STDIO_F_TRUNCATED = 1 << 4
STDIO_F_UNLINKED = 1 << 5
STDIO_F_DNAME = 1 << 6

SOCK_F_NONBLOCK = 1 << 0
SOCK_F_LOCAL_KNOWN = 1 << 1
SOCK_F_REPEATS_ONLY = 1 << 2
SOCK_F_UNCONNECTED = 1 << 3
SOCK_F_DENIED = 1 << 4  # refused by the sandbox's egress policy (--enforce)

FLOW_F_INGRESS = 1 << 0
UNIX_F_DENIED = 1 << 0  # a container runtime's socket, refused (--enforce)

# enum app_protocol: what a flow speaks, as the kernel told it from its first bytes.
APP_UNKNOWN = 0
APP_SSH = 1
APP_TLS = 2
APP_HTTP = 3
APP_STRATUM = 4
APP_DNS = 5
APP_MAX = 6

APPLICATION_NAMES = {
    APP_UNKNOWN: "",
    APP_SSH: "ssh",
    APP_TLS: "tls",
    APP_HTTP: "http",
    APP_STRATUM: "stratum",
    APP_DNS: "dns",
}

BIND_F_FAILED = 1 << 0
BIND_F_REQUEST_KNOWN = 1 << 1

TASK_COMM_LEN = 16
ARGV_MAX = 16384
ARGV_TAIL_MAX = 4096
CGROUP_PATH_MAX = 256
UNIX_PATH_MAX = 108
FLOW_PAYLOAD_MAX = 256
DNS_PAYLOAD_MAX = 512
STDIO_FDS = 3

# Field types: the C type's struct code, in the annotation's metadata.
U16 = Annotated[int, "H"]
U32 = Annotated[int, "I"]
S32 = Annotated[int, "i"]
U64 = Annotated[int, "Q"]
Comm = Annotated[bytes, f"{TASK_COMM_LEN}s"]  # char[TASK_COMM_LEN]
Addr = Annotated[bytes, "16s"]  # __u8[16]: an IPv4 address in its first 4 bytes
CgroupPath = Annotated[bytes, f"{CGROUP_PATH_MAX}s"]  # char[CGROUP_PATH_MAX]
UnixPath = Annotated[bytes, f"{UNIX_PATH_MAX}s"]  # char[UNIX_PATH_MAX]
FlowPayload = Annotated[bytes, f"{FLOW_PAYLOAD_MAX}s"]  # __u8[FLOW_PAYLOAD_MAX]
DnsPayload = Annotated[bytes, f"{DNS_PAYLOAD_MAX}s"]  # __u8[DNS_PAYLOAD_MAX]
# A plain bytes field, last, is a C flexible array member: the record's variable data.


class StdioFd(NamedTuple):
    """struct stdio_fd: one standard stream of a process at exec (see events.h)."""

    ino: U64
    addr: Addr  # an inet socket's peer address (IPv4: its first 4 bytes)
    flags: U32  # STDIO_F_*
    mode: U32  # i_mode
    rdev: U32  # the kernel's encoding: major << 20 | minor
    name_size: U32  # bytes of this stream's name in the exec record's data
    family: U16
    sock_type: U16
    protocol: U16
    port: U16  # an inet socket's peer port, host byte order


_STDIO_FD_SIZE = 48
Stdio = Annotated[bytes, f"{STDIO_FDS * _STDIO_FD_SIZE}s"]  # struct stdio_fd[STDIO_FDS]


class Header(NamedTuple):
    """struct record_header: the process context at the moment of the event. Every record
    starts with these fields, so its first 14 items are a Header's."""

    type: U16
    version: U16
    size: U32  # whole record, header included
    ktime_ns: U64  # CLOCK_MONOTONIC
    cgroup_id: U64  # cgroup v2 id of the task at the event
    start_ns: U64  # start time of the thread-group leader: with pid, the process key
    pid: U32  # thread-group id as the host sees it
    tid: U32
    ns_pid: U32  # pid inside the task's own pid namespace
    ppid: U32  # real parent's thread-group id
    uid: U32
    gid: U32
    sandbox: U32  # index of the scope that made the task traced
    comm: Comm


class ExecRecord(NamedTuple):
    """struct exec_record: a traced process executed a program."""

    type: U16
    version: U16
    size: U32
    ktime_ns: U64
    cgroup_id: U64
    start_ns: U64
    pid: U32
    tid: U32
    ns_pid: U32
    ppid: U32
    uid: U32
    gid: U32
    sandbox: U32
    comm: Comm
    exe_ino: U64
    flags: U32  # EXEC_F_*
    argv_size: U32  # bytes of argv captured
    argv_full_size: U32  # bytes of argv the process has
    exe_size: U32
    cwd_size: U32
    filename_size: U32
    exe_nlink: U32
    old_tid: U32  # thread that called execve, before de_thread
    argv_tail_size: U32  # bytes of argv's end captured after the head
    exe_dev: U32  # with EXEC_F_FILE_KEY: the kernel's dev_t (major << 20 | minor)
    exe_ctime_ns: U64  # with EXEC_F_FILE_KEY: the executed file's change time
    exe_file_size: U64  # with EXEC_F_FILE_KEY
    stdio: Stdio  # fds 0-2 (with EXEC_F_STDIO): stdio_fds
    data: bytes  # argv, exe, cwd, file name, the streams' names: exec_parts


class ForkRecord(NamedTuple):
    """struct fork_record: a traced process forked; the header is the parent's."""

    type: U16
    version: U16
    size: U32
    ktime_ns: U64
    cgroup_id: U64
    start_ns: U64
    pid: U32
    tid: U32
    ns_pid: U32
    ppid: U32
    uid: U32
    gid: U32
    sandbox: U32
    comm: Comm
    child_start_ns: U64
    child_pid: U32


class ExitRecord(NamedTuple):
    """struct exit_record: the last thread of a traced process exited."""

    type: U16
    version: U16
    size: U32
    ktime_ns: U64
    cgroup_id: U64
    start_ns: U64
    pid: U32
    tid: U32
    ns_pid: U32
    ppid: U32
    uid: U32
    gid: U32
    sandbox: U32
    comm: Comm
    exit_code: U32  # as wait(2) encodes it: status << 8 | signal


class ConnectRecord(NamedTuple):
    """struct connect_record: a connect as the cgroup hook saw it, before the protocol."""

    type: U16
    version: U16
    size: U32
    ktime_ns: U64
    cgroup_id: U64
    start_ns: U64
    pid: U32
    tid: U32
    ns_pid: U32
    ppid: U32
    uid: U32
    gid: U32
    sandbox: U32
    comm: Comm
    cookie: U64  # socket cookie; joins TCP state records
    daddr: Addr
    saddr: Addr
    family: U16
    dport: U16  # host byte order
    sport: U16
    sock_type: U32
    protocol: U32
    flags: U32  # SOCK_F_*
    repeats: U32  # connects to this destination counted, not sent, since the last record


class TcpStateRecord(NamedTuple):
    """struct tcp_state_record: TCP progress of a socket a traced process connected or
    listened on (outcomes carry the connecting thread's header)."""

    type: U16
    version: U16
    size: U32
    ktime_ns: U64
    cgroup_id: U64
    start_ns: U64
    pid: U32
    tid: U32
    ns_pid: U32
    ppid: U32
    uid: U32
    gid: U32
    sandbox: U32
    comm: Comm
    cookie: U64
    saddr: Addr
    daddr: Addr
    family: U16
    sport: U16
    dport: U16
    oldstate: S32
    newstate: S32
    err: S32  # sk_err when the socket closed
    flags: U32  # SOCK_F_*


class BindRecord(NamedTuple):
    """struct bind_record: a bind, as asked for and as done (or failed)."""

    type: U16
    version: U16
    size: U32
    ktime_ns: U64
    cgroup_id: U64
    start_ns: U64
    pid: U32
    tid: U32
    ns_pid: U32
    ppid: U32
    uid: U32
    gid: U32
    sandbox: U32
    comm: Comm
    cookie: U64
    req_addr: Addr
    addr: Addr  # bound address
    family: U16
    req_port: U16
    port: U16  # bound port (the kernel's choice for port 0)
    sock_type: U32
    protocol: U32
    flags: U32  # BIND_F_*


class CgroupMoveRecord(NamedTuple):
    """struct cgroup_move_record: a traced process was moved to another cgroup; the header
    is the mover's."""

    type: U16
    version: U16
    size: U32
    ktime_ns: U64
    cgroup_id: U64
    start_ns: U64
    pid: U32
    tid: U32
    ns_pid: U32
    ppid: U32
    uid: U32
    gid: U32
    sandbox: U32
    comm: Comm
    dst_cgroup_id: U64
    target_pid: U32  # the process that was moved
    dst_level: S32
    path_size: U32
    dst_path: CgroupPath


class UnixConnectRecord(NamedTuple):
    """struct unix_connect_record: a connect to a unix socket, as the cgroup hook saw it
    (before the path is looked up)."""

    type: U16
    version: U16
    size: U32
    ktime_ns: U64
    cgroup_id: U64
    start_ns: U64
    pid: U32
    tid: U32
    ns_pid: U32
    ppid: U32
    uid: U32
    gid: U32
    sandbox: U32
    comm: Comm
    cookie: U64
    sock_type: U32
    path_size: U32  # bytes of sun_path given; an abstract name starts with NUL
    path: UnixPath
    flags: U32  # UNIX_F_*


class SockCreateRecord(NamedTuple):
    """struct sock_create_record: a raw IP socket a traced process made."""

    type: U16
    version: U16
    size: U32
    ktime_ns: U64
    cgroup_id: U64
    start_ns: U64
    pid: U32
    tid: U32
    ns_pid: U32
    ppid: U32
    uid: U32
    gid: U32
    sandbox: U32
    comm: Comm
    cookie: U64
    family: U32
    sock_type: U32
    protocol: U32


class IoUringRecord(NamedTuple):
    """struct io_uring_record: an io_uring instance a traced process set up."""

    type: U16
    version: U16
    size: U32
    ktime_ns: U64
    cgroup_id: U64
    start_ns: U64
    pid: U32
    tid: U32
    ns_pid: U32
    ppid: U32
    uid: U32
    gid: U32
    sandbox: U32
    comm: Comm
    fd: S32
    sq_entries: U32
    cq_entries: U32
    flags: U32  # IORING_SETUP_*


class FlowRecord(NamedTuple):
    """struct flow_record: the first payload one way of a socket a traced process made; the
    header is the socket maker's."""

    type: U16
    version: U16
    size: U32
    ktime_ns: U64
    cgroup_id: U64
    start_ns: U64
    pid: U32
    tid: U32
    ns_pid: U32
    ppid: U32
    uid: U32
    gid: U32
    sandbox: U32
    comm: Comm
    cookie: U64
    laddr: Addr  # the socket's own address
    raddr: Addr  # the peer's
    family: U16
    lport: U16
    rport: U16
    protocol: U16  # IPPROTO_TCP or IPPROTO_UDP
    app: U32  # APP_*, as the kernel told it
    flags: U32  # FLOW_F_*
    payload_size: U32  # bytes of payload captured
    payload_full: U32  # bytes of payload the packet had
    payload: FlowPayload


class DnsRecord(NamedTuple):
    """struct dns_record: a DNS message from port 53 to a socket a traced process made."""

    type: U16
    version: U16
    size: U32
    ktime_ns: U64
    cgroup_id: U64
    start_ns: U64
    pid: U32
    tid: U32
    ns_pid: U32
    ppid: U32
    uid: U32
    gid: U32
    sandbox: U32
    comm: Comm
    cookie: U64
    server: Addr  # the address the answer came from
    family: U16
    server_port: U16
    protocol: U16
    payload_size: U32  # bytes of the message captured
    payload_full: U32  # bytes of the message in the packet (TCP: its length prefix)
    mapped: U32  # A and AAAA answers the kernel entered in its dns_names map
    payload: DnsPayload


AnyRecord = (
    ExecRecord
    | ForkRecord
    | ExitRecord
    | ConnectRecord
    | TcpStateRecord
    | BindRecord
    | CgroupMoveRecord
    | UnixConnectRecord
    | SockCreateRecord
    | IoUringRecord
    | FlowRecord
    | DnsRecord
)

RECORD_CLASSES: dict[int, type[AnyRecord]] = {
    REC_EXEC: ExecRecord,
    REC_FORK: ForkRecord,
    REC_EXIT: ExitRecord,
    REC_CONNECT: ConnectRecord,
    REC_TCP_STATE: TcpStateRecord,
    REC_BIND: BindRecord,
    REC_CGROUP_MOVE: CgroupMoveRecord,
    REC_UNIX_CONNECT: UnixConnectRecord,
    REC_SOCK_CREATE: SockCreateRecord,
    REC_IO_URING: IoUringRecord,
    REC_FLOW: FlowRecord,
    REC_DNS: DnsRecord,
}


C_STRUCTS: dict[type[Header | StdioFd | AnyRecord], str] = {
    Header: "record_header",
    StdioFd: "stdio_fd",
    ExecRecord: "exec_record",
    ForkRecord: "fork_record",
    ExitRecord: "exit_record",
    ConnectRecord: "connect_record",
    TcpStateRecord: "tcp_state_record",
    BindRecord: "bind_record",
    CgroupMoveRecord: "cgroup_move_record",
    UnixConnectRecord: "unix_connect_record",
    SockCreateRecord: "sock_create_record",
    IoUringRecord: "io_uring_record",
    FlowRecord: "flow_record",
    DnsRecord: "dns_record",
}


class Layout(NamedTuple):
    """Where a record class's fields sit in the C struct."""

    struct: struct.Struct  # the fixed part, padding skipped ("x" codes)
    offsets: dict[str, int]  # every field's offset, the variable data's included
    codes: dict[str, str]  # every fixed field's struct code
    variable: bool  # a variable data field follows the fixed part


def layout(cls: type[object]) -> Layout:
    """The layout of a record class, from its fields' annotations (in declaration order)."""
    hints = get_type_hints(cls, include_extras=True)
    names = list(hints)
    fmt, pos, variable = "<", 0, False
    offsets: dict[str, int] = {}
    codes: dict[str, str] = {}
    for name in names:
        metadata = getattr(hints[name], "__metadata__", None)
        if variable or (metadata is None and name != names[-1]):
            raise TypeError(f"{cls.__name__}.{name}: only the last field may be variable data")
        if metadata is None:
            offsets[name], variable = pos + -pos % 8, True  # after the struct's padding
            continue
        code = metadata[0]
        size = struct.calcsize("<" + code)
        pad = -pos % (8 if code.endswith("s") else size)
        fmt += f"{pad}x{code}" if pad else code
        offsets[name], codes[name] = pos + pad, code
        pos += pad + size
    if pos % 8:
        fmt += f"{-pos % 8}x"
    return Layout(struct.Struct(fmt), offsets, codes, variable)


class RecordError(ValueError):
    """A record that cannot be decoded: too short, unknown type, or a wrong layout version."""


def _decoder(
    cls: type[AnyRecord],
) -> tuple[struct.Struct, Callable[[Iterable[Any]], AnyRecord], bool]:
    fixed = layout(cls)
    # The tuple constructor itself rather than cls._make, which is Python code that checks
    # the count of values: the struct's unpacking gives exactly the fields (with the
    # variable data, the last), so there is nothing to check, once per record.
    make = cast(Callable[[Iterable[Any]], AnyRecord], functools.partial(tuple.__new__, cls))
    return fixed.struct, make, fixed.variable


_DECODERS = {t: _decoder(cls) for t, cls in RECORD_CLASSES.items()}
_TYPE_VERSION = struct.Struct("<HH")


def decode_record(buf: bytes) -> AnyRecord:
    if len(buf) < _TYPE_VERSION.size:
        raise RecordError(f"record of {len(buf)} bytes is shorter than its type field")
    rtype, version = _TYPE_VERSION.unpack_from(buf, 0)
    if version != LAYOUT_VERSION:
        raise RecordError(
            f"record layout version {version} is not {LAYOUT_VERSION}: the probes and the "
            "collector come from different builds; reinstall sandtrace"
        )
    dec = _DECODERS.get(rtype)
    if dec is None:
        raise RecordError(f"unknown record type {rtype}")
    fmt, make, variable = dec
    if len(buf) < fmt.size:
        raise RecordError(
            f"{RECORD_NAMES[rtype]} record of {len(buf)} bytes is shorter than {fmt.size}"
        )
    if variable:
        return make((*fmt.unpack_from(buf, 0), buf[fmt.size :]))
    return make(fmt.unpack_from(buf, 0))


def unix_path(rec: UnixConnectRecord) -> bytes:
    """The address a unix connect named: its path, or "@" and the name for an abstract one
    (whose first byte is NUL), as ss and /proc/net/unix show them. Only the bytes the caller
    gave count; a path ends at its first NUL."""
    given = rec.path[: min(rec.path_size, UNIX_PATH_MAX)]
    if given.startswith(b"\0"):
        return b"@" + given[1:]
    return given.split(b"\0", 1)[0]


def split_nul(data: bytes) -> list[bytes]:
    """NUL-terminated strings back to back -> list, keeping empty strings exactly."""
    if not data:
        return []
    if data.endswith(b"\0"):
        data = data[:-1]
    return data.split(b"\0")


_JOINED: dict[bytes, bytes] = {}  # join_components' answers for short paths
_JOINED_MAX = 4096  # entries kept, all forgotten at once when full
_JOINED_SIZE = 256  # bytes of the longest path remembered: at most 1 MiB in all


def join_components(data: bytes) -> bytes:
    """Path components written leaf first (each NUL-terminated) -> absolute path.

    A program's executable and working directory come again with each of its runs: the
    answer for a short path is kept."""
    path = _JOINED.get(data)
    if path is not None:
        return path
    parts = split_nul(data)
    path = b"/" + b"/".join(reversed(parts)) if parts else b""
    if len(data) <= _JOINED_SIZE:
        if len(_JOINED) >= _JOINED_MAX:
            _JOINED.clear()
        _JOINED[data] = path
    return path


def argv_of(head: bytes, tail: bytes, full_size: int) -> list[bytes]:
    """The arguments in an exec record's argv head and tail (see events.h).

    A tail that follows the head directly (together they are all of argv) is joined to it.
    Otherwise the bytes between them are missing, and the arguments cut there are kept as
    far as they were captured: the head's last one as its start, the tail's first as its end
    (one long argument, such as a shell's -c script, is seen at both ends)."""
    if tail and len(head) + len(tail) < full_size:
        return _split_cut(head) + _split_cut(tail)
    return _split_cut(head + tail)


def _split_cut(data: bytes) -> list[bytes]:
    """NUL-terminated strings whose last may be cut short (no NUL after it)."""
    if data and not data.endswith(b"\0"):
        return data.split(b"\0")
    return split_nul(data)


class ExecParts(NamedTuple):
    argv: list[bytes]
    exe: bytes
    cwd: bytes
    filename: bytes
    stdio_names: bytes  # the standard streams' names as the kernel wrote them: stdio_names


_STDIO_FD = layout(StdioFd).struct
if _STDIO_FD.size != _STDIO_FD_SIZE:
    raise TypeError(f"StdioFd is {_STDIO_FD.size} bytes; ExecRecord.stdio assumes {_STDIO_FD_SIZE}")


def stdio_fds(stdio: bytes) -> list[StdioFd]:
    """The standard streams an exec record's `stdio` describes (with EXEC_F_STDIO)."""
    return [StdioFd._make(t) for t in _STDIO_FD.iter_unpack(stdio)]


def stdio_names(fds: list[StdioFd], data: bytes) -> list[bytes]:
    """Each stream's name, from the exec record's data after the file name."""
    names, pos = [], 0
    for fd in fds:
        end = pos + fd.name_size
        if end > len(data):
            raise RecordError(f"exec record has {len(data)} bytes of stdio names; needs {end}")
        names.append(data[pos:end])
        pos = end
    return names


def exec_parts(rec: ExecRecord) -> ExecParts:
    """Cut an exec record's variable data into its parts, trusting only bytes present."""
    data = rec.data
    h = rec.argv_size
    a = h + rec.argv_tail_size
    e = a + rec.exe_size
    c = e + rec.cwd_size
    f = c + rec.filename_size
    if f > len(data):
        raise RecordError(f"exec record data has {len(data)} bytes; its sizes need {f}")
    filename = data[c:f]
    return ExecParts(
        argv=argv_of(data[:h], data[h:a], rec.argv_full_size),
        exe=join_components(data[a:e]),
        # A complete walk with no components is the root itself.
        cwd=join_components(data[e:c])
        or (b"/" if rec.cwd_size == 0 and not rec.flags & EXEC_F_CWD_TRUNCATED else b""),
        filename=filename.rstrip(b"\0"),
        stdio_names=data[f:],
    )
