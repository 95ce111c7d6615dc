"""The ocsf schema: OCSF 1.8.0 events.

exec and fork are Process Activity (1007) Launch with launch_type_id Exec (3) or Fork (2);
exit is Terminate (2); a cgroup move is Process Activity Other (99). connect is Network
Activity (4001) Open (1), or Refuse (5) on ECONNREFUSED and Fail (4) on any other error;
listen is Listen (7); a bind alone is Other (99, "Bind"); a socket snapshot is Listen,
Traffic (6, established) or Other. An alert is a Detection Finding (2004) Create whose
evidences are its triggering events (``unmapped.sandtrace.omitted`` counts those the alert
left out); a repeat summary is an Update (2) of the finding it folds: the same
``finding_info.uid`` (the folded alert's id), its own alert id in ``metadata.uid`` (which
every alert's document carries). A LostEvent (the collector's loss counters) is
Application Error (6008) General Error (1): OCSF's class for "issues with an application
that generates OCSF events", which is what lost telemetry is; the counters go in unmapped.
argv and what OCSF has no attribute for go in ``unmapped``. A document that uses an attribute
a profile adds (``namespace_pid`` and ``container`` from container, ``actor`` and ``device``
from host outside System Activity) declares the profile in ``metadata.profiles``.
tests/unit/test_schema_conformance.py checks every document against the official schema
(tests/data/ocsf).

Each kind of event has its class and a function that decides its activity (the table
EVENT_ACTIVITIES); the document is then put together the same way for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from api.events import (
    Alert,
    BindEvent,
    CgroupMoveEvent,
    ConnectEvent,
    DnsEvent,
    Event,
    ExecEvent,
    ExitEvent,
    ForkEvent,
    IoUringEvent,
    ListenEvent,
    LostEvent,
    Process,
    RawSocketEvent,
    ResponseEvent,
    SocketEvent,
)
from service.schemas.attack import Named, attack_of
from service.schemas.common import (
    IANA_PROTOCOLS,
    PRODUCT,
    Doc,
    Item,
    ancestry,
    command_line,
    connect_details,
    endpoint,
    lost_counters,
    text,
    unbound,
)

OCSF_VERSION = "1.8.0"
OCSF_SEVERITY = {"informational": 1, "low": 2, "medium": 3, "high": 4, "critical": 5}
OCSF_SEVERITY_NAMES = {
    0: "Unknown",
    1: "Informational",
    2: "Low",
    3: "Medium",
    4: "High",
    5: "Critical",
}
_STATUS_NAMES = {0: "Unknown", 1: "Success", 2: "Failure"}
_DIRECTIONS = {0: "Unknown", 1: "Inbound", 2: "Outbound"}

# (category_uid, category_name, class_uid, class_name, the profiles its documents use)
OcsfClass = tuple[int, str, int, str, tuple[str, ...]]
_PROCESS_ACTIVITY: OcsfClass = (1, "System Activity", 1007, "Process Activity", ("container",))
_NETWORK_ACTIVITY: OcsfClass = (
    4,
    "Network Activity",
    4001,
    "Network Activity",
    ("container", "host"),
)
_DNS_ACTIVITY: OcsfClass = (4, "Network Activity", 4003, "DNS Activity", ("container", "host"))
_DETECTION_FINDING: OcsfClass = (2, "Findings", 2004, "Detection Finding", ("container", "host"))
_APPLICATION_ERROR: OcsfClass = (6, "Application Activity", 6008, "Application Error", ("host",))


def ocsf(item: Item) -> Doc:
    """OCSF 1.8 event of one event or alert (see the module docstring for the classes)."""
    return DOCUMENTS[type(item)](item)


def _base(
    klass: OcsfClass,
    *,
    activity_id: int,
    activity_name: str,
    time_ns: int,
    severity_id: int,
    host: str,
) -> Doc:
    category_uid, category_name, class_uid, class_name, profiles = klass
    return {
        "activity_id": activity_id,
        "activity_name": activity_name,
        "category_uid": category_uid,
        "category_name": category_name,
        "class_uid": class_uid,
        "class_name": class_name,
        "type_uid": class_uid * 100 + activity_id,
        "type_name": f"{class_name}: {activity_name}",
        "severity_id": severity_id,
        "severity": OCSF_SEVERITY_NAMES.get(severity_id, "Other"),
        "time": time_ns // 1_000_000,
        "metadata": {
            "version": OCSF_VERSION,
            "product": {"name": PRODUCT, "vendor_name": PRODUCT},
            "profiles": list(profiles),
        },
        # device.type_id is required; sandtrace does not know what kind of machine it is.
        "device": {"hostname": host, "type_id": 0, "type": "Unknown"},
    }


def _file(path: bytes) -> Doc:
    p = text(path)
    return {"name": PurePosixPath(p).name or p, "path": p, "type_id": 1, "type": "Regular File"}


def _process(process: Process, container_id: str = "") -> Doc:
    d: Doc = {
        "pid": process.pid,
        "uid": process.key,
        "name": text(process.comm),
        "ptid": process.tid,  # tid is deprecated since OCSF 1.6
        "namespace_pid": process.ns_pid,
        "user": {"uid": str(process.uid), "name": process.user}
        if process.user
        else {"uid": str(process.uid)},
    }
    if process.exe:
        d["file"] = _file(process.exe)
    if process.argv:
        d["cmd_line"] = command_line(process.argv)
    parent: Doc = {"pid": process.ppid}
    if process.ancestry:
        ancestor = process.ancestry[0]
        parent["uid"] = ancestor.key
        if ancestor.exe:
            parent["file"] = _file(ancestor.exe)
        if ancestor.argv:
            parent["cmd_line"] = command_line(ancestor.argv)
    d["parent_process"] = parent
    if container_id:
        d["container"] = {"uid": container_id}
    return d


def _unmapped(event: Event) -> Doc:
    d: Doc = {
        "sandtrace": {
            "kind": event.kind,
            "sandbox": event.sandbox,
            "cgroup_id": event.cgroup_id,
            "cgroup_path": event.cgroup_path,
        }
    }
    if event.process.argv:
        d["argv"] = [text(a) for a in event.process.argv]
    if event.process.ancestry:
        d["sandtrace"]["ancestry"] = ancestry(event.process)
    return d


def _connection_info(protocol: str, family: str, direction_id: int) -> Doc:
    d: Doc = {"direction_id": direction_id, "direction": _DIRECTIONS[direction_id]}
    if protocol:
        d["protocol_name"] = protocol
        if protocol in IANA_PROTOCOLS:
            d["protocol_num"] = IANA_PROTOCOLS[protocol]
    if family in ("ipv4", "ipv6"):
        d["protocol_ver_id"] = 4 if family == "ipv4" else 6
    return d


# --- events: each kind decides its activity; the document is put together alike ----------------


@dataclass(slots=True)
class Activity:
    """What an event's kind decides: its activity and status, the process (the acting one,
    or for a fork the child), what goes in unmapped, and its other attributes in the order
    they go into the document."""

    proc: Doc
    unmapped: Doc
    activity_id: int = 99
    activity_name: str = "Other"
    status_id: int | None = None
    extra: Doc = field(default_factory=dict)
    profiles: tuple[str, ...] = ()  # beyond the class's own (metadata.profiles)


def _event(event: Event) -> Doc:
    klass, decide = EVENT_ACTIVITIES[type(event)]
    a = Activity(_process(event.process, event.container_id), _unmapped(event))
    decide(event, a)
    d = _base(
        klass,
        activity_id=a.activity_id,
        activity_name=a.activity_name,
        time_ns=event.time_ns,
        severity_id=1,
        host=event.host,
    )
    if klass is _NETWORK_ACTIVITY or klass is _DNS_ACTIVITY:
        a.extra["actor"] = {"process": a.proc}
    else:
        d["process"] = a.proc
    if a.status_id is not None:
        d["status_id"] = a.status_id
        d["status"] = _STATUS_NAMES[a.status_id]
    d["metadata"]["profiles"] += a.profiles
    d |= a.extra
    actor = d["actor"]
    if "app_name" not in actor:  # the acting process's user (sandtrace's own is not known)
        actor["user"] = {"uid": str(event.process.uid)}
        if event.process.user:
            actor["user"]["name"] = event.process.user
    d["unmapped"] = a.unmapped
    return d


def _exec(event: ExecEvent, a: Activity) -> None:
    proc, unmapped = a.proc, a.unmapped
    a.activity_id, a.activity_name = 1, "Launch"
    a.extra["launch_type_id"], a.extra["launch_type"] = 3, "Exec"
    if event.argv:
        proc["cmd_line"] = command_line(event.argv)
        unmapped["argv"] = [text(x) for x in event.argv]
    exe = event.process.exe or event.filename
    if exe:
        proc["file"] = _file(exe)
    if event.cwd:
        proc["working_directory"] = text(event.cwd)
    if event.parent_exe:
        proc["parent_process"]["file"] = _file(event.parent_exe)
    if event.parent_argv:
        proc["parent_process"]["cmd_line"] = command_line(event.parent_argv)
        unmapped["parent_argv"] = [text(x) for x in event.parent_argv]
    unmapped["sandtrace"]["exec"] = {
        "filename": text(event.filename),
        "argv_truncated": event.argv_truncated,
        "argv_size": event.argv_size,
        "fileless": event.fileless,
        "deleted": event.deleted,
        "path_truncated": event.path_truncated,
    }
    a.extra["actor"] = {"process": proc["parent_process"]}
    a.status_id = 1


def _fork(event: ForkEvent, a: Activity) -> None:
    a.activity_id, a.activity_name = 1, "Launch"
    a.extra["launch_type_id"], a.extra["launch_type"] = 2, "Fork"
    child = {k: v for k, v in a.proc.items() if k not in ("ptid", "namespace_pid")}
    child |= {
        "pid": event.child_pid,
        "uid": event.child_key,
        "parent_process": {"pid": event.process.pid, "uid": event.process.key},
    }
    a.extra["actor"] = {"process": a.proc}
    a.proc = child
    a.status_id = 1


def _exit(event: ExitEvent, a: Activity) -> None:
    a.activity_id, a.activity_name = 2, "Terminate"
    a.extra["exit_code"] = event.exit_code if not event.signal else 128 + event.signal
    a.unmapped["sandtrace"]["exit"] = {
        "code": event.exit_code,
        "signal": event.signal,
        "core_dumped": event.core_dumped,
    }
    a.extra["actor"] = {"process": a.proc}  # an exit is reflexive


def _cgroup_move(event: CgroupMoveEvent, a: Activity) -> None:
    a.activity_name = "Cgroup Move"
    a.unmapped["sandtrace"]["cgroup_move"] = {
        "target_pid": event.target_pid,
        "dst_cgroup_id": event.dst_cgroup_id,
        "dst_cgroup_path": event.dst_cgroup_path,
        "left_sandbox": event.left_sandbox,
    }
    a.extra["actor"] = {"process": a.proc}


def _connect(event: ConnectEvent, a: Activity) -> None:
    if event.denied:
        # refused in the kernel by the sandbox's egress policy (--enforce): OCSF's Refuse,
        # disposition Blocked
        a.activity_id, a.activity_name = 5, "Refuse"
        a.status_id = 2
        a.extra["action_id"], a.extra["action"] = 2, "Denied"
        a.extra["disposition_id"], a.extra["disposition"] = 2, "Blocked"
        a.profiles = ("security_control",)
    elif event.outcome == "error":
        refused = event.errno_name == "ECONNREFUSED"
        a.activity_id, a.activity_name = (5, "Refuse") if refused else (4, "Fail")
        a.status_id = 2
    else:
        a.activity_id, a.activity_name = 1, "Open"
        a.status_id = 1 if event.outcome == "success" else 0
    if event.errno:
        a.extra["status_code"] = event.errno_name or str(event.errno)
    if event.family == "unix":  # no address: the endpoint is named by its socket's path
        a.extra["dst_endpoint"] = {"name": text(event.path)}
    else:
        # The source is not bound before the connect (0.0.0.0, port 0): then it is not known.
        source = endpoint("" if unbound(event.saddr) else event.saddr, event.sport)
        if source.get("ip"):  # an endpoint names its address (a port alone says nothing)
            a.extra["src_endpoint"] = source
        a.extra["dst_endpoint"] = endpoint(event.daddr, event.dport)
    a.extra["connection_info"] = _connection_info(event.protocol, event.family, 2)
    if event.hostname:
        a.extra["dst_endpoint"]["hostname"] = event.hostname
    if event.app_protocol and event.app_protocol != "unknown":
        a.extra["app_name"] = event.app_protocol
    a.unmapped["sandtrace"]["connect"] = connect_details(event)


_RCODE_CAPTIONS = {
    0: "NoError",
    1: "FormError",
    2: "ServError",
    3: "NXDomain",
    4: "NotImp",
    5: "Refused",
    6: "YXDomain",
    7: "YXRRSet",
    8: "NXRRSet",
    9: "NotAuth",
    10: "NotZone",
}


def _dns(event: DnsEvent, a: Activity) -> None:
    """A DNS answer the process received: DNS Activity, Response; the resolver is the
    destination the query went to."""
    a.activity_id, a.activity_name = 2, "Response"
    a.status_id = 1 if event.rcode == 0 and not event.error else 2
    if event.query_name:
        a.extra["query"] = {"hostname": event.query_name, "type": event.query_type}
    answers = [{"rdata": r, "type": "CNAME"} for r in event.cnames]
    answers += [{"rdata": r, "type": "AAAA" if ":" in r else "A"} for r in event.addresses]
    if answers:
        a.extra["answers"] = [answer | {"ttl": event.ttl} for answer in answers]
    if not event.error:
        a.extra["rcode_id"] = event.rcode if event.rcode in _RCODE_CAPTIONS else 99
        a.extra["rcode"] = _RCODE_CAPTIONS.get(event.rcode, event.rcode_name)
    a.extra["connection_info"] = _connection_info(event.protocol, "", 2)
    a.extra["dst_endpoint"] = endpoint(event.resolver, event.resolver_port)
    a.unmapped["sandtrace"]["dns"] = {
        "transaction_id": event.transaction_id,
        "truncated": event.truncated,
        "mapped": event.mapped,
        "answers": event.answers,
        "error": event.error,
    }


def _raw_socket(event: RawSocketEvent, a: Activity) -> None:
    # Not yet a connection, so no Network Activity (which wants an endpoint): what the
    # process did, as a process activity, its socket's protocol unmapped.
    a.activity_id, a.activity_name = 99, "Raw Socket"
    a.status_id = 1
    a.extra["actor"] = {"process": a.proc}
    a.unmapped["sandtrace"]["raw_socket"] = {
        "family": event.family,
        "protocol": event.protocol,
        "protocol_number": event.protocol_number,
    }


def _io_uring(event: IoUringEvent, a: Activity) -> None:
    a.activity_id, a.activity_name = 99, "io_uring Setup"
    a.extra["actor"] = {"process": a.proc}  # a process acting on itself
    a.unmapped["sandtrace"]["io_uring"] = {
        "fd": event.fd,
        "sq_entries": event.sq_entries,
        "cq_entries": event.cq_entries,
        "flags": event.flags,
    }


def _bind(event: BindEvent, a: Activity) -> None:
    # A bind alone is not yet a listener (listen follows as its own event).
    a.activity_id, a.activity_name = 99, "Bind"
    a.status_id = {"success": 1, "error": 2}.get(event.outcome, 0)
    a.extra["dst_endpoint"] = endpoint(event.addr or event.requested_addr, event.port)
    a.extra["connection_info"] = _connection_info(event.protocol, event.family, 1)
    a.unmapped["sandtrace"]["bind"] = {
        "requested_addr": event.requested_addr,
        "requested_port": event.requested_port,
    }


def _listen(event: ListenEvent, a: Activity) -> None:
    a.activity_id, a.activity_name = 7, "Listen"
    a.status_id = 1
    a.extra["dst_endpoint"] = endpoint(event.addr, event.port)
    a.extra["connection_info"] = _connection_info(event.protocol, event.family, 1)


def _socket(event: SocketEvent, a: Activity) -> None:
    if event.state == "listen":
        a.activity_id, a.activity_name = 7, "Listen"
        a.extra["dst_endpoint"] = endpoint(event.laddr, event.lport)
        a.extra["connection_info"] = _connection_info(event.protocol, event.family, 1)
    else:
        a.activity_id, a.activity_name = (
            (6, "Traffic") if event.state == "established" else (99, "Other")
        )
        a.extra["src_endpoint"] = endpoint(event.laddr, event.lport)
        a.extra["dst_endpoint"] = endpoint(event.raddr, event.rport)
        a.extra["connection_info"] = _connection_info(event.protocol, event.family, 0)
    a.unmapped["sandtrace"]["socket"] = {"state": event.state}


def _response(event: ResponseEvent, a: Activity) -> None:
    # A kill is Process Activity Terminate of the alerting process (the document's process);
    # a freeze or thaw acts on the whole sandbox (Other). The actor is sandtrace itself, an
    # application, not a process the event describes.
    if event.action == "kill":
        a.activity_id, a.activity_name = 2, "Terminate"
    else:
        a.activity_id, a.activity_name = 99, event.action.capitalize() or "Other"
    a.status_id = 1 if event.result == "ok" else 2
    if event.error:
        a.extra["status_detail"] = event.error
    a.extra["actor"] = {"app_name": PRODUCT}
    a.unmapped["sandtrace"]["response"] = {
        "action": event.action,
        "origin": event.origin,
        "result": event.result,
        "alert_id": event.alert_id,
        "rule_id": event.rule_id,
        "title": event.title,
        "level": event.level,
        "target_pid": event.target_pid,
        "target_uid": event.target_key,
        "pids": list(event.pids),
        "took_ns": event.took_ns,
    }


# Each kind of event: its OCSF class, and what decides its activity. (The functions take the
# type they are filed under: Any stands for "that type" here.)
EVENT_ACTIVITIES: dict[type[Event], tuple[OcsfClass, Callable[[Any, Activity], None]]] = {
    ExecEvent: (_PROCESS_ACTIVITY, _exec),
    ForkEvent: (_PROCESS_ACTIVITY, _fork),
    ExitEvent: (_PROCESS_ACTIVITY, _exit),
    CgroupMoveEvent: (_PROCESS_ACTIVITY, _cgroup_move),
    ConnectEvent: (_NETWORK_ACTIVITY, _connect),
    BindEvent: (_NETWORK_ACTIVITY, _bind),
    ListenEvent: (_NETWORK_ACTIVITY, _listen),
    SocketEvent: (_NETWORK_ACTIVITY, _socket),
    RawSocketEvent: (_PROCESS_ACTIVITY, _raw_socket),
    IoUringEvent: (_PROCESS_ACTIVITY, _io_uring),
    ResponseEvent: (_PROCESS_ACTIVITY, _response),
    DnsEvent: (_DNS_ACTIVITY, _dns),
}


# --- loss counters and alerts ------------------------------------------------------------------


def _lost(event: LostEvent) -> Doc:
    lost = lost_counters(event)
    total = lost["total"]
    d = _base(
        _APPLICATION_ERROR,
        activity_id=1,
        activity_name="General Error",
        time_ns=event.time_ns,
        severity_id=3 if total else 1,
        host=event.host,
    )
    d["message"] = (
        f"sandtrace lost {total} events: kernel={sum(event.kernel.values())} "
        f"user={event.user} spool={event.spool}"
    )
    d["count"] = total
    d["unmapped"] = {
        "sandtrace": {
            "kind": "lost",
            "lost": lost,
        }
    }
    return d


def _evidence(event: object) -> Doc:
    if not isinstance(event, Event):
        return {"data": {"kind": getattr(event, "kind", "unknown")}}
    o = _event(event)
    evidence: Doc = {
        "uid": f"{event.process.key}/{event.kind}/{event.time_ns}",
        "name": event.kind,
        "actor": o["actor"],
        "data": {"kind": event.kind, "time": o["time"], "activity_name": o["activity_name"]},
    }
    for key in ("process", "src_endpoint", "dst_endpoint", "connection_info"):
        if key in o:
            evidence[key] = o[key]
    if "argv" in o["unmapped"]:
        evidence["data"]["argv"] = o["unmapped"]["argv"]
    return evidence


def _named(n: Named) -> Doc:
    d: Doc = {"uid": n.id, "src_url": n.reference}
    if n.name:
        d["name"] = n.name
    return d


def _attacks(tags: list[str]) -> list[Doc]:
    """OCSF attacks of a rule's ATT&CK tags: one per technique (with its first sub-technique,
    one more per further one); the tactic in each when the rule names one, else one attack
    per tactic. Which technique serves which tactic is the rule's to say, and tags do not."""
    attack = attack_of(tags)
    attacks: list[Doc] = []
    tactic = _named(attack.tactics[0]) if len(attack.tactics) == 1 else None
    for technique in attack.techniques:
        subs: list[Named | None] = [
            s for s in attack.subtechniques if s.id.startswith(technique.id + ".")
        ]
        for sub in subs or [None]:
            entry: Doc = {"technique": _named(technique)}
            if sub is not None:
                entry["sub_technique"] = _named(sub)
            if tactic is not None:
                entry["tactic"] = tactic
            attacks.append(entry)
    if tactic is None or not attack.techniques:
        attacks.extend({"tactic": _named(t)} for t in attack.tactics)
    return attacks


