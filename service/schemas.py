"""One event or alert as a JSON-serialisable dict, in the schema a SIEM output asks for.

    SCHEMAS["ecs"](event)  # or native(event), ecs(event), ocsf(event)

native
    sandtrace's own form: exactly the object ``api.render.json_line`` dumps. Bytes
    fields are lossless there (invalid UTF-8 as lone surrogates \\udcNN).
ecs
    Elastic Common Schema. Field names as in the project's detection notes (DETECTIONS.md
    §4.1, §4.4). What ECS has no field for lives under ``sandtrace.*``.
ocsf
    OCSF 1.8.0: Process Activity (1007), Network Activity (4001), Detection Finding (2004)
    and, for collector loss counters, Application Error (6008). argv and what OCSF has no
    attribute for go in ``unmapped``.

In ecs and ocsf every string a traced process controls (argv, paths, comm) is decoded from
bytes with ``errors="backslashreplace"``: valid UTF-8 stays text, each invalid byte becomes
the four characters ``\\xNN``, so a SIEM that insists on valid Unicode accepts every
document. Control characters stay as they are: JSON escapes them when the dict is dumped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from api.events import (
    Alert,
    AnyEvent,
    BindEvent,
    CgroupMoveEvent,
    ConnectEvent,
    Event,
    ExecEvent,
    ExitEvent,
    ForkEvent,
    ListenEvent,
    LostEvent,
    Process,
    SocketEvent,
)
from api.render import json_dict

Item = AnyEvent | Alert
Schema = Callable[[Item], dict[str, Any]]

PRODUCT = "sandtrace"
OCSF_VERSION = "1.8.0"
IANA_PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58}
# Elastic's risk scores for the rule severities (as its detection rules use them).
ECS_SEVERITY = {"informational": 21, "low": 21, "medium": 47, "high": 73, "critical": 99}
OCSF_SEVERITY = {"informational": 1, "low": 2, "medium": 3, "high": 4, "critical": 5}
OCSF_SEVERITY_NAMES = {
    0: "Unknown",
    1: "Informational",
    2: "Low",
    3: "Medium",
    4: "High",
    5: "Critical",
}
_TECHNIQUE_TAG = re.compile(r"^attack\.(t\d{4})(?:\.(\d{3}))?$", re.IGNORECASE)
_TACTIC_TAG = re.compile(r"^attack\.([a-z][a-z-]*)$", re.IGNORECASE)


_ECS_OUTCOME = {"success": "success", "error": "failure"}  # sandtrace outcome -> ECS


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


def _last_event(alert: Alert) -> Event | None:
    for event in reversed(alert.events):
        if isinstance(event, Event):
            return event
    return None


# --- native --------------------------------------------------------------------------------


def native(item: Item) -> dict[str, Any]:
    """sandtrace's own form: the object api.render.json_line() dumps."""
    return json_dict(item)


# --- ECS -----------------------------------------------------------------------------------


