"""The ecs schema: Elastic Common Schema (ECS_VERSION, declared in every document's
``ecs.version``) documents.

Field names as in the project's detection notes (DETECTIONS.md §4.1, §4.4). What ECS has no
field for lives under ``sandtrace.*`` (a custom namespace, as ECS advises). An event's
document is made of the fields every event has, then those of its kind (the table
EVENT_FIELDS); an alert's is its last triggering event's, then the rule's, with every
triggering event it carries summarised in ``sandtrace.alert.events`` and the number left
out in ``sandtrace.alert.omitted``; a LostEvent (the collector's loss counters) is a metric
document. A repeat summary is an alert document of its own (``event.id`` its own alert id)
that names the alert whose repeats it counts in ``sandtrace.alert.folds``: ECS has no field
for another event's id. tests/unit/test_schema_conformance.py checks every document against
the official field definitions (tests/data/ecs).
"""

from __future__ import annotations

from collections.abc import Callable
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
from service.schemas.attack import attack_of
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
    rfc3339,
    text,
    unbound,
)

ECS_VERSION = "9.4.0"

# Elastic's risk scores for the rule severities (as its detection rules use them).
ECS_SEVERITY = {"informational": 21, "low": 21, "medium": 47, "high": 73, "critical": 99}
_OUTCOME = {"success": "success", "error": "failure"}  # sandtrace outcome -> ECS


def ecs(item: Item) -> Doc:
    """Elastic Common Schema document of one event or alert."""
    return DOCUMENTS[type(item)](item)


def _process(process: Process) -> Doc:
    d: Doc = {
        "pid": process.pid,
        "vpid": process.ns_pid,
        "entity_id": process.key,
        "name": text(process.comm),
        "thread": {"id": process.tid},
        "user": {"id": str(process.uid)},
        "group": {"id": str(process.gid)},
    }
    if process.user:
        d["user"]["name"] = process.user
    if process.group:
        d["group"]["name"] = process.group
    if process.exe:
        d["executable"] = text(process.exe)
    if process.argv:
        d["args"] = [text(a) for a in process.argv]
        d["args_count"] = len(process.argv)
        d["command_line"] = command_line(process.argv)
    parent: Doc = {"pid": process.ppid}
    if process.ancestry:
        ancestor = process.ancestry[0]
        parent["entity_id"] = ancestor.key
        if ancestor.exe:
            parent["executable"] = text(ancestor.exe)
        if ancestor.argv:
            parent["args"] = [text(a) for a in ancestor.argv]
            parent["args_count"] = len(ancestor.argv)
            parent["command_line"] = command_line(ancestor.argv)
    d["parent"] = parent
    return d


def _network(protocol: str, family: str, direction: str) -> Doc:
    d: Doc = {"direction": direction}
    if protocol:
        d["transport"] = protocol
        if protocol in IANA_PROTOCOLS:
            d["iana_number"] = str(IANA_PROTOCOLS[protocol])
    if family:
        d["type"] = family
    return d


# --- events: the fields every event has, then those of its kind -------------------------------


def _event(event: Event) -> Doc:
    sandtrace: Doc = {
        "kind": event.kind,
        "sandbox": event.sandbox,
        "cgroup": {"id": event.cgroup_id, "path": event.cgroup_path},
    }
    d: Doc = {
        "@timestamp": rfc3339(event.time_ns),
        "ecs": {"version": ECS_VERSION},
        "event": {"kind": "event", "module": PRODUCT, "dataset": f"{PRODUCT}.{event.kind}"},
        "host": {"name": event.host},
        "process": _process(event.process),
        "user": {"id": str(event.process.uid)},
        "sandtrace": sandtrace,
    }
    if event.process.user:
        d["user"]["name"] = event.process.user
    if event.container_id:
        d["container"] = {"id": event.container_id}
    if event.process.ancestry:
        sandtrace["ancestry"] = ancestry(event.process)
    EVENT_FIELDS[type(event)](event, d)
    return d


def _exec(event: ExecEvent, d: Doc) -> None:
    proc = d["process"]
    d["event"] |= {
        "category": ["process"],
        "type": ["start"],
        "action": "exec",
        "outcome": "success",
    }
    if event.argv:
        proc["args"] = [text(a) for a in event.argv]
        proc["args_count"] = len(event.argv)
        proc["command_line"] = command_line(event.argv)
    exe = event.process.exe or event.filename
    if exe:
        proc["executable"] = text(exe)
    if event.cwd:
        proc["working_directory"] = text(event.cwd)
    if event.parent_exe:
        proc["parent"]["executable"] = text(event.parent_exe)
    if event.parent_argv:
        proc["parent"]["args"] = [text(a) for a in event.parent_argv]
        proc["parent"]["args_count"] = len(event.parent_argv)
        proc["parent"]["command_line"] = command_line(event.parent_argv)
    d["sandtrace"]["exec"] = {
        "filename": text(event.filename),
        "argv_truncated": event.argv_truncated,
        "argv_size": event.argv_size,
        "fileless": event.fileless,
        "deleted": event.deleted,
        "path_truncated": event.path_truncated,
        "exe_inode": event.exe_inode,
    }