def _alert(alert: Alert) -> Doc:
    severity_id = OCSF_SEVERITY.get(alert.level, 0)
    created_ns = alert.raised_ns or alert.time_ns
    update = bool(alert.repeat and alert.folds)  # a summary of repeats updates its finding
    d = _base(
        _DETECTION_FINDING,
        activity_id=2 if update else 1,
        activity_name="Update" if update else "Create",
        time_ns=created_ns,
        severity_id=severity_id,
        host=alert.host,
    )
    d["metadata"]["uid"] = alert.alert_id
    times = [e.time_ns // 1_000_000 for e in alert.events if isinstance(e, Event)]
    if times:
        d["start_time"], d["end_time"] = min(times), max(times)
    finding_info: Doc = {
        "uid": alert.folds if update else alert.alert_id,
        "title": alert.title,
        "desc": alert.description,
        "analytic": {"uid": alert.rule_id, "name": alert.title, "type_id": 1, "type": "Rule"},
        "related_events_count": alert.count,
        "types": [t.name for t in attack_of(alert.tags).tactics],
    }
    finding_info["modified_time" if update else "created_time"] = created_ns // 1_000_000
    attacks = _attacks(alert.tags)
    if attacks:
        finding_info["attacks"] = attacks
    d["finding_info"] = finding_info
    d["is_alert"] = True
    d["message"] = alert.title
    d["actor"] = {"process": _process(alert.process)}
    d["evidences"] = [_evidence(e) for e in alert.events] or [{"process": _process(alert.process)}]
    d["unmapped"] = {
        "sandtrace": {
            "kind": "alert",
            "alert_id": alert.alert_id,
            "sandbox": alert.sandbox,
            "level": alert.level,
            "tags": list(alert.tags),
            "count": alert.count,
            "repeat": alert.repeat,
            "omitted": alert.omitted,
            "ancestry": ancestry(alert.process),
        }
    }
    if alert.folds:
        d["unmapped"]["sandtrace"]["folds"] = alert.folds
    if alert.process.argv:
        d["unmapped"]["argv"] = [text(a) for a in alert.process.argv]
    return d


# The document of each type of item.
DOCUMENTS: dict[type, Callable[[Any], Doc]] = {
    Alert: _alert,
    LostEvent: _lost,
    **dict.fromkeys(EVENT_ACTIVITIES, _event),
}
