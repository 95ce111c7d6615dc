"""Compiled rules: what the loader makes of Sigma files and the engine runs.

A rule sandtrace cannot evaluate is refused with the reason (RuleError), never dropped
silently; a RuleSet keeps the refusals next to the rules that loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from detect.fieldcache import FieldDict, Matcher
from detect.fields import Value

if TYPE_CHECKING:
    from detect.conditions import Node


class RuleError(ValueError):
    """A rule sandtrace cannot evaluate; the message says which rule and why."""


@dataclass(slots=True)
class Rule:
    """One compiled detection rule."""

    id: str
    name: str  # the rule's `name`, which correlations refer to, or its id
    title: str
    level: str
    category: str
    description: str
    tags: list[str]
    falsepositives: list[str]
    source: str  # the file it came from
    test: Matcher  # over a FieldDict
    node: Node  # the compiled condition (the engine generates code from it)

    def match(self, fields: Mapping[str, Value] | FieldDict) -> bool:
        """Whether the rule matches an event's fields (any mapping)."""
        return self.test(fields if isinstance(fields, FieldDict) else FieldDict(fields))


@dataclass(slots=True)
class Correlation:
    id: str
    title: str
    level: str
    description: str
    tags: list[str]
    kind: str  # event_count | value_count | temporal | temporal_ordered
    rules: list[str]  # names/ids of the rules it counts
    group_by: list[str]
    seconds: float
    op: str  # gte, gt, lte, lt, eq
    count: int
    field: str | None  # value_count's field
    source: str
    generate: bool = False  # whether the rules it counts also alert on their own
    # Sigma correlation aliases: a group-by name -> per rule (name or id) the field it reads
    aliases: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

    def group_fields(self, rule: Rule) -> tuple[str, ...]:
        """The fields whose values group `rule`'s events: the group-by names, an alias read
        as the field it names for this rule."""
        out = []
        for name in self.group_by:
            mapping = self.aliases.get(name, {})
            out.append(mapping.get(rule.name, mapping.get(rule.id, name)))
        return tuple(out)


@dataclass(slots=True)
class RuleSet:
    rules: list[Rule] = field(default_factory=list)
    correlations: list[Correlation] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (where, why)