def _fork(event: ForkEvent, d: Doc) -> None:
    # As Elastic Defend's fork events: process is the new child, its parent the actor.
    proc = d["process"]
    d["event"] |= {
        "category": ["process"],
        "type": ["start"],
        "action": "fork",
        "outcome": "success",
    }
    actor = _process(event.process)
    parent: Doc = {k: actor[k] for k in ("pid", "vpid", "entity_id", "name") if k in actor}
    for k in ("executable", "args", "args_count", "command_line"):
        if k in actor:
            parent[k] = actor[k]
    proc["pid"] = event.child_pid
    proc["entity_id"] = event.child_key
    proc.pop("vpid", None)
    proc.pop("thread", None)
    proc["parent"] = parent


def _exit(event: ExitEvent, d: Doc) -> None:
    ok = event.exit_code == 0 and event.signal == 0
    d["event"] |= {
        "category": ["process"],
        "type": ["end"],
        "action": "end",
        "outcome": "success" if ok else "failure",
    }
    if not event.signal:
        d["process"]["exit_code"] = event.exit_code
    d["sandtrace"]["exit"] = {
        "code": event.exit_code,
        "signal": event.signal,
        "core_dumped": event.core_dumped,
    }


def _connect(event: ConnectEvent, d: Doc) -> None:
    d["event"] |= {
        "category": ["network"],
        "type": ["connection", "start"],
        "action": "connection_attempted",
        "outcome": _OUTCOME.get(event.outcome, "unknown"),
    }
    if event.denied:  # refused in the kernel by the sandbox's egress policy (--enforce)
        d["event"] |= {"type": ["connection", "denied"], "outcome": "failure"}
    d["network"] = _network(event.protocol, event.family, "egress")
    if event.family == "unix":  # ECS: an address may be a Unix socket
        if event.path:
            d["destination"] = {"address": text(event.path)}
    else:
        # The source is not bound before the connect (0.0.0.0, port 0): then it is not known.
        source = endpoint("" if unbound(event.saddr) else event.saddr, event.sport, address=True)
        if source:
            d["source"] = source
        d["destination"] = endpoint(event.daddr, event.dport, address=True)
    if event.errno:
        d["error"] = {"code": event.errno_name or str(event.errno)}
    if event.hostname:
        d["destination"]["domain"] = event.hostname
    if event.app_protocol and event.app_protocol != "unknown":
        d["network"]["protocol"] = event.app_protocol
    if event.sni:
        d["tls"] = {"client": {"server_name": event.sni}}
    d["sandtrace"]["connect"] = connect_details(event)


def _dns(event: DnsEvent, d: Doc) -> None:
    """A DNS answer the process received (ECS dns.type "answer"); the resolver is the server."""
    d["event"] |= {
        "category": ["network"],
        "type": ["protocol", "info"],
        "action": "dns_answer_received",
        "outcome": "success" if event.rcode == 0 and not event.error else "failure",
    }
    d["network"] = _network(event.protocol, "", "ingress") | {"protocol": "dns"}
    dns: Doc = {"type": "answer", "id": str(event.transaction_id)}
    if event.query_name:
        dns["question"] = {"name": event.query_name, "type": event.query_type}
    if not event.error:
        dns["response_code"] = event.rcode_name
    chain = [event.query_name, *event.cnames]
    answers: list[Doc] = [
        {"name": chain[i], "type": "CNAME", "data": target, "ttl": event.ttl}
        for i, target in enumerate(event.cnames)
    ]
    answers += [
        {"name": chain[-1], "type": "AAAA" if ":" in a else "A", "data": a, "ttl": event.ttl}
        for a in event.addresses
    ]
    if answers:
        dns["answers"] = answers
    if event.addresses:
        dns["resolved_ip"] = list(event.addresses)
    d["dns"] = dns
    d["server"] = endpoint(event.resolver, event.resolver_port, address=True)
    d["sandtrace"]["dns"] = {
        "truncated": event.truncated,
        "mapped": event.mapped,
        "answers": event.answers,
        "error": event.error,
    }


def _raw_socket(event: RawSocketEvent, d: Doc) -> None:
    d["event"] |= {
        "category": ["network"],
        "type": ["info"],
        "action": "raw_socket_created",
        "outcome": "success",
    }
    d["network"] = _network(event.protocol, event.family, "unknown")
    d["sandtrace"]["raw_socket"] = {"protocol_number": event.protocol_number}