def _ecs_process(process: Process) -> dict[str, Any]:
    d: dict[str, Any] = {
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
    parent: dict[str, Any] = {"pid": process.ppid}
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


def _ancestry(process: Process) -> list[dict[str, Any]]:
    return [
        {
            "pid": a.pid,
            "entity_id": a.key,
            "executable": text(a.exe),
            "args": [text(x) for x in a.argv],
        }
        for a in process.ancestry
    ]


def _ecs_network(protocol: str, family: str, direction: str) -> dict[str, Any]:
    d: dict[str, Any] = {"direction": direction}
    if protocol:
        d["transport"] = protocol
        if protocol in IANA_PROTOCOLS:
            d["iana_number"] = str(IANA_PROTOCOLS[protocol])
    if family:
        d["type"] = family
    return d


def _endpoint(addr: str, port: int) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if addr:
        d["ip"] = addr
        d["address"] = addr
    if port:
        d["port"] = port
    return d


def _ecs_event(event: Event) -> dict[str, Any]:
    sandtrace: dict[str, Any] = {
        "kind": event.kind,
        "sandbox": event.sandbox,
        "cgroup": {"id": event.cgroup_id, "path": event.cgroup_path},
    }
    d: dict[str, Any] = {
        "@timestamp": rfc3339(event.time_ns),
        "event": {"kind": "event", "module": PRODUCT, "dataset": f"{PRODUCT}.{event.kind}"},
        "host": {"name": event.host},
        "process": _ecs_process(event.process),
        "user": {"id": str(event.process.uid)},
        "sandtrace": sandtrace,
    }
    if event.process.user:
        d["user"]["name"] = event.process.user
    if event.container_id:
        d["container"] = {"id": event.container_id}
    if event.process.ancestry:
        sandtrace["ancestry"] = _ancestry(event.process)
    ev = d["event"]
    proc = d["process"]
    if isinstance(event, ExecEvent):
        ev |= {"category": ["process"], "type": ["start"], "action": "exec", "outcome": "success"}
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
        sandtrace["exec"] = {
            "filename": text(event.filename),
            "argv_truncated": event.argv_truncated,
            "argv_size": event.argv_size,
            "fileless": event.fileless,
            "deleted": event.deleted,
            "path_truncated": event.path_truncated,
            "exe_inode": event.exe_inode,
        }
    elif isinstance(event, ForkEvent):
        # As Elastic Defend's fork events: process is the new child, its parent the actor.
        ev |= {"category": ["process"], "type": ["start"], "action": "fork", "outcome": "success"}
        actor = _ecs_process(event.process)
        parent: dict[str, Any] = {
            k: actor[k] for k in ("pid", "vpid", "entity_id", "name") if k in actor
        }
        for k in ("executable", "args", "args_count", "command_line"):
            if k in actor:
                parent[k] = actor[k]
        proc["pid"] = event.child_pid
        proc["entity_id"] = event.child_key
        proc.pop("vpid", None)
        proc.pop("thread", None)
        proc["parent"] = parent
    elif isinstance(event, ExitEvent):
        ok = event.exit_code == 0 and event.signal == 0
        ev |= {
            "category": ["process"],
            "type": ["end"],
            "action": "end",
            "outcome": "success" if ok else "failure",
        }
        if not event.signal:
            proc["exit_code"] = event.exit_code
        sandtrace["exit"] = {
            "code": event.exit_code,
            "signal": event.signal,
            "core_dumped": event.core_dumped,
        }
    elif isinstance(event, ConnectEvent):
        outcome = _ECS_OUTCOME.get(event.outcome, "unknown")
        ev |= {
            "category": ["network"],
            "type": ["connection", "start"],
            "action": "connection_attempted",
            "outcome": outcome,
        }
        d["source"] = _endpoint(event.saddr, event.sport)
        d["destination"] = _endpoint(event.daddr, event.dport)
        d["network"] = _ecs_network(event.protocol, event.family, "egress")
        if event.errno:
            d["error"] = {"code": event.errno_name or str(event.errno)}
        sandtrace["connect"] = {
            "outcome": event.outcome,
            "errno": event.errno,
            "nonblocking": event.nonblocking,
        }
    elif isinstance(event, BindEvent):
        outcome = _ECS_OUTCOME.get(event.outcome, "unknown")
        ev |= {
            "category": ["network"],
            "type": ["start"],
            "action": "bound-socket",
            "outcome": outcome,
        }
        # The bound address is where connections would arrive: the destination (ingress).
        d["destination"] = _endpoint(event.addr or event.requested_addr, event.port)
        d["network"] = _ecs_network(event.protocol, event.family, "ingress")
        sandtrace["bind"] = {
            "requested_addr": event.requested_addr,
            "requested_port": event.requested_port,
        }
    elif isinstance(event, ListenEvent):
        ev |= {
            "category": ["network"],
            "type": ["start"],
            "action": "listen-for-connections",
            "outcome": "success",
        }
        d["destination"] = _endpoint(event.addr, event.port)
        d["network"] = _ecs_network(event.protocol, event.family, "ingress")
    elif isinstance(event, SocketEvent):
        ev |= {"category": ["network"], "type": ["info"], "action": "socket-snapshot"}
        if event.state == "listen":
            d["destination"] = _endpoint(event.laddr, event.lport)
            d["network"] = _ecs_network(event.protocol, event.family, "ingress")
        else:
            d["source"] = _endpoint(event.laddr, event.lport)
            d["destination"] = _endpoint(event.raddr, event.rport)
            d["network"] = _ecs_network(event.protocol, event.family, "unknown")
        sandtrace["socket"] = {"state": event.state}
    elif isinstance(event, CgroupMoveEvent):
        ev |= {
            "category": ["process"],
            "type": ["change"],
            "action": "cgroup-move",
            "outcome": "success",
        }
        sandtrace["cgroup_move"] = {
            "target_pid": event.target_pid,
            "dst_cgroup_id": event.dst_cgroup_id,
            "dst_cgroup_path": event.dst_cgroup_path,
            "left_sandbox": event.left_sandbox,
        }
    return d


def _ecs_lost(event: LostEvent) -> dict[str, Any]:
    total = sum(event.kernel.values()) + event.user + event.spool
    return {
        "@timestamp": rfc3339(event.time_ns),
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
            "lost": {
                "total": total,
                "kernel": dict(event.kernel),
                "user": event.user,
                "spool": event.spool,
                "errors": dict(event.errors),
                "collector": event.collector,
            },
        },
    }


