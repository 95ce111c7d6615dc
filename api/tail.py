"""The live tail's protocol: where it is served, the filter a client asks for, and the
control messages beside the event frames (which are exactly api.events.encode(item)).

``GET /v1/tail`` upgrades to a WebSocket. The query chooses what the client gets; every
parameter is optional and anything else is refused with 400 before the upgrade:

    alerts_only=1        alerts (and loss reports) only
    sandbox=a,b          only these sandbox ids
    host=h1,h2           only these hosts
    kind=exec,connect    only these event kinds; an alert passes when one of the events
                         that raised it is of one of these kinds

Loss reports (LostEvent) say what a collector could not deliver; they pass every filter but
the host.

Frames, server to client:
  - binary: one event or alert, exactly api.events.encode(item) (msgpack, carrying the
    event wire version in "v");
  - text: a JSON control message with a "type": first ``hello`` with the server's event
    wire version and tail protocol version and the filter it applies, and, when the server
    cannot give everything the filter asks for, a ``notice`` saying why (e.g. a collector
    that streams to a service and detects nothing itself: no alerts here), then ``dropped``
    whenever this client fell behind: its queue was full, so ``count`` items were not sent
    to it (``total`` so far). Nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from api.events import EVENT_TYPES, WIRE_VERSION, Alert, AnyEvent, LostEvent

TAIL_PATH = "/v1/tail"
TAIL_PROTOCOL = 1
"""Version of the control messages. Bump on any incompatible change."""

DEFAULT_SOCKET = "/run/sandtrace/tail.sock"
FILTER_KINDS = frozenset(k for k in EVENT_TYPES if k not in {"alert", "lost"})
PARAMETERS = ("alerts_only", "sandbox", "host", "kind")
_TRUE, _FALSE = {"1", "true", "yes"}, {"0", "false", "no", ""}


class BadFilter(ValueError):
    """A tail query that cannot be served; the message says what is wrong."""


def _names(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.strip() for value in values for v in value.split(",") if v.strip())


@dataclass(frozen=True, slots=True)
class TailFilter:
    """What one client wants; empty sets mean no restriction."""

    alerts_only: bool = False
    sandboxes: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, query: Mapping[str, str] | Iterable[tuple[str, str]]) -> TailFilter:
        """From query parameters (repeated ones add up); BadFilter says what is wrong."""
        pairs = list(query.items()) if isinstance(query, Mapping) else list(query)
        unknown = sorted({k for k, _ in pairs} - set(PARAMETERS))
        if unknown:
            known = ", ".join(PARAMETERS)
            raise BadFilter(f"unknown parameter {', '.join(map(repr, unknown))}; known: {known}")
        values: dict[str, list[str]] = {}
        for key, value in pairs:
            values.setdefault(key, []).append(value)
        alerts_only = False
        for value in values.get("alerts_only", []):
            if value.lower() not in _TRUE | _FALSE:
                raise BadFilter(f"alerts_only wants 1 or 0, not {value!r}")
            alerts_only = value.lower() in _TRUE
        kinds = _names(values.get("kind", []))
        bad = sorted(kinds - FILTER_KINDS)
        if bad:
            known = ", ".join(sorted(FILTER_KINDS))
            raise BadFilter(f"unknown kind {', '.join(map(repr, bad))}; known: {known}")
        return cls(
            alerts_only=alerts_only,
            sandboxes=_names(values.get("sandbox", [])),
            hosts=_names(values.get("host", [])),
            kinds=kinds,
        )

    def query(self) -> dict[str, str]:
        """The query parameters that parse() turns back into this filter."""
        out = {"alerts_only": "1"} if self.alerts_only else {}
        for key, names in (("sandbox", self.sandboxes), ("host", self.hosts), ("kind", self.kinds)):
            if names:
                out[key] = ",".join(sorted(names))
        return out

    def matches(self, item: AnyEvent | Alert) -> bool:
        if self.hosts and item.host not in self.hosts:
            return False
        if isinstance(item, LostEvent):
            return True
        if self.sandboxes and item.sandbox not in self.sandboxes:
            return False
        if isinstance(item, Alert):
            return not self.kinds or any(getattr(e, "kind", "") in self.kinds for e in item.events)
        return not self.alerts_only and (not self.kinds or item.kind in self.kinds)


def hello_message(flt: TailFilter, notice: str = "") -> str:
    """The greeting; `notice`, when given, is for the client to show its user once."""
    message: dict[str, object] = {
        "type": "hello",
        "wire_version": WIRE_VERSION,
        "tail_version": TAIL_PROTOCOL,
        "filter": flt.query(),
    }
    if notice:
        message["notice"] = notice
    return json.dumps(message)


def dropped_message(count: int, total: int) -> str:
    return json.dumps({"type": "dropped", "count": count, "total": total})


def parse_control(text: str) -> dict[str, Any]:
    """A control message; ValueError when the text is not one."""
    try:
        message = json.loads(text)
    except ValueError:
        raise ValueError(f"control frame is not JSON: {text[:80]!r}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError(f"control frame has no type: {text[:80]!r}")  # noqa: TRY004
    return message
