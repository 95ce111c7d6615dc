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
exercises the rule and the mapping together. load_cases refuses a file it cannot run with a
CaseError naming the file and the case; run_case runs one case through a fresh engine (the
pack's own tests and `sandtrace rules test`).
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
    DnsEvent,
    ExecEvent,
    IoUringEvent,
    ListenEvent,
    Process,
    RawSocketEvent,
)
from detect.engine import Engine
from detect.fields import (
    DNS_QUERY,
    KERNEL_INTERFACE,
    NETWORK_CONNECTION,
    NETWORK_LISTEN,
    PROCESS_CREATION,
)
from detect.ruleset import RuleSet

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
    "Family", "ProtocolNumber", "Flags", "SqEntries", "DestinationHostname",
    "ApplicationProtocol", "TlsServerName", "HttpHost", "ApplicationDetail", "QueryName",
    "QueryType", "QueryStatus", "QueryResults", "ResolverIp", "AncestorProcessIds", "Denied",
})  # fmt: skip
# OriginalFileName sets the packaged file the executable copies (original_exe, on the exec event
# and on the process of any event); GoModule the
# Go main module; Sha256 the digest (Hashes reads "SHA256=<it>"); Stdio the three standard
# streams as the collector gives them ("tcp:203.0.113.7:4444", "pipe", ...); ExecFileName the
# name given to execve (by default Image); Comm the process name (by default "test");
# AncestorProcessIds the ancestors' pids, nearest first (the first is the parent's: it
# overrides ParentProcessId), for correlations that follow a process's descendants.


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
    if "AncestorProcessIds" in fields:  # the ancestors' pids, nearest first
        images = [fields.get("ParentImage", ""), *fields.get("AncestorImages", [])[1:]]
        ancestry = [
            AncestorRef(
                pid=int(p),
                key=f"{p}@1",
                exe=_b(images[i] if i < len(images) else ""),
                argv=parent_argv if i == 0 else [],
            )
            for i, p in enumerate(fields["AncestorProcessIds"])
        ]
    process = Process(
        pid=pid,
        tid=pid,
        ns_pid=pid,
        ppid=ancestry[0].pid if ancestry else int(fields.get("ParentProcessId", 4241)),
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
        sha256=str(fields.get("Sha256", "")),
        original_exe=_b(fields.get("OriginalFileName", "")),
        go_module=str(fields.get("GoModule", "")),
        cwd=_b(fields.get("CurrentDirectory", "")),
        filename=_b(fields.get("ExecFileName", "")),
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
            outcome=str(fields.get("Outcome", "")),
            denied=fields.get("Denied") == "true",
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
            hostname=str(fields.get("DestinationHostname", "")),
            hostname_source="dns" if "DestinationHostname" in fields else "",
            app_protocol=str(fields.get("ApplicationProtocol", "")),
            sni=str(fields.get("TlsServerName", "")),
            http_host=str(fields.get("HttpHost", "")),
            app_detail=str(fields.get("ApplicationDetail", "")),
            denied=fields.get("Denied") == "true",
        )
    if category == DNS_QUERY:
        results = [str(r) for r in fields.get("QueryResults", [])]
        status = int(fields.get("QueryStatus", 0))
        return DnsEvent(
            **common,
            query_name=str(fields.get("QueryName", "")),
            query_type=str(fields.get("QueryType", "A")),
            rcode=status,
            rcode_name={0: "NOERROR", 3: "NXDOMAIN"}.get(status, f"RCODE{status}"),
            addresses=[r for r in results if r[:1].isdigit() or ":" in r],
            cnames=[r for r in results if not (r[:1].isdigit() or ":" in r)],
            resolver=str(fields.get("ResolverIp", "192.0.2.53")),
            resolver_port=53,
            protocol="udp",
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


class CaseError(ValueError):
    """A case file that cannot be run as written; the message names the file, the case and
    what is wrong with it."""


def _case_events(raw: dict[str, Any]) -> list[AnyEvent]:
    events = raw.get("events")
    if not isinstance(events, list) or not events:
        raise CaseError("`events` must be a non-empty list of {category, fields, at}")
    out = []
    for j, e in enumerate(events):
        if not isinstance(e, dict) or not isinstance(e.get("category"), str):
            raise CaseError(f"event {j}: must be a map with a `category`")
        fields = e.get("fields", {})
        if not isinstance(fields, dict):
            raise CaseError(f"event {j}: `fields` must be a map of Sigma field names to values")
        try:
            out.append(event_from_fields(e["category"], fields, float(e.get("at", 0.0))))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"event {j}: {exc}") from None
    return out


def load_cases(path: Path) -> list[Case]:
    """The cases of one case file; CaseError (naming the file and the case) when the file is
    not YAML, not a map of `cases`, or a case lacks what it needs."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise CaseError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise CaseError(f"{path}: not YAML: {exc}") from None
    cases = doc.get("cases", []) if isinstance(doc, dict) else None
    if not isinstance(cases, list):
        raise CaseError(f"{path}: expected a map with `cases:`, a list of test cases")
    out = []
    for i, raw in enumerate(cases):
        name = raw.get("name", f"case {i}") if isinstance(raw, dict) else f"case {i}"
        where = f"{path}: case {i} ({name})"
        if not isinstance(raw, dict) or "rule" not in raw:
            raise CaseError(f"{where}: a case is a map with `rule`, `fire` and `events`")
        if not isinstance(raw.get("fire"), bool):
            raise CaseError(f"{where}: `fire` must be true or false, not {raw.get('fire')!r}")
        try:
            events = _case_events(raw)
        except ValueError as exc:
            raise CaseError(f"{where}: {exc}") from None
        out.append(
            Case(
                rule=str(raw["rule"]),
                fire=raw["fire"],
                name=str(name),
                events=events,
                source=str(path),
            )
        )
    return out


@dataclass(slots=True)
class CaseResult:
    case: Case
    fired: list[str]  # the rule ids that alerted on the case's events, sorted

    @property
    def passed(self) -> bool:
        return (self.case.rule in self.fired) == self.case.fire


def rules_of(rules: RuleSet, rule_id: str) -> RuleSet:
    """The part of `rules` that decides whether `rule_id` alerts: the rule, the correlations
    that count it (which may silence it) and, for a correlation, the rules it counts. An
    engine over it says the same of `rule_id` as one over every rule (rules match, fold and
    correlate independently) and is built in a fraction of the time."""
    names = {n for r in rules.rules if r.id == rule_id for n in (r.id, r.name)}
    correlations = [
        c for c in rules.correlations if c.id == rule_id or any(ref in names for ref in c.rules)
    ]
    refs = {ref for c in correlations for ref in c.rules}
    return RuleSet(
        rules=[r for r in rules.rules if r.id == rule_id or r.id in refs or r.name in refs],
        correlations=correlations,
    )


def _fired(rules: RuleSet, case: Case) -> list[str]:
    engine = Engine(rules)
    fired = {a.rule_id for e in case.events for a in engine.feed(e)}
    fired |= {a.rule_id for a in engine.flush()}
    return sorted(fired)


def run_case(rules: RuleSet, case: Case, scoped: RuleSet | None = None) -> CaseResult:
    """The case's events through a fresh engine (so no case sees another's windows or folds),
    the end of the stream included, over `scoped` (rules_of(rules, case.rule)) when given;
    a case that fails is run again over every rule, to say all that alerted."""
    result = CaseResult(case, _fired(scoped if scoped is not None else rules, case))
    if scoped is not None and not result.passed:
        result.fired = _fired(rules, case)
    return result
