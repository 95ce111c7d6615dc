"""The detection engine: events in, alerts out. Pure: no root, no BCC, no I/O.

The same engine runs embedded in ``sandtrace run``/``watch`` and, later, in the detection
service. Per event it evaluates the rules of the event's log source, feeds correlation
windows, checks the sandbox's egress allow-list, and folds repeats of one rule for one
process into a single alert with a count.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec.structs

from api.events import Alert, AnyEvent, ConnectEvent, DnsEvent, Event, LostEvent, Process
from api.ids import uuid7
from detect.codegen import generate_matcher
from detect.correlation import NS, Counting, Distinct, Observer, Window, Windows, observer
from detect.egress import (
    DNS_PORT,
    EGRESS_RULE,
    RESOLVER_RULE,
    BuiltinRule,
    EgressPolicies,
    EgressPolicy,
)
from detect.fields import GETTERS, Getter, category_of_type
from detect.ruleset import Correlation, Rule, RuleSet


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


LOSS_RULE_ID = "b5b92233-ff88-416e-b4e0-1dcb228952ff"
LOSS_TAGS = ["attack.defense-evasion", "attack.t1562.006"]  # impair defenses: indicator blocking
LOSS_RULE = BuiltinRule(LOSS_RULE_ID, "Events were lost", "medium", LOSS_TAGS)
LOSS_RECURRING = BuiltinRule(LOSS_RULE_ID, "Events were lost again", "high", LOSS_TAGS)
LOSS_RECUR_NS = 600 * NS
SWEEP_NS = 10 * NS
"""Expiry looks over the correlation windows at most this often (event time): a window
outlives its timespan by up to this much, and a second's expiry costs nothing per window."""
"""A loss within this time of the previous one from the same host is high, not medium: a
flood that keeps the probes' buffers full is itself a way to hide."""
_NO_PROCESS = Process(pid=0, tid=0, ns_pid=0, ppid=0, uid=0, gid=0, comm=b"", start_ns=0, key="")


def loss_summary(event: LostEvent) -> str:
    """What a LostEvent says was lost, in words: every non-zero count, by kind."""
    parts = []
    if event.kernel:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(event.kernel.items()))
        parts.append(f"kernel buffer full: {kinds}")
    if event.user:
        parts.append(f"collector queue full: {event.user}")
    if event.spool:
        parts.append(f"spool or buffer to the service full: {event.spool}")
    if event.errors:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(event.errors.items()))
        parts.append(f"probe state lost: {kinds}")
    if event.sandboxes:
        counts = ", ".join(f"{k} {n}" for k, n in sorted(event.sandboxes.items()))
        parts.append(f"in sandboxes: {counts}")
    where = f" (collector {event.collector})" if event.collector else ""
    return "; ".join(parts) + where


Matcher = Callable[[AnyEvent], list[int]]
"""A compiled matcher: the indices of its category's rules an event matches."""
_Action = tuple[Rule, bool, Observer | None]
"""What a match of a rule does: the rule, whether it alerts, the correlations it feeds."""

MAX_EVENTS = 32
"""An alert lists at most this many of the events that raised it (a summary, of those it
folds): the first half and the latest half, in the order they happened; `omitted` counts
the others. A correlation over a flood, or an hour of repeats, stays one bounded alert."""
_HEAD = MAX_EVENTS // 2
_TAIL = MAX_EVENTS - _HEAD


def bounded(events: list[Any]) -> tuple[list[Any], int]:
    """`events` cut to MAX_EVENTS (the first and the latest), and how many were left out."""
    if len(events) <= MAX_EVENTS:
        return events, 0
    return events[:_HEAD] + events[-_TAIL:], len(events) - MAX_EVENTS


def destination(event: ConnectEvent) -> str:
    """A connect's destination as an egress alert names it: protocol, address and port,
    and the name the sandbox resolved the address as when there is one (a TLS server name
    said as such: the client chose it)."""
    where = f"{event.protocol} {event.daddr}:{event.dport}"
    if event.hostname_source == "sni":
        return f"{where} (TLS server name {event.hostname})"
    return f"{where} ({event.hostname})" if event.hostname else where


