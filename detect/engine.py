"""The detection engine: events in, alerts out. Pure: no root, no BCC, no I/O.

The same engine runs embedded in ``sandtrace run``/``watch`` and, later, in the detection
service. Per event it evaluates the rules of the event's log source, feeds correlation
windows, checks the sandbox's egress allow-list, and folds repeats of one rule for one
process into a single alert with a count.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import textwrap
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec.structs

from api.events import Alert, AnyEvent, ConnectEvent, Event
from detect.fields import (
    ALWAYS_STR,
    CONSTANT,
    DECODES,
    GETTERS,
    category_of_type,
    text_expression,
)
from detect.sigma import CodeContext, Correlation, Rule, RuleSet, ip_int

EGRESS_RULE_ID = "sandtrace-egress-allow-list"


class RuleInfo(Protocol):
    """What an alert names of its rule (a Rule, a Correlation, or a built-in check)."""

    @property
    def id(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def level(self) -> str: ...
    @property
    def tags(self) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class BuiltinRule:
    id: str
    title: str
    level: str
    tags: list[str]


EGRESS_RULE = BuiltinRule(
    EGRESS_RULE_ID,
    "Connection outside the sandbox's egress allow-list",
    "high",
    ["attack.exfiltration", "attack.command_and_control", "attack.t1041"],
)
NS = 1_000_000_000
_EGRESS_ANSWERS = 4096  # (address, port) answers an egress policy keeps


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """Destinations a sandbox may connect to: networks, each with optional ports."""

    allowed: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, frozenset[int]], ...] = ()
    # `allowed` as (version, netmask, network, ports) integers
    _ints: list[tuple[int, int, int, frozenset[int]]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )
    _answers: dict[tuple[str, int], bool] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._ints.extend(
            (net.version, int(net.netmask), int(net.network_address), ports)
            for net, ports in self.allowed
        )

    @classmethod
    def parse(cls, specs: Iterable[str]) -> EgressPolicy:
        """Entries like ``192.0.2.0/24``, ``198.51.100.7:443``, ``10.0.0.0/8:80,443``,
        ``2001:db8::/32`` and, with ports, ``[2001:db8::/32]:53``. ValueError names a bad one."""
        allowed = []
        for spec in specs:
            if spec.startswith("["):
                net_part, _, rest = spec[1:].partition("]")
                ports_part = rest.removeprefix(":")
            elif spec.count(":") == 1:
                net_part, _, ports_part = spec.partition(":")
            else:
                net_part, ports_part = spec, ""
            try:
                net = ipaddress.ip_network(net_part, strict=False)
                ports = frozenset(int(p) for p in ports_part.split(",") if p)
            except ValueError as exc:
                raise ValueError(f"egress allow-list entry {spec!r}: {exc}") from None
            allowed.append((net, ports))
        return cls(tuple(allowed))

    def allows(self, addr: str, port: int) -> bool:
        # Sandboxes connect to the same few destinations again and again: answers are kept
        # (a bounded number, forgotten all at once when full; the list never changes).
        key = (addr, port)
        answer = self._answers.get(key)
        if answer is None:
            if len(self._answers) >= _EGRESS_ANSWERS:
                self._answers.clear()
            answer = self._answers[key] = self._allows(addr, port)
        return answer

    def _allows(self, addr: str, port: int) -> bool:
        parsed = ip_int(addr)
        if parsed is None:
            return False
        # Integer compares, in the order of the list: ipaddress's `in` and is_loopback cost
        # more than all the rest of the check.
        version, value = parsed
        if value >> 24 == 127 if version == 4 else value == 1:
            return True  # the sandbox talking to itself (127.0.0.0/8, ::1)
        for net_version, mask, network, ports in self._ints:
            if net_version == version and value & mask == network and (not ports or port in ports):
                return True
        return False


@dataclass(slots=True)
class EgressPolicies:
    """Egress allow-lists per sandbox, and one for every sandbox not named."""

    default: EgressPolicy | None = None
    per_sandbox: dict[str, EgressPolicy] = field(default_factory=dict)

    @classmethod
    def parse(cls, specs: Iterable[str]) -> EgressPolicies:
        """Entries as EgressPolicy.parse takes them, each optionally prefixed ``SANDBOX=``
        (a sandbox id) to apply to that sandbox only; a sandbox named in any entry gets
        only its own entries."""
        shared: list[str] = []
        named: dict[str, list[str]] = {}
        for spec in specs:
            sandbox, sep, rest = spec.partition("=")
            if sep:
                named.setdefault(sandbox, []).append(rest)
            else:
                shared.append(spec)
        return cls(
            default=EgressPolicy.parse(shared) if shared else None,
            per_sandbox={name: EgressPolicy.parse(entries) for name, entries in named.items()},
        )

    def policy_for(self, sandbox: str) -> EgressPolicy | None:
        return self.per_sandbox.get(sandbox, self.default)

    def __len__(self) -> int:
        own = sum(len(p.allowed) for p in self.per_sandbox.values())
        return own + (len(self.default.allowed) if self.default else 0)


@dataclass(slots=True)
class _Fold:
    alert: Alert
    until_ns: int
    extra: int = 0
    last: Event | None = None


class Engine:
    def __init__(
        self,
        rules: RuleSet,
        egress: EgressPolicy | EgressPolicies | None = None,
        fold_seconds: float = 60.0,
    ) -> None:
        self.rules = rules
        self.egress = EgressPolicies(default=egress) if isinstance(egress, EgressPolicy) else egress
        self.fold_ns = int(fold_seconds * NS)
        self._by_category: dict[str, list[Rule]] = {}
        for rule in rules.rules:
            self._by_category.setdefault(rule.category, []).append(rule)
        # per correlation id, its windows by group-by value (a tuple of several)
        self._windows: dict[str, dict[Any, _Window | _Distinct]] = {
            c.id: {} for c in rules.correlations
        }
        self._window_ns = {c.id: int(c.seconds * NS) for c in rules.correlations}
        self._folds: dict[tuple[str, str], _Fold] = {}
        self._ids = itertools.count(1)
        # rule id -> the correlations that count it (they refer to rules by name or id), each
        # with what it counts of that rule's events
        self._correlations_of: dict[str, list[tuple[Correlation, _Counting]]] = {}
        # Rules a correlation counts do not alert on their own, unless it says `generate`
        # (Sigma's default).
        self.silent: set[str] = set()  # ids of rules that only feed correlations
        for corr in rules.correlations:
            for rule in rules.rules:
                if rule.name in corr.rules or rule.id in corr.rules:
                    counting = _Counting(corr, rule)
                    self._correlations_of.setdefault(rule.id, []).append((corr, counting))
                    if not corr.generate:
                        self.silent.add(rule.id)
        # event type -> a matcher generated for its fields, its getters, and per rule of its
        # category what a match does: (rule, whether it alerts, the correlations it feeds)
        self._plan: dict[type, tuple[Callable[[Any], list[int]], list[_Action]]] = {}
        for etype, getters in GETTERS.items():
            category = category_of_type(etype)
            if category in self._by_category:
                rs = self._by_category[category]
                actions = [
                    (r, r.id not in self.silent, self._observer(
                        [c for _, c in self._correlations_of.get(r.id, [])], getters))
                    for r in rs
                ]  # fmt: skip
                self._plan[etype] = (generate_matcher(rs, getters), actions)

    # -- public -----------------------------------------------------------------------------

    def feed(self, event: AnyEvent) -> list[Alert]:
        out: list[Alert] = []
        plan = self._plan.get(type(event))
        if plan is not None:
            matcher, actions = plan
            for index in matcher(event):
                rule, alerts, observe = actions[index]
                if alerts:
                    self._raise(out, rule, rule.description, event)  # type: ignore[arg-type]
                if observe is not None:
                    observe(out, event)  # type: ignore[arg-type]
        if type(event) is ConnectEvent and (egress := self.egress) is not None:
            policy = egress.per_sandbox.get(event.sandbox, egress.default)  # policy_for
            if policy is not None and not policy.allows(event.daddr, event.dport):
                where = f"{event.protocol} {event.daddr}:{event.dport}"
                self._raise(out, EGRESS_RULE, f"{where} is not on the allow-list", event)
        return out

    def expire(self, now_ns: int) -> list[Alert]:
        """Close fold windows that have ended (repeats they folded come out as summaries) and
        forget correlation windows with nothing recent in them, so memory stays bounded by
        what is active."""
        for cid, windows in self._windows.items():
            horizon = now_ns - self._window_ns[cid]
            for wkey, window in list(windows.items()):
                if window.last() < horizon:
                    del windows[wkey]
        out = []
        for fkey, fold in list(self._folds.items()):
            if fold.until_ns <= now_ns:
                del self._folds[fkey]
                if fold.extra:
                    out.append(self._summary(fold))
        return out

    def flush(self) -> list[Alert]:
        return self.expire(1 << 62)

    # -- internals --------------------------------------------------------------------------

    def _raise(self, out: list[Alert], rule: RuleInfo, description: str, event: Event) -> None:
        """An alert for `rule` on `event`, or a count on the one already raised for this rule
        and process within the fold window."""
        key = (rule.id, event.process.key)
        fold = self._folds.get(key)
        if fold is not None and event.time_ns < fold.until_ns:
            fold.extra += 1
            fold.last = event
            return
        if fold is not None and fold.extra:
            out.append(self._summary(fold))
        alert = Alert(
            alert_id=f"{event.host}-{next(self._ids)}",
            rule_id=rule.id,
            title=rule.title,
            level=rule.level,
            tags=list(rule.tags),
            description=description,
            time_ns=event.time_ns,
            host=event.host,
            sandbox=event.sandbox,
            process=event.process,
            events=[event],
            raised_ns=time.time_ns(),
        )
        self._folds[key] = _Fold(alert, event.time_ns + self.fold_ns)
        out.append(alert)

    def _summary(self, fold: _Fold) -> Alert:
        last = fold.last if fold.last is not None else fold.alert.events[-1]
        return msgspec.structs.replace(
            fold.alert,
            count=fold.extra + 1,
            repeat=True,
            time_ns=getattr(last, "time_ns", fold.alert.time_ns),
            events=[last],
            raised_ns=time.time_ns(),
        )

    def _observer(
        self, countings: list[_Counting], getters: Mapping[str, Callable[[Any], Any]]
    ) -> Callable[[list[Alert], Event], None] | None:
        """What a match of a correlated rule does, for one event type (None when no
        correlation counts the rule): per correlation, add the event to its window and alert
        when the count is reached. One function is generated per rule, its settings inlined
        and the window key and the counted value read as the matchers read fields: every
        TCP connect comes here with the built-in pack (two value_count correlations), and
        calls per correlation cost more than the dict and deque work itself. A value_count
        window (_Distinct) is one dict store per event, looked back over only when full."""
        if not countings:
            return None
        ctx = CodeContext(getters)
        scope: dict[str, Any] = {"_Window": _Window, "_Distinct": _Distinct, "fire": self._fire}
        reads: dict[str, str] = {}  # each field read once, whatever reads it

        def read(name: str | None) -> str:
            getter = getters.get(name) if name is not None else None
            if getter is None:  # fields the type lacks are None, as FieldDict gives them
                return "None"
            return reads.setdefault(ctx.read(getter), f"a{len(reads)}")

        body = []
        for n, counting in enumerate(countings):
            scope[f"G{n}"], scope[f"W{n}"] = counting, self._windows[counting.corr.id]
            parts = [read(f) for f in counting.group_by]
            key = parts[0] if len(parts) == 1 else f"({''.join(p + ', ' for p in parts)})"
            if counting.field is not None:
                value = read(counting.field)
            else:
                scope[f"V{n}"], value = counting.value, f"V{n}"
            horizon = f"now - {counting.window_ns}"
            window = "_Window" if counting.field is None else "_Distinct"
            body += [
                f"    # {counting.corr.kind} {counting.corr.id}",
                f"    w = W{n}.get({key})",
                "    if w is None:",
                f"        w = W{n}[{key}] = {window}()",
                f"    v = {value}",
            ]
            if counting.field is not None:  # value_count: when each value was last seen
                getter = getters.get(counting.field)
                counted = "v" if getter in ALWAYS_STR else 'v is not None and v != ""'
                body += [
                    f"    if {counted}:  # an absent or empty value is not counted",
                    "        d = w.seen",
                    "        d[v] = now",
                ]
                if counting.op is not None:  # the window is looked at once it may be full
                    test = f"len(d) {counting.op} {counting.ref!r}"
                    body += [
                        f"        if {test}:",
                        f"            w.forget({horizon})",
                        f"            if {test}:",
                        f"                fire(out, G{n}, w, len(d), e)",
                    ]
                continue
            body += [
                "    x, d = w.entries, w.values",
                "    x.append((now, v))",
                "    d[v] += 1",
            ]
            if counting.corr.kind == "temporal_ordered":
                body.append("    w.place(v)")
            body += [f"    if x[0][0] < {horizon}:", f"        w.forget({horizon})"]
            if counting.op is None:
                continue
            kind = counting.corr.kind
            if kind == "temporal_ordered":
                scope[f"O{n}"] = counting.corr.rules
                seen = f"w.ordered_prefix(O{n})"
            elif kind == "temporal":  # distinct rules
                seen = "len(d)"
            else:  # event_count
                seen = "len(x)"
            body += [
                f"    s = {seen}",
                f"    if s {counting.op} {counting.ref!r}:",
                f"        fire(out, G{n}, w, s, e)",
            ]
        lines = ["def observe(out, e):", "    now = e.time_ns"]
        lines += [f"    {local} = {source}" for source, local in reads.items()]
        lines += body
        scope.update(ctx.namespace())
        name = f"<correlations of {countings[0].rule_id}>"
        exec(compile("\n".join(lines), name, "exec"), scope)  # noqa: S102 - our own source
        observe: Callable[[list[Alert], Event], None] = scope["observe"]
        return observe

    def _fire(self, out: list[Alert], counting: _Counting, window: _Window | _Distinct, seen: int,
              event: Event) -> None:  # fmt: skip
        corr = counting.corr
        detail = f"{corr.kind} {seen} in {corr.seconds:g}s"
        self._raise(out, corr, f"{corr.description} ({detail})".strip(), event)
        window.clear()  # the next alert needs a window of its own


class _Counting:
    """What a correlation counts of one of its rules' events, worked out once."""

    __slots__ = ("corr", "field", "group_by", "op", "ref", "rule_id", "value", "window_ns")

    def __init__(self, corr: Correlation, rule: Rule) -> None:
        self.corr = corr
        self.rule_id = rule.id
        self.group_by = tuple(corr.group_by)
        self.window_ns = int(corr.seconds * NS)
        temporal = corr.kind.startswith("temporal")
        # value_count counts distinct values of a field; temporal ones, distinct rules
        self.field = (corr.field or "") if corr.kind == "value_count" else None
        self.value: Any = None
        if temporal:
            self.value = rule.name if rule.name in corr.rules else rule.id
        self.op = _OPS.get(corr.op)  # Python's operator, or None: never alerts
        self.ref = len(corr.rules) if temporal else corr.count


