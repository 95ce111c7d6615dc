"""Response orders (api/orders.py): which alerts order what, and what a collector reads."""

from __future__ import annotations

import json

import pytest

from api.orders import (
    ORDER_VERSION,
    OrderError,
    level_at_least,
    order_from_json,
    order_to_json,
    orders_for,
)
from tests.unit.test_schemas import alert


def test_levels_order_kill_and_freeze() -> None:
    high = alert(level="high")
    assert [o.action for o in orders_for(high, "high", None)] == ["kill"]
    assert [o.action for o in orders_for(high, "medium", "high")] == ["kill", "freeze"]
    assert orders_for(high, "critical", "critical") == []
    assert orders_for(alert(level="high", repeat=True), "low", "low") == []  # a summary
    assert not level_at_least("bogus", "low")


def test_an_order_survives_json_and_carries_the_process() -> None:
    (order,) = orders_for(alert(level="critical"), "high", None, now_ns=7)
    back = order_from_json(json.loads(json.dumps(order_to_json(order))))
    assert back == order
    assert back.process.comm == order.process.comm  # bytes through base64
    assert back.v == ORDER_VERSION


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "an order is not a map"),
        ({"v": 2, "action": "kill"}, "order version 2 is not known here"),
        ({"v": 1, "action": "kill"}, "malformed order: Object missing required field"),
    ],
)
def test_what_is_not_an_order_is_refused(raw: object, message: str) -> None:
    with pytest.raises(OrderError, match=message):
        order_from_json(raw)


def test_an_unknown_action_is_refused() -> None:
    (order,) = orders_for(alert(level="critical"), "high", None)
    raw = order_to_json(order) | {"action": "reboot"}
    with pytest.raises(OrderError, match="unknown action 'reboot'"):
        order_from_json(raw)
