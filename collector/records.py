"""Python mirrors of the kernel-to-user records in bpf/include/events.h, and their decoding.

Each mirror lists the C struct's fields in order with their struct-module codes; offsets
follow from the explicit padding in the header. tests/unit/test_layout.py compiles the C
header with the host compiler and checks every size and offset against these mirrors.

Decoding is pure: bytes in, named tuples out. It never trusts a length from the record
beyond the bytes actually received.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, NamedTuple

LAYOUT_VERSION = 1

REC_EXEC = 1
REC_FORK = 2
REC_EXIT = 3
REC_CONNECT = 4
REC_TCP_STATE = 5
REC_BIND = 6
REC_CGROUP_MOVE = 7
REC_MAX = 8

RECORD_NAMES = {
    REC_EXEC: "exec",
    REC_FORK: "fork",
    REC_EXIT: "exit",
    REC_CONNECT: "connect",
    REC_TCP_STATE: "tcp_state",
    REC_BIND: "bind",
    REC_CGROUP_MOVE: "cgroup_move",
}
ERROR_NAMES = {0: "traced_map_full", 1: "stash_map_full", 2: "scratch_unavailable"}
ERR_MAX = 3

EXEC_F_ARGV_TRUNCATED = 1 << 0
EXEC_F_EXE_TRUNCATED = 1 << 1
EXEC_F_CWD_TRUNCATED = 1 << 2
EXEC_F_FILENAME_TRUNCATED = 1 << 3
EXEC_F_MEMFD = 1 << 4
EXEC_F_UNLINKED = 1 << 5
EXEC_F_NO_MM = 1 << 6

SOCK_F_NONBLOCK = 1 << 0
SOCK_F_LOCAL_KNOWN = 1 << 1

BIND_F_FAILED = 1 << 0
BIND_F_REQUEST_KNOWN = 1 << 1

ARGV_MAX = 16384
CGROUP_PATH_MAX = 256

# (field name, struct code). Padding fields are named _padN and kept, so that offsets match.
HEADER_FIELDS: list[tuple[str, str]] = [
    ("type", "H"),
    ("version", "H"),
    ("size", "I"),
    ("ktime_ns", "Q"),
    ("cgroup_id", "Q"),
    ("start_ns", "Q"),
    ("pid", "I"),
    ("tid", "I"),
    ("ns_pid", "I"),
    ("ppid", "I"),
    ("uid", "I"),
    ("gid", "I"),
    ("sandbox", "I"),
    ("_pad0", "I"),
    ("comm", "16s"),
]

BODY_FIELDS: dict[str, list[tuple[str, str]]] = {
    "exec_record": [
        ("exe_ino", "Q"),
        ("flags", "I"),
        ("argv_size", "I"),
        ("argv_full_size", "I"),
        ("exe_size", "I"),
        ("cwd_size", "I"),
        ("filename_size", "I"),
        ("exe_nlink", "I"),
        ("old_tid", "I"),
    ],
    "fork_record": [("child_start_ns", "Q"), ("child_pid", "I"), ("_pad0", "I")],
    "exit_record": [("exit_code", "I"), ("_pad0", "I")],
    "connect_record": [
        ("cookie", "Q"),
        ("daddr", "16s"),
        ("saddr", "16s"),
        ("family", "H"),
        ("dport", "H"),
        ("sport", "H"),
        ("_pad0", "H"),
        ("sock_type", "I"),
        ("protocol", "I"),
        ("flags", "I"),
        ("_pad1", "I"),
    ],
    "tcp_state_record": [
        ("cookie", "Q"),
        ("saddr", "16s"),
        ("daddr", "16s"),
        ("family", "H"),
        ("sport", "H"),
        ("dport", "H"),
        ("_pad0", "H"),
        ("oldstate", "i"),
        ("newstate", "i"),
        ("err", "i"),
        ("flags", "I"),
    ],
    "bind_record": [
        ("cookie", "Q"),
        ("req_addr", "16s"),
        ("addr", "16s"),
        ("family", "H"),
        ("req_port", "H"),
        ("port", "H"),
        ("_pad0", "H"),
        ("sock_type", "I"),
        ("protocol", "I"),
        ("flags", "I"),
        ("_pad1", "I"),
    ],
    "cgroup_move_record": [
        ("dst_cgroup_id", "Q"),
        ("target_pid", "I"),
        ("dst_level", "i"),
        ("path_size", "I"),
        ("_pad0", "I"),
        ("dst_path", f"{CGROUP_PATH_MAX}s"),
    ],
}

RECORD_STRUCTS = {
    REC_EXEC: "exec_record",
    REC_FORK: "fork_record",
    REC_EXIT: "exit_record",
    REC_CONNECT: "connect_record",
    REC_TCP_STATE: "tcp_state_record",
    REC_BIND: "bind_record",
    REC_CGROUP_MOVE: "cgroup_move_record",
}


def fields_of(struct_name: str) -> list[tuple[str, str]]:
    """All fields of a record, header fields first, as the C struct lays them out."""
    if struct_name == "record_header":
        return HEADER_FIELDS
    return HEADER_FIELDS + BODY_FIELDS[struct_name]


def layout(struct_name: str) -> tuple[int, dict[str, int]]:
    """(size, {field: offset}) of a mirror, for the layout test."""
    offsets: dict[str, int] = {}
    pos = 0
    for name, code in fields_of(struct_name):
        offsets[name] = pos
        pos += struct.calcsize("<" + code)
    return pos, offsets


class RecordError(ValueError):
    """A record that cannot be decoded: too short, unknown type, or a wrong layout version."""


def _make_decoder(struct_name: str) -> tuple[struct.Struct, Callable[..., Any]]:
    # Padding is skipped ("x" codes), so it never reaches the decoded tuple.
    fields = fields_of(struct_name)
    names = [n for n, _ in fields if not n.startswith("_")]
    fmt = struct.Struct(
        "<" + "".join(f"{struct.calcsize(c)}x" if n.startswith("_") else c for n, c in fields)
    )
    cls = NamedTuple(  # type: ignore[misc]
        struct_name.title().replace("_", ""), [(n, Any) for n in names]
    )
    return fmt, cls._make


_DECODERS = {t: _make_decoder(name) for t, name in RECORD_STRUCTS.items()}
_TYPE_VERSION = struct.Struct("<HH")


class Header(NamedTuple):
    """The common header alone (padding left out): what an event's context is made from.
    Its field order is the decoded records' for the first fields, so slices agree."""

    type: int
    version: int
    size: int
    ktime_ns: int
    cgroup_id: int
    start_ns: int
    pid: int
    tid: int
    ns_pid: int
    ppid: int
    uid: int
    gid: int
    sandbox: int
    comm: bytes


