"""sandtrace's typed events: one definition, one versioned msgpack encoding.

Everything a traced process controls (argv, paths, comm, cgroup names) is kept as it came,
as bytes where it may not be text. Renderers escape it; nothing here interprets it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
    """Plain dict of an event, bytes kept as bytes, with its kind (also nested events'): what
    dataclasses.asdict() gives plus "kind", built by one generated function per event type
    (asdict's generic deep copy cost ~60 us per event)."""
    return _TO_DICT[type(event)](event)


def _dict_expr(name: str, t: str, var: str) -> str:
    v = f"{var}.{name}"
    if t == "Process":
        return f"_pdict({v})"
    if t == "list[AncestorRef]":
        return f"[_adict(a) for a in {v}]"
    if t == "list[Any]":  # an alert's events
        return f"[to_dict(x) for x in {v}]"
    if t.startswith("list["):
        return f"list({v})"
    if t.startswith("dict["):
        return f"dict({v})"
    return v


def _dict_function(cls: type, fname: str, kind: bool) -> Callable[[Any], dict[str, Any]]:
    items = [f"{f.name!r}: {_dict_expr(f.name, str(f.type), 'e')}" for f in dataclasses.fields(cls)]
    if kind:
        items.append(f"'kind': {cls.kind!r}")  # type: ignore[attr-defined]
    src = f"def {fname}(e):\n    return {{{', '.join(items)}}}\n"
    exec(compile(src, f"<dict {cls.__name__}>", "exec"), _DICT_SCOPE)  # noqa: S102 - our source
    fn: Callable[[Any], dict[str, Any]] = _DICT_SCOPE[fname]
    return fn


_DICT_SCOPE: dict[str, Any] = {"to_dict": to_dict}
_DICT_SCOPE["_adict"] = _dict_function(AncestorRef, "_adict", kind=False)
_DICT_SCOPE["_pdict"] = _dict_function(Process, "_pdict", kind=False)
_TO_DICT = {cls: _dict_function(cls, f"to_dict_{k}", kind=True) for k, cls in EVENT_TYPES.items()}


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
        event = cls(**d)
    except TypeError as exc:  # missing or unknown fields
        raise EventFormatError(f"{kind} event has the wrong fields: {exc}") from None
    return validate(event)


# --- type checks ----------------------------------------------------------------------------
# A decoded event reaches the engine, the outputs and the live tail, which all trust its
# field types; a collector (or anything holding its token) controls every byte. So decoding
# checks each field's type exactly, with one generated function per event type.

_CHECK_EXPR = {
    # {v} is the value's expression; set(map(type, ...)) runs at C speed over lists
    "int": "type({v}) is int",
    "str": "type({v}) is str",
    "bytes": "type({v}) is bytes",
    "bool": "type({v}) is bool",
    "list[bytes]": "(type({v}) is list and set(map(type, {v})) <= _B)",
    "list[str]": "(type({v}) is list and set(map(type, {v})) <= _S)",
    "dict[str, int]": (
        "(type({v}) is dict and set(map(type, {v})) <= _S and set(map(type, {v}.values())) <= _I)"
    ),
    "Process": "_process_ok({v})",
    "list[AncestorRef]": "_ancestry_ok({v})",
    "list[Any]": "type({v}) is list",
}
_SCOPE: dict[str, Any] = {"_B": {bytes}, "_S": {str}, "_I": {int}}


def _conds(cls: type, var: str) -> str:
    """One boolean expression checking every field of `var`, a `cls`; a Process field is
    checked inline (bound once with :=), not through a call."""
    conds = []
    for f in dataclasses.fields(cls):
        t = str(f.type)
        if t == "Process":
            conds.append(f"(type(p := {var}.{f.name}) is Process and {_conds(Process, 'p')})")
        else:
            conds.append(_CHECK_EXPR[t].format(v=f"{var}.{f.name}"))
    return " and ".join(conds) or "True"


def _checker(cls: type) -> tuple[Callable[[Any], bool], list[tuple[str, str]]]:
    fields = [(f.name, str(f.type)) for f in dataclasses.fields(cls)]
    src = f"def check(e):\n    return {_conds(cls, 'e')}\n"
    exec(compile(src, f"<check {cls.__name__}>", "exec"), _SCOPE)  # noqa: S102 - our own source
    check: Callable[[Any], bool] = _SCOPE.pop("check")
    return check, fields


def _process_ok(p: Any) -> bool:
    return type(p) is Process and _PROCESS_CHECK[0](p)


def _ancestry_ok(v: Any) -> bool:
    if type(v) is not list:
        return False
    check = _ANCESTOR_CHECK[0]
    return all(type(a) is AncestorRef and check(a) for a in v)


_SCOPE.update(Process=Process, _process_ok=_process_ok, _ancestry_ok=_ancestry_ok)
_ANCESTOR_CHECK = _checker(AncestorRef)
_PROCESS_CHECK = _checker(Process)
_CHECKS = {cls: _checker(cls) for cls in EVENT_TYPES.values()}


def _why(obj: Any, checks: tuple[Callable[[Any], bool], list[tuple[str, str]]]) -> str:
    """Which field failed its check, for the error message."""
    scope = {**_SCOPE, "e": obj}
    for name, t in checks[1]:
        if not eval(_CHECK_EXPR[t].format(v=f"e.{name}"), scope):  # noqa: S307 - our own source
            value = getattr(obj, name)
            if t == "Process" and type(value) is Process:
                return f"process: {_why(value, _PROCESS_CHECK)}"
            return f"{name} is not {t} ({type(value).__name__})"
    return "fields of the wrong type"


def validate(event: Any) -> Any:
    """event itself when every field has its declared type, else EventFormatError."""
    checks = _CHECKS[type(event)]
    if not checks[0](event):
        raise EventFormatError(f"{event.kind} event: {_why(event, checks)}")
    return event


# --- rows: the compact form batches carry ----------------------------------------------------
# An event as a list: its kind, then its fields in declaration order, the process as a list
# of its own fields (ancestry last, each ancestor a list). Without the field names, a batch is
# half the size of the map form and decodes about three times faster. Any change to the
# fields of an event type changes the layout: bump the batch version in service/wire.py.

_ROW_KINDS = {kind: cls for kind, cls in EVENT_TYPES.items() if cls is not Alert}


def _row_codecs(cls: type) -> tuple[Callable[[Any], list[Any]], Callable[[list[Any]], Any]]:
    names = [f.name for f in dataclasses.fields(cls)]
    out = ", ".join("_prow(e.process)" if n == "process" else f"e.{n}" for n in names)
    args = ", ".join(
        f"_pfrom(r[{i + 1}])" if n == "process" else f"r[{i + 1}]" for i, n in enumerate(names)
    )
    src = (
        f"def to_row(e):\n    return [{cls.kind!r}, {out}]\n"  # type: ignore[attr-defined]
        f"def from_row(r):\n"
        f"    if len(r) != {len(names) + 1}:\n"
        f"        raise EventFormatError('{cls.kind} event row has ' + str(len(r) - 1) + "  # type: ignore[attr-defined]
        f"' fields, not {len(names)}')\n"
        f"    return cls({args})\n"
    )
    scope: dict[str, Any] = {"cls": cls, "_prow": _process_row, "_pfrom": _process_from_row,
                             "EventFormatError": EventFormatError}  # fmt: skip
    exec(compile(src, f"<rows {cls.__name__}>", "exec"), scope)  # noqa: S102 - our own source
    return scope["to_row"], scope["from_row"]


def _process_row(p: Process) -> list[Any]:
    ancestry = [[a.pid, a.key, a.exe, a.argv] for a in p.ancestry]
    return [p.pid, p.tid, p.ns_pid, p.ppid, p.uid, p.gid, p.comm, p.start_ns, p.key, p.exe,
            p.argv, p.user, p.group, ancestry]  # fmt: skip


def _process_from_row(p: Any) -> Process:
    if type(p) is not list or len(p) != 14:
        raise EventFormatError("event process row is not a list of 14 fields")
    ancestry = p[13]
    if type(ancestry) is not list:
        raise EventFormatError("process ancestry is not a list")
    for a in ancestry:
        if type(a) is not list or len(a) != 4:
            raise EventFormatError("process ancestor row is not a list of 4 fields")
    return Process(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11],
                   p[12], [AncestorRef(a[0], a[1], a[2], a[3]) for a in ancestry])  # fmt: skip


_ROWS = {cls: _row_codecs(cls) for cls in _ROW_KINDS.values()}
_FROM_ROW = {kind: (_ROWS[cls][1], _CHECKS[cls]) for kind, cls in _ROW_KINDS.items()}


def to_row(event: AnyEvent) -> list[Any]:
    """The row form of an event (not of an alert: batches carry events)."""
    return _ROWS[type(event)][0](event)


def from_row(row: Any) -> AnyEvent:
    """An event from its row form, every field type checked; EventFormatError otherwise."""
    if type(row) is not list or not row or type(row[0]) is not str:
        raise EventFormatError("event row is not a list starting with its kind")
    codec = _FROM_ROW.get(row[0])
    if codec is None:
        raise EventFormatError(f"unknown event kind {row[0]!r} in a row")
    event = codec[0](row)
    if not codec[1][0](event):
        raise EventFormatError(f"{row[0]} event: {_why(event, codec[1])}")
    return event  # type: ignore[no-any-return]
