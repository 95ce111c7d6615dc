"""What the schemas share: the item and document types, and the fields ECS and OCSF both make.

Every string a traced process controls (argv, paths, comm) becomes text through text():
valid UTF-8 stays text, each invalid byte becomes the four characters ``\\xNN``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from api.events import Alert, AnyEvent, ConnectEvent, Process

Item = AnyEvent | Alert
# A JSON document as a schema makes it: nested dicts, lists and scalars, dumped as JSON by the
# output that sends it. Any is the truth here: each schema decides the shape.
Doc = dict[str, Any]
Schema = Callable[[Item], Doc]

PRODUCT = "sandtrace"
IANA_PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58}
_TECHNIQUE_TAG = re.compile(r"^attack\.(t\d{4})(?:\.(\d{3}))?$", re.IGNORECASE)
_TACTIC_TAG = re.compile(r"^attack\.([a-z][a-z-]*)$", re.IGNORECASE)


def text(value: bytes | str) -> str:
    """Untrusted bytes as text: invalid UTF-8 bytes become ``\\xNN`` (see module docstring)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
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


def attack_ids(tags: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(technique ids, sub-technique ids, tactic names) named by Sigma-style ATT&CK tags:
    ``attack.t1059.004`` gives technique T1059 and sub-technique T1059.004,
    ``attack.command-and-control`` the tactic command-and-control."""
    techniques: list[str] = []
    subtechniques: list[str] = []
    tactics: list[str] = []
    for tag in tags:
        if m := _TECHNIQUE_TAG.match(tag):
            technique = m.group(1).upper()
            if technique not in techniques:
                techniques.append(technique)
            if m.group(2):
                subtechniques.append(f"{technique}.{m.group(2)}")
        elif m := _TACTIC_TAG.match(tag):
            tactics.append(m.group(1).lower())
    return techniques, subtechniques, tactics


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
    if event.family == "unix":
        details |= {"path": text(event.path), "peer_pid": event.peer_pid}
        if event.peer_exe:
            details["peer_executable"] = text(event.peer_exe)
    return details


def endpoint(addr: str, port: int) -> Doc:
    """An ECS source/destination or OCSF src_endpoint/dst_endpoint: what is known of it."""
    d: Doc = {}
    if addr:
        d["ip"] = addr
        d["address"] = addr
    if port:
        d["port"] = port
    return d
