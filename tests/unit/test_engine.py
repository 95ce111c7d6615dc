"""The engine: folding repeats, correlation windows, the egress allow-list."""

from __future__ import annotations

import pytest

from api.events import AnyEvent, ConnectEvent, LostEvent
from detect.egress import EGRESS_RULE_ID, EgressPolicies, EgressPolicy
from detect.engine import Engine
from detect.loader import load_text
from detect.ruleset import RuleSet
from detect.testing import event_from_fields

BASE = """
title: connect to pool port
id: 00000000-0000-4000-8000-0000000000aa
name: pool_port
logsource: {product: linux, category: network_connection}
detection: {s: {DestinationPort: 3333}, condition: s}
level: high
"""


def engine(extra: str = "", **kw: object) -> Engine:
    rules = RuleSet()
    load_text(BASE + extra, "t", rules)
    assert rules.refused == []
    return Engine(rules, **kw)  # type: ignore[arg-type]


def connect(at: float, ip: str = "198.51.100.1", port: int = 3333, pid: int = 7) -> AnyEvent:
    return event_from_fields(
        "network_connection",
        {"DestinationIp": ip, "DestinationPort": port, "ProcessId": pid, "Image": "/tmp/m"},
        at,
    )


def test_repeats_fold_into_one_alert_with_a_count() -> None:
    e = engine(fold_seconds=60)
    first = [a for i in range(5) for a in e.feed(connect(i))]
    assert len(first) == 1 and first[0].count == 1 and not first[0].repeat
    assert first[0].process.pid == 7
    assert e.expire(first[0].time_ns + 59 * 10**9) == []
    (summary,) = e.expire(first[0].time_ns + 60 * 10**9)
    assert (summary.count, summary.repeat, summary.folds) == (5, True, first[0].alert_id)
    assert summary.alert_id != first[0].alert_id  # a summary is an alert of its own
    assert e.flush() == []


TEMPORAL = """---
title: pool then pool elsewhere
id: 00000000-0000-4000-8000-0000000000dd
correlation: {type: temporal, rules: [pool_port], group-by: [DestinationIp], timespan: 30s}
level: high
"""


def test_engine_state_empties_after_expiry() -> None:
    """Folds, correlation windows and the last loss go once expiry passes their ends, so an
    engine holds only what is active (the service expires every host's engine on a timer)."""
    e = engine(VALUE_COUNT + TEMPORAL, fold_seconds=60)
    for i in range(5):
        for pid in (7, 8):
            e.feed(connect(i, ip=f"198.51.100.{i}", pid=pid))
    lost = LostEvent(
        time_ns=connect(5).time_ns, host="testhost", kernel={"exec": 3}, user=0, errors={}
    )
    assert len(e.feed(lost)) == 1
    assert e._folds and any(e._windows.values()) and e._last_loss_ns and not e.idle()
    t0 = connect(0).time_ns
    assert e.expire(t0 + 30 * 10**9) == []  # the windows' timespans are over, the folds not
    assert not any(e._windows.values()) and e._folds and not e.idle()
    summaries = e.expire(t0 + 63 * 10**9)  # the last fold began at 3 s (value_count, once)
    assert sorted((a.rule_id[-2:], a.process.pid, a.count) for a in summaries) == [
        ("dd", 7, 5),  # the temporal correlation fires at each of a process's connects
        ("dd", 8, 5),
    ]
    assert e._folds == {} and e._last_loss_ns  # a loss is remembered for 10 minutes
    assert e.expire(connect(5).time_ns + 601 * 10**9) == []
    assert e._last_loss_ns == {} and e.idle()


def test_other_process_is_not_folded() -> None:
    e = engine()
    a = e.feed(connect(0, pid=7))
    b = e.feed(connect(0, pid=8))
    assert len(a) == len(b) == 1 and a[0].alert_id != b[0].alert_id


VALUE_COUNT = """---
title: many hosts
id: 00000000-0000-4000-8000-0000000000bb
correlation:
  type: value_count
  rules: [pool_port]
  group-by: [ProcessId]
  timespan: 10s
  condition: {gte: 4, field: DestinationIp}
level: high
"""


