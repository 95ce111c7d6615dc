"""The service's expiry (service.app.Ingest.expire, run every second by serve): in each
host's own event time, whatever its clock says against the service's, and engines of hosts
gone quiet dropped once they hold nothing."""

from __future__ import annotations

import msgspec.structs

from api.events import Alert, AnyEvent
from detect.engine import Engine
from detect.loader import load_text
from detect.ruleset import RuleSet
from detect.testing import T0, event_from_fields
from service.app import ENGINE_IDLE_S, EXPIRY_GRACE_NS, Ingest

NS = 1_000_000_000
RULE = """
title: miner flags
id: 00000000-0000-4000-8000-00000000f00d
logsource: {product: linux, category: process_creation}
detection: {s: {CommandLine|contains: 'stratum+tcp://'}, condition: s}
level: high
"""


def miner(host: str, at_ns: int, pid: int = 7) -> AnyEvent:
    fields = {"Image": "/tmp/x", "CommandLine": "x -o stratum+tcp://h:3333", "ProcessId": pid}
    event = event_from_fields("process_creation", fields)
    return msgspec.structs.replace(event, host=host, time_ns=at_ns)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ingest_with(clock: Clock, alerts: list[Alert]) -> Ingest:
    rules = RuleSet()
    load_text(RULE, "t", rules)
    return Ingest(
        rules,
        on_alert=alerts.append,
        engine_factory=lambda r: Engine(r, fold_seconds=10),
        clock=clock,
    )


def test_each_host_expires_in_its_own_time() -> None:
    """Two hosts, one's clock an hour ahead of the other's (and of the service's): both
    summaries come once 10 s of each host's time (and the grace) have passed since their
    first alert, measured by the service's clock from their events' arrival."""
    clock, alerts = Clock(), list[Alert]()
    ingest = ingest_with(clock, alerts)
    ahead = T0 + 3600 * NS
    ingest.handle("c1", 0, [miner("slow", T0 + i * NS) for i in range(3)])
    ingest.handle("c2", 0, [miner("fast", ahead + i * NS) for i in range(3)])
    assert [(a.host, a.repeat) for a in alerts] == [("slow", False), ("fast", False)]
    # the last events were at 2 s; the folds end at 10 s: 8 s later, plus the grace
    wait = 8 + EXPIRY_GRACE_NS / NS
    clock.now += wait - 0.5
    assert ingest.expire() == []
    clock.now += 0.5
    summaries = ingest.expire()
    assert [(a.host, a.repeat, a.count) for a in summaries] == [
        ("slow", True, 3),
        ("fast", True, 3),
    ]
    assert alerts[2:] == summaries  # they went to on_alert too
    assert ingest.stats.alerts["00000000-0000-4000-8000-00000000f00d"] == 4
    assert ingest.expire() == []  # once


def test_a_host_that_keeps_sending_moves_its_own_clock() -> None:
    """A host's latest event, not the time since it first came, is where its clock stands:
    repeats spread over 9 s of its time are one fold, summarised after its 10 s."""
    clock, alerts = Clock(), list[Alert]()
    ingest = ingest_with(clock, alerts)
    for i in range(10):
        ingest.handle("c1", i, [miner("h", T0 + i * NS)])
        clock.now += 1.0
        assert ingest.expire() == []
    clock.now += EXPIRY_GRACE_NS / NS
    (summary,) = ingest.expire()
    assert (summary.count, summary.folds) == (10, alerts[0].alert_id)


def test_the_engine_of_a_quiet_host_is_dropped_once_it_holds_nothing() -> None:
    clock, alerts = Clock(), list[Alert]()
    ingest = ingest_with(clock, alerts)
    ingest.handle("c1", 0, [miner("gone", T0), miner("gone", T0 + NS)])
    ingest.handle("c2", 0, [miner("here", T0)])
    assert set(ingest.engines) == {"gone", "here"}
    clock.now += 60
    assert [a.host for a in ingest.expire()] == ["gone"]  # the summary; nothing held now
    assert set(ingest.engines) == {"gone", "here"}  # quiet, but not for long yet
    for i in range(1, 12):
        clock.now += ENGINE_IDLE_S / 10
        ingest.handle("c2", i, [miner("here", T0 + int((clock.now - 1000) * NS), pid=8 + i)])
        ingest.expire()
    assert set(ingest.engines) == {"here"}
    assert "gone" not in ingest.heard
    # the host comes back: a fresh engine raises what the old one would have
    ingest.handle("c1", 1, [miner("gone", T0 + 3600 * NS)])
    assert alerts[-1].host == "gone" and not alerts[-1].repeat