def _ecs_alert(alert: Alert) -> dict[str, Any]:
    # Like Elastic's own alerts: the fields of the (last) triggering event, then the rule's.
    last = _last_event(alert)
    d = _ecs_event(last) if last is not None else {"sandtrace": {}}
    d["@timestamp"] = rfc3339(alert.time_ns)
    d["host"] = {"name": alert.host}
    d["process"] = (
        _ecs_process(alert.process)
        if last is None or isinstance(last, ForkEvent)
        else d["process"]
        | {k: v for k, v in _ecs_process(alert.process).items() if k not in d["process"]}
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
    techniques, subtechniques, tactics = attack_ids(alert.tags)
    if techniques or tactics:
        threat: dict[str, Any] = {"framework": "MITRE ATT&CK"}
        if techniques:
            threat["technique"] = {"id": techniques}
            if subtechniques:
                threat["technique"]["subtechnique"] = {"id": subtechniques}
        if tactics:
            threat["tactic"] = {"name": tactics}
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
        "events": [
            {
                "kind": e.kind,
                "@timestamp": rfc3339(e.time_ns),
                "process": {"pid": e.process.pid, "entity_id": e.process.key},
            }
            for e in alert.events
            if isinstance(e, Event)
        ],
    }
    if alert.process.ancestry:
        sandtrace["ancestry"] = _ancestry(alert.process)
    return d


def ecs(item: Item) -> dict[str, Any]:
    """Elastic Common Schema document of one event or alert."""
    if isinstance(item, Alert):
        return _ecs_alert(item)
    if isinstance(item, LostEvent):
        return _ecs_lost(item)
    return _ecs_event(item)


# --- OCSF ----------------------------------------------------------------------------------

# (category_uid, category_name, class_uid, class_name)
_PROCESS_ACTIVITY = (1, "System Activity", 1007, "Process Activity")
_NETWORK_ACTIVITY = (4, "Network Activity", 4001, "Network Activity")
_DETECTION_FINDING = (2, "Findings", 2004, "Detection Finding")
_APPLICATION_ERROR = (6, "Application Activity", 6008, "Application Error")
_DIRECTIONS = {0: "Unknown", 1: "Inbound", 2: "Outbound"}


def _ocsf_base(
    klass: tuple[int, str, int, str],
    *,
    activity_id: int,
    activity_name: str,
    time_ns: int,
    severity_id: int,
    host: str,
) -> dict[str, Any]:
    category_uid, category_name, class_uid, class_name = klass
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
        },
        # device.type_id is required; sandtrace does not know what kind of machine it is.
        "device": {"hostname": host, "type_id": 0, "type": "Unknown"},
    }