def _io_uring(event: IoUringEvent, d: Doc) -> None:
    d["event"] |= {
        "category": ["process"],
        "type": ["info"],
        "action": "io_uring_created",
        "outcome": "success",
    }
    d["sandtrace"]["io_uring"] = {
        "fd": event.fd,
        "sq_entries": event.sq_entries,
        "cq_entries": event.cq_entries,
        "flags": event.flags,
    }


def _bind(event: BindEvent, d: Doc) -> None:
    d["event"] |= {
        "category": ["network"],
        "type": ["start"],
        "action": "bound-socket",
        "outcome": _OUTCOME.get(event.outcome, "unknown"),
    }
    # The bound address is where connections would arrive: the destination (ingress).
    d["destination"] = endpoint(event.addr or event.requested_addr, event.port, address=True)
    d["network"] = _network(event.protocol, event.family, "ingress")
    d["sandtrace"]["bind"] = {
        "requested_addr": event.requested_addr,
        "requested_port": event.requested_port,
    }


def _listen(event: ListenEvent, d: Doc) -> None:
    d["event"] |= {
        "category": ["network"],
        "type": ["start"],
        "action": "listen-for-connections",
        "outcome": "success",
    }
    d["destination"] = endpoint(event.addr, event.port, address=True)
    d["network"] = _network(event.protocol, event.family, "ingress")


def _socket(event: SocketEvent, d: Doc) -> None:
    d["event"] |= {"category": ["network"], "type": ["info"], "action": "socket-snapshot"}
    if event.state == "listen":
        d["destination"] = endpoint(event.laddr, event.lport, address=True)
        d["network"] = _network(event.protocol, event.family, "ingress")
    else:
        d["source"] = endpoint(event.laddr, event.lport, address=True)
        d["destination"] = endpoint(event.raddr, event.rport, address=True)
        d["network"] = _network(event.protocol, event.family, "unknown")
    d["sandtrace"]["socket"] = {"state": event.state}


def _cgroup_move(event: CgroupMoveEvent, d: Doc) -> None:
    d["event"] |= {
        "category": ["process"],
        "type": ["change"],
        "action": "cgroup-move",
        "outcome": "success",
    }
    d["sandtrace"]["cgroup_move"] = {
        "target_pid": event.target_pid,
        "dst_cgroup_id": event.dst_cgroup_id,
        "dst_cgroup_path": event.dst_cgroup_path,
        "left_sandbox": event.left_sandbox,
    }


# What a response did, as ECS event.type: a kill ends processes, a freeze or thaw changes them.
_RESPONSE_TYPES = {"kill": ["end"], "freeze": ["change"], "thaw": ["change"]}


def _response(event: ResponseEvent, d: Doc) -> None:
    # process is the one the action is about (the alerting process); why is in event.reason
    # and rule.*, the alert's id in sandtrace.response (ECS has no field for another event's).
    d["event"] |= {
        "category": ["process"],
        "type": _RESPONSE_TYPES.get(event.action, ["info"]),
        "action": f"sandbox-{event.action}",
        "outcome": "success" if event.result == "ok" else "failure",
    }
    if event.alert_id:
        d["event"]["reason"] = f"alert {event.alert_id}: {event.title}"
        d["rule"] = {"id": event.rule_id, "name": event.title, "ruleset": PRODUCT}
    if event.error:
        d["error"] = {"message": event.error}
    d["message"] = f"sandtrace {event.action} {event.result}"
    d["sandtrace"]["response"] = {
        "action": event.action,
        "origin": event.origin,
        "result": event.result,
        "alert_id": event.alert_id,
        "level": event.level,
        "target_pid": event.target_pid,
        "target_entity_id": event.target_key,
        "pids": list(event.pids),
        "took_ns": event.took_ns,
    }


# Each kind of event adds its fields to the document of the fields all events have. (The
# functions take the type they are filed under: Any stands for "that type" here.)
EVENT_FIELDS: dict[type[Event], Callable[[Any, Doc], None]] = {
    ExecEvent: _exec,
    ForkEvent: _fork,
    ExitEvent: _exit,
    ConnectEvent: _connect,
    BindEvent: _bind,
    ListenEvent: _listen,
    SocketEvent: _socket,
    CgroupMoveEvent: _cgroup_move,
    RawSocketEvent: _raw_socket,
    IoUringEvent: _io_uring,
    ResponseEvent: _response,
    DnsEvent: _dns,
}


# --- loss counters and alerts ------------------------------------------------------------------


