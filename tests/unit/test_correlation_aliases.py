"""Sigma correlation aliases (a group-by name read as a different field per rule) and
grouping by a list field (LineageProcessIds: an event joins the group of each element), so
a correlation can follow what a process's descendants do after it connected out."""

from __future__ import annotations

from detect.engine import Engine
from detect.loader import load_text
from detect.ruleset import RuleSet
from detect.testing import event_from_fields

CONNECT = """title: remote connect
id: 11111111-1111-4111-8111-111111111111
name: remote
status: experimental
logsource: {product: linux, category: network_connection}
detection:
  s:
    Protocol: tcp
  condition: s
level: informational
---
title: shell exec
id: 22222222-2222-4222-8222-222222222222
name: shell
status: experimental
logsource: {product: linux, category: process_creation}
detection:
  s:
    Image|endswith: /sh
  condition: s
level: informational
---
"""


def correlation(group_by: str, aliases: str) -> str:
    return (
        CONNECT
        + f"""title: connect then a shell below it
id: 33333333-3333-4333-8333-333333333333
status: experimental
correlation:
  type: temporal_ordered
  rules: [remote, shell]
  group-by: [{group_by}]
{aliases}  timespan: 10s
level: high
"""
    )


LINEAGE = """  aliases:
    lineage:
      remote: ProcessId
      shell: LineageProcessIds
"""


def load(text: str) -> RuleSet:
    rules = RuleSet()
    load_text(text, "test.yml", rules)
    return rules


def fired(rules: RuleSet, *events: tuple[str, dict[str, object], float]) -> bool:
    engine = Engine(rules)
    alerts = [a for c, f, at in events for a in engine.feed(event_from_fields(c, f, at))]
    return any(a.rule_id == "33333333-3333-4333-8333-333333333333" for a in alerts)


def connect(pid: int, at: float = 0.0) -> tuple[str, dict[str, object], float]:
    return ("network_connection", {"ProcessId": pid, "DestinationIp": "192.0.2.1"}, at)


def shell(pid: int, ancestors: list[int], at: float = 1.0) -> tuple[str, dict[str, object], float]:
    fields = {"ProcessId": pid, "AncestorProcessIds": ancestors, "Image": "/bin/sh"}
    return ("process_creation", fields, at)


def test_an_alias_groups_a_connect_with_a_shell_of_its_lineage() -> None:
    rules = load(correlation("lineage", LINEAGE))
    assert rules.refused == []
    [corr] = rules.correlations
    assert corr.aliases == {"lineage": {"remote": "ProcessId", "shell": "LineageProcessIds"}}
    assert fired(rules, connect(100), shell(100, [99]))  # itself, after exec
    assert fired(rules, connect(100), shell(102, [101, 100, 99]))  # a grandchild
    assert not fired(rules, connect(100), shell(102, [101, 99]))  # not below it
    assert not fired(rules, connect(101), shell(102, [100, 99]))  # a sibling's connect
    assert not fired(rules, connect(100), shell(101, [100], at=11.0))  # too late
    assert not fired(rules, shell(101, [100], at=0.0), connect(100, at=1.0))  # wrong order


def test_without_the_alias_only_the_same_process_counts() -> None:
    rules = load(correlation("ProcessId", ""))
    assert fired(rules, connect(100), shell(100, [99]))
    assert not fired(rules, connect(100), shell(101, [100]))


def test_an_alias_that_leaves_a_rule_out_is_refused() -> None:
    text = correlation("lineage", "  aliases:\n    lineage:\n      remote: ProcessId\n")
    rules = load(text)
    assert rules.correlations == []
    [(where, why)] = rules.refused
    assert "connect then a shell below it" in where
    assert why == "alias lineage names no field for rule(s) ['shell']"


def test_a_list_field_groups_only_on_its_own() -> None:
    rules = load(correlation("lineage, Sandbox", LINEAGE))
    assert rules.correlations == []
    [(_, why)] = rules.refused
    assert why == "list field LineageProcessIds can group only on its own (one group-by)"


THREE = (
    CONNECT.replace("name: remote", "name: a", 1)
    + """title: listen
id: 44444444-4444-4444-8444-444444444444
name: b
status: experimental
logsource: {product: linux, category: network_listen}
detection:
  s:
    Action: listen
  condition: s
level: informational
---
title: shell exec
id: 55555555-5555-4555-8555-555555555555
name: c
status: experimental
logsource: {product: linux, category: process_creation}
detection:
  s:
    Image|endswith: /bash
  condition: s
level: informational
---
title: a then b then c
id: 66666666-6666-4666-8666-666666666666
status: experimental
correlation:
  type: temporal_ordered
  rules: [a, b, c]
  group-by: [ProcessId]
  timespan: 10s
level: high
"""
)


def test_an_ordered_correlation_completes_only_in_order() -> None:
    """Only an entry of the order's last rule can complete it (the engine skips the count
    for the others): every order of three events, and repeats, give what the order says."""
    rules = load(THREE)
    assert rules.refused == []
    step = {
        "a": ("network_connection", {"ProcessId": 7, "DestinationIp": "192.0.2.1"}),
        "b": ("network_listen", {"ProcessId": 7, "Action": "listen"}),
        "c": ("process_creation", {"ProcessId": 7, "Image": "/bin/bash"}),
    }
    for sequence, expected in [
        ("abc", True),
        ("acb", False),
        ("bac", False),
        ("cab", False),
        ("bca", False),
        ("abac", True),
        ("acbc", True),
        ("cbabc", True),
        ("aab", False),
        ("ccba", False),
    ]:
        engine = Engine(rules)
        alerts = [
            a
            for i, name in enumerate(sequence)
            for a in engine.feed(event_from_fields(*step[name], at=float(i)))
        ]
        fired = any(a.rule_id == "66666666-6666-4666-8666-666666666666" for a in alerts)
        assert fired == expected, sequence