def _ocsf_file(path: bytes) -> dict[str, Any]:
    p = text(path)
    return {"name": PurePosixPath(p).name or p, "path": p, "type_id": 1, "type": "Regular File"}


def _ocsf_process(process: Process, container_id: str = "") -> dict[str, Any]:
    d: dict[str, Any] = {
        "pid": process.pid,
        "uid": process.key,
        "name": text(process.comm),
        "tid": process.tid,
        "namespace_pid": process.ns_pid,
        "user": {"uid": str(process.uid), "name": process.user}
        if process.user
        else {"uid": str(process.uid)},
    }
    if process.exe:
        d["file"] = _ocsf_file(process.exe)
    if process.argv:
        d["cmd_line"] = command_line(process.argv)
    parent: dict[str, Any] = {"pid": process.ppid}
    if process.ancestry:
        ancestor = process.ancestry[0]
        parent["uid"] = ancestor.key
        if ancestor.exe:
            parent["file"] = _ocsf_file(ancestor.exe)
        if ancestor.argv:
            parent["cmd_line"] = command_line(ancestor.argv)
    d["parent_process"] = parent
    if container_id:
        d["container"] = {"uid": container_id}
    return d


def _ocsf_unmapped(event: Event) -> dict[str, Any]:
    d: dict[str, Any] = {
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
        d["sandtrace"]["ancestry"] = _ancestry(event.process)
    return d


def _ocsf_connection_info(protocol: str, family: str, direction_id: int) -> dict[str, Any]:
    d: dict[str, Any] = {"direction_id": direction_id, "direction": _DIRECTIONS[direction_id]}
    if protocol:
        d["protocol_name"] = protocol
        if protocol in IANA_PROTOCOLS:
            d["protocol_num"] = IANA_PROTOCOLS[protocol]
    if family in ("ipv4", "ipv6"):
        d["protocol_ver_id"] = 4 if family == "ipv4" else 6
    return d


def _ocsf_event(event: Event) -> dict[str, Any]:
    proc = _ocsf_process(event.process, event.container_id)
    unmapped = _ocsf_unmapped(event)
    network = isinstance(event, ConnectEvent | BindEvent | ListenEvent | SocketEvent)
    klass = _NETWORK_ACTIVITY if network else _PROCESS_ACTIVITY
    activity_id, activity_name = 99, "Other"
    status_id: int | None = None
    extra: dict[str, Any] = {}
    if isinstance(event, ExecEvent):
        activity_id, activity_name = 1, "Launch"
        extra["launch_type_id"], extra["launch_type"] = 3, "Exec"
        if event.argv:
            proc["cmd_line"] = command_line(event.argv)
            unmapped["argv"] = [text(a) for a in event.argv]
        exe = event.process.exe or event.filename
        if exe:
            proc["file"] = _ocsf_file(exe)
        if event.cwd:
            proc["working_directory"] = text(event.cwd)
        if event.parent_exe:
            proc["parent_process"]["file"] = _ocsf_file(event.parent_exe)
        if event.parent_argv:
            proc["parent_process"]["cmd_line"] = command_line(event.parent_argv)
            unmapped["parent_argv"] = [text(a) for a in event.parent_argv]
        unmapped["sandtrace"]["exec"] = {
            "filename": text(event.filename),
            "argv_truncated": event.argv_truncated,
            "argv_size": event.argv_size,
            "fileless": event.fileless,
            "deleted": event.deleted,
            "path_truncated": event.path_truncated,
        }
        extra["actor"] = {"process": proc["parent_process"]}
        status_id = 1
    elif isinstance(event, ForkEvent):
        activity_id, activity_name = 1, "Launch"
        extra["launch_type_id"], extra["launch_type"] = 2, "Fork"
        child = {k: v for k, v in proc.items() if k not in ("tid", "namespace_pid")}
        child |= {
            "pid": event.child_pid,
            "uid": event.child_key,
            "parent_process": {"pid": event.process.pid, "uid": event.process.key},
        }
        extra["actor"] = {"process": proc}
        proc = child
        status_id = 1
    elif isinstance(event, ExitEvent):
        activity_id, activity_name = 2, "Terminate"
        extra["exit_code"] = event.exit_code if not event.signal else 128 + event.signal
        unmapped["sandtrace"]["exit"] = {
            "code": event.exit_code,
            "signal": event.signal,
            "core_dumped": event.core_dumped,
        }
        extra["actor"] = {"process": proc}  # an exit is reflexive
    elif isinstance(event, CgroupMoveEvent):
        activity_name = "Cgroup Move"
        unmapped["sandtrace"]["cgroup_move"] = {
            "target_pid": event.target_pid,
            "dst_cgroup_id": event.dst_cgroup_id,
            "dst_cgroup_path": event.dst_cgroup_path,
            "left_sandbox": event.left_sandbox,
        }
        extra["actor"] = {"process": proc}
    elif isinstance(event, ConnectEvent):
        if event.outcome == "error":
            refused = event.errno_name == "ECONNREFUSED"
            activity_id, activity_name = (5, "Refuse") if refused else (4, "Fail")
            status_id = 2
        else:
            activity_id, activity_name = 1, "Open"
            status_id = 1 if event.outcome == "success" else 0
        if event.errno:
            extra["status_code"] = event.errno_name or str(event.errno)
        extra["src_endpoint"] = _endpoint(event.saddr, event.sport)
        extra["dst_endpoint"] = _endpoint(event.daddr, event.dport)
        extra["connection_info"] = _ocsf_connection_info(event.protocol, event.family, 2)
        unmapped["sandtrace"]["connect"] = {
            "outcome": event.outcome,
            "errno": event.errno,
            "nonblocking": event.nonblocking,
        }
    elif isinstance(event, BindEvent):
        # A bind alone is not yet a listener (listen follows as its own event).
        activity_id, activity_name = 99, "Bind"
        status_id = {"success": 1, "error": 2}.get(event.outcome, 0)
        extra["dst_endpoint"] = _endpoint(event.addr or event.requested_addr, event.port)
        extra["connection_info"] = _ocsf_connection_info(event.protocol, event.family, 1)
        unmapped["sandtrace"]["bind"] = {
            "requested_addr": event.requested_addr,
            "requested_port": event.requested_port,
        }
    elif isinstance(event, ListenEvent):
        activity_id, activity_name = 7, "Listen"
        status_id = 1
        extra["dst_endpoint"] = _endpoint(event.addr, event.port)
        extra["connection_info"] = _ocsf_connection_info(event.protocol, event.family, 1)
    elif isinstance(event, SocketEvent):
        if event.state == "listen":
            activity_id, activity_name = 7, "Listen"
            extra["dst_endpoint"] = _endpoint(event.laddr, event.lport)
            extra["connection_info"] = _ocsf_connection_info(event.protocol, event.family, 1)
        else:
            activity_id, activity_name = (
                (6, "Traffic") if event.state == "established" else (99, "Other")
            )
            extra["src_endpoint"] = _endpoint(event.laddr, event.lport)
            extra["dst_endpoint"] = _endpoint(event.raddr, event.rport)
            extra["connection_info"] = _ocsf_connection_info(event.protocol, event.family, 0)
        unmapped["sandtrace"]["socket"] = {"state": event.state}
    d = _ocsf_base(
        klass,
        activity_id=activity_id,
        activity_name=activity_name,
        time_ns=event.time_ns,
        severity_id=1,
        host=event.host,
    )
    if network:
        extra["actor"] = {"process": proc}
    else:
        d["process"] = proc
    if status_id is not None:
        d["status_id"] = status_id
        d["status"] = {0: "Unknown", 1: "Success", 2: "Failure"}[status_id]
    d |= extra
    actor = d["actor"]
    actor["user"] = {"uid": str(event.process.uid)}
    if event.process.user:
        actor["user"]["name"] = event.process.user
    d["unmapped"] = unmapped
    return d


def _ocsf_lost(event: LostEvent) -> dict[str, Any]:
    total = sum(event.kernel.values()) + event.user + event.spool
    d = _ocsf_base(
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
            "lost": {
                "total": total,
                "kernel": dict(event.kernel),
                "user": event.user,
                "spool": event.spool,
                "errors": dict(event.errors),
                "collector": event.collector,
            },
        }
    }
    return d