class Record(NamedTuple):
    """A decoded record: its type, its fixed fields, and the variable data after them."""

    type: int
    fields: Any  # the named tuple for the record's struct
    data: bytes


def decode_record(buf: bytes) -> Record:
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
    fmt, make = dec
    if len(buf) < fmt.size:
        raise RecordError(
            f"{RECORD_NAMES[rtype]} record of {len(buf)} bytes is shorter than {fmt.size}"
        )
    return Record(rtype, make(fmt.unpack_from(buf, 0)), buf[fmt.size :])


def split_nul(data: bytes) -> list[bytes]:
    """NUL-terminated strings back to back -> list, keeping empty strings exactly."""
    if not data:
        return []
    if data.endswith(b"\0"):
        data = data[:-1]
    return data.split(b"\0")


def join_components(data: bytes) -> bytes:
    """Path components written leaf first (each NUL-terminated) -> absolute path."""
    parts = split_nul(data)
    if not parts:
        return b""
    return b"/" + b"/".join(reversed(parts))


class ExecParts(NamedTuple):
    argv: list[bytes]
    exe: bytes
    cwd: bytes
    filename: bytes


def exec_parts(fields: Any, data: bytes) -> ExecParts:
    """Cut an exec record's variable data into its parts, trusting only bytes present."""
    a = fields.argv_size
    e = a + fields.exe_size
    c = e + fields.cwd_size
    f = c + fields.filename_size
    if f > len(data):
        raise RecordError(f"exec record data has {len(data)} bytes; its sizes need {f}")
    argv_bytes = data[:a]
    if fields.flags & EXEC_F_ARGV_TRUNCATED and argv_bytes and not argv_bytes.endswith(b"\0"):
        # The cut fell inside an argument: keep its start, it is marked truncated.
        argv = argv_bytes.split(b"\0")
    else:
        argv = split_nul(argv_bytes)
    filename = data[c:f]
    return ExecParts(
        argv=argv,
        exe=join_components(data[a:e]),
        # A complete walk with no components is the root itself.
        cwd=join_components(data[e:c])
        or (b"/" if fields.cwd_size == 0 and not fields.flags & EXEC_F_CWD_TRUNCATED else b""),
        filename=filename.rstrip(b"\0"),
    )
