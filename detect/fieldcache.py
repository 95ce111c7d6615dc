"""An event's fields as compiled rules read them: each read once, lowered at most once.

Rules' closures (Rule.test) take a FieldDict; the engine's generated matchers read fields
into locals of their own and make one only for the closures they still call.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Final, cast

from api.events import AnyEvent
from detect.addresses import IP, ip_int
from detect.fields import Getter, Value

Lowered = str | list[str] | None
"""A value as a case-insensitive comparison sees it (lowered)."""


class _Missing(enum.Enum):
    MISSING = 0


# A miss is the first read of every field: a sentinel, not a KeyError, marks it.
_MISSING: Final = _Missing.MISSING


class FieldDict:
    """An event's fields as rules read them: each computed on first use, then kept, and
    lowercased at most once for all the rules that compare it without case."""

    __slots__ = ("_getters", "_low", "_vals", "event")

    def __init__(
        self,
        values: Mapping[str, Value] | None = None,
        *,
        event: AnyEvent | None = None,
        getters: Mapping[str, Getter] | None = None,
    ) -> None:
        self._vals: dict[str, Value] = dict(values or {})
        self.event = event
        self._getters = getters or {}
        # lowered values, and under "\0ip:" keys (no field name starts with NUL) addresses
        self._low: dict[str, Lowered | IP] = {}

    @classmethod
    def of(cls, event: AnyEvent, getters: Mapping[str, Getter]) -> FieldDict:
        """The fields of `event`, each read by its getter on first use (the engine's path)."""
        out = cls.__new__(cls)
        out._vals = {}
        out.event = event
        out._getters = getters
        out._low = {}
        return out

    def get(self, name: str, default: Value = None) -> Value:
        value = self._vals.get(name, _MISSING)
        if value is _MISSING:
            getter = self._getters.get(name)
            if getter is None:
                return default
            value = self._vals[name] = getter(self.event)
        return value

    def low(self, name: str) -> Lowered:
        value = self._low.get(name, _MISSING)
        if value is _MISSING:
            value = self._low[name] = lowered(self.get(name))
        return value  # type: ignore[return-value]  # a field name's entry: Lowered

    def ip(self, name: str) -> IP | None:
        """The field as an IP address, (version, address as an integer), parsed once; None
        when it is not one."""
        key = "\0ip:" + name
        try:
            return self._low[key]  # type: ignore[return-value]  # an "\0ip:" entry: IP | None
        except KeyError:
            value = self.get(name)
            parsed = self._low[key] = ip_int(str(value)) if value else None
            return parsed

    def joined(self, name: str) -> str:
        """A list field lowered and joined as NUL + e1 + NUL + e2 ... + NUL ("" if absent)."""
        return joined(self.low(name))


Matcher = Callable[[FieldDict], bool]
"""A compiled test of an event's fields."""


def joined(values: Lowered) -> str:
    """Elements between NULs: NUL + e1 + NUL + e2 ... + NUL ("" for none)."""
    if not values:
        return ""
    return "\0" + "\0".join(values) + "\0"


def lowered(value: Value) -> Lowered:
    """The text a case-insensitive comparison sees: str lowercased, numbers as text, lists
    element by element, None kept."""
    if type(value) is str:
        return value.lower()
    if value is None:
        return None
    if isinstance(value, list):
        return [v.lower() if type(v) is str else cast(str, lowered(v)) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).lower()