def _ocsf_evidence(event: Any) -> dict[str, Any]:
    if not isinstance(event, Event):
        return {"data": {"kind": getattr(event, "kind", "unknown")}}
    o = _ocsf_event(event)
    evidence: dict[str, Any] = {
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


def _ocsf_alert(alert: Alert) -> dict[str, Any]:
    severity_id = OCSF_SEVERITY.get(alert.level, 0)
    created_ns = alert.raised_ns or alert.time_ns
    d = _ocsf_base(
        _DETECTION_FINDING,
        activity_id=1,
        activity_name="Create",
        time_ns=created_ns,
        severity_id=severity_id,
        host=alert.host,
    )
    times = [e.time_ns // 1_000_000 for e in alert.events if isinstance(e, Event)]
    if times:
        d["start_time"], d["end_time"] = min(times), max(times)
    techniques, subtechniques, tactics = attack_ids(alert.tags)
    attacks: list[dict[str, Any]] = []
    for technique in techniques:
        attack: dict[str, Any] = {"technique": {"uid": technique}}
        subs = [s for s in subtechniques if s.startswith(technique + ".")]
        if subs:
            attack["sub_technique"] = {"uid": subs[0]}
        attacks.append(attack)
        attacks.extend(
            {"technique": {"uid": technique}, "sub_technique": {"uid": s}} for s in subs[1:]
        )
    finding_info: dict[str, Any] = {
        "uid": alert.alert_id,
        "title": alert.title,
        "desc": alert.description,
        "analytic": {"uid": alert.rule_id, "name": alert.title, "type_id": 1, "type": "Rule"},
        "created_time": created_ns // 1_000_000,
        "related_events_count": alert.count,
        "types": tactics,
    }
    if attacks:
        finding_info["attacks"] = attacks
    d["finding_info"] = finding_info
    d["is_alert"] = True
    d["message"] = alert.title
    d["actor"] = {"process": _ocsf_process(alert.process)}
    d["evidences"] = [_ocsf_evidence(e) for e in alert.events] or [
        {"process": _ocsf_process(alert.process)}
    ]
    d["unmapped"] = {
        "sandtrace": {
            "kind": "alert",
            "sandbox": alert.sandbox,
            "level": alert.level,
            "tags": list(alert.tags),
            "count": alert.count,
            "repeat": alert.repeat,
            "ancestry": _ancestry(alert.process),
        }
    }
    if alert.process.argv:
        d["unmapped"]["argv"] = [text(a) for a in alert.process.argv]
    return d


def ocsf(item: Item) -> dict[str, Any]:
    """OCSF 1.8 event of one event or alert.

    exec and fork are Process Activity (1007) Launch with launch_type_id Exec (3) or Fork (2);
    exit is Terminate (2); a cgroup move is Process Activity Other (99). connect is Network
    Activity (4001) Open (1), or Refuse (5) on ECONNREFUSED and Fail (4) on any other error;
    listen is Listen (7); a bind alone is Other (99, "Bind"); a socket snapshot is Listen,
    Traffic (6, established) or Other. An alert is a Detection Finding (2004) Create whose
    evidences are its triggering events. A LostEvent (the collector's loss counters) is
    Application Error (6008) General Error (1): OCSF's class for "issues with an application
    that generates OCSF events", which is what lost telemetry is; the counters go in unmapped.
    """
    if isinstance(item, Alert):
        return _ocsf_alert(item)
    if isinstance(item, LostEvent):
        return _ocsf_lost(item)
    return _ocsf_event(item)


SCHEMAS: dict[str, Schema] = {"native": native, "ecs": ecs, "ocsf": ocsf}
