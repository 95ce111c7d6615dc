"""Correlation windows: what each correlation has counted within its timespan, per group.

event_count counts a group's matches, value_count the distinct values of a field among
them, temporal the distinct rules that matched, temporal_ordered how many of its rules
matched in order. What a match of a correlated rule does to its correlations' windows is
generated as one function per rule and event type (observer), settings inlined.
"""

from __future__ import annotations

import bisect
import operator
from collections import defaultdict, deque
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from api.events import Alert, Event
from detect.codegen import CodeContext
from detect.fields import ALWAYS_STR, GROUP_LIST_FIELDS, Getter
from detect.ruleset import Correlation, Rule

NS = 1_000_000_000
_event_time = operator.attrgetter("time_ns")
OPS = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<", "eq": "=="}

# What a window counts per entry: a rule's name (temporal) or None (event_count), as the
# generated observers append them; Any, for what reads them back (a test of ordered_prefix).
Counted = Any
Entry = tuple[int, Counted, Event]
"""A window's entry: (event time, what it counts, the event itself, for the alert)."""


class Counting:
    """What a correlation counts of one of its rules' events, worked out once."""

    __slots__ = ("corr", "field", "group_by", "op", "ref", "rule_id", "value", "window_ns")

    def __init__(self, corr: Correlation, rule: Rule) -> None:
        self.corr = corr
        self.rule_id = rule.id
        self.group_by = corr.group_fields(rule)
        self.window_ns = int(corr.seconds * NS)
        temporal = corr.kind.startswith("temporal")
        # value_count counts distinct values of a field; temporal ones, distinct rules
        self.field = (corr.field or "") if corr.kind == "value_count" else None
        self.value: str | None = None
        if temporal:
            self.value = rule.name if rule.name in corr.rules else rule.id
        self.op = OPS.get(corr.op)  # Python's operator, or None: never alerts
        self.ref = len(corr.rules) if temporal else corr.count


class Distinct:
    """A value_count correlation's window: the event each value was last seen in. The values
    seen within the timespan are those last seen since its start; the others are forgotten
    when the count might be reached, so the window holds at most about as many as it counts
    to, and an alert lists one event per value counted (ten hosts probed: ten connects)."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen: dict[Hashable, Event] = {}

    def forget(self, horizon: int) -> None:
        seen = self.seen
        for value in [v for v, e in seen.items() if e.time_ns < horizon]:
            del seen[value]

    def last(self) -> int:
        return max((e.time_ns for e in self.seen.values()), default=0)

    def clear(self) -> None:
        self.seen.clear()

    def raised(self, _counting: Counting) -> list[Event]:
        """The events of the values counted, in the order they happened."""
        return sorted(self.seen.values(), key=_event_time)


class Window:
    """Entries within a correlation's timespan, with a running count of distinct values and,
    for ordered correlations, where each value stands in the sequence."""

    __slots__ = ("entries", "next", "positions", "values")

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()
        self.values: defaultdict[Counted, int] = defaultdict(int)  # value -> entries holding it
        self.positions: dict[Counted, deque[int]] = {}  # value -> its entries' sequence numbers
        self.next = 0

    def place(self, value: Counted) -> None:
        """Record the position of the entry just appended (ordered correlations only)."""
        self.positions.setdefault(value, deque()).append(self.next)
        self.next += 1

    def forget(self, horizon: int) -> None:
        """Drop the entries older than `horizon` (the newest always stays)."""
        positions = self.positions
        while self.entries[0][0] < horizon:
            old = self.entries.popleft()[1]
            self.values[old] -= 1
            if not self.values[old]:
                del self.values[old]
            if positions:  # the oldest entry of a value is the first of its positions
                places = positions[old]
                places.popleft()
                if not places:
                    del positions[old]

    def ordered_prefix(self, order: list[str]) -> int:
        """How many of the rules in `order` matched in that order within the window: each
        the earliest entry after the one before (one bisection per rule, whatever the
        window holds)."""
        return len(self._ordered(order))

    def _ordered(self, order: list[str]) -> list[int]:
        """The sequence numbers of the entries ordered_prefix counts."""
        at, chosen = -1, []
        for name in order:
            places = self.positions.get(name)
            if not places:
                break
            i = bisect.bisect_right(places, at)
            if i == len(places):
                break
            at = places[i]
            chosen.append(at)
        return chosen

    def raised(self, counting: Counting) -> list[Event]:
        """The events that made the count, in the order they happened: every entry
        (event_count), the latest of each rule (temporal), the entries of the rules in
        their order (temporal_ordered)."""
        entries = self.entries
        kind = counting.corr.kind
        if kind == "temporal_ordered":  # entry i has sequence number first + i
            first = self.next - len(entries)
            return [entries[at - first][2] for at in self._ordered(counting.corr.rules)]
        if kind == "temporal":
            latest: dict[Counted, Event] = {}
            for _, value, event in reversed(entries):
                if value not in latest:
                    latest[value] = event
                    if len(latest) == len(self.values):
                        break
            return list(reversed(latest.values()))
        return [event for _, _, event in entries]

    def last(self) -> int:
        return self.entries[-1][0] if self.entries else 0

    def clear(self) -> None:
        self.entries.clear()
        self.values.clear()
        self.positions.clear()


Windows = dict[Hashable, Window | Distinct]
"""A correlation's windows by group-by value (a tuple of several)."""
Observer = Callable[[list[Alert], Event], None]
"""What a match of a correlated rule does: its event into its correlations' windows, and
alerts (into the list) for the counts it reaches."""
Fire = Callable[[list[Alert], Counting, Window | Distinct, int, Event], None]
"""What a reached count does: (alerts, counting, window, count seen, event)."""


