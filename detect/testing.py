"""Rule test cases: events described by their Sigma fields, made into real sandtrace events.

A case file (``rules/tests/<rule file stem>.yml``) lists cases; each names the rule under
test, whether it must fire, and one or more events in order::

    cases:
      - rule: 6a1b...            # rule id
        fire: true
        name: xmrig with a stratum URL
        events:
          - category: process_creation
            at: 0.0              # seconds from the first event (correlations)
            fields: {Image: /tmp/xmrig, CommandLine: xmrig -o stratum+tcp://h:3333}

The events go through the same field mapping as live events (detect.fields), so a case
exercises the rule and the mapping together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from api.events import (
    AncestorRef,
    AnyEvent,
    BindEvent,
    ConnectEvent,
    ExecEvent,
    IoUringEvent,
    ListenEvent,
    Process,
    RawSocketEvent,
)
from detect.fields import KERNEL_INTERFACE, NETWORK_CONNECTION, NETWORK_LISTEN, PROCESS_CREATION

T0 = 1_800_000_000 * 1_000_000_000


@dataclass(slots=True)
class Case:
    rule: str
    fire: bool
    name: str
    events: list[AnyEvent]
    source: str


# The Sigma fields a case may give; the event's other attributes take fixed values.
KNOWN_FIELDS = frozenset({
    "Image", "CommandLine", "Argv", "ProcessId", "ParentProcessId", "ParentImage",
    "ParentCommandLine", "AncestorImages", "User", "Uid", "Sandbox", "CurrentDirectory",
    "OriginalFileName", "Fileless", "Deleted", "ArgvTruncated", "Protocol", "DestinationIp",
    "DestinationPort", "SourceIp", "SourcePort", "Outcome", "ErrnoName", "Action", "LocalIp",
    "LocalPort", "RequestedPort", "Initiated", "DestinationIsIpv6", "ExecFileName", "GoModule",
    "Sha256", "Stdio", "Comm", "DestinationPath", "DestinationImage", "DestinationProcessId",
    "Family", "ProtocolNumber", "Flags", "SqEntries",
})  # fmt: skip
# OriginalFileName sets the packaged file the executable copies (original_exe); GoModule the
# Go main module; Sha256 the digest (Hashes reads "SHA256=<it>"); Stdio the three standard
# streams as the collector gives them ("tcp:203.0.113.7:4444", "pipe", ...); ExecFileName the
# name given to execve (by default Image); Comm the process name (by default "test").


def _b(value: object) -> bytes:
    return str(value).encode()


def _argv(fields: dict[str, Any], list_key: str, line_key: str) -> list[bytes]:
    if list_key in fields:
        return [_b(a) for a in fields[list_key]]
    line = fields.get(line_key, "")
    return [_b(a) for a in str(line).split(" ")] if line else []


def event_from_fields(category: str, fields: dict[str, Any], at: float = 0.0) -> AnyEvent:
    """A real event whose detect.fields view carries the given Sigma fields."""
    unknown = set(fields) - KNOWN_FIELDS
    if unknown:
        raise ValueError(f"test case fields not supported: {sorted(unknown)}")
    pid = int(fields.get("ProcessId", 4242))
    argv = _argv(fields, "Argv", "CommandLine")
    parent_argv = _argv(fields, "ParentArgv", "ParentCommandLine")
    ancestry = [
        AncestorRef(
            pid=int(fields.get("ParentProcessId", 4241)),
            key="4241@1",
            exe=_b(fields.get("ParentImage", "")),
            argv=parent_argv,
        ),
        *[
            AncestorRef(pid=4000 + i, key=f"{4000 + i}@1", exe=_b(exe), argv=[])
            for i, exe in enumerate(fields.get("AncestorImages", [])[1:])
        ],
    ]
    process = Process(
        pid=pid,
        tid=pid,
        ns_pid=pid,
        ppid=int(fields.get("ParentProcessId", 4241)),
        uid=int(fields.get("Uid", 1000)),
        gid=1000,
        comm=_b(fields.get("Comm", "test")),
        start_ns=1,
        key=f"{pid}@1",
        exe=_b(fields.get("Image", "")),
        argv=argv,
        user=str(fields.get("User", "agent")),
        group="agent",
        ancestry=ancestry,
    )
    common: dict[str, Any] = {
        "time_ns": T0 + int(at * 1e9),
        "mono_ns": int(at * 1e9),
        "host": "testhost",
        "sandbox": str(fields.get("Sandbox", "st-test")),
        "cgroup_id": 1,
        "cgroup_path": "/sandtrace/st-test",
        "container_id": "",
        "process": process,
    }
    if category == PROCESS_CREATION:
        return ExecEvent(
            **common,
            argv=argv,
            cwd=_b(fields.get("CurrentDirectory", "/work")),
            filename=_b(fields.get("ExecFileName", fields.get("Image", ""))),
            original_exe=_b(fields.get("OriginalFileName", "")),
            go_module=str(fields.get("GoModule", "")),
            sha256=str(fields.get("Sha256", "")),
            stdio=[str(s) for s in fields.get("Stdio", [])],
            fileless=fields.get("Fileless") == "true",
            deleted=fields.get("Deleted") == "true",
            argv_truncated=fields.get("ArgvTruncated") == "true",
            parent_exe=_b(fields.get("ParentImage", "")),
            parent_argv=parent_argv,
        )
    if category == NETWORK_CONNECTION and "DestinationPath" in fields:
        return ConnectEvent(
            **common,
            protocol="unix",
            family="unix",
            path=_b(fields["DestinationPath"]),
            peer_pid=int(fields.get("DestinationProcessId", 0)),
            peer_exe=_b(fields.get("DestinationImage", "")),
        )
    if category == NETWORK_CONNECTION:
        ip = str(fields.get("DestinationIp", "192.0.2.1"))
        return ConnectEvent(
            **common,
            protocol=str(fields.get("Protocol", "tcp")),
            family="ipv6" if ":" in ip else "ipv4",
            daddr=ip,
            dport=int(fields.get("DestinationPort", 443)),
            saddr=str(fields.get("SourceIp", "")),
            sport=int(fields.get("SourcePort", 0)),
            outcome=str(fields.get("Outcome", "success")),
            errno_name=str(fields.get("ErrnoName", "")),
        )
    if category == NETWORK_LISTEN:
        addr = str(fields.get("LocalIp", "0.0.0.0"))  # noqa: S104 - a field value
        family = "ipv6" if ":" in addr else "ipv4"
        port = int(fields.get("LocalPort", 4444))
        if fields.get("Action", "listen") == "bind":
            return BindEvent(
                **common,
                protocol=str(fields.get("Protocol", "tcp")),
                family=family,
                addr=addr,
                port=port,
                requested_addr=addr,
                requested_port=int(fields.get("RequestedPort", port)),
                outcome=str(fields.get("Outcome", "success")),
            )
        return ListenEvent(
            **common,
            protocol=str(fields.get("Protocol", "tcp")),
            family=family,
            addr=addr,
            port=port,
        )
    if category == KERNEL_INTERFACE:
        if fields.get("Action", "raw_socket") == "io_uring":
            return IoUringEvent(
                **common,
                fd=5,
                sq_entries=int(fields.get("SqEntries", 8)),
                cq_entries=2 * int(fields.get("SqEntries", 8)),
                flags=int(fields.get("Flags", 0)),
            )
        return RawSocketEvent(
            **common,
            family=str(fields.get("Family", "ipv4")),
            protocol=str(fields.get("Protocol", "icmp")),
            protocol_number=int(fields.get("ProtocolNumber", 1)),
        )
    raise ValueError(f"unknown category {category!r}")


def load_cases(path: Path) -> list[Case]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out = []
    for i, raw in enumerate(doc.get("cases", [])):
        events = [
            event_from_fields(e["category"], e.get("fields", {}), float(e.get("at", 0.0)))
            for e in raw["events"]
        ]
        out.append(
            Case(
                rule=str(raw["rule"]),
                fire=bool(raw["fire"]),
                name=str(raw.get("name", f"case {i}")),
                events=events,
                source=str(path),
            )
        )
    return out