def egress_description(events: Sequence[Any], omitted: int = 0) -> str:
    """What an egress alert says: the destinations of the connects it lists, never one it
    does not list."""
    where = list(dict.fromkeys(destination(e) for e in events if type(e) is ConnectEvent))
    named = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
    verb = "is" if len(where) == 1 else "are"
    rest = f" ({omitted} more connects not listed)" if omitted else ""
    return f"{named} {verb} not on the allow-list{rest}"


@dataclass(slots=True)
class _Fold:
    """An alert raised for a rule and a process, and the repeats folded into it until
    `until_ns`: the events of all of them, bounded as an alert's are (kept from the first
    repeat on: an alert that never repeats costs nothing more)."""

    alert: Alert
    until_ns: int
    extra: int = 0
    head: list[Any] | None = None
    tail: deque[Any] | None = None
    omitted: int = 0

    def add(self, event: Any) -> None:
        """One more event folded (the first call takes the alert's own events first)."""
        head, tail = self.head, self.tail
        if head is None or tail is None:
            head, tail = self.head, self.tail = [], deque(maxlen=_TAIL)
            self.omitted = self.alert.omitted
            for first in self.alert.events:
                self.add(first)
        if len(head) < _HEAD:
            head.append(event)
            return
        if len(tail) == _TAIL:
            self.omitted += 1
        tail.append(event)

    def events(self) -> list[Any]:
        return [*(self.head or ()), *(self.tail or ())]