def _needs_before(counting: Counting) -> Counted | None:
    """For a temporal_ordered correlation, the rule that must have matched in a group's
    window before an entry of this counting's rule can count (the one before it in the
    order); None when every entry counts (its rule comes first, or another kind).

    The ordered count only ever takes an entry after one of the rule before it, and entries
    only join a window at its end: one that comes while the window holds none of that rule
    never counts, and is not kept. With the built-in pack, this keeps an hour of every
    process's remote connects out of the SSH-forward correlations' windows: only those of
    processes that ran an ssh client are kept."""
    if counting.corr.kind != "temporal_ordered" or counting.value is None:
        return None
    order = counting.corr.rules
    at = order.index(counting.value) if counting.value in order else 0
    return order[at - 1] if at > 0 else None


def _cannot_complete(counting: Counting) -> bool:
    """Whether an entry of this counting's rule can never be the one that completes its
    temporal_ordered correlation: a new entry is the window's newest, so an in-order chain
    it completes ends with it, and only the order's last rule ends one. With the built-in
    pack, every remote connect skips the ordered count this way."""
    order = counting.corr.rules
    return (
        counting.op == ">="
        and counting.ref == len(order)
        and bool(order)
        and counting.value != order[-1]
        and order.count(order[-1]) == 1
    )