def test_value_count_correlation_and_its_window() -> None:
    e = engine(VALUE_COUNT)
    ids = []
    for i in range(3):  # three distinct hosts in 10 s: not yet
        ids += [a.rule_id for a in e.feed(connect(i, ip=f"198.51.100.{20 + i}"))]
    assert ids == []  # the referenced rule does not alert on its own
    late = e.feed(connect(20, ip="198.51.100.29"))
    assert late == []  # the first three fell out of the window
    burst = [a.rule_id for i in range(4) for a in e.feed(connect(30 + i, ip=f"198.51.100.{i}"))]
    assert burst == ["00000000-0000-4000-8000-0000000000bb"]


def test_event_count_correlation_groups_by_field() -> None:
    e = engine("""---
title: bursts
id: 00000000-0000-4000-8000-0000000000cc
correlation: {type: event_count, rules: [pool_port], group-by: [ProcessId], timespan: 5s,
              condition: {gte: 3}}
level: medium
""")
    fired = [a.rule_id for i in range(2) for pid in (1, 2) for a in e.feed(connect(i, pid=pid))]
    assert fired == []  # two per process
    assert [a.rule_id for a in e.feed(connect(2, pid=1))] == [
        "00000000-0000-4000-8000-0000000000cc"
    ]


@pytest.mark.parametrize(
    ("specs", "ip", "port", "allowed"),
    [
        (["198.51.100.0/24"], "198.51.100.7", 22, True),
        (["198.51.100.0/24:80,443"], "198.51.100.7", 22, False),
        (["198.51.100.0/24:80,443"], "198.51.100.7", 443, True),
        (["192.0.2.1"], "192.0.2.2", 80, False),
        (["[2001:db8::/32]:53"], "2001:db8::1", 53, True),
        (["[2001:db8::/32]:53"], "2001:db8::1", 80, False),
        (["2001:db8::/32"], "2001:db8::1", 80, True),
        (["0.0.0.0/0", "::/0"], "203.0.113.9", 1, True),
        ([], "127.0.0.1", 8000, True),  # loopback is the sandbox itself
    ],
)
def test_egress_policy(specs: list[str], ip: str, port: int, allowed: bool) -> None:
    assert EgressPolicy.parse(specs).allows(ip, port) == allowed


def test_egress_rule_alerts_outside_the_list_only() -> None:
    e = engine(egress=EgressPolicy.parse(["198.51.100.0/24:3333"]))
    inside = e.feed(connect(0, ip="198.51.100.1", port=3333))
    outside = e.feed(connect(1, ip="203.0.113.9", port=443, pid=9))
    assert EGRESS_RULE_ID not in {a.rule_id for a in inside}
    assert [a.rule_id for a in outside] == [EGRESS_RULE_ID]
    assert "203.0.113.9:443" in outside[0].description


def test_bad_egress_entry_is_named() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.300/8'"):
        EgressPolicy.parse(["10.0.0.300/8"])


def test_correlation_window_restarts_after_firing_and_idle_windows_go() -> None:
    e = engine(VALUE_COUNT, fold_seconds=0)
    first = [a for i in range(4) for a in e.feed(connect(i * 0.1, ip=f"198.51.100.{i}"))]
    assert len(first) == 1
    again = [a for i in range(3) for a in e.feed(connect(1 + i * 0.1, ip=f"198.51.100.{i}"))]
    assert again == []  # three new ones after the alert are not yet four
    assert sum(map(len, e._windows.values())) == 1
    e.expire(first[0].time_ns + 60 * 10**9)
    assert sum(map(len, e._windows.values())) == 0


def test_egress_allow_lists_per_sandbox() -> None:
    policies = EgressPolicies.parse(["192.0.2.0/24", "st-web=198.51.100.0/24:443"])
    e = engine(egress=policies)

    def conn(sandbox: str, pid: int, ip: str) -> AnyEvent:
        fields = {"Sandbox": sandbox, "ProcessId": pid, "DestinationIp": ip, "DestinationPort": 443}
        return event_from_fields("network_connection", fields)

    web, other = conn("st-web", 1, "192.0.2.9"), conn("st-job", 2, "192.0.2.9")
    web_ok = conn("st-web", 3, "198.51.100.4")
    # st-web has only its own list
    assert [a.rule_id for a in e.feed(web)] == [EGRESS_RULE_ID]
    assert e.feed(other) == []  # the shared list allows 192.0.2.0/24
    assert e.feed(web_ok) == []
    assert len(policies) == 2