_Action = tuple[Rule, bool, Callable[[list[Alert], Event], None] | None]


class _Distinct:
    """A value_count correlation's window: when each value was last seen. The values seen
    within the timespan are those last seen since its start; the others are forgotten when
    the count might be reached, so the window holds at most about as many as it counts to."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen: dict[Any, int] = {}

    def forget(self, horizon: int) -> None:
        seen = self.seen
        for value in [v for v, at in seen.items() if at < horizon]:
            del seen[value]

    def last(self) -> int:
        return max(self.seen.values(), default=0)

    def clear(self) -> None:
        self.seen.clear()


class _Window:
    """Entries within a correlation's timespan, with a running count of distinct values and,
    for ordered correlations, where each value stands in the sequence."""

    __slots__ = ("entries", "next", "positions", "values")

    def __init__(self) -> None:
        self.entries: deque[tuple[int, Any]] = deque()
        self.values: defaultdict[Any, int] = defaultdict(int)  # value -> entries holding it
        self.positions: dict[Any, deque[int]] = {}  # value -> its entries' sequence numbers
        self.next = 0

    def place(self, value: Any) -> None:
        """Record the position of the entry just appended (ordered correlations only)."""
        self.positions.setdefault(value, deque()).append(self.next)
        self.next += 1

    def forget(self, horizon: int) -> None:
        """Drop the entries older than `horizon` (the newest always stays)."""
        positions = self.positions
        while self.entries[0][0] < horizon:
            _, old = self.entries.popleft()
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
        at, n = -1, 0
        for name in order:
            places = self.positions.get(name)
            if not places:
                break
            i = bisect.bisect_right(places, at)
            if i == len(places):
                break
            at, n = places[i], n + 1
        return n

    def last(self) -> int:
        return self.entries[-1][0] if self.entries else 0

    def clear(self) -> None:
        self.entries.clear()
        self.values.clear()
        self.positions.clear()


def generate_matcher(
    rules: list[Rule], getters: Mapping[str, Callable[[Any], Any]] | None = None
) -> Callable[[Any], list[int]]:
    """One Python function that tests every rule of a category against an event's fields,
    returning the indices of those that match. Each field a string test reads is lowered
    once, when first needed; tests are inlined as C-level str/set/tuple/regex calls; anything else
    calls the rule's compiled closure. Same semantics as Rule.test, which tests check.

    Rules are indexed by their guards (see detect.sigma.Node.guard): the function first looks
    the event up by the last path element of a field, the needles its text contains (one
    Aho-Corasick pass per text; a command line's in its argv's), how often it holds a
    character and its numbers, and enters only the rules one of whose atoms holds, plus
    those without a guard, testing them in groups of eight. A path field's part of the
    index is worked out once per value (_memoised).

    Without getters the function takes a FieldDict. With `getters` (those of the one event
    type it will see) it takes the event and reads fields straight from it; it makes a
    FieldDict only if a test it calls as a closure needs one."""
    ctx = CodeContext(getters)
    always = 0
    index: dict[tuple[str, str], dict[Any, int]] = {}
    for i, rule in enumerate(rules):
        guard = rule.node.guard()
        if guard is None or any(_holds(getters, atom) for atom in guard):
            always |= 1 << i
            continue
        for atom in guard:
            if _holds(getters, atom) is False:
                continue  # a fixed value that is never this one
            kind, (var, key) = atom[0], atom[1:]
            if kind == "needle":
                var, key = ctx.needle_home(var, key)
            table = index.setdefault((kind, var), {})
            table[key] = table.get(key, 0) | 1 << i
            if kind == "needle":
                ctx.needles.setdefault(var, set()).add(key)
    # Fields whose values repeat (a host runs few executables) have their part of the index
    # worked out once per value: lowered, looked up, searched, kept with what it gave.
    # Each is keyed by the bytes it decodes when it decodes one attribute, else by its text.
    memo = {
        var[2:]: DECODES.get(getters[var[2:]])
        for _, var in index
        if getters is not None and var[2:] in _MEMO_FIELDS
    }
    derived = {f"{f}_{name}" for name in memo for f in ("v", "r")}
    # raw forms first: the lowered and joined forms of a field read its raw local on the way
    loaded = {var for _, var in index if var not in derived}
    loaded |= {f"r_{name}" for name, source in memo.items() if source is None}
    assigned: set[str] = set()
    loads = []
    for var in sorted(loaded, key=lambda var: (var[0] != "r", var)):
        loads.append(f"    {var} = {ctx.load(var, assigned)}")
        assigned.add(var)
    namespace: dict[str, Any] = {}
    tables = {key: f"T{n}" for n, key in enumerate(sorted(index))}
    for name, source in sorted(memo.items()):
        own = {entry: index[entry] for entry in index if entry[1] in (f"v_{name}", f"r_{name}")}
        code, out = _memoised(name, source, own, tables=tables, ctx=ctx,
                              namespace=namespace)  # fmt: skip
        loads += code
        assigned.update(out)
    # Every rule is tested after the index has read its fields: no first-use checks for those.
    ctx.preloaded = {var for _, var in index}
    ctx.preloaded |= {f"p_{var}" for kind, var in index if kind == "needle"}
    ctx.preloaded |= ctx.raw_loaded  # lowered forms read the raw value on the way
    exprs = [rule.node.code(ctx) for rule in rules]
    if getters is None:
        lines, unset = ["def match(f):", "    low = f.low"], []
    else:  # the event itself; a FieldDict only for the closures some tests call
        lines, unset = ["def match(e):"], ["f"]
    # Fields load on first use (see detect.sigma._lazy): most rules stop at their first test.
    # Every local starts unset (_U) but those the index loads, in one chained assignment.
    unset += [f"i_{name}" for name in sorted(ctx.ip_fields)]
    unset += [f"k_{name}" for name in sorted(ctx.raw_joined_fields)]
    unset += [f"v_{name}" for name in sorted(ctx.low_fields)]
    unset += [f"r_{name}" for name in sorted(ctx.raw_fields)]
    unset += [f"j_{name}" for name in sorted(ctx.joined_fields)]
    unset += [f"p_{var}" for var in sorted(ctx.needles)]
    unset = [var for var in unset if var not in assigned]
    if unset:
        lines.append(f"    {' = '.join(unset)} = _U")
    lines.append(f"    cand = {always}")
    lines += loads
    for key, table in sorted(index.items()):
        if key[1] not in derived:
            lines += _index_lines(*key, table, tables[key], namespace)
    lines.append("    found = []")
    tests = [
        f"if cand & {1 << i} and {expr}:\n    found.append({i})" for i, expr in enumerate(exprs)
    ]
    if len(tests) <= _GROUP:
        lines += [textwrap.indent(test, "    ") for test in tests]
    else:  # most events enter one rule or none: rules in groups, a group tested only when
        lines.append("    if cand:")  # one of its rules is a candidate
        for start in range(0, len(tests), _GROUP):
            group = tests[start : start + _GROUP]
            lines.append(f"        if cand & {((1 << len(group)) - 1) << start}:")
            lines += [textwrap.indent(test, " " * 12) for test in group]
    lines.append("    return found")
    masks = {var: table for (kind, var), table in index.items() if kind == "needle"}
    namespace.update(ctx.namespace(masks))
    namespace["_U"] = object()
    exec(compile("\n".join(lines), "<sandtrace rules>", "exec"), namespace)  # noqa: S102
    matcher: Callable[[Any], list[int]] = namespace["match"]
    return matcher


_GROUP = 8  # rules per group in a generated matcher
_MEMO_FIELDS = frozenset({"Image", "ParentImage", "OriginalFileName", "CurrentDirectory"})
_MEMO_SIZE = 4096  # values kept per field; all forgotten at once when full


def _memoised(
    name: str,
    source: str | None,
    own: Mapping[tuple[str, str], dict[Any, int]],
    *,
    tables: Mapping[tuple[str, str], str],
    ctx: CodeContext,
    namespace: dict[str, Any],
) -> tuple[list[str], list[str]]:
    """Field `name`'s part of the index (its entries `own`) as a function D_<name> of the
    field's value, run once per value and its results kept in M_<name>; the value is looked
    up by the bytes attribute `source` when the field decodes one (and decoded there), else
    by the text (r_<name>). The matcher's lines that look it up, and the locals they set."""
    raw = f"r_{name}"
    out = [var for var in (f"v_{name}",) if any(v == var for _, v in own)]
    out += [f"p_{var}" for kind, var in own if kind == "needle"]
    lines = []
    if source is None:
        body = [f"def D_{name}({raw}):", "    cand = 0"]
        lookup = raw
    else:  # the text is decoded here, once per value, and kept with the rest
        body = [f"def D_{name}(b):", f"    {raw} = {text_expression('b')}", "    cand = 0"]
        out.insert(0, raw)
        lookup = f"b_{name}"  # the bytes behind r_X
        lines.append(f"    {lookup} = {source}")
    body += [f"    {var} = _U" for var in out if var.startswith("p_")]
    if f"v_{name}" in out:
        body.append(f"    v_{name} = {ctx.load(f'v_{name}', {raw})}")
    for entry, table in sorted(own.items()):
        body += _index_lines(*entry, table, tables[entry], namespace)
    body.append(f"    return cand, {', '.join(out)}")
    exec(compile("\n".join(body), f"<sandtrace {name}>", "exec"), namespace)  # noqa: S102
    namespace[f"M_{name}"] = {}
    lines += [
        f"    m_{name} = M_{name}.get({lookup})",
        f"    if m_{name} is None:",
        f"        if len(M_{name}) >= {_MEMO_SIZE}:",
        f"            M_{name}.clear()",
        f"        m_{name} = M_{name}[{lookup}] = D_{name}({lookup})",
        f"    c, {', '.join(out)} = m_{name}",
        "    cand |= c",
    ]
    return lines, out


