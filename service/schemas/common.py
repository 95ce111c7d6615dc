"""What the schemas share: the item and document types, and the fields ECS and OCSF both make.

Every string a traced process controls (argv, paths, comm) becomes text through text(): the
"escaped text" of api.events.bytes_text, the one encoding of bytes in every output (valid
UTF-8 as itself, a backslash doubled, each invalid byte ``\\xNN``; lossless, see
api/events.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from api.events import Alert, AnyEvent, ConnectEvent, LostEvent, Process, bytes_text

Item = AnyEvent | Alert
# A JSON document as a schema makes it: nested dicts, lists and scalars, dumped as JSON by the
# output that sends it. Any is the truth here: each schema decides the shape.
Doc = dict[str, Any]
Schema = Callable[[Item], Doc]

PRODUCT = "sandtrace"
IANA_PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58}


def text(value: bytes | str) -> str:
    """Untrusted bytes as escaped text (see module docstring); a str is text already."""
    if isinstance(value, bytes):
        return bytes_text(value)
    return value


def command_line(argv: list[bytes]) -> str:
    """argv joined with spaces, as ECS process.command_line and OCSF cmd_line hold it."""
    return " ".join(text(a) for a in argv)


def rfc3339(time_ns: int, digits: int = 9) -> str:
    """UTC RFC 3339 time with `digits` (6 or 9) fraction digits, e.g. ...T22:13:20.123456Z."""
    seconds, ns = divmod(time_ns, 1_000_000_000)
    try:
        base = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        base = "1970-01-01T00:00:00"  # a time no clock produces: shown as the epoch
        ns = 0
    fraction = f"{ns:09d}"[:digits]
    return f"{base}.{fraction}Z"


def ancestry(process: Process) -> list[Doc]:
    """The process's ancestors, nearest first, as both schemas keep them under sandtrace."""
    return [
        {
            "pid": a.pid,
            "entity_id": a.key,
            "executable": text(a.exe),
            "args": [text(x) for x in a.argv],
        }
        for a in process.ancestry
    ]


def connect_details(event: ConnectEvent) -> Doc:
    """sandtrace's own account of a connect (ECS `sandtrace.connect`, OCSF
    `unmapped.sandtrace.connect`): its outcome, and for a unix socket its path and the
    process listening there."""
    details: Doc = {
        "outcome": event.outcome,
        "errno": event.errno,
        "nonblocking": event.nonblocking,
    }
    if event.denied:
        details["denied"] = True
    if event.app_protocol:  # what the flow spoke, and what its first bytes named
        details |= {"app_protocol": event.app_protocol}
        for name, value in (
            ("hostname_source", event.hostname_source),
            ("sni", event.sni),  # (OCSF's tls object wants the version, not known here)
            ("http_host", event.http_host),
            ("app_detail", event.app_detail),
        ):
            if value:
                details[name] = value
    if event.family == "unix":
        details |= {"path": text(event.path), "peer_pid": event.peer_pid}
        if event.peer_exe:
            details["peer_executable"] = text(event.peer_exe)
    return details


def unbound(addr: str) -> bool:
    """Whether `addr` is the unspecified address (0.0.0.0, ::): a socket bound to no address
    yet, as a connect's source is until the kernel picks one."""
    try:
        return ipaddress.ip_address(addr).is_unspecified
    except ValueError:
        return False


def endpoint(addr: str, port: int, *, address: bool = False) -> Doc:
    """An ECS source/destination (with `address`: ECS has both ip and address) or an OCSF
    src_endpoint/dst_endpoint: what is known of it; empty when nothing is."""
    d: Doc = {}
    if addr:
        d["ip"] = addr
        if address:
            d["address"] = addr
    if port:
        d["port"] = port
    return d


def lost_counters(event: LostEvent) -> Doc:
    """The counters of a loss report, with their total, as both schemas carry them (ECS under
    sandtrace.lost, OCSF in unmapped)."""
    return {
        "total": sum(event.kernel.values()) + event.user + event.spool,
        "kernel": dict(event.kernel),
        "user": event.user,
        "spool": event.spool,
        "errors": dict(event.errors),
        "collector": event.collector,
    }
