"""A rule's condition compiled into nodes: AND/OR/NOT over tests of fields.

pySigma parses a rule's detection and condition into a tree of AND/OR/NOT over (field,
value) tests. compile_condition turns it into Nodes, once: each carries its test as a
closure over a FieldDict (Rule.test, matching an event is then a handful of calls) and what
detect.codegen needs to write the same test inline into the engine's generated matchers.
The values of one field in a Sigma list (``Image|endswith: [a, b, c]``) become one node.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from sigma.conditions import (
    ConditionAND,
    ConditionFieldEqualsValueExpression,
    ConditionItem,
    ConditionNOT,
    ConditionOR,
    ConditionValueExpression,
)
from sigma.types import SigmaCIDRExpression, SigmaExpansion, SigmaNumber, SigmaRegularExpression

from detect.addresses import in_nets, net_ints
from detect.fieldcache import Matcher
from detect.fields import KEYWORD_FIELDS, LIST_FIELDS
from detect.regexes import (
    element_search,
    min_width,
    required_counts,
    required_literal_sets,
    required_literals,
)
from detect.ruleset import RuleError
from detect.values import (
    Simple,
    ValueTest,
    all_of,
    any_of,
    as_keyword,
    compile_regex,
    field_test,
    numbers_test,
    regex_test,
    regex_value_test,
    simple,
    simples,
    strings_test,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# What pySigma's condition tree holds (None and identifiers only before it is postprocessed)
Condition = ConditionItem | ConditionFieldEqualsValueExpression | ConditionValueExpression | None


class Join:
    """AND (op "and") or OR (op "or") of conditions."""

    def __init__(self, op: str, parts: list[Node]) -> None:
        self.op = op
        self.parts = parts
        self.test: Matcher = (all_of if op == "and" else any_of)([p.test for p in parts])


class Not:
    def __init__(self, inner: Node) -> None:
        self.inner = inner
        self.test: Matcher = lambda f: not inner.test(f)


class Strings:
    """Any of several case-insensitive strings of the common shapes on one field."""

    def __init__(self, name: str, simple: list[Simple]) -> None:
        self.name = name
        self.simple = simple
        self.test: Matcher = strings_test(name, simple)


class Regex:
    """|re on one field, with what every match holds (detect.regexes), for prefilters."""

    def __init__(self, name: str, value: SigmaRegularExpression) -> None:
        self.name = name
        self.rx = compile_regex(value)
        sets = required_literal_sets(self.rx)
        self.needles = required_literals(self.rx, sets)
        # single characters every match holds besides the needles: `in` tests, nearly free
        self.chars = sorted({next(iter(s)) for s in sets if len(s) == 1} - {""})
        # characters every match holds several times: a count in C instead of `in`
        self.counts = required_counts(self.rx)
        # the other small sets of which every match holds one: `in` tests, before the
        # expression (which, without a literal prefix, tries every position of the text)
        self.others = [
            sorted(s)
            for s in dict.fromkeys(sets)
            if s != self.needles and 1 < len(s) <= 4 and all(s)
        ]
        self.min_width = min_width(self.rx)
        self.spread = element_search(self.rx) if name in LIST_FIELDS else None
        self.value_test: ValueTest = regex_value_test(self.rx)
        self.test: Matcher = regex_test(name, value)


class Cidrs:
    """|cidr (one or several networks) on an address field, parsed once per event."""

    def __init__(self, name: str, nets: list[Network]) -> None:
        self.name = name
        self.nets = tuple(nets)
        self.ints = ints = net_ints(nets)
        self.test: Matcher = lambda f: in_nets(f.ip(name), ints)


class Numbers:
    """Any of several numbers on one field."""

    def __init__(self, name: str, numbers: frozenset[int | float]) -> None:
        self.name = name
        self.numbers = numbers
        self.test: Matcher = numbers_test(name, numbers)


class Call:
    """Any other test of a field: its closure, called as it is."""

    def __init__(self, test: Matcher) -> None:
        self.test: Matcher = test


Node = Join | Not | Strings | Regex | Cidrs | Numbers | Call
"""A compiled condition: its test (`test`, over a FieldDict) and what its code needs."""


def compile_condition(node: Condition, fields: Mapping[str, str], used: set[str]) -> Node:
    """The node for pySigma's condition tree `node`, over a log source's `fields`; the
    fields it tests are added to `used`."""
    if isinstance(node, ConditionAND):
        return Join("and", [compile_condition(a, fields, used) for a in node.args])
    if isinstance(node, ConditionOR):
        # Sigma lists (Image|endswith: [a, b, c]) arrive as ORs of one field: test them at once.
        by_field: dict[str, list[Simple]] = {}
        numbers: dict[str, set[int | float]] = {}
        cidrs: dict[str, list[Network]] = {}
        rest: list[Condition] = []
        for arg in node.args:
            if not isinstance(arg, ConditionFieldEqualsValueExpression) or arg.field not in fields:
                rest.append(arg)
            elif (shape := simple(arg.value)) is not None:
                by_field.setdefault(arg.field, []).append(shape)
                used.add(arg.field)
            elif type(arg.value) is SigmaNumber:
                numbers.setdefault(arg.field, set()).add(arg.value.number)
                used.add(arg.field)
            elif isinstance(arg.value, SigmaCIDRExpression):
                cidrs.setdefault(arg.field, []).append(arg.value.network)
                used.add(arg.field)
            else:
                rest.append(arg)
        parts: list[Node] = [Strings(name, shapes) for name, shapes in by_field.items()]
        parts += [Numbers(name, frozenset(ns)) for name, ns in numbers.items()]
        parts += [Cidrs(name, nets) for name, nets in cidrs.items()]
        parts += [compile_condition(a, fields, used) for a in rest]
        return parts[0] if len(parts) == 1 else Join("or", parts)
    if isinstance(node, ConditionNOT):
        return Not(compile_condition(node.args[0], fields, used))
    if isinstance(node, ConditionFieldEqualsValueExpression):
        if node.field not in fields:
            raise RuleError(f"field {node.field!r} is not provided for this log source")
        used.add(node.field)
        if (shape := simple(node.value)) is not None:
            return Strings(node.field, [shape])
        if type(node.value) is SigmaNumber:
            return Numbers(node.field, frozenset([node.value.number]))
        if isinstance(node.value, SigmaCIDRExpression):
            return Cidrs(node.field, [node.value.network])
        if isinstance(node.value, SigmaExpansion) and (
            (shapes := simples(node.value.values)) is not None
        ):
            return Strings(node.field, shapes)
        if isinstance(node.value, SigmaRegularExpression):
            return Regex(node.field, node.value)
        return Call(field_test(node.field, node.value))
    if isinstance(node, ConditionValueExpression):
        keyword = as_keyword(node.value)
        if (shape := simple(keyword)) is not None:
            return Join("or", [Strings(k, [shape]) for k in KEYWORD_FIELDS])
        return Join("or", [Call(field_test(k, keyword)) for k in KEYWORD_FIELDS])
    raise RuleError(f"condition element {type(node).__name__} is not supported")
