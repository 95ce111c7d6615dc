"""Response orders: what an alert asks a collector to do to the sandbox it came from.

The same order serves both paths: a collector that detects itself (`run`/`watch`
``--kill-on``/``--freeze-on``) makes orders of its own alerts; the detection service, set
to respond (``kill_on``/``freeze_on``), makes them of the alerts it raises on a collector's
batch and sends them back in that batch's acknowledgement, over the connection the
collector opened and authenticated:

    {"ack": <seq>, "orders": [<order>, ...]}

where an order is a JSON map (ORDER_VERSION 1):

    {"v": 1, "action": "kill" | "freeze", "alert_id": "...", "rule_id": "...",
     "title": "...", "level": "high", "host": "...", "sandbox": "...",
     "process": <the alerting process: api.events.Process as an array, bytes in base64>,
     "ordered_ns": <wall clock when the service ordered it>}

A collector reads the orders of every version it knows and ignores, with a warning, one of
a version it does not (a newer service): an answer without "orders" is an answer with none.
It acts only on a sandbox it traces, and only on a process that is still the one the alert
named (its pid and start time) and still inside that sandbox; what it did goes back to the
service as a ResponseEvent in its next batch.
"""

from __future__ import annotations

from typing import Any

import msgspec

from api.events import Alert, Process

ORDER_VERSION = 1
LEVELS = ("informational", "low", "medium", "high", "critical")
ACTIONS = ("kill", "freeze")


class Order(msgspec.Struct, frozen=True):
    """One action an alert asks for (see the module docstring)."""

    v: int
    action: str
    alert_id: str
    rule_id: str
    title: str
    level: str
    host: str
    sandbox: str
    process: Process
    ordered_ns: int = 0


class OrderError(ValueError):
    """An order that cannot be read (malformed, or of a version this build does not know)."""


def level_at_least(level: str, threshold: str) -> bool:
    """Whether an alert of `level` reaches `threshold` (both in LEVELS)."""
    if level not in LEVELS:
        return False
    return LEVELS.index(level) >= LEVELS.index(threshold)


def orders_for(
    alert: Alert, kill_on: str | None, freeze_on: str | None, *, now_ns: int = 0
) -> list[Order]:
    """What `alert` orders under --kill-on/--freeze-on: a kill of its process, a freeze of
    its sandbox, both, or nothing. A repeat summary orders nothing (its first alert did),
    nor does an alert with no process or no sandbox (a loss alert)."""
    if alert.repeat or alert.process.pid <= 0 or not alert.sandbox:
        return []
    out = []
    for action, threshold in (("kill", kill_on), ("freeze", freeze_on)):
        if threshold is not None and level_at_least(alert.level, threshold):
            out.append(
                Order(
                    v=ORDER_VERSION,
                    action=action,
                    alert_id=alert.alert_id,
                    rule_id=alert.rule_id,
                    title=alert.title,
                    level=alert.level,
                    host=alert.host,
                    sandbox=alert.sandbox,
                    process=alert.process,
                    ordered_ns=now_ns,
                )
            )
    return out


def order_to_json(order: Order) -> dict[str, Any]:
    """The JSON-ready map of an order (json.dumps takes it)."""
    d: dict[str, Any] = msgspec.to_builtins(order)
    return d


def order_from_json(obj: Any) -> Order:
    """An order from its JSON map; OrderError when it is not one this build can act on."""
    if not isinstance(obj, dict):
        raise OrderError("an order is not a map")
    version = obj.get("v")
    if version != ORDER_VERSION:
        raise OrderError(f"order version {version!r} is not known here (this build reads 1)")
    try:
        order = msgspec.convert(obj, Order)
    except msgspec.ValidationError as exc:
        raise OrderError(f"malformed order: {exc}") from None
    if order.action not in ACTIONS:
        raise OrderError(f"unknown action {order.action!r} (known: {', '.join(ACTIONS)})")
    return order