def _lost(event: LostEvent) -> Doc:
    lost = lost_counters(event)
    total = lost["total"]
    return {
        "@timestamp": rfc3339(event.time_ns),
        "ecs": {"version": ECS_VERSION},
        "event": {
            "kind": "metric",  # telemetry about the pipeline, not an observed activity
            "module": PRODUCT,
            "dataset": f"{PRODUCT}.lost",
            "category": ["host"],
            "type": ["info"],
            "action": "events-lost",
            "outcome": "failure" if total else "success",
        },
        "host": {"name": event.host},
        "message": f"sandtrace lost {total} events",
        "sandtrace": {
            "kind": "lost",
            "lost": lost,
        },
    }


def _last_event(alert: Alert) -> Event | None:
    for event in reversed(alert.events):
        if isinstance(event, Event):
            return event
    return None


def _threat(tags: list[str]) -> Doc | None:
    """ECS threat.* of a rule's ATT&CK tags: ids, names and pages, each list in tag order."""
    attack = attack_of(tags)
    if not (attack.tactics or attack.techniques):
        return None
    threat: Doc = {"framework": "MITRE ATT&CK"}
    for key, named in (("tactic", attack.tactics), ("technique", attack.techniques)):
        if named:
            threat[key] = {
                "id": [n.id for n in named],
                "name": [n.name for n in named if n.name],
                "reference": [n.reference for n in named],
            }
    if attack.subtechniques:
        threat["technique"]["subtechnique"] = {
            "id": [n.id for n in attack.subtechniques],
            "name": [n.name for n in attack.subtechniques if n.name],
            "reference": [n.reference for n in attack.subtechniques],
        }
    return threat


def _event_summary(event: Event) -> Doc:
    """One triggering event of an alert as ``sandtrace.alert.events`` lists it: when, what,
    by which process, and where to for a network event (ECS field names)."""
    d = _event(event)
    summary: Doc = {
        "kind": event.kind,
        "@timestamp": d["@timestamp"],
        "action": d["event"]["action"],
        "process": {
            k: d["process"][k]
            for k in ("pid", "entity_id", "executable", "args")
            if k in d["process"]
        },
    }
    if "outcome" in d["event"]:
        summary["outcome"] = d["event"]["outcome"]
    for key in ("source", "destination"):
        if d.get(key):
            summary[key] = d[key]
    return summary


def _alert(alert: Alert) -> Doc:
    # Like Elastic's own alerts: the fields of the (last) triggering event, then the rule's.
    last = _last_event(alert)
    d: Doc = (
        _event(last) if last is not None else {"ecs": {"version": ECS_VERSION}, "sandtrace": {}}
    )
    d["@timestamp"] = rfc3339(alert.time_ns)
    d["host"] = {"name": alert.host}
    d["process"] = (
        _process(alert.process)
        if last is None or isinstance(last, ForkEvent)
        else d["process"]
        | {k: v for k, v in _process(alert.process).items() if k not in d["process"]}
    )
    d["user"] = {"id": str(alert.process.uid)}
    if alert.process.user:
        d["user"]["name"] = alert.process.user
    source_event = d.get("event", {})
    d["event"] = {
        "kind": "alert",
        "module": PRODUCT,
        "dataset": f"{PRODUCT}.alert",
        "id": alert.alert_id,
        "category": source_event.get("category", ["intrusion_detection"]),
        "type": ["info"],
        "action": source_event.get("action", "rule-match"),
        "severity": ECS_SEVERITY.get(alert.level, 0),
        "risk_score": float(ECS_SEVERITY.get(alert.level, 0)),
    }
    if "outcome" in source_event:
        d["event"]["outcome"] = source_event["outcome"]
    d["message"] = alert.title
    d["rule"] = {
        "id": alert.rule_id,
        "name": alert.title,
        "description": alert.description,
        "ruleset": PRODUCT,
    }
    threat = _threat(alert.tags)
    if threat:
        d["threat"] = threat
    d["tags"] = list(alert.tags)
    sandtrace = d["sandtrace"]
    sandtrace["kind"] = "alert"
    sandtrace["sandbox"] = alert.sandbox
    sandtrace["alert"] = {
        "id": alert.alert_id,
        "level": alert.level,
        "count": alert.count,
        "repeat": alert.repeat,
        "raised": rfc3339(alert.raised_ns) if alert.raised_ns else None,
        "events": [_event_summary(e) for e in alert.events if isinstance(e, Event)],
        "omitted": alert.omitted,
    }
    if alert.folds:
        sandtrace["alert"]["folds"] = alert.folds
    if alert.process.ancestry:
        sandtrace["ancestry"] = ancestry(alert.process)
    return d


# The document of each type of item.
DOCUMENTS: dict[type, Callable[[Any], Doc]] = {
    Alert: _alert,
    LostEvent: _lost,
    **dict.fromkeys(EVENT_FIELDS, _event),
}