def _greedy(order: list[str], seen: list[str]) -> list[int]:
    """The reference: walk the window's values in order, advancing on each next rule; the
    indices of the entries taken."""
    taken: list[int] = []
    for at, name in enumerate(seen):
        if len(taken) < len(order) and name == order[len(taken)]:
            taken.append(at)
    return taken


def test_ordered_window_agrees_with_a_walk_of_its_entries() -> None:
    """The ordered prefix comes from per-value positions, not a walk of the window (which
    cost a pass over up to an hour of entries per event); both must agree as the window
    slides, including orders that name a rule twice, and so must the events an alert of
    it lists."""
    import random  # noqa: PLC0415

    import msgspec.structs  # noqa: PLC0415

    from detect.correlation import Counting  # noqa: PLC0415
    from detect.correlation import Window as _Window  # noqa: PLC0415
    from detect.ruleset import Correlation  # noqa: PLC0415

    rng = random.Random(3)
    base = connect(0)
    assert isinstance(base, ConnectEvent)
    rule = engine().rules.rules[0]
    checked = 0
    for order in (["a", "b"], ["a", "b", "c"], ["a", "a", "b"], ["b", "a", "b"]):
        corr = Correlation(
            id="c",
            title="c",
            level="high",
            description="",
            tags=[],
            kind="temporal_ordered",
            rules=order,
            group_by=["ProcessId"],
            seconds=20,
            op="gte",
            count=len(order),
            field=None,
            source="t",
        )
        counting = Counting(corr, rule)
        window = _Window()
        now = 0
        for _ in range(3000):
            now += rng.randint(0, 3)
            value = rng.choice("abcd")
            event = msgspec.structs.replace(base, time_ns=now)
            window.entries.append((now, value, event))
            window.values[value] = window.values.get(value, 0) + 1
            window.place(value)
            if window.entries[0][0] < now - 20:
                window.forget(now - 20)
            if rng.random() < 0.01:
                window.clear()
                continue
            taken = _greedy(order, [v for _, v, _ in window.entries])
            assert window.ordered_prefix(order) == len(taken)
            if len(taken) == len(order):
                checked += 1
                listed = [window.entries[i][2] for i in taken]
                assert all(a is b for a, b in zip(window.raised(counting), listed, strict=True))
    assert checked > 100  # full matches were among the cases


def test_value_count_alerts_as_a_count_over_the_window_says() -> None:
    """A value_count window keeps when each value was last seen, and looks back only when
    the count may be reached: its alerts must be those of counting, at every event, the
    distinct values of the events since the last alert that lie within the timespan (the
    group's events, an empty value not counted), whatever the order of values and gaps."""
    import random  # noqa: PLC0415

    rng = random.Random(11)
    e = engine(VALUE_COUNT, fold_seconds=0)  # gte 4 distinct DestinationIp in 10 s, per pid
    since: dict[int, list[tuple[float, str]]] = {1: [], 2: []}
    now, fired = 0.0, 0
    for _ in range(4000):
        now += rng.choice([0.0, 0.5, 1.0, 3.0, 7.0])
        pid = rng.choice([1, 2])
        ip = rng.choice(
            ["", "198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4", "198.51.100.5"]
        )
        got = [a for a in e.feed(connect(now, ip=ip, pid=pid)) if a.rule_id.endswith("bb")]
        since[pid].append((now, ip))
        distinct = {v for at, v in since[pid] if at >= now - 10 and v}
        if len(distinct) >= 4:
            since[pid] = []
            fired += 1
            assert len(got) == 1, (now, pid, distinct)
        else:
            assert got == [], (now, pid, distinct)
    assert fired > 50