def _index_lines(kind: str, var: str, table: dict[Any, int], name: str,
                 namespace: dict[str, Any]) -> list[str]:  # fmt: skip
    """The code adding to `cand` the rules the index entry (kind, var) lets in (its table
    is `name` in the namespace; needles' rules ride in their automaton's values)."""
    if kind == "base":
        namespace[name] = table
        return [f"    if {var} is not None:",
                f"        cand |= {name}.get({var}.rpartition('/')[2], 0)"]  # fmt: skip
    if kind == "num":
        namespace[name] = table
        return [f"    if type({var}) is int:", f"        cand |= {name}.get({var}, 0)"]
    if kind == "eq":
        namespace[name] = table
        return [f"    if {var} is not None:", f"        cand |= {name}.get({var}, 0)"]
    lines = [f"    if {var} is not None:"]
    if kind == "minlen":  # each threshold's rules once the text is that long
        for width, mask in sorted(table.items()):
            lines += [f"        if len({var}) >= {width}:", f"            cand |= {mask}"]
    elif kind == "count":  # each character's rules once the text holds it that often
        for (char, times), mask in sorted(table.items()):
            lines += [
                f"        if {var}.count({char!r}) >= {times}:",
                f"            cand |= {mask}",
            ]
    else:  # the automaton's values carry each needle's rules: one loop sets both
        lines += [f"        p_{var} = set()", f"        for _, (n, m) in S_{var}({var}):",
                  f"            p_{var}.add(n)", "            cand |= m"]  # fmt: skip
    return lines


def _holds(
    getters: Mapping[str, Callable[[Any], Any]] | None, atom: tuple[str, str, Any]
) -> bool | None:
    """Whether an "eq" atom holds for every event (True) or none (False) because its field
    has one fixed value for the type (an Action or Initiated), None when it depends."""
    kind, var, key = atom
    getter = getters.get(var[2:]) if getters is not None and kind == "eq" else None
    if getter not in CONSTANT:
        return None
    return bool(CONSTANT[getter] == key)


_OPS = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<", "eq": "=="}