def _count(
    n: int, counting: Counting, value: str, getters: Mapping[str, Getter], scope: dict[str, Any]
) -> list[str]:
    """The lines (of the generated observer) that count event `e` into window `w`, for
    counting number `n`, and fire when the count is reached."""
    horizon = f"now - {counting.window_ns}"
    lines = [f"    v = {value}"]
    if counting.field is not None:  # value_count: the event each value was last seen in
        getter = getters.get(counting.field)
        counted = "v" if getter in ALWAYS_STR else 'v is not None and v != ""'
        lines += [
            f"    if {counted}:  # an absent or empty value is not counted",
            "        d = w.seen",
            "        d[v] = e",
        ]
        if counting.op is not None:  # the window is looked at once it may be full
            test = f"len(d) {counting.op} {counting.ref!r}"
            lines += [
                f"        if {test}:",
                f"            w.forget({horizon})",
                f"            if {test}:",
                f"                fire(out, G{n}, w, len(d), e)",
            ]
        return lines
    lines += [
        "    x, d = w.entries, w.values",
        "    x.append((now, v, e))",
        "    d[v] += 1",
    ]
    kind = counting.corr.kind
    if kind == "temporal_ordered":
        lines.append("    w.place(v)")
    lines += [f"    if x[0][0] < {horizon}:", f"        w.forget({horizon})"]
    if counting.op is None:
        return lines
    if kind == "temporal_ordered" and _cannot_complete(counting):
        return lines
    if kind == "temporal_ordered":
        scope[f"O{n}"] = counting.corr.rules
        seen = f"w.ordered_prefix(O{n})"
    elif kind == "temporal":  # distinct rules
        seen = "len(d)"
    else:  # event_count
        seen = "len(x)"
    return [
        *lines,
        f"    s = {seen}",
        f"    if s {counting.op} {counting.ref!r}:",
        f"        fire(out, G{n}, w, s, e)",
    ]


def observer(
    countings: list[Counting],
    getters: Mapping[str, Getter],
    windows: Mapping[str, Windows],
    fire: Fire,
) -> Observer | None:
    """What a match of a correlated rule does, for one event type (None when no
    correlation counts the rule): per correlation, add the event to its window (in
    `windows` by correlation id) and `fire` when the count is reached. One function is
    generated per rule, its settings inlined and the window key and the counted value read
    as the matchers read fields: every TCP connect comes here with the built-in pack (two
    value_count correlations), and calls per correlation cost more than the dict and deque
    work itself. A value_count window (Distinct) is one dict store per event, looked back
    over only when full. Windows hold the events they count (an alert lists them: `raised`),
    never copies: a reference per entry."""
    if not countings:
        return None
    ctx = CodeContext(getters)
    scope: dict[str, Any] = {"_Window": Window, "_Distinct": Distinct, "fire": fire}
    reads: dict[str, str] = {}  # each field read once, whatever reads it

    def read(name: str | None) -> str:
        getter = getters.get(name) if name is not None else None
        if getter is None:  # fields the type lacks are None, as FieldDict gives them
            return "None"
        return reads.setdefault(ctx.read(getter), f"a{len(reads)}")

    body = []
    for n, counting in enumerate(countings):
        scope[f"G{n}"], scope[f"W{n}"] = counting, windows[counting.corr.id]
        parts = [read(f) for f in counting.group_by]
        key = parts[0] if len(parts) == 1 else f"({''.join(p + ', ' for p in parts)})"
        if counting.field is not None:
            value = read(counting.field)
        else:
            scope[f"V{n}"], value = counting.value, f"V{n}"
        body.append(f"    # {counting.corr.kind} {counting.corr.id}")
        after = _needs_before(counting)
        if after is None:
            window = "_Window" if counting.field is None else "_Distinct"
            lines = [
                f"    w = W{n}.get(k)",
                "    if w is None:",
                f"        w = W{n}[k] = {window}()",
                *_count(n, counting, value, getters, scope),
            ]
        else:  # an entry no earlier rule of the order precedes can never be part of it
            scope[f"P{n}"] = after
            lines = [
                f"    w = W{n}.get(k)",
                f"    if w is not None and P{n} in w.positions:",
                *[f"    {line}" for line in _count(n, counting, value, getters, scope)],
            ]
        if counting.group_by[0] in GROUP_LIST_FIELDS:  # the event is in the group of each
            body += [f"    for k in {key} or ():", *[f"    {line}" for line in lines]]
        else:
            body += [f"    k = {key}", *lines]
    lines = ["def observe(out, e):", "    now = e.time_ns"]
    lines += [f"    {local} = {source}" for source, local in reads.items()]
    lines += body
    scope.update(ctx.namespace())
    name = f"<correlations of {countings[0].rule_id}>"
    exec(compile("\n".join(lines), name, "exec"), scope)  # noqa: S102 - our own source
    observe: Observer = scope["observe"]
    return observe
