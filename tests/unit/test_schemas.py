"""service.schemas: every event type and alerts in native, ECS and OCSF form, field by field;
OCSF output checked against the required attributes of the real schema (tests/data/ocsf)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from api.events import (
    EVENT_TYPES,
    Alert,
    AncestorRef,
    AnyEvent,
    BindEvent,
    CgroupMoveEvent,
    ConnectEvent,
    DnsEvent,
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
    bytes_text,
    text_bytes,
)
from api.render import json_line
from service.outputs.syslog import sd_escape, syslog_message
from service.schemas import SCHEMAS
from service.schemas.attack import Named, attack_of
from service.schemas.common import rfc3339
from service.schemas.ecs import ecs
from service.schemas.native import native
from service.schemas.ocsf import ocsf

T0 = 1_700_000_000_123_456_789  # 2023-11-14T22:13:20.123456789Z
T0_MS = 1_700_000_000_123


def process(**kw: Any) -> Process:
    fields: dict[str, Any] = {
        "pid": 4242,
        "tid": 4243,
        "ns_pid": 7,
        "ppid": 4000,
        "uid": 1000,
        "gid": 1001,
        "comm": b"curl",
        "start_ns": 99,
        "key": "4242@99",
        "exe": b"/usr/bin/curl",
        "argv": [b"curl", b"-s", b"http://x/"],
        "user": "alice",
        "group": "staff",
        "ancestry": [
            AncestorRef(pid=4000, key="4000@50", exe=b"/bin/bash", argv=[b"bash", b"-c", b"x"]),
            AncestorRef(pid=1, key="1@1", exe=b"/sbin/init", argv=[b"init"]),
        ],
    }
    fields.update(kw)
    return Process(**fields)


def common(**kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "time_ns": T0,
        "mono_ns": 5,
        "host": "node1",
        "sandbox": "sb-1",
        "cgroup_id": 11,
        "cgroup_path": "/sandboxes/sb-1",
        "container_id": "c0ffee",
        "process": process(),
    }
    d.update(kw)
    return d


def exec_event(**kw: Any) -> ExecEvent:
    fields: dict[str, Any] = {
        "argv": [b"curl", b"-s", b"http://x/"],
        "argv_size": 20,
        "cwd": b"/tmp",
        "filename": b"/usr/bin/curl",
        "exe_inode": 77,
        "parent_exe": b"/bin/bash",
        "parent_argv": [b"bash", b"-c", b"x"],
    }
    fields.update(kw)
    return ExecEvent(**common(), **fields)


def connect_event(**kw: Any) -> ConnectEvent:
    fields: dict[str, Any] = {
        "protocol": "tcp",
        "family": "ipv4",
        "daddr": "203.0.113.10",
        "dport": 3333,
        "saddr": "198.51.100.2",
        "sport": 40000,
        "outcome": "success",
    }
    fields.update(kw)
    return ConnectEvent(**common(), **fields)


def alert(events: list[Any] | None = None, **kw: Any) -> Alert:
    fields: dict[str, Any] = {
        "alert_id": "a-1",
        "rule_id": "r-123",
        "title": "Miner pool connection",
        "level": "high",
        "tags": ["attack.impact", "attack.t1496", "attack.t1059.004", "attack.t1059.006"],
        "description": "connects to a stratum port",
        "time_ns": T0,
        "host": "node1",
        "sandbox": "sb-1",
        "process": process(),
        "events": [connect_event()] if events is None else events,
        "count": 3,
        "raised_ns": T0 + 2_000_000,
    }
    fields.update(kw)
    return Alert(**fields)


def lost_event() -> LostEvent:
    return LostEvent(
        time_ns=T0,
        host="node1",
        kernel={"exec": 2, "connect": 1},
        user=4,
        errors={"proc_map": 1},
        spool=5,
        collector="col-1",
    )


ALL_ITEMS: list[AnyEvent | Alert] = [
    exec_event(),
    ForkEvent(**common(), child_pid=5000, child_key="5000@120"),
    ExitEvent(**common(), exit_code=3),
    ExitEvent(**common(), signal=9, core_dumped=True),
    connect_event(),
    connect_event(outcome="error", errno=111, errno_name="ECONNREFUSED"),
    connect_event(outcome="error", errno=110, errno_name="ETIMEDOUT"),
    connect_event(outcome="in_progress", nonblocking=True),
    connect_event(
        dport=443,
        hostname="pool.example.test",
        hostname_source="dns",
        app_protocol="stratum",
        app_detail="login",
    ),
    connect_event(
        dport=8443,
        hostname="api.example.test",
        hostname_source="sni",
        app_protocol="tls",
        sni="api.example.test",
    ),
    DnsEvent(
        **common(),
        query_name="pool.example.test",
        query_type="A",
        rcode_name="NOERROR",
        cnames=["edge.pools.test"],
        addresses=["198.51.100.1", "2001:db8::1"],
        answers=["CNAME edge.pools.test", "A 198.51.100.1", "AAAA 2001:db8::1"],
        ttl=60,
        resolver="198.51.100.53",
        resolver_port=53,
        protocol="udp",
        transaction_id=4660,
        mapped=2,
    ),
    DnsEvent(
        **common(),
        query_name="nope.example.test",
        query_type="AAAA",
        rcode=3,
        rcode_name="NXDOMAIN",
        resolver="2001:db8::53",
        resolver_port=53,
        protocol="tcp",
    ),
    BindEvent(
        **common(),
        protocol="tcp",
        family="ipv4",
        addr="0.0.0.0",
        port=4444,
        requested_addr="0.0.0.0",
        requested_port=4444,
        outcome="success",
    ),
    ListenEvent(**common(), family="ipv6", addr="::", port=4444),
    SocketEvent(
        **common(), protocol="tcp", family="ipv4", state="listen", laddr="0.0.0.0", lport=22
    ),
    SocketEvent(
        **common(),
        protocol="tcp",
        family="ipv4",
        state="established",
        laddr="198.51.100.2",
        lport=40000,
        raddr="203.0.113.10",
        rport=22,
    ),
    CgroupMoveEvent(
        **common(), target_pid=4242, dst_cgroup_id=12, dst_cgroup_path="/x", left_sandbox=True
    ),
    ConnectEvent(
        **common(),
        protocol="unix",
        family="unix",
        outcome="success",
        path=b"/run/docker.sock",
        peer_pid=812,
        peer_exe=b"/usr/bin/dockerd",
    ),
    RawSocketEvent(**common(), family="ipv4", protocol="icmp", protocol_number=1),
    IoUringEvent(**common(), fd=5, sq_entries=8, cq_entries=16),
    ResponseEvent(
        **common(),
        action="kill",
        origin="embedded",
        result="ok",
        alert_id="0190a5c4-0000-7000-8000-000000000001",
        rule_id="sandtrace-miner",
        title="Cryptocurrency miner started",
        level="high",
        target_pid=4242,
        target_key="4242@99",
        pids=[4242, 4250],
        took_ns=1_500_000,
    ),
    ResponseEvent(
        **common(),
        action="freeze",
        origin="service",
        result="failed",
        error="not frozen within 5 s",
        alert_id="0190a5c4-0000-7000-8000-000000000002",
        rule_id="sandtrace-miner",
        title="Cryptocurrency miner started",
        level="critical",
    ),
    ResponseEvent(**common(), action="thaw", origin="operator", result="ok"),
    lost_event(),
    alert(),
    alert(events=[exec_event()], level="critical", tags=[]),
    alert(events=[], level="informational"),
]


# --- native --------------------------------------------------------------------------------


@pytest.mark.parametrize("item", ALL_ITEMS, ids=lambda i: i.kind)
def test_native_is_json_line_content(item: AnyEvent | Alert) -> None:
    assert json.dumps(native(item), ensure_ascii=True, separators=(",", ":")) == json_line(item)


def test_every_kind_of_event_is_in_every_schema() -> None:
    assert {item.kind for item in ALL_ITEMS} == set(EVENT_TYPES)


def test_a_unix_connect_names_its_socket_not_an_address() -> None:
    (unix,) = [i for i in ALL_ITEMS if isinstance(i, ConnectEvent) and i.family == "unix"]
    e = ecs(unix)
    assert e["destination"] == {"address": "/run/docker.sock"}
    assert "source" not in e
    assert e["sandtrace"]["connect"]["peer_executable"] == "/usr/bin/dockerd"
    o = ocsf(unix)
    assert o["dst_endpoint"] == {"name": "/run/docker.sock"}
    assert "src_endpoint" not in o
    assert o["unmapped"]["sandtrace"]["connect"]["path"] == "/run/docker.sock"
    assert o["unmapped"]["sandtrace"]["connect"]["peer_pid"] == 812


def test_schemas_table() -> None:
    assert {"native": native, "ecs": ecs, "ocsf": ocsf} == SCHEMAS


@pytest.mark.parametrize("schema", ["native", "ecs", "ocsf"])
@pytest.mark.parametrize("item", ALL_ITEMS, ids=lambda i: i.kind)
def test_every_item_dumps_as_ascii_json(schema: str, item: AnyEvent | Alert) -> None:
    out = json.dumps(SCHEMAS[schema](item), ensure_ascii=True, allow_nan=False)
    assert out.isascii()
    assert "\n" not in out


def test_rfc3339() -> None:
    assert rfc3339(T0) == "2023-11-14T22:13:20.123456789Z"
    assert rfc3339(T0, digits=6) == "2023-11-14T22:13:20.123456Z"
    assert rfc3339(5) == "1970-01-01T00:00:00.000000005Z"


def test_attack_of_names_tactics_techniques_and_subtechniques() -> None:
    attack = attack_of(
        [
            "attack.t1059.004",
            "attack.T1059",
            "attack.command-and-control",
            "cve.2021",
            "attack.t1496",
            "attack.s0002",  # software, not a tactic
            "attack.t9999",  # not in the table: its id, no name
        ]
    )
    assert attack.tactics == [
        Named("TA0011", "Command and Control", "https://attack.mitre.org/tactics/TA0011/")
    ]
    assert [(t.id, t.name) for t in attack.techniques] == [
        ("T1059", "Command and Scripting Interpreter"),
        ("T1496", "Resource Hijacking"),
        ("T9999", ""),
    ]
    assert attack.subtechniques == [
        Named("T1059.004", "Unix Shell", "https://attack.mitre.org/techniques/T1059/004/")
    ]


def test_attack_table_names_every_tag_of_the_built_in_rules() -> None:
    rules = Path(__file__).parent.parent.parent / "rules"
    tags = {
        tag
        for path in rules.glob("*.yml")
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict)
        for tag in doc.get("tags", [])
    }
    attack = attack_of(sorted(tags))
    assert len(attack.techniques) > 10 and len(attack.tactics) > 5
    for named in [*attack.tactics, *attack.techniques, *attack.subtechniques]:
        assert named.name, f"{named.id} has no name in service/schemas/attack.py"
    unknown = {t for t in tags if t.startswith("attack.") and not attack_of([t]).tactics}
    unknown -= {t for t in tags if attack_of([t]).techniques}
    assert not unknown, f"tags the ATT&CK table does not know: {sorted(unknown)}"


# --- ECS -----------------------------------------------------------------------------------


def test_ecs_exec() -> None:
    d = ecs(exec_event(fileless=True))
    assert d["@timestamp"] == "2023-11-14T22:13:20.123456789Z"
    assert d["event"] == {
        "kind": "event",
        "module": "sandtrace",
        "dataset": "sandtrace.exec",
        "category": ["process"],
        "type": ["start"],
        "action": "exec",
        "outcome": "success",
    }
    assert d["host"] == {"name": "node1"}
    assert d["container"] == {"id": "c0ffee"}
    assert d["user"] == {"id": "1000", "name": "alice"}
    assert d["process"] == {
        "pid": 4242,
        "vpid": 7,
        "entity_id": "4242@99",
        "name": "curl",
        "thread": {"id": 4243},
        "user": {"id": "1000", "name": "alice"},
        "group": {"id": "1001", "name": "staff"},
        "executable": "/usr/bin/curl",
        "args": ["curl", "-s", "http://x/"],
        "args_count": 3,
        "command_line": "curl -s http://x/",
        "working_directory": "/tmp",
        "parent": {
            "pid": 4000,
            "entity_id": "4000@50",
            "executable": "/bin/bash",
            "args": ["bash", "-c", "x"],
            "args_count": 3,
            "command_line": "bash -c x",
        },
    }
    assert d["sandtrace"]["sandbox"] == "sb-1"
    assert d["sandtrace"]["kind"] == "exec"
    assert d["sandtrace"]["cgroup"] == {"id": 11, "path": "/sandboxes/sb-1"}
    assert d["sandtrace"]["exec"] == {
        "filename": "/usr/bin/curl",
        "argv_truncated": False,
        "argv_size": 20,
        "fileless": True,
        "deleted": False,
        "path_truncated": False,
        "exe_inode": 77,
    }
    assert d["sandtrace"]["ancestry"] == [
        {
            "pid": 4000,
            "entity_id": "4000@50",
            "executable": "/bin/bash",
            "args": ["bash", "-c", "x"],
        },
        {"pid": 1, "entity_id": "1@1", "executable": "/sbin/init", "args": ["init"]},
    ]


def test_ecs_fork_child_is_the_process() -> None:
    d = ecs(ForkEvent(**common(), child_pid=5000, child_key="5000@120"))
    assert d["event"]["action"] == "fork"
    assert d["event"]["type"] == ["start"]
    assert d["process"]["pid"] == 5000
    assert d["process"]["entity_id"] == "5000@120"
    assert d["process"]["parent"] == {
        "pid": 4242,
        "vpid": 7,
        "entity_id": "4242@99",
        "name": "curl",
        "executable": "/usr/bin/curl",
        "args": ["curl", "-s", "http://x/"],
        "args_count": 3,
        "command_line": "curl -s http://x/",
    }


def test_ecs_exit() -> None:
    d = ecs(ExitEvent(**common(), exit_code=3))
    assert (d["event"]["type"], d["event"]["action"], d["event"]["outcome"]) == (
        ["end"],
        "end",
        "failure",
    )
    assert d["process"]["exit_code"] == 3
    killed = ecs(ExitEvent(**common(), signal=9, core_dumped=True))
    assert "exit_code" not in killed["process"]
    assert killed["sandtrace"]["exit"] == {"code": 0, "signal": 9, "core_dumped": True}
    assert ecs(ExitEvent(**common()))["event"]["outcome"] == "success"


def test_ecs_connect() -> None:
    d = ecs(connect_event())
    assert d["event"]["category"] == ["network"]
    assert d["event"]["type"] == ["connection", "start"]
    assert d["event"]["action"] == "connection_attempted"
    assert d["event"]["outcome"] == "success"
    assert d["source"] == {"ip": "198.51.100.2", "address": "198.51.100.2", "port": 40000}
    assert d["destination"] == {"ip": "203.0.113.10", "address": "203.0.113.10", "port": 3333}
    assert d["network"] == {
        "direction": "egress",
        "transport": "tcp",
        "iana_number": "6",
        "type": "ipv4",
    }
    assert "error" not in d
    refused = ecs(connect_event(outcome="error", errno=111, errno_name="ECONNREFUSED"))
    assert refused["event"]["outcome"] == "failure"
    assert refused["error"] == {"code": "ECONNREFUSED"}
    assert ecs(connect_event(outcome="in_progress"))["event"]["outcome"] == "unknown"


def test_ecs_bind_listen_socket() -> None:
    bind = ecs(
        BindEvent(
            **common(),
            protocol="udp",
            family="ipv6",
            addr="::1",
            port=53,
            requested_addr="::1",
            requested_port=0,
            outcome="success",
        )
    )
    assert bind["event"]["action"] == "bound-socket"
    assert bind["destination"] == {"ip": "::1", "address": "::1", "port": 53}
    assert bind["network"] == {
        "direction": "ingress",
        "transport": "udp",
        "iana_number": "17",
        "type": "ipv6",
    }
    assert bind["sandtrace"]["bind"] == {"requested_addr": "::1", "requested_port": 0}
    listen = ecs(ListenEvent(**common(), family="ipv4", addr="0.0.0.0", port=4444))
    assert listen["event"]["action"] == "listen-for-connections"
    assert listen["destination"] == {"ip": "0.0.0.0", "address": "0.0.0.0", "port": 4444}
    assert listen["network"]["direction"] == "ingress"
    sock = ecs(
        SocketEvent(
            **common(),
            protocol="tcp",
            family="ipv4",
            state="established",
            laddr="10.0.0.1",
            lport=1,
            raddr="10.0.0.2",
            rport=2,
        )
    )
    assert sock["source"] == {"ip": "10.0.0.1", "address": "10.0.0.1", "port": 1}
    assert sock["destination"] == {"ip": "10.0.0.2", "address": "10.0.0.2", "port": 2}
    assert sock["network"]["direction"] == "unknown"
    assert sock["sandtrace"]["socket"] == {"state": "established"}


def test_ecs_cgroup_move_and_lost() -> None:
    move = ecs(
        CgroupMoveEvent(
            **common(), target_pid=9, dst_cgroup_id=12, dst_cgroup_path="/x", left_sandbox=True
        )
    )
    assert move["event"]["type"] == ["change"]
    assert move["event"]["action"] == "cgroup-move"
    assert move["sandtrace"]["cgroup_move"] == {
        "target_pid": 9,
        "dst_cgroup_id": 12,
        "dst_cgroup_path": "/x",
        "left_sandbox": True,
    }
    lost = ecs(lost_event())
    assert lost == {
        "@timestamp": "2023-11-14T22:13:20.123456789Z",
        "ecs": {"version": "9.4.0"},
        "event": {
            "kind": "metric",
            "module": "sandtrace",
            "dataset": "sandtrace.lost",
            "category": ["host"],
            "type": ["info"],
            "action": "events-lost",
            "outcome": "failure",
        },
        "host": {"name": "node1"},
        "message": "sandtrace lost 12 events",
        "sandtrace": {
            "kind": "lost",
            "lost": {
                "total": 12,
                "kernel": {"exec": 2, "connect": 1},
                "user": 4,
                "spool": 5,
                "errors": {"proc_map": 1},
                "collector": "col-1",
            },
        },
    }


def test_ecs_alert() -> None:
    d = ecs(alert())
    assert d["event"] == {
        "kind": "alert",
        "module": "sandtrace",
        "dataset": "sandtrace.alert",
        "id": "a-1",
        "category": ["network"],
        "type": ["info"],
        "action": "connection_attempted",
        "severity": 73,
        "risk_score": 73.0,
        "outcome": "success",
    }
    assert d["rule"] == {
        "id": "r-123",
        "name": "Miner pool connection",
        "description": "connects to a stratum port",
        "ruleset": "sandtrace",
    }
    assert d["threat"] == {
        "framework": "MITRE ATT&CK",
        "technique": {
            "id": ["T1496", "T1059"],
            "name": ["Resource Hijacking", "Command and Scripting Interpreter"],
            "reference": [
                "https://attack.mitre.org/techniques/T1496/",
                "https://attack.mitre.org/techniques/T1059/",
            ],
            "subtechnique": {
                "id": ["T1059.004", "T1059.006"],
                "name": ["Unix Shell", "Python"],
                "reference": [
                    "https://attack.mitre.org/techniques/T1059/004/",
                    "https://attack.mitre.org/techniques/T1059/006/",
                ],
            },
        },
        "tactic": {
            "id": ["TA0040"],
            "name": ["Impact"],
            "reference": ["https://attack.mitre.org/tactics/TA0040/"],
        },
    }
    assert d["destination"]["ip"] == "203.0.113.10"
    assert d["process"]["pid"] == 4242
    assert d["process"]["parent"]["entity_id"] == "4000@50"
    assert d["message"] == "Miner pool connection"
    assert d["sandtrace"]["sandbox"] == "sb-1"
    assert d["sandtrace"]["alert"] == {
        "id": "a-1",
        "level": "high",
        "count": 3,
        "repeat": False,
        "raised": "2023-11-14T22:13:20.125456789Z",
        "events": [
            {
                "kind": "connect",
                "@timestamp": "2023-11-14T22:13:20.123456789Z",
                "action": "connection_attempted",
                "outcome": "success",
                "process": {
                    "pid": 4242,
                    "entity_id": "4242@99",
                    "executable": "/usr/bin/curl",
                    "args": ["curl", "-s", "http://x/"],
                },
                "source": {"ip": "198.51.100.2", "address": "198.51.100.2", "port": 40000},
                "destination": {"ip": "203.0.113.10", "address": "203.0.113.10", "port": 3333},
            }
        ],
        "omitted": 0,
    }
    assert d["ecs"] == {"version": "9.4.0"}
    bare = ecs(alert(events=[], level="critical", tags=[]))
    assert bare["event"]["severity"] == 99
    assert bare["event"]["category"] == ["intrusion_detection"]
    assert "threat" not in bare
    assert bare["process"]["command_line"] == "curl -s http://x/"


# --- OCSF ----------------------------------------------------------------------------------


def test_ocsf_exec() -> None:
    d = ocsf(exec_event())
    assert {
        k: d[k]
        for k in (
            "activity_id",
            "activity_name",
            "category_uid",
            "category_name",
            "class_uid",
            "class_name",
            "type_uid",
            "type_name",
            "severity_id",
            "severity",
            "time",
            "status_id",
            "launch_type_id",
            "launch_type",
        )
    } == {
        "activity_id": 1,
        "activity_name": "Launch",
        "category_uid": 1,
        "category_name": "System Activity",
        "class_uid": 1007,
        "class_name": "Process Activity",
        "type_uid": 100701,
        "type_name": "Process Activity: Launch",
        "severity_id": 1,
        "severity": "Informational",
        "time": T0_MS,
        "status_id": 1,
        "launch_type_id": 3,
        "launch_type": "Exec",
    }
    assert d["device"] == {"hostname": "node1", "type_id": 0, "type": "Unknown"}
    parent = {
        "pid": 4000,
        "uid": "4000@50",
        "file": {"name": "bash", "path": "/bin/bash", "type_id": 1, "type": "Regular File"},
        "cmd_line": "bash -c x",
    }
    assert d["process"] == {
        "pid": 4242,
        "uid": "4242@99",
        "name": "curl",
        "ptid": 4243,
        "namespace_pid": 7,
        "user": {"uid": "1000", "name": "alice"},
        "file": {"name": "curl", "path": "/usr/bin/curl", "type_id": 1, "type": "Regular File"},
        "cmd_line": "curl -s http://x/",
        "working_directory": "/tmp",
        "parent_process": parent,
        "container": {"uid": "c0ffee"},
    }
    assert d["actor"] == {"process": parent, "user": {"uid": "1000", "name": "alice"}}
    assert d["unmapped"]["argv"] == ["curl", "-s", "http://x/"]
    assert d["unmapped"]["parent_argv"] == ["bash", "-c", "x"]
    assert d["unmapped"]["sandtrace"]["sandbox"] == "sb-1"
    assert d["unmapped"]["sandtrace"]["exec"]["filename"] == "/usr/bin/curl"


def test_ocsf_fork_exit_move() -> None:
    fork = ocsf(ForkEvent(**common(), child_pid=5000, child_key="5000@120"))
    assert (fork["activity_id"], fork["launch_type_id"], fork["launch_type"]) == (1, 2, "Fork")
    assert fork["process"]["pid"] == 5000
    assert fork["process"]["uid"] == "5000@120"
    assert fork["process"]["parent_process"] == {"pid": 4242, "uid": "4242@99"}
    assert fork["actor"]["process"]["pid"] == 4242
    exit_ = ocsf(ExitEvent(**common(), signal=9, core_dumped=True))
    assert (exit_["activity_id"], exit_["activity_name"], exit_["type_uid"]) == (
        2,
        "Terminate",
        100702,
    )
    assert exit_["exit_code"] == 137
    assert exit_["unmapped"]["sandtrace"]["exit"] == {"code": 0, "signal": 9, "core_dumped": True}
    assert ocsf(ExitEvent(**common(), exit_code=3))["exit_code"] == 3
    move = ocsf(
        CgroupMoveEvent(
            **common(), target_pid=9, dst_cgroup_id=12, dst_cgroup_path="/x", left_sandbox=True
        )
    )
    assert (move["class_uid"], move["activity_id"], move["activity_name"]) == (
        1007,
        99,
        "Cgroup Move",
    )
    assert move["unmapped"]["sandtrace"]["cgroup_move"]["left_sandbox"] is True


def test_ocsf_connect() -> None:
    d = ocsf(connect_event())
    assert (d["class_uid"], d["category_uid"], d["activity_id"], d["type_uid"]) == (
        4001,
        4,
        1,
        400101,
    )
    assert (d["status_id"], d["status"]) == (1, "Success")
    assert d["src_endpoint"] == {"ip": "198.51.100.2", "port": 40000}
    assert d["dst_endpoint"] == {"ip": "203.0.113.10", "port": 3333}
    assert d["connection_info"] == {
        "direction_id": 2,
        "direction": "Outbound",
        "protocol_name": "tcp",
        "protocol_num": 6,
        "protocol_ver_id": 4,
    }
    assert d["actor"]["process"]["pid"] == 4242
    assert d["actor"]["process"]["cmd_line"] == "curl -s http://x/"
    assert "process" not in d
    refused = ocsf(connect_event(outcome="error", errno=111, errno_name="ECONNREFUSED"))
    assert (refused["activity_id"], refused["activity_name"], refused["type_uid"]) == (
        5,
        "Refuse",
        400105,
    )
    assert (refused["status_id"], refused["status_code"]) == (2, "ECONNREFUSED")
    failed = ocsf(connect_event(outcome="error", errno=110, errno_name="ETIMEDOUT"))
    assert (failed["activity_id"], failed["activity_name"]) == (4, "Fail")
    pending = ocsf(connect_event(outcome="in_progress"))
    assert (pending["activity_id"], pending["status_id"]) == (1, 0)


def test_ocsf_bind_listen_socket() -> None:
    bind = ocsf(
        BindEvent(
            **common(), protocol="tcp", family="ipv4", addr="0.0.0.0", port=4444, outcome="success"
        )
    )
    assert (bind["activity_id"], bind["activity_name"], bind["type_uid"]) == (99, "Bind", 400199)
    assert bind["dst_endpoint"] == {"ip": "0.0.0.0", "port": 4444}
    assert bind["connection_info"]["direction_id"] == 1
    listen = ocsf(ListenEvent(**common(), family="ipv6", addr="::", port=22))
    assert (listen["activity_id"], listen["activity_name"], listen["type_uid"]) == (
        7,
        "Listen",
        400107,
    )
    assert listen["connection_info"] == {
        "direction_id": 1,
        "direction": "Inbound",
        "protocol_name": "tcp",
        "protocol_num": 6,
        "protocol_ver_id": 6,
    }
    snap = ocsf(
        SocketEvent(
            **common(),
            protocol="tcp",
            family="ipv4",
            state="established",
            laddr="10.0.0.1",
            lport=1,
            raddr="10.0.0.2",
            rport=2,
        )
    )
    assert (snap["activity_id"], snap["activity_name"]) == (6, "Traffic")
    assert snap["connection_info"]["direction_id"] == 0
    assert snap["src_endpoint"]["port"] == 1
    assert snap["dst_endpoint"]["port"] == 2


def test_ocsf_lost() -> None:
    d = ocsf(lost_event())
    assert (
        d["class_uid"],
        d["class_name"],
        d["category_uid"],
        d["activity_id"],
        d["type_uid"],
    ) == (6008, "Application Error", 6, 1, 600801)
    assert (d["severity_id"], d["severity"]) == (3, "Medium")
    assert d["count"] == 12
    assert d["message"] == "sandtrace lost 12 events: kernel=3 user=4 spool=5"
    assert d["unmapped"]["sandtrace"]["lost"] == {
        "total": 12,
        "kernel": {"exec": 2, "connect": 1},
        "user": 4,
        "spool": 5,
        "errors": {"proc_map": 1},
        "collector": "col-1",
    }


IMPACT = {"uid": "TA0040", "name": "Impact", "src_url": "https://attack.mitre.org/tactics/TA0040/"}


def _named(uid: str, name: str) -> dict[str, str]:
    url = f"https://attack.mitre.org/techniques/{uid.replace('.', '/')}/"
    return {"uid": uid, "name": name, "src_url": url}


def test_ocsf_alert() -> None:
    d = ocsf(alert())
    assert (d["class_uid"], d["category_uid"], d["activity_id"], d["type_uid"]) == (
        2004,
        2,
        1,
        200401,
    )
    assert (d["severity_id"], d["severity"]) == (4, "High")
    assert d["time"] == T0_MS + 2  # raised 2 ms after the event
    assert (d["start_time"], d["end_time"]) == (T0_MS, T0_MS)
    assert d["is_alert"] is True
    assert d["finding_info"] == {
        "uid": "a-1",
        "title": "Miner pool connection",
        "desc": "connects to a stratum port",
        "analytic": {"uid": "r-123", "name": "Miner pool connection", "type_id": 1, "type": "Rule"},
        "created_time": T0_MS + 2,
        "related_events_count": 3,
        "types": ["Impact"],
        "attacks": [
            {"technique": _named("T1496", "Resource Hijacking"), "tactic": IMPACT},
            {
                "technique": _named("T1059", "Command and Scripting Interpreter"),
                "sub_technique": _named("T1059.004", "Unix Shell"),
                "tactic": IMPACT,
            },
            {
                "technique": _named("T1059", "Command and Scripting Interpreter"),
                "sub_technique": _named("T1059.006", "Python"),
                "tactic": IMPACT,
            },
        ],
    }
    assert d["metadata"]["uid"] == "a-1"
    assert d["metadata"]["profiles"] == ["container", "host"]
    (evidence,) = d["evidences"]
    assert evidence["name"] == "connect"
    assert evidence["uid"] == f"4242@99/connect/{T0}"
    assert evidence["dst_endpoint"]["ip"] == "203.0.113.10"
    assert evidence["connection_info"]["direction_id"] == 2
    assert evidence["actor"]["process"]["uid"] == "4242@99"
    assert d["unmapped"]["sandtrace"]["level"] == "high"
    assert d["unmapped"]["argv"] == ["curl", "-s", "http://x/"]
    assert [s["uid"] for s in ocsf(alert(events=[exec_event()]))["evidences"][:1]] == [
        f"4242@99/exec/{T0}"
    ]
    for level, sid in (("informational", 1), ("low", 2), ("medium", 3), ("critical", 5)):
        assert ocsf(alert(level=level))["severity_id"] == sid


# --- untrusted bytes -----------------------------------------------------------------------

EVIL_ARG = b'\x1b[31mred\x07 \xff\xfe ok \xe2\x80\xae]"\\'
EVIL_TEXT = '\x1b[31mred\x07 \\xff\\xfe ok \u202e]"\\\\'  # the real backslash doubled


def evil_exec() -> ExecEvent:
    proc = process(comm=b'e\xffvil]"', exe=b'/tmp/\xff"]x', argv=[b"sh", EVIL_ARG])
    return ExecEvent(
        **common(process=proc), argv=[b"sh", EVIL_ARG], cwd=b"/tmp/\xc3(", filename=b'/tmp/\xff"]x'
    )


def test_untrusted_bytes_in_ecs_and_ocsf() -> None:
    e = ecs(evil_exec())
    assert e["process"]["args"] == ["sh", EVIL_TEXT]
    assert e["process"]["command_line"] == "sh " + EVIL_TEXT
    assert e["process"]["name"] == 'e\\xffvil]"'
    assert e["process"]["executable"] == '/tmp/\\xff"]x'
    assert e["process"]["working_directory"] == "/tmp/\\xc3("
    o = ocsf(evil_exec())
    assert o["unmapped"]["argv"] == ["sh", EVIL_TEXT]
    assert o["process"]["file"] == {
        "name": '\\xff"]x',
        "path": '/tmp/\\xff"]x',
        "type_id": 1,
        "type": "Regular File",
    }
    for doc in (e, o):
        dumped = json.dumps(doc, ensure_ascii=True)
        assert "\x1b" not in dumped
        assert json.loads(dumped) == doc
        # escaped text is valid Unicode only: a strict UTF-8 encoder accepts it.
        json.dumps(doc, ensure_ascii=False).encode("utf-8", "strict")


def test_untrusted_bytes_in_native_are_lossless() -> None:
    d = native(evil_exec())
    assert d["argv"][1] == EVIL_TEXT
    assert text_bytes(d["argv"][1]) == EVIL_ARG


# b"a\\xffb" holds a real backslash, b"a\xffb" a real 0xff byte: every output must tell them
# apart and give back the exact bytes.
BACKSLASH, BAD_BYTE = b"a\\xffb", b"a\xffb"


def _two_argvs_exec() -> ExecEvent:
    proc = process(comm=BAD_BYTE, exe=b"/tmp/" + BACKSLASH, argv=[BACKSLASH, BAD_BYTE])
    return ExecEvent(**common(process=proc), argv=[BACKSLASH, BAD_BYTE], filename=proc.exe)


def _sd_params(message: str) -> dict[str, str]:
    """The SD-PARAMs of an RFC 5424 message, unescaped (RFC 5424 §6.3.3)."""
    sd = re.search(r"\[sandtrace@32473 ((?:[^\]\\]|\\.)*)\]", message)
    assert sd is not None
    return {
        m.group(1): re.sub(r"\\(.)", r"\1", m.group(2))
        for m in re.finditer(r'(\w+)="((?:[^"\\]|\\.)*)"', sd.group(1))
    }


@pytest.mark.parametrize("output", ["json_line", "native", "ecs", "ocsf", "syslog"])
def test_a_real_backslash_and_a_bad_byte_come_out_apart_and_exact(output: str) -> None:
    event = _two_argvs_exec()
    if output == "json_line":
        d = json.loads(json_line(event))
        argv, exe, comm = d["argv"], d["process"]["exe"], d["process"]["comm"]
    elif output == "native":
        d = json.loads(json.dumps(native(event)))
        argv, exe, comm = d["argv"], d["process"]["exe"], d["process"]["comm"]
    elif output == "ecs":
        d = json.loads(json.dumps(ecs(event)))
        argv, exe, comm = d["process"]["args"], d["process"]["executable"], d["process"]["name"]
    elif output == "ocsf":
        d = json.loads(json.dumps(ocsf(event)))
        argv, exe, comm = d["unmapped"]["argv"], d["process"]["file"]["path"], d["process"]["name"]
    else:
        message = syslog_message(event, ecs(event), facility=1, app_name="sandtrace").decode()
        params = _sd_params(message)
        exe, comm = params["exe"], params["comm"]
        d = json.loads(message.split("] ", 1)[1])
        argv = d["process"]["args"]
    assert argv == ["a\\\\xffb", "a\\xffb"]  # a\\xffb and a\xffb: apart
    assert [text_bytes(a) for a in argv] == [BACKSLASH, BAD_BYTE]
    assert text_bytes(exe) == b"/tmp/" + BACKSLASH
    assert text_bytes(comm) == BAD_BYTE


@settings(database=None, max_examples=300)
@given(raw=st.binary(max_size=48))
def test_escaped_text_round_trips_any_bytes(raw: bytes) -> None:
    text = bytes_text(raw)
    assert text_bytes(text) == raw
    text.encode("utf-8", "strict")  # valid Unicode: no lone surrogates
    if b"\\" not in raw and raw.decode("utf-8", "replace").encode() == raw:
        assert text == raw.decode("utf-8")  # valid UTF-8 reads as itself


def test_text_bytes_refuses_what_is_not_escaped_text() -> None:
    for bad in ("a\\b", "a\\x4", "a\\xFF", "\\", "\udcff"):
        with pytest.raises(UnicodeError):
            text_bytes(bad)


def test_sd_escape() -> None:
    assert sd_escape('a"b\\c]d') == 'a\\"b\\\\c\\]d'


def test_syslog_message_escapes_structured_data() -> None:
    msg = syslog_message(evil_exec(), {"x": 1}, facility=16, app_name="sandtrace").decode()
    assert msg == (
        "<134>1 2023-11-14T22:13:20.123456Z node1 sandtrace 4242 exec "
        '[sandtrace@32473 kind="exec" sandbox="sb-1" pid="4242" comm="e\\\\xffvil\\]\\"" '
        'exe="/tmp/\\\\xff\\"\\]x"] {"x":1}'
    )


def test_syslog_message_alert_and_lost() -> None:
    a = syslog_message(alert(), {}, facility=1, app_name="st app").decode()
    assert a.startswith(
        "<11>1 2023-11-14T22:13:20.123456Z node1 st_app 4242 alert [sandtrace@32473 "
        'kind="alert" alert_id="a-1" rule_id="r-123" level="high" sandbox="sb-1" pid="4242" '
        'exe="/usr/bin/curl"] {}'
    )
    lost = syslog_message(lost_event(), {}, facility=16, app_name="sandtrace").decode()
    assert lost == (
        "<132>1 2023-11-14T22:13:20.123456Z node1 sandtrace - lost "
        '[sandtrace@32473 kind="lost" kernel="3" user="4" spool="5"] {}'
    )
    spaced = syslog_message(ExitEvent(**common(host="bad host\n")), {}, facility=16, app_name="")
    assert spaced.decode().split(" ")[2:4] == ["bad_host_", "-"]
