"""sandtrace's typed events: one definition, one versioned msgpack encoding.

Everything a traced process controls (argv, paths, comm, cgroup names) is kept as it came,
as bytes where it may not be text. Renderers escape it; nothing here interprets it.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from typing import Any, ClassVar

import msgpack
import msgspec
from msgspec import field

WIRE_VERSION = 1
"""Version of the msgpack encoding of events. Bump on any incompatible change."""


class WireVersionError(ValueError):
    """An encoded event carries a wire version this build cannot read."""


class EventFormatError(ValueError):
    """Encoded bytes that are not an event: not a map, or of an unknown kind."""


class _Record(msgspec.Struct, array_like=True, gc=False, forbid_unknown_fields=True):
    """Every event's base: a msgspec Struct. Its fields are its wire layout, a row: an array
    of the fields in declaration order (tagged records start with their kind), so one C
    decoder checks every field's type exactly while it builds the objects, and encoding is
    one C call. Instances are not tracked by the cyclic garbage collector (records never
    refer back to themselves)."""


class Process(_Record):
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
    # What the process's current program is, as its exec event said once the collector
    # completed it (on events after the exec; "" or empty before, or when not known): the
    # executable's identity, the working directory at exec and the name given to execve,
    # so that network events are judged by identity and by the file that actually runs.
    sha256: str = ""
    original_exe: bytes = b""
    go_module: str = ""
    cwd: bytes = b""
    filename: bytes = b""


class AncestorRef(_Record):
    """One ancestor of the acting process, nearest first."""

    pid: int
    key: str
    exe: bytes
    argv: list[bytes]


class Event(_Record, tag_field="kind"):
    """Fields common to every event."""

    kind: ClassVar[str] = "event"

    time_ns: int  # wall clock, nanoseconds since the epoch
    mono_ns: int  # CLOCK_MONOTONIC at the event (for latency measurement)
    host: str
    sandbox: str  # sandbox id
    cgroup_id: int
    cgroup_path: str
    container_id: str
    if typing.TYPE_CHECKING:
        process: Process
    else:
        # In a batch (service/wire.py, version 3) an event's process is an index into the
        # batch's table of processes until decode_batch puts the Process there; every
        # other decoder refuses an index (see _no_index). Everywhere else it is a Process.
        process: Process | int


class ExecEvent(Event, tag="exec"):
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
    # What the executed file is, whatever it is called (filled by the collector, which sees
    # the file; "" or empty when not known):
    sha256: str = ""  # hex digest of the executable's content
    original_exe: bytes = b""  # the packaged file it is a copy of (the package's digests)
    go_module: str = ""  # a Go program's main module path, from its build information
    # What its standard streams 0, 1, 2 are at exec, one "type[:detail]" each (see
    # collector/stdio.py): tty, pipe, file:PATH, null, tcp:PEER, udp:PEER, unix:PATH, ...
    stdio: list[str] = field(default_factory=list)


class ForkEvent(Event, tag="fork"):
    kind: ClassVar[str] = "fork"

    child_pid: int = 0
    child_key: str = ""


class ExitEvent(Event, tag="exit"):
    kind: ClassVar[str] = "exit"

    exit_code: int = 0  # 0-255 when the process exited normally
    signal: int = 0  # the signal that killed it, 0 if none
    core_dumped: bool = False


class ConnectEvent(Event, tag="connect"):
    kind: ClassVar[str] = "connect"

    protocol: str = ""  # "tcp", "udp", "unix", or "ip/<n>"
    family: str = ""  # "ipv4" | "ipv6" | "unix"
    daddr: str = ""
    dport: int = 0
    saddr: str = ""
    sport: int = 0
    # success | in_progress | pending | error | repeated | sent (a datagram sent without
    # connect(): the first of a socket to this destination) | denied (see `denied`): see
    # README, "connect outcomes"
    outcome: str = ""
    errno: int = 0
    errno_name: str = ""
    nonblocking: bool = False
    # A unix socket's connect (family and protocol "unix"; daddr "", dport 0): the address
    # as given, a path or "@" and an abstract name, and the process listening there when the
    # collector found it (pid 0 and exe b"" when not).
    path: bytes = b""
    peer_pid: int = 0
    peer_exe: bytes = b""
    # Connects by this process to this destination counted in the kernel, not sent, since
    # the previous event for it (a flood of repeats is one event a second). With outcome
    # "repeated" the event reports only such a count, no connect of its own.
    repeats: int = 0
    # Names and protocols (where the kernel has cgroup_skb hooks; see README, "Names and
    # protocols"). All of it comes from the sandbox's own packets and is untrusted.
    # The name the sandbox resolved daddr as (a DNS answer it received), else the server
    # name of a TLS ClientHello on this flow; "" when neither was seen.
    hostname: str = ""
    hostname_source: str = ""  # "dns" | "sni" | ""
    # What the flow speaks, from its first bytes each way whatever the port: ssh, tls, http,
    # stratum, dns; "unknown" for bytes that match none; "" when no payload was seen.
    app_protocol: str = ""
    sni: str = ""  # a TLS ClientHello's server name
    http_host: str = ""  # an HTTP request's Host
    # the first line said: an HTTP request line, a Stratum method, an SSH banner
    app_detail: str = ""
    # Refused in the kernel by the sandbox's egress policy (`--enforce`; README,
    # "Enforcement"): the connect or the send failed with EPERM and reached nobody (outcome
    # "denied"; with "repeated", the count is of refused ones).
    denied: bool = False


class BindEvent(Event, tag="bind"):
    kind: ClassVar[str] = "bind"

    protocol: str = ""
    family: str = ""
    addr: str = ""
    port: int = 0  # the bound port (the kernel's choice when 0 was asked)
    requested_addr: str = ""
    requested_port: int = 0
    outcome: str = ""  # success | error


class ListenEvent(Event, tag="listen"):
    kind: ClassVar[str] = "listen"

    protocol: str = "tcp"
    family: str = ""
    addr: str = ""
    port: int = 0


class SocketEvent(Event, tag="socket"):
    """A socket a traced process already held when tracing started (from sock_diag)."""

    kind: ClassVar[str] = "socket"

    protocol: str = ""
    family: str = ""
    state: str = ""  # "listen" | "established" | ...
    laddr: str = ""
    lport: int = 0
    raddr: str = ""
    rport: int = 0


class CgroupMoveEvent(Event, tag="cgroup_move"):
    kind: ClassVar[str] = "cgroup_move"

    target_pid: int = 0
    dst_cgroup_id: int = 0
    dst_cgroup_path: str = ""
    left_sandbox: bool = False  # the destination lies outside every traced cgroup


class RawSocketEvent(Event, tag="raw_socket"):
    """A raw IP or packet socket a traced process made: it can craft packets no connect or
    bind shows."""

    kind: ClassVar[str] = "raw_socket"

    family: str = ""  # "ipv4" | "ipv6" | "packet" (AF_PACKET)
    # the IP protocol it was opened for: "icmp", "tcp", "udp", "ip/<n>"; a packet socket's
    # ethertype: "all", "ip", "ipv6", "arp", "none", "eth/0x<hex>"
    protocol: str = ""
    protocol_number: int = 0  # as given to socket(), in host order: 255 is IPPROTO_RAW


class IoUringEvent(Event, tag="io_uring"):
    """An io_uring instance a traced process set up (io_uring_setup)."""

    kind: ClassVar[str] = "io_uring"

    fd: int = 0  # the ring's file descriptor
    sq_entries: int = 0
    cq_entries: int = 0
    flags: int = 0  # IORING_SETUP_*


class ResponseEvent(Event, tag="response"):
    """An action sandtrace took against a sandbox, ordered by an alert (embedded detection or
    the service's) or by an operator (`sandtrace sandbox`). Its process is the one the
    action is about: the alerting process (whose pid and key the action checked before
    acting), or for an operator's command sandtrace's own."""

    kind: ClassVar[str] = "response"

    action: str = ""  # kill | freeze | thaw
    origin: str = ""  # embedded (this collector's rules) | service | operator
    result: str = ""  # ok | failed | refused (outside the traced sandboxes) | gone (exited)
    error: str = ""  # why, when the result is not ok
    alert_id: str = ""  # the alert that ordered it ("" for an operator's command)
    rule_id: str = ""
    title: str = ""
    level: str = ""
    target_pid: int = 0  # kill: the alerting process
    target_key: str = ""
    pids: list[int] = field(default_factory=list)  # kill: every process signalled
    took_ns: int = 0  # from the order to the action's result


class DnsEvent(Event, tag="dns"):
    """A DNS answer a traced process received (from port 53, UDP or TCP), as it came: the
    names in it are whatever the answering server chose, untrusted."""

    kind: ClassVar[str] = "dns"

    query_name: str = ""  # lower-case, no trailing dot; bytes that are not UTF-8 as \xNN
    query_type: str = ""  # "A", "AAAA", "CNAME", ..., "TYPE<n>"
    rcode: int = 0  # response code: 0 NOERROR, 3 NXDOMAIN, ...
    rcode_name: str = ""
    addresses: list[str] = field(default_factory=list)  # A/AAAA answers of the question
    cnames: list[str] = field(default_factory=list)  # the CNAME chain from it, in order
    # every answer record as "TYPE data" ("A 192.0.2.7", "CNAME edge.example.net", "MX ")
    answers: list[str] = field(default_factory=list)
    ttl: int = 0  # the shortest TTL of the answers
    resolver: str = ""  # the address the answer came from
    resolver_port: int = 0
    protocol: str = ""  # "udp" | "tcp"
    transaction_id: int = 0
    truncated: bool = False  # the TC bit, or the message was longer than sandtrace captures
    mapped: int = 0  # addresses the kernel entered in its per-sandbox name map
    error: str = ""  # why the message could not be read whole ("" when it could)


class LostEvent(_Record, tag_field="kind", tag="lost"):
    """Records that could not be delivered since the previous LostEvent, by cause."""

    kind: ClassVar[str] = "lost"

    time_ns: int
    host: str
    kernel: dict[str, int]  # ring buffer full, per record kind
    user: int  # dropped in user space (queue full)
    errors: dict[str, int]  # kernel map updates that failed
    spool: int = 0  # events discarded on the way to the service (spool or buffer full)
    collector: str = ""  # the collector's id when it streams to a service
    sandboxes: dict[str, int] = field(default_factory=dict)  # kernel losses by sandbox id


class Alert(_Record, tag_field="kind", tag="alert"):
    """A detection: a rule matched one or more events of one process."""

    kind: ClassVar[str] = "alert"

    alert_id: str  # a UUIDv7 (api.ids): unique across hosts, runs and restarts
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
    folds: str = ""  # a summary's: the alert_id of the alert whose repeats it counts
    omitted: int = 0  # triggering events left out of `events` (it is bounded)
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
    | RawSocketEvent
    | IoUringEvent
    | ResponseEvent
    | DnsEvent
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
        RawSocketEvent,
        IoUringEvent,
        ResponseEvent,
        DnsEvent,
    )
}


def fields_of(cls: type) -> tuple[msgspec.structs.FieldInfo, ...]:
    """An event type's fields, in declaration (and row) order, with their resolved types."""
    return _FIELDS[cls]


_RECORDS: list[type[msgspec.Struct]] = [Process, AncestorRef, *EVENT_TYPES.values()]
_FIELDS: dict[type, tuple[msgspec.structs.FieldInfo, ...]] = {
    cls: tuple(  # an event's process is a Process outside a batch's decoder (see Event)
        msgspec.structs.replace(f, type=Process) if f.type == Process | int else f
        for f in msgspec.structs.fields(cls)
    )
    for cls in _RECORDS
}
_untagged = [c for c in EVENT_TYPES.values() if c.__struct_config__.tag != c.kind]
if _untagged:  # the class attribute and the wire tag are one name
    raise TypeError(f"event types whose kind is not their wire tag: {_untagged}")


def to_dict(event: AnyEvent | Alert) -> dict[str, Any]:
    """Plain dict of an event, bytes kept as bytes, with its kind (also nested events'),
    built by one generated function per event type (a generic deep copy cost ~60 us per
    event)."""
    return _TO_DICT[type(event)](event)


def _dict_expr(name: str, t: Any, var: str) -> str:
    v = f"{var}.{name}"
    if t is Process:
        return f"_pdict({v})"
    if t == list[AncestorRef]:
        return f"[_adict(a) for a in {v}]"
    if t == list[Any]:  # an alert's events
        return f"[to_dict(x) for x in {v}]"
    if typing.get_origin(t) is list:
        return f"list({v})"
    if typing.get_origin(t) is dict:
        return f"dict({v})"
    return v


def _dict_function(cls: type, fname: str, kind: bool) -> Callable[[Any], dict[str, Any]]:
    items = [f"{f.name!r}: {_dict_expr(f.name, f.type, 'e')}" for f in _FIELDS[cls]]
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


# --- bytes as text -----------------------------------------------------------------------------
# One encoding for every text form of a bytes field (JSON lines, ECS, OCSF, syslog): "escaped
# text". Valid UTF-8 reads as itself, except that a backslash is written as two (\\); each
# byte that is not part of valid UTF-8 is written \xNN (two lower-case hex digits). So a
# backslash in the text always starts one of those two escapes: b"a\\xffb" (a real
# backslash) is the text a\\xffb, b"a\xffb" (a 0xff byte) is a\xffb, and text_bytes() gives
# back the exact bytes. The text is valid Unicode (no lone surrogates), so any JSON parser
# in any language reads it.

_INVALID_BYTE = re.compile("[\udc80-\udcff]")  # what "surrogateescape" makes of a bad byte
_ESCAPES = re.compile(r"(\\\\|\\x[0-9a-f]{2})")


def bytes_text(value: bytes) -> str:
    """`value` as escaped text (see above): lossless, valid Unicode, one string."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("utf-8", "surrogateescape").replace("\\", "\\\\")
        return _INVALID_BYTE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", text)
    return text.replace("\\", "\\\\") if "\\" in text else text


def text_bytes(text: str) -> bytes:
    """The bytes bytes_text() was given; UnicodeError (a ValueError) when `text` is not
    escaped text: a backslash that starts neither two backslashes nor ``x`` and two
    lower-case hex digits, or a lone surrogate."""
    if "\\" not in text:
        return text.encode("utf-8")
    out = bytearray()
    for i, part in enumerate(_ESCAPES.split(text)):
        if i % 2:  # an escape
            out += b"\\" if part == "\\\\" else bytes((int(part[2:], 16),))
        elif "\\" in part:
            raise UnicodeError(f"not escaped text: a lone backslash in {text!r}")
        else:
            out += part.encode("utf-8")
    return bytes(out)


def encode(event: AnyEvent | Alert) -> bytes:
    """msgpack of one event as a map, tagged with the wire version."""
    d = to_dict(event)
    d["v"] = WIRE_VERSION
    return msgpack.packb(d, use_bin_type=True)


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


# --- from maps -------------------------------------------------------------------------------
# The map form (to_dict's, the JSON and version-1 batches') becomes a row, field by field,
# which the row decoder then checks: one place decides what a valid event is.


def from_dict(d: Any) -> Any:
    """An event (or alert) from its to_dict() form, every field's type checked;
    EventFormatError when it is not one."""
    if not isinstance(d, dict):
        raise EventFormatError("encoded event is not a map")
    kind = d.get("kind")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise EventFormatError(f"unknown event kind {kind!r}")
    row = _row_of_map(d, cls, kind)
    events = None
    if cls is Alert:  # its events are maps of their own kinds
        events = row[_ALERT_EVENTS]
        if not isinstance(events, list):
            raise EventFormatError("alert events is not a list")
        row[_ALERT_EVENTS] = []
    event = _checked(row, cls)
    if events is not None:
        event.events = [from_dict(e) for e in events]
    return event


def _row_of_map(d: dict[Any, Any], cls: type, kind: str | None) -> list[Any]:
    """The row of a map (fields missing from it take their defaults); EventFormatError
    names a field it lacks or does not know."""
    try:
        row: list[Any] = _MAP_TO_ROW[cls](d)
    except (KeyError, TypeError, AttributeError):  # the slow path says what is wrong
        row = _row_of_map_slowly(d, cls, kind)
    return row


def _row_of_map_slowly(d: dict[Any, Any], cls: type, kind: str | None) -> list[Any]:
    fields = _FIELDS[cls]
    what = f"{kind} event" if kind else f"event {cls.__name__.lower()}"
    unknown = d.keys() - _NAMES[cls]
    if unknown:
        raise EventFormatError(f"{what} has unknown fields: {', '.join(sorted(map(str, unknown)))}")
    row: list[Any] = [kind] if kind else []
    for f in fields:
        if f.name in d:
            value = d[f.name]
            if f.type is Process and isinstance(value, dict):
                value = _row_of_map(value, Process, None)
            elif f.type == list[AncestorRef] and isinstance(value, list):
                value = [
                    _row_of_map(a, AncestorRef, None) if isinstance(a, dict) else a for a in value
                ]
        elif f.default is not msgspec.NODEFAULT:
            value = f.default
        elif f.default_factory is not msgspec.NODEFAULT:
            value = f.default_factory()
        else:
            raise EventFormatError(f"{what} has no {f.name}")
        row.append(value)
    return row


def _map_to_row_function(cls: type) -> Callable[[dict[Any, Any]], list[Any]]:
    """A generated function: a map's row, defaults filled in; KeyError, TypeError or
    AttributeError when it has a field it should not or lacks one, or a nested value is not
    a map (the slow path then says which)."""
    items = [repr(cls.kind)] if cls.__struct_config__.tag else []  # type: ignore[attr-defined]
    scope: dict[str, Any] = {
        "_prow": _MAP_TO_ROW.get(Process),
        "_arow": _MAP_TO_ROW.get(AncestorRef),
        "N": _NAMES[cls],
    }
    for i, f in enumerate(_FIELDS[cls]):
        if f.default is not msgspec.NODEFAULT:
            scope[f"D{i}"] = f.default
            value = f"d.get({f.name!r}, D{i})"
        elif f.default_factory is not msgspec.NODEFAULT:
            scope[f"F{i}"] = f.default_factory
            value = f"(d[{f.name!r}] if {f.name!r} in d else F{i}())"
        else:
            value = f"d[{f.name!r}]"
        if f.type is Process:
            value = f"_prow({value})"
        elif f.type == list[AncestorRef]:
            value = f"[_arow(a) for a in {value}]"
        items.append(value)
    src = (
        "def row(d):\n    if not d.keys() <= N:\n        raise KeyError\n"
        f"    return [{', '.join(items)}]\n"
    )
    exec(compile(src, f"<map row {cls.__name__}>", "exec"), scope)  # noqa: S102 - our own source
    fn: Callable[[dict[Any, Any]], list[Any]] = scope["row"]
    return fn


# the keys a map of each record may have: its fields, and its kind when it is tagged
_NAMES = {
    cls: frozenset(f.name for f in _FIELDS[cls])
    | ({"kind"} if cls.__struct_config__.tag else set())
    for cls in _RECORDS
}
_MAP_TO_ROW: dict[type, Callable[[dict[Any, Any]], list[Any]]] = {}
_MAP_TO_ROW[AncestorRef] = _map_to_row_function(AncestorRef)
_MAP_TO_ROW[Process] = _map_to_row_function(Process)
_MAP_TO_ROW.update({cls: _map_to_row_function(cls) for cls in EVENT_TYPES.values()})


def _checked(row: list[Any], cls: type) -> Any:
    """The record `row` describes; msgpack in between, so that the checks are the wire
    decoder's own, as strict (no text for bytes, no bool for int)."""
    try:
        record = _DECODERS[cls].decode(msgpack.packb(row, use_bin_type=True))
    except (msgspec.DecodeError, TypeError, ValueError, OverflowError) as exc:
        raise EventFormatError(explain_row_error(str(exc), row)) from None
    refuse_process_index(record)
    return record


def refuse_process_index(event: Any) -> None:
    """EventFormatError when an event's process is an index into a batch's table: only
    api.wire.decode_batch, which has the table, may read one (see Event)."""
    if getattr(event, "process", None).__class__ is int:
        raise EventFormatError(f"{event.kind} event: process: Expected `array`, got `int`")


_ALERT_EVENTS = 1 + [f.name for f in _FIELDS[Alert]].index("events")
_DECODERS = {cls: msgspec.msgpack.Decoder(cls) for cls in EVENT_TYPES.values()}


# --- rows: the compact form batches carry ----------------------------------------------------
# An event as an array: its kind, then its fields in declaration order, the process as an
# array of its own fields (each ancestor an array): the records' own msgpack
# encoding. Without the field names, a batch is half the size of the map form. Any change to
# the fields of an event type changes the layout: bump the batch version in service/wire.py.

ROW_TYPES = tuple(cls for cls in EVENT_TYPES.values() if cls is not Alert)
RowEvent = typing.Union[ROW_TYPES]  # type: ignore[valid-type]  # noqa: UP007 - built at run time
"""What a batch's rows may hold: any event but an alert (collectors send events)."""


def to_row(event: AnyEvent) -> list[Any]:
    """The row form of an event, as Python lists (what a batch carries, msgpack-encoded)."""
    row: list[Any] = msgspec.to_builtins(event, builtin_types=(bytes,))
    return row


_ROW_DECODER = msgspec.msgpack.Decoder(RowEvent)


def from_row(row: Any) -> AnyEvent:
    """An event from its row form, every field type checked; EventFormatError otherwise."""
    try:
        event: AnyEvent = _ROW_DECODER.decode(msgpack.packb(row, use_bin_type=True))
    except (msgspec.DecodeError, TypeError, ValueError, OverflowError) as exc:
        raise EventFormatError(explain_row_error(str(exc), row)) from None
    refuse_process_index(event)
    return event


_AT = re.compile(r"(.*) - at `\$((?:\[\d+\])*)`", re.DOTALL)


def explain_row_error(message: str, row: Any, *, in_list: bool = False) -> str:
    """msgspec's message about a row, its path (``$[8][6]``) put in field names: "exec
    event: process.comm: Expected `bytes`, got `str`". `row` is the row as msgpack lists;
    with `in_list`, a list of rows (a batch's events), and the message names the event."""
    m = _AT.fullmatch(message)
    what, path = (
        (m.group(1), [int(i) for i in re.findall(r"\d+", m.group(2))]) if m else (message, [])
    )
    if in_list:
        if not path:
            return f"batch events: {what}"
        i = path.pop(0)
        row = row[i] if isinstance(row, list) and i < len(row) else None
        return f"event {i}: {_explain(what, path, row)}"
    return _explain(what, path, row)


def _explain(what: str, path: list[int], row: Any) -> str:
    kind = row[0] if isinstance(row, list) and row and isinstance(row[0], str) else None
    cls = EVENT_TYPES.get(kind) if kind is not None else None
    if path[:1] in ([], [0]) and what.startswith("Invalid value"):
        return f"unknown event kind{what.removeprefix('Invalid value')} in a row"
    if not path or cls is None:
        return f"{kind} event row: {what}" if cls is not None else f"event row: {what}"
    names: list[str] = []
    tp: Any = cls
    for i in path:
        if isinstance(tp, type) and tp in _FIELDS:
            fields = _FIELDS[tp]
            index = i - 1 if tp is cls else i  # a tagged row starts with its kind
            if not 0 <= index < len(fields):
                break
            names.append(fields[index].name)
            tp = fields[index].type
        elif typing.get_origin(tp) is list:
            names[-1] += f"[{i}]"
            tp = typing.get_args(tp)[0]
        else:
            break
    return f"{kind} event: {'.'.join(names)}: {what}"