class Engine:
    def __init__(
        self,
        rules: RuleSet,
        egress: EgressPolicy | EgressPolicies | None = None,
        fold_seconds: float = 60.0,
        matchers: dict[type, Matcher] | None = None,
    ) -> None:
        """`matchers`: the compiled matchers of `rules` by event type, to share among the
        engines of one rule set (the service's, one per host): filled by the first engine,
        reused by the others. Half a megabyte and 30 ms each otherwise, and their caches of
        executable paths are then one for all hosts."""
        self.rules = rules
        self.egress = EgressPolicies(default=egress) if isinstance(egress, EgressPolicy) else egress
        self.fold_ns = int(fold_seconds * NS)
        self._by_category: dict[str, list[Rule]] = {}
        for rule in rules.rules:
            self._by_category.setdefault(rule.category, []).append(rule)
        # per correlation id, its windows by group-by value (a tuple of several)
        self._windows: dict[str, Windows] = {c.id: {} for c in rules.correlations}
        self._window_ns = {c.id: int(c.seconds * NS) for c in rules.correlations}
        self._folds: dict[tuple[str, str], _Fold] = {}
        self._fold_ends: list[tuple[int, tuple[str, str]]] = []  # heap of (until_ns, key)
        self._swept_ns = -SWEEP_NS  # when expire last looked over the correlation windows
        self._last_loss_ns: dict[str, int] = {}  # per host
        # rule id -> the correlations that count it (they refer to rules by name or id), each
        # with what it counts of that rule's events
        self._correlations_of: dict[str, list[tuple[Correlation, Counting]]] = {}
        # Rules a correlation counts do not alert on their own, unless it says `generate`
        # (Sigma's default).
        self.silent: set[str] = set()  # ids of rules that only feed correlations
        for corr in rules.correlations:
            for rule in rules.rules:
                if rule.name in corr.rules or rule.id in corr.rules:
                    counting = Counting(corr, rule)
                    self._correlations_of.setdefault(rule.id, []).append((corr, counting))
                    if not corr.generate:
                        self.silent.add(rule.id)
        # event type -> a matcher generated for its fields, its getters, and per rule of its
        # category what a match does: (rule, whether it alerts, the correlations it feeds)
        self._plan: dict[type, tuple[Matcher, list[_Action]]] = {}
        for etype, getters in GETTERS.items():
            category = category_of_type(etype)
            if category in self._by_category:
                rs = self._by_category[category]
                actions = [(r, r.id not in self.silent, self._observer(r, getters)) for r in rs]
                matcher = matchers.get(etype) if matchers is not None else None
                if matcher is None:
                    matcher = generate_matcher(rs, getters)
                    if matchers is not None:
                        matchers[etype] = matcher
                self._plan[etype] = (matcher, actions)

    # -- public -----------------------------------------------------------------------------

    def feed(self, event: AnyEvent) -> list[Alert]:
        if type(event) is LostEvent:
            return self._loss(event)
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
        egress = self.egress  # read once: a reload swaps the whole mapping between events
        if egress is not None:
            if type(event) is ConnectEvent:
                self._egress(out, egress, event)
            elif type(event) is DnsEvent:
                self._dns(out, egress, event)
        return out

    def _egress(self, out: list[Alert], egress: EgressPolicies, event: ConnectEvent) -> None:
        """The egress check of a connect or UDP send: DNS (port 53) by the sandbox's
        resolvers when it has some, every other destination by its allow-list."""
        if event.family == "unix" or event.denied:
            # A unix socket's connect is local IPC, not egress; one the kernel refused
            # (--enforce) is the denial rule's to report, not the audit's.
            return
        policy = egress.per_sandbox.get(event.sandbox, egress.default)  # policy_for
        if policy is None:
            return
        if event.dport == DNS_PORT and policy.resolvers:
            if not policy.is_resolver(event.daddr):
                self._raise(
                    out,
                    RESOLVER_RULE,
                    f"DNS to {destination(event)}, not one of the sandbox's resolvers "
                    f"({', '.join(map(str, policy.resolvers))})",
                    event,
                )
        # Only a name from a DNS answer the sandbox received can allow: a TLS server name is
        # whatever the client put in its ClientHello, and would let any address pass as an
        # allowed name (in-kernel enforcement, at connect time, has no ClientHello either).
        elif not policy.allows(
            event.daddr, event.dport, event.hostname if event.hostname_source == "dns" else ""
        ):
            self._raise(out, EGRESS_RULE, f"{destination(event)} is not on the allow-list", event)

    def _dns(self, out: list[Alert], egress: EgressPolicies, event: DnsEvent) -> None:
        """A DNS answer the sandbox received from a server that is not one of its
        resolvers (a query sent there, answered)."""
        policy = egress.per_sandbox.get(event.sandbox, egress.default)
        if policy is None or not policy.resolvers or not event.resolver:
            return
        if not policy.is_resolver(event.resolver):
            self._raise(
                out,
                RESOLVER_RULE,
                f"DNS answer for {event.query_name} {event.query_type} from "
                f"{event.resolver}:{event.resolver_port}, not one of the sandbox's resolvers "
                f"({', '.join(map(str, policy.resolvers))})",
                event,
            )

    def _loss(self, event: LostEvent) -> list[Alert]:
        """An alert for events lost: whatever was lost may have been the one that mattered
        (a flood hides what follows it). Medium; high when it recurs."""
        if not (sum(event.kernel.values()) or event.user or event.spool or event.errors):
            return []
        last = self._last_loss_ns.get(event.host)
        self._last_loss_ns[event.host] = event.time_ns
        rule = LOSS_RULE if last is None or event.time_ns - last > LOSS_RECUR_NS else LOSS_RECURRING
        return [
            Alert(
                alert_id=uuid7(),
                rule_id=rule.id,
                title=rule.title,
                level=rule.level,
                tags=list(rule.tags),
                description=f"events of traced processes were lost: {loss_summary(event)}",
                time_ns=event.time_ns,
                host=event.host,
                sandbox=",".join(sorted(event.sandboxes)),
                process=_NO_PROCESS,
                events=[event],
                raised_ns=time.time_ns(),
            )
        ]

    def expire(self, now_ns: int) -> list[Alert]:
        """Close fold windows that have ended by `now_ns` (event time: the clock of the host
        the events come from; repeats they folded come out as summaries, in the order their
        windows ended) and forget correlation windows with nothing recent in them and losses
        too old to make the next one recur, so memory stays bounded by what is active.

        Called every second (by the service, for every host): folds are found by when they
        end (a heap), not by a pass over all of them; correlation windows are looked over
        at most every SWEEP_NS of event time."""
        if now_ns - self._swept_ns >= SWEEP_NS:
            self._swept_ns = now_ns
            for cid, windows in self._windows.items():
                horizon = now_ns - self._window_ns[cid]
                for wkey, window in list(windows.items()):
                    if window.last() < horizon:
                        del windows[wkey]
            for host, at in list(self._last_loss_ns.items()):
                if now_ns - at > LOSS_RECUR_NS:
                    del self._last_loss_ns[host]
        out = []
        ends, folds = self._fold_ends, self._folds
        while ends and ends[0][0] <= now_ns:
            until, key = heapq.heappop(ends)
            fold = folds.get(key)
            if fold is not None and fold.until_ns <= until:  # not one raised since
                del folds[key]
                if fold.extra:
                    out.append(self._summary(fold))
        return out

    def flush(self) -> list[Alert]:
        return self.expire(1 << 62)

    def idle(self) -> bool:
        """Nothing held: no fold open, no correlation window, no recent loss. An idle
        engine can be dropped without changing what a new one would raise."""
        return not (self._folds or self._last_loss_ns or any(self._windows.values()))

    # -- internals --------------------------------------------------------------------------

    def _raise(
        self,
        out: list[Alert],
        rule: RuleInfo,
        description: str,
        event: Event,
        raised: list[Any] | None = None,
    ) -> None:
        """An alert for `rule` on `event` (the last of `raised`, the events that raised it
        when there are several), or a count on the one already raised for this rule and
        process within the fold window."""
        key = (rule.id, event.process.key)
        fold = self._folds.get(key)
        if fold is not None and event.time_ns < fold.until_ns:
            fold.extra += 1
            if raised is None:
                fold.add(event)
            else:
                for each in raised:
                    fold.add(each)
            return
        if fold is not None and fold.extra:
            out.append(self._summary(fold))
        events, omitted = ([event], 0) if raised is None else bounded(raised)
        alert = Alert(
            alert_id=uuid7(),
            rule_id=rule.id,
            title=rule.title,
            level=rule.level,
            tags=list(rule.tags),
            description=description,
            time_ns=event.time_ns,
            host=event.host,
            sandbox=event.sandbox,
            process=event.process,
            events=events,
            omitted=omitted,
            raised_ns=time.time_ns(),
        )
        until = event.time_ns + self.fold_ns
        self._folds[key] = _Fold(alert, until)
        heapq.heappush(self._fold_ends, (until, key))
        out.append(alert)

    def _summary(self, fold: _Fold) -> Alert:
        """The repeats folded into an alert: a new alert (its own id, `folds` naming the
        first) counting them all and listing their events, the first alert's included."""
        events = fold.events()
        description = fold.alert.description
        if fold.alert.rule_id == EGRESS_RULE.id:  # the destinations it lists, not the first's
            description = egress_description(events, fold.omitted)
        return msgspec.structs.replace(
            fold.alert,
            alert_id=uuid7(),
            description=description,
            count=fold.extra + 1,
            repeat=True,
            folds=fold.alert.alert_id,
            time_ns=events[-1].time_ns,
            events=events,
            omitted=fold.omitted,
            raised_ns=time.time_ns(),
        )

    def _observer(self, rule: Rule, getters: Mapping[str, Getter]) -> Observer | None:
        """What a match of `rule` does to the windows of the correlations that count it
        (detect.correlation.observer), for the event type of `getters`."""
        countings = [c for _, c in self._correlations_of.get(rule.id, [])]
        return observer(countings, getters, self._windows, self._fire)

    def _fire(
        self,
        out: list[Alert],
        counting: Counting,
        window: Window | Distinct,
        seen: int,
        event: Event,
    ) -> None:
        corr = counting.corr
        detail = f"{corr.kind} {seen} in {corr.seconds:g}s"
        raised = window.raised(counting)
        self._raise(out, corr, f"{corr.description} ({detail})".strip(), event, raised)
        window.clear()  # the next alert needs a window of its own
