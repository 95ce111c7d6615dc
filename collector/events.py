"""sandtrace's typed events: one definition, one versioned msgpack encoding.

Everything a traced process controls (argv, paths, comm, cgroup names) is kept as it came,
as bytes where it may not be text. Renderers escape it; nothing here interprets it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

WIRE_VERSION = 1
"""Version of the msgpack encoding of events. Bump on any incompatible change."""


class WireVersionError(ValueError):
    """An encoded event carries a wire version this build cannot read."""


class EventFormatError(ValueError):
    """Encoded bytes that are not an event: not a map, or of an unknown kind."""


@dataclass(slots=True)
class Process:
    """Who did it: the process context carried by every event."""

    pid: int  # thread-group id as the host sees it
    tid: int
    ns_pid: int  # pid inside the process's own pid namespace
    ppid: int
    uid: int
    gid: int
    comm: bytes
    start_ns: int  # boot-relative start time of the process (with pid: unique key)
    key: str  # unique across pid reuse: "<pid>@<start_ns>"
    exe: bytes = b""  # absolute path of the executable, when known
    argv: list[bytes] = field(default_factory=list)  # its current argv, when known
    user: str = ""  # user name for uid, when the host knows it
    group: str = ""
    ancestry: list[AncestorRef] = field(default_factory=list)


@dataclass(slots=True)
class AncestorRef:
    """One ancestor of the acting process, nearest first."""

    pid: int
    key: str
    exe: bytes
    argv: list[bytes]


@dataclass(slots=True)
class Event:
    """Fields common to every event."""

    kind: ClassVar[str] = "event"

    time_ns: int  # wall clock, nanoseconds since the epoch
    mono_ns: int  # CLOCK_MONOTONIC at the event (for latency measurement)
    host: str
    sandbox: str  # sandbox id
    cgroup_id: int
    cgroup_path: str
    container_id: str
    process: Process


@dataclass(slots=True)
class ExecEvent(Event):
    kind: ClassVar[str] = "exec"

    argv: list[bytes] = field(default_factory=list)
    argv_truncated: bool = False
    argv_size: int = 0  # bytes of argv the process really has
    cwd: bytes = b""
    filename: bytes = b""  # the name given to execve, as given
    exe_inode: int = 0
    fileless: bool = False  # executable is a memfd
    deleted: bool = False  # executable file has no links
    path_truncated: bool = False  # exe or cwd path too deep or long to read whole
    parent_exe: bytes = b""
    parent_argv: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class ForkEvent(Event):
    kind: ClassVar[str] = "fork"

    child_pid: int = 0
    child_key: str = ""


@dataclass(slots=True)
class ExitEvent(Event):
    kind: ClassVar[str] = "exit"

    exit_code: int = 0  # 0-255 when the process exited normally
    signal: int = 0  # the signal that killed it, 0 if none
    core_dumped: bool = False


@dataclass(slots=True)
class ConnectEvent(Event):
    kind: ClassVar[str] = "connect"

    protocol: str = ""  # "tcp", "udp", or "ip/<n>"
    family: str = ""  # "ipv4" | "ipv6"
    daddr: str = ""
    dport: int = 0
    saddr: str = ""
    sport: int = 0
    # success | in_progress | pending | error: see README, "connect outcomes"
    outcome: str = ""
    errno: int = 0
    errno_name: str = ""
    nonblocking: bool = False


@dataclass(slots=True)
class BindEvent(Event):
    kind: ClassVar[str] = "bind"

    protocol: str = ""
    family: str = ""
    addr: str = ""
    port: int = 0  # the bound port (the kernel's choice when 0 was asked)
    requested_addr: str = ""
    requested_port: int = 0
    outcome: str = ""  # success | error


@dataclass(slots=True)
class ListenEvent(Event):
    kind: ClassVar[str] = "listen"

    protocol: str = "tcp"
    family: str = ""
    addr: str = ""
    port: int = 0


@dataclass(slots=True)
class SocketEvent(Event):
    """A socket a traced process already held when tracing started (from sock_diag)."""

    kind: ClassVar[str] = "socket"

    protocol: str = ""
    family: str = ""
    state: str = ""  # "listen" | "established" | ...
    laddr: str = ""
    lport: int = 0
    raddr: str = ""
    rport: int = 0


@dataclass(slots=True)
class CgroupMoveEvent(Event):
    kind: ClassVar[str] = "cgroup_move"

    target_pid: int = 0
    dst_cgroup_id: int = 0
    dst_cgroup_path: str = ""
    left_sandbox: bool = False  # the destination lies outside every traced cgroup


@dataclass(slots=True)
class LostEvent:
    """Records that could not be delivered since the previous LostEvent, by cause."""

    kind: ClassVar[str] = "lost"

    time_ns: int
    host: str
    kernel: dict[str, int]  # ring buffer full, per record kind
    user: int  # dropped in user space (queue full)
    errors: dict[str, int]  # kernel map updates that failed
    spool: int = 0  # events discarded on the way to the service (spool or buffer full)
    collector: str = ""  # the collector's id when it streams to a service


@dataclass(slots=True)
class Alert:
    """A detection: a rule matched one or more events of one process."""

    kind: ClassVar[str] = "alert"

    alert_id: str
    rule_id: str
    title: str
    level: str  # informational, low, medium, high, critical
    tags: list[str]
    description: str
    time_ns: int  # of the (last) triggering event
    host: str
    sandbox: str
    process: Process  # the acting process, with its ancestry up to the sandbox root
    events: list[Any]  # the triggering events (AnyEvent)
    count: int = 1  # events folded into this alert
    repeat: bool = False  # a summary of repeats folded after the first alert
    raised_ns: int = 0  # wall clock when the engine raised it (time_ns to here: detection lag)


AnyEvent = (
    ExecEvent
    | ForkEvent
    | ExitEvent
    | ConnectEvent
    | BindEvent
    | ListenEvent
    | SocketEvent
    | CgroupMoveEvent
    | LostEvent
)

EVENT_TYPES: dict[str, type[Any]] = {
    t.kind: t
    for t in (
        ExecEvent,
        ForkEvent,
        ExitEvent,
        ConnectEvent,
        BindEvent,
        ListenEvent,
        SocketEvent,
        CgroupMoveEvent,
        LostEvent,
        Alert,
    )
}


def to_dict(event: AnyEvent | Alert) -> dict[str, Any]:
    """Plain dict of an event, bytes kept as bytes, with its kind (also nested events')."""
    d = dataclasses.asdict(event)
    d["kind"] = event.kind
    if isinstance(event, Alert):
        d["events"] = [to_dict(e) for e in event.events]
    return d


def encode(event: AnyEvent | Alert) -> bytes:
    """msgpack of one event, tagged with the wire version."""
    d = to_dict(event)
    d["v"] = WIRE_VERSION
    return msgpack.packb(d, use_bin_type=True)


def _process_from(d: Any) -> Process:
    if not isinstance(d, dict):
        raise EventFormatError("event process is not a map")
    ancestry = [AncestorRef(**a) for a in d.pop("ancestry", [])]
    return Process(**d, ancestry=ancestry)


def decode(data: bytes) -> AnyEvent | Alert:
    """Inverse of encode(); raises WireVersionError or EventFormatError (both ValueError) on
    anything it cannot read, whatever the bytes."""
    try:
        d = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise EventFormatError(f"not a msgpack event: {exc}") from None
    if not isinstance(d, dict):
        raise EventFormatError("encoded event is not a map")
    version = d.pop("v", None)
    if version != WIRE_VERSION:
        raise WireVersionError(
            f"event wire version {version!r} is not supported (this build reads {WIRE_VERSION})"
        )
    event: AnyEvent | Alert = from_dict(d)
    return event


def from_dict(d: Any) -> Any:
    """An event (or alert) from its to_dict() form; EventFormatError when it is not one."""
    if not isinstance(d, dict):
        raise EventFormatError("encoded event is not a map")
    kind = d.pop("kind", None)
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise EventFormatError(f"unknown event kind {kind!r}")
    try:
        if "process" in d:
            d["process"] = _process_from(d["process"])
        if cls is Alert:
            events = d.get("events")
            if not isinstance(events, list):
                raise EventFormatError("alert events is not a list")
            d["events"] = [from_dict(e) for e in events]
        return cls(**d)
    except TypeError as exc:  # missing or unknown fields
        raise EventFormatError(f"{kind} event has the wrong fields: {exc}") from None
