"""Sigma rules, parsed by pySigma and evaluated natively against sandtrace's field dicts.

pySigma turns a rule's detection and condition into a tree of AND/OR/NOT nodes over
(field, value) tests, with every value modifier already applied: ``contains`` becomes a
wildcard string, ``windash`` and ``base64offset`` become expansions, ``re`` a regular
expression, ``cidr`` a network. This module compiles that tree once into Python closures;
matching an event is then a handful of calls, with no query language in between.

A rule sandtrace cannot evaluate (another log source, a field it does not provide, a
value type it does not support) is refused with the reason, never dropped silently.
"""

from __future__ import annotations

import functools
import ipaddress
import operator
import re
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ahocorasick  # type: ignore[import-not-found]
import yaml
from sigma.collection import SigmaCollection
from sigma.conditions import (
    ConditionAND,
    ConditionFieldEqualsValueExpression,
    ConditionNOT,
    ConditionOR,
    ConditionValueExpression,
)
from sigma.correlations import SigmaCorrelationCondition, SigmaCorrelationRule
from sigma.exceptions import SigmaError
from sigma.rule import SigmaRule
from sigma.types import (
    SigmaBool,
    SigmaCasedString,
    SigmaCIDRExpression,
    SigmaCompareExpression,
    SigmaExists,
    SigmaExpansion,
    SigmaFieldReference,
    SigmaNull,
    SigmaNumber,
    SigmaRegularExpression,
    SigmaString,
    SpecialChars,
)

from detect.fields import (
    ALWAYS_LOWER,
    ALWAYS_STR,
    CATEGORY_FIELDS,
    CONSTANT,
    EXPR_SCOPE,
    INLINE,
    LOWER_JOINED,
    PRODUCT,
    RAW_JOINED,
    SPACE_JOINED,
)

_MISSING: Any = object()


class FieldDict:
    """An event's fields as rules read them: each computed on first use, then kept, and
    lowercased at most once for all the rules that compare it without case."""

    __slots__ = ("_getters", "_low", "_vals", "event")

    def __init__(
        self,
        values: Mapping[str, Any] | None = None,
        *,
        event: Any = None,
        getters: Mapping[str, Callable[[Any], Any]] | None = None,
    ) -> None:
        self._vals: dict[str, Any] = dict(values or {})
        self.event = event
        self._getters = getters or {}
        self._low: dict[str, Any] = {}

    @classmethod
    def of(cls, event: Any, getters: Mapping[str, Callable[[Any], Any]]) -> FieldDict:
        """The fields of `event`, each read by its getter on first use (the engine's path)."""
        out = cls.__new__(cls)
        out._vals = {}
        out.event = event
        out._getters = getters
        out._low = {}
        return out

    # A miss is the first read of every field: a sentinel, not a KeyError, marks it.
    def get(self, name: str, default: Any = None) -> Any:
        value = self._vals.get(name, _MISSING)
        if value is _MISSING:
            getter = self._getters.get(name)
            if getter is None:
                return default
            value = self._vals[name] = getter(self.event)
        return value

    def low(self, name: str) -> Any:
        value = self._low.get(name, _MISSING)
        if value is _MISSING:
            value = self._low[name] = _lower(self.get(name))
        return value

    def ip(self, name: str) -> tuple[int, int] | None:
        """The field as an IP address, (version, address as an integer), parsed once; None
        when it is not one."""
        key = "\0ip:" + name
        try:
            return self._low[key]  # type: ignore[no-any-return]
        except KeyError:
            value = self.get(name)
            parsed = self._low[key] = ip_int(str(value)) if value else None
            return parsed

    def joined(self, name: str) -> str:
        """A list field lowered and joined as NUL + e1 + NUL + e2 ... + NUL ("" if absent)."""
        return _joined(self.low(name))


def _joined(values: Any) -> str:
    if not values:
        return ""
    return "\0" + "\0".join(values) + "\0"


def ip_int(addr: str) -> tuple[int, int] | None:
    """(version, address as an integer), or None when `addr` is not an IP address: parsed
    in C by inet_pton where it can be (integer compares then cost less than ipaddress's)."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, addr))
    except (OSError, ValueError):
        pass
    try:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, addr))
    except (OSError, ValueError):
        pass
    try:
        ip = ipaddress.ip_address(addr)  # scoped IPv6 addresses, which inet_pton refuses
    except ValueError:
        return None
    return ip.version, int(ip)


NetInts = tuple[tuple[int, int, int], ...]


def net_ints(nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> NetInts:
    """Networks as (version, netmask, network address) integers, for in_nets."""
    return tuple((n.version, int(n.netmask), int(n.network_address)) for n in nets)


def in_nets(ip: tuple[int, int] | None, nets: NetInts) -> bool:
    """Whether an address as ip_int gives it lies in one of `nets` (net_ints)."""
    if ip is None:
        return False
    version, value = ip
    for net_version, mask, network in nets:
        if net_version == version and value & mask == network:
            return True
    return False


def _lower(value: Any) -> Any:
    """The text a case-insensitive comparison sees: str lowercased, numbers as text, lists
    element by element, None kept."""
    if type(value) is str:
        return value.lower()
    if value is None:
        return None
    if isinstance(value, list):
        return [v.lower() if type(v) is str else _lower(v) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).lower()


Fields = FieldDict
Matcher = Callable[[FieldDict], bool]

# Keyword rules (no field named) search these fields.
KEYWORD_FIELDS = ("CommandLine", "Image")


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

    def match(self, fields: Mapping[str, Any]) -> bool:
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


@dataclass(slots=True)
class RuleSet:
    rules: list[Rule] = field(default_factory=list)
    correlations: list[Correlation] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (where, why)


# -- values ----------------------------------------------------------------------------------


def _string_regex(value: SigmaString, cased: bool) -> re.Pattern[str]:
    parts = []
    for part in value.s:
        if part == SpecialChars.WILDCARD_MULTI:
            parts.append(".*")
        elif part == SpecialChars.WILDCARD_SINGLE:
            parts.append(".")
        elif isinstance(part, str):
            parts.append(re.escape(part))
        else:
            raise RuleError(f"placeholder or special value {part!r} is not supported")
    flags = re.DOTALL | (0 if cased else re.IGNORECASE)
    return re.compile("".join(parts), flags)


def _string_test(value: SigmaString, cased: bool) -> Callable[[str], bool]:
    """Fast paths for the common shapes: plain, *x*, x*, *x."""
    parts = value.s
    plain = [p for p in parts if isinstance(p, str)]
    wild = [p for p in parts if p == SpecialChars.WILDCARD_MULTI]
    if len(plain) + len(wild) == len(parts) and len(plain) <= 1:
        needle = plain[0] if plain else ""
        if not cased:
            needle = needle.lower()
        norm: Callable[[str], str] = (lambda s: s) if cased else str.lower
        shape = tuple(p == SpecialChars.WILDCARD_MULTI for p in parts)
        if shape in ((False,), ()):
            return lambda s: norm(s) == needle
        if shape == (True, False, True):
            return lambda s: needle in norm(s)
        if shape == (False, True):
            return lambda s: norm(s).startswith(needle)
        if shape == (True, False):
            return lambda s: norm(s).endswith(needle)
        if shape == (True,):
            return lambda s: True
    rx = _string_regex(value, cased)
    return lambda s: rx.fullmatch(s) is not None


def _scalar_test(value: Any) -> Callable[[Any], bool]:
    """A test for one field value (a string, a number, or absent)."""
    if isinstance(value, SigmaExpansion):
        tests = [_scalar_test(v) for v in value.values]
        return lambda v: any(t(v) for t in tests)
    if isinstance(value, SigmaCasedString | SigmaString):
        stest = _string_test(value, cased=isinstance(value, SigmaCasedString))
        number = None
        if value.s and all(isinstance(p, str) for p in value.s):
            try:
                number = int("".join(value.s))  # type: ignore[arg-type]
            except ValueError:
                number = None

        def test_string(v: Any) -> bool:
            if v is None:
                return False
            if isinstance(v, bool):
                v = "true" if v else "false"
            if isinstance(v, int):
                return number is not None and v == number
            return stest(str(v))

        return test_string
    if isinstance(value, SigmaNumber):
        n = value.number
        return lambda v: v is not None and not isinstance(v, bool) and _num(v) == n
    if isinstance(value, SigmaBool):
        want = "true" if value.boolean else "false"
        return lambda v: v is not None and str(v).lower() == want
    if isinstance(value, SigmaNull):
        return lambda v: v is None or v == ""
    if isinstance(value, SigmaRegularExpression):
        rx = _regex(value)
        return lambda v: v is not None and rx.search(str(v)) is not None
    if isinstance(value, SigmaCIDRExpression):
        nets = net_ints([value.network])
        return lambda v: bool(v) and in_nets(ip_int(str(v)), nets)
    if isinstance(value, SigmaCompareExpression):
        ops: dict[Any, Callable[[float, float], bool]] = {
            SigmaCompareExpression.CompareOperators.LT: operator.lt,
            SigmaCompareExpression.CompareOperators.LTE: operator.le,
            SigmaCompareExpression.CompareOperators.GT: operator.gt,
            SigmaCompareExpression.CompareOperators.GTE: operator.ge,
            SigmaCompareExpression.CompareOperators.NEQ: operator.ne,
        }
        op = ops[value.op]
        ref = value.number.number
        ref_f = float(ref)

        def compare(v: Any) -> bool:
            n = _num(v)
            return n is not None and op(n, ref_f)

        return compare
    raise RuleError(f"value {value!r} ({type(value).__name__}) is not supported")


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _as_keyword(value: Any) -> Any:
    """Keywords are searched for anywhere in the text, as Sigma's full-text search does."""
    if isinstance(value, SigmaString) and not isinstance(value, SigmaCasedString):
        parts = list(value.s)
        if not parts or parts[0] != SpecialChars.WILDCARD_MULTI:
            parts.insert(0, SpecialChars.WILDCARD_MULTI)
        if parts[-1] != SpecialChars.WILDCARD_MULTI:
            parts.append(SpecialChars.WILDCARD_MULTI)
        keyword = SigmaString("")
        keyword.s = parts
        return keyword
    if isinstance(value, SigmaExpansion):
        return SigmaExpansion([_as_keyword(v) for v in value.values])
    return value


def _simple(value: Any) -> tuple[str, str] | None:
    """(shape, lowercased needle) for a case-insensitive string of a common shape:
    exact, prefix (x*), suffix (*x), contains (*x*); None for anything else."""
    if not isinstance(value, SigmaString) or isinstance(value, SigmaCasedString):
        return None
    parts = list(value.s)
    wild = SpecialChars.WILDCARD_MULTI
    texts = [p for p in parts if isinstance(p, str)]
    if len(texts) != 1 or any(p not in (wild,) and not isinstance(p, str) for p in parts):
        return None
    needle = texts[0].lower()
    shape = tuple(p == wild for p in parts)
    return {
        (False,): ("exact", needle),
        (False, True): ("prefix", needle),
        (True, False): ("suffix", needle),
        (True, False, True): ("contains", needle),
    }.get(shape)


def _strings_test(name: str, simple: list[tuple[str, str]]) -> Matcher:
    """One test for any of several simple strings on one field, all in C-level calls:
    a set, two tuples for startswith/endswith, one regular expression for substrings."""
    exact = frozenset(n for shape, n in simple if shape == "exact")
    prefixes = tuple(n for shape, n in simple if shape == "prefix")
    suffixes = tuple(n for shape, n in simple if shape == "suffix")
    needles = [n for shape, n in simple if shape == "contains"]
    rx = re.compile("|".join(re.escape(n) for n in needles), re.DOTALL) if needles else None

    def one(v: str) -> bool:
        return (
            v in exact
            or (bool(prefixes) and v.startswith(prefixes))
            or (bool(suffixes) and v.endswith(suffixes))
            or (rx is not None and rx.search(v) is not None)
        )

    def match(f: FieldDict) -> bool:
        v = f.low(name)
        if v is None:
            return False
        if isinstance(v, list):
            return any(one(x) for x in v)
        return one(v)

    return match


def _numbers_test(name: str, numbers: frozenset[int | float]) -> Matcher:
    def match(f: FieldDict) -> bool:
        v = f.get(name)
        return type(v) is int and v in numbers

    return match


def _all(parts: list[Matcher]) -> Matcher:
    """AND of matchers, as plain nested calls (no generator per event)."""
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        a, b = parts
        return lambda f: a(f) and b(f)
    head, tail = parts[0], _all(parts[1:])
    return lambda f: head(f) and tail(f)


def _any(parts: list[Matcher]) -> Matcher:
    """OR of matchers, as plain nested calls."""
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        a, b = parts
        return lambda f: a(f) or b(f)
    head, tail = parts[0], _any(parts[1:])
    return lambda f: head(f) or tail(f)


def _regex(value: SigmaRegularExpression) -> re.Pattern[str]:
    flags = 0
    for flag in value.flags:
        flags |= value.sigma_to_python_flags[flag]
    try:
        return re.compile(str(value.regexp), flags)
    except re.error as exc:
        raise RuleError(f"regular expression {str(value.regexp)!r}: {exc}") from None


def _required_literals(
    rx: re.Pattern[str], sets: list[frozenset[str]] | None = None
) -> frozenset[str] | None:
    """Strings of which any match must contain at least one (lowercased when the pattern
    ignores case), or None when the pattern guarantees none worth checking: the best of
    `sets` (by default the pattern's _required_literal_sets). A substring test with these in
    C turns most events away before the regular expression runs."""
    sets = _required_literal_sets(rx) if sets is None else sets
    return max(sets, key=lambda s: min(map(len, s))) if sets else None


def _required_literal_sets(rx: re.Pattern[str]) -> list[frozenset[str]]:
    """Sets of strings such that any match contains at least one string of every set
    (lowercased when the pattern ignores case), in the pattern's order."""
    parsed = _parse(rx)
    if parsed is None:
        return []
    c, tree = parsed
    fold = bool(rx.flags & re.IGNORECASE)

    def best(seq: Any) -> frozenset[str] | None:
        useful = required(seq)
        return max(useful, key=lambda s: min(map(len, s))) if useful else None

    def required(seq: Any) -> list[frozenset[str]]:
        sets: list[frozenset[str]] = []
        run: list[str] = []
        for op, av in seq:
            if op is c.LITERAL:
                run.append(chr(av))
                continue
            if run:
                sets.append(frozenset(["".join(run)]))
                run = []
            if op is c.SUBPATTERN:  # a group ignoring case in a pattern that does not: none
                inner = None if av[1] & re.IGNORECASE and not fold else best(av[3])
            elif op is c.BRANCH:
                alts = [best(alt) for alt in av[1]]
                inner = frozenset().union(*alts) if alts and all(alts) else None  # type: ignore[arg-type]
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT) and av[0] >= 1:
                inner = best(av[2])
            else:
                inner = None
            if inner:
                sets.append(inner)
        if run:
            sets.append(frozenset(["".join(run)]))
        return [s for s in sets if min(map(len, s)) >= 1]

    found = required(tree)
    return [frozenset(x.lower() for x in s) for s in found] if fold else found


def _required_counts(rx: re.Pattern[str]) -> dict[str, int]:
    """Single characters any match holds more than once, with the fewest times it holds each
    (lowercased when the pattern ignores case): `text.count(c) >= n` turns away, in C, texts
    that hold each character but too few times for a match (an IP:port:IP:port pattern
    needs six dots and three colons; a URL has some of both)."""
    parsed = _parse(rx)
    if parsed is None:
        return {}
    c, tree = parsed
    fold = bool(rx.flags & re.IGNORECASE)

    def counts(seq: Any) -> Counter[str]:
        total: Counter[str] = Counter()
        for op, av in seq:
            if op is c.LITERAL:
                ch = chr(av).lower() if fold else chr(av)
                if len(ch) == 1:
                    total[ch] += 1
            elif op is c.SUBPATTERN and not (av[1] & re.IGNORECASE and not fold):
                total += counts(av[3])  # (a group ignoring case in a pattern that does not:
                # its letters may be either case; nothing counted)
            elif op is c.BRANCH:  # what every alternative holds, as few times as the least
                alts = [counts(alt) for alt in av[1]]
                total += functools.reduce(operator.and_, alts) if alts else Counter()
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT) and av[0] >= 1:
                total += Counter({ch: n * av[0] for ch, n in counts(av[2]).items()})
        return total

    return {ch: n for ch, n in counts(tree).items() if n >= 2}


def _element_search(rx: re.Pattern[str]) -> re.Pattern[str] | None:
    """A search over a list's elements NUL-joined (detect.fields.nul_joined) that finds a match
    whenever `rx` matches some element: a leading ^ becomes the NUL before an element, a
    trailing $ the NUL after one (or a newline and that NUL, as $ allows). It may also find
    what no element holds, so it only prefilters the per-element test. None for what the
    rewrite cannot vouch for: other anchors, lookarounds, multiline mode."""
    body = rx.pattern
    if rx.flags & (re.MULTILINE | re.VERBOSE):
        return None
    start = body.startswith("^")
    body = body[1:] if start else body
    escapes = len(body[:-1]) - len(body[:-1].rstrip("\\"))
    end = body.endswith("$") and escapes % 2 == 0
    body = body[:-1] if end else body
    if any(x in body for x in ("^", "$", "\\A", "\\Z", "\\z", "(?=", "(?!", "(?<")):
        return None
    try:
        return re.compile(("\\x00" if start else "") + body + ("(?=\\n?\\x00)" if end else ""),
                          rx.flags)  # fmt: skip
    except re.error:
        return None


def _min_width(rx: re.Pattern[str]) -> int:
    """The fewest characters any match of `rx` spans (0 when unknown)."""
    parsed = _parse(rx)
    return int(parsed[1].getwidth()[0]) if parsed is not None else 0


@functools.cache
def _parse(rx: re.Pattern[str]) -> tuple[Any, Any] | None:
    """The pattern's parse tree as the re module makes it, with the module of its opcodes;
    None when this Python's re has neither (they are internals): the analyses above then
    find nothing, and only prefilter less."""
    try:
        import importlib  # noqa: PLC0415

        constants = importlib.import_module("re._constants")
        return constants, importlib.import_module("re._parser").parse(rx.pattern, rx.flags)
    except Exception:
        return None


def _regex_test(name: str, value: SigmaRegularExpression) -> Matcher:
    test = _regex_value_test(_regex(value))
    return lambda f: test(f.get(name))


def _regex_value_test(rx: re.Pattern[str]) -> Callable[[Any], bool]:
    """|re over a field's value (text, number, list of either, or None)."""
    needles = _required_literals(rx)
    if needles is None:
        search = rx.search

        def match(v: Any) -> bool:
            if isinstance(v, list):
                return any(search(str(x)) is not None for x in v)
            return v is not None and search(str(v)) is not None

        return match
    fold = bool(rx.flags & re.IGNORECASE)
    pre = re.compile("|".join(re.escape(n) for n in sorted(needles)))

    def one(raw: Any, low: Any) -> bool:
        seen = low if fold else str(raw)
        return pre.search(seen) is not None and rx.search(str(raw)) is not None

    def prefiltered(v: Any) -> bool:
        if v is None:
            return False
        lv = _lower(v) if fold else None
        if isinstance(v, list):
            return any(one(x, lv[i] if lv else None) for i, x in enumerate(v))
        return one(v, lv)

    return prefiltered


def _field_test(name: str, value: Any) -> Matcher:
    if isinstance(value, SigmaRegularExpression):
        return _regex_test(name, value)
    if type(value) is SigmaNumber:
        return _numbers_test(name, frozenset([value.number]))
    if (shape := _simple(value)) is not None:
        return _strings_test(name, [shape])
    if isinstance(value, SigmaExpansion) and all(_simple(v) for v in value.values):
        return _strings_test(name, [_simple(v) for v in value.values])  # type: ignore[misc]
    if isinstance(value, SigmaExists):
        want = value.exists
        return lambda f: (f.get(name) not in (None, "", [])) == want
    if isinstance(value, SigmaFieldReference):
        other = value.field
        return lambda f: f.get(name) is not None and f.get(name) == f.get(other)
    test = _scalar_test(value)

    def match(f: Fields) -> bool:
        v = f.get(name)
        if isinstance(v, list):
            return any(test(x) for x in v)
        return test(v)

    return match


class Node:
    """A compiled condition: a closure that tests a FieldDict, and the same test as Python
    source for the engine's generated per-category matcher (detect.codegen)."""

    test: Matcher

    def code(self, ctx: CodeContext) -> str:
        raise NotImplementedError

    def guard(self) -> list[Atom] | None:
        """Atoms of which at least one holds whenever this condition does (None when there
        is no such list): the engine indexes rules by them, so that an event enters only
        the rules one of whose atoms it satisfies."""
        return None


Atom = tuple[str, str, Any]
"""(kind, local, key) over a generated matcher's local holding a field: ("base", v_X, name)
when the lowered text's last path element is `name`; ("needle", v_X/r_X/j_X, text) when
the text contains `text`; ("num", r_X, n) when the number is `n`; ("eq", v_X, text) when
the lowered text is `text`; ("minlen", v_X/r_X, n) when the text has at least n characters;
("count", v_X/r_X, (c, n)) when the text holds the character c at least n times."""
ATOM_COST = {"base": 0, "minlen": 0, "eq": 1, "num": 1, "count": 1, "needle": 2}
_MINLEN_GUARD = 16  # a regex needing fewer characters than this is not indexed by length


class CodeContext:
    """Constants and preloaded fields a generated matcher refers to.

    With `getters` (one event type's, see detect.fields.GETTERS), the generated code reads
    fields straight from the event (local `e`), a call per field instead of a walk through
    FieldDict's caches; closures it calls still read the FieldDict."""

    def __init__(self, getters: Mapping[str, Callable[[Any], Any]] | None = None) -> None:
        self.getters = getters
        self.consts: dict[str, Any] = {}
        self.low_fields: set[str] = set()
        self.raw_fields: set[str] = set()
        self.joined_fields: set[str] = set()
        # local holding a text -> every needle any rule looks for in that text
        self.needles: dict[str, set[str]] = {}
        # locals the matcher sets before it tests any rule: read as they are
        self.preloaded: set[str] = set()
        # raw locals that load() has set on the way to a lowered or joined form
        self.raw_loaded: set[str] = set()
        # fields read as IP addresses (locals i_X)
        self.ip_fields: set[str] = set()
        # list fields read NUL-joined as they are (locals k_X)
        self.raw_joined_fields: set[str] = set()

    @property
    def fields(self) -> str:
        """Code giving the FieldDict that compiled closures take: the matcher's argument, or
        with getters (where the matcher takes the event) one made on first use."""
        return "f" if self.getters is None else _lazy("f", "_F(e)")

    def raw_joined(self, name: str) -> str | None:
        """Code giving a list field's elements NUL-joined as they are (k_X), or None when
        the matcher reads no event (no getters) or the field has no such form."""
        getter = self.getters.get(name) if self.getters is not None else None
        joined = RAW_JOINED.get(getter) if getter is not None else None
        if joined is None:
            return None
        self.raw_joined_fields.add(name)
        return self.lazy(f"k_{name}", self.read(joined))

    def ip(self, name: str) -> str:
        """Code giving the field as FieldDict.ip gives it, parsed once per event."""
        if self.getters is None:
            return f"f.ip({name!r})"
        self.ip_fields.add(name)
        self.raw_fields.add(name)
        raw = self.lazy(f"r_{name}", self.load(f"r_{name}"))
        parse = f"({self.const(ip_int)}(str({raw})) if {raw} else None)"
        return _lazy(f"i_{name}", parse)

    def const(self, value: Any) -> str:
        name = f"K{len(self.consts)}"
        self.consts[name] = value
        return name

    def lazy(self, var: str, load: str) -> str:
        """`var`, loaded by `load` on first use unless the matcher preloads it."""
        return var if var in self.preloaded else _lazy(var, load)

    def load(self, var: str, assigned: set[str] | None = None) -> str:
        """Code that reads the field behind local `var`: v_X lowered, r_X as is, j_X as
        FieldDict.joined gives it. With `assigned` (code that runs first, before any test:
        the locals set so far), the raw local is read if set, else set, without the check."""
        kind, name = var[0], var[2:]
        if self.getters is None:
            return {"v": "low({!r})", "r": "f.get({!r})", "j": "f.joined({!r})"}[kind].format(name)
        getter = self.getters.get(name)
        if getter is None:  # not a field of this event type: FieldDict would give None
            return {"v": "None", "r": "None", "j": '""'}[kind]
        raw = self.read(getter)
        if kind == "r":
            return raw
        if kind == "j" and getter in LOWER_JOINED:
            return self.read(LOWER_JOINED[getter])
        # The lowered and joined forms start from the raw value, read once for all three.
        self.raw_fields.add(name)
        self.raw_loaded.add(f"r_{name}")
        if assigned is None:
            raw = _lazy(f"r_{name}", raw)
        else:
            raw = f"r_{name}" if f"r_{name}" in assigned else f"(r_{name} := {raw})"
            assigned.add(f"r_{name}")
        # text fields are always str: lowered in place, without _lower's checks
        if getter in ALWAYS_LOWER:
            lowered = raw
        elif name in TEXT_FIELDS or getter in ALWAYS_STR:
            lowered = f"{raw}.lower()"
        else:
            lowered = f"{self.const(_lower)}({raw})"
        return lowered if kind == "v" else f"{self.const(_joined)}({lowered})"

    def read(self, getter: Callable[[Any], Any]) -> str:
        """Code reading a field from the event `e`: the getter's own expression when it has
        one (detect.fields.INLINE), saving a call, else a call to it."""
        source = INLINE.get(getter)
        return f"({source})" if source is not None else f"{self.const(getter)}(e)"

    def fixed(self, node: _Strings | _Regex) -> str | None:
        """ "True" or "False" when the field a test reads has one fixed value for the event
        type (a connect's Initiated, a bind's Action): decided once, when the matcher is
        made, instead of on every event."""
        getter = self.getters.get(node.name) if self.getters is not None else None
        if getter not in CONSTANT:
            return None
        return str(bool(node.test(FieldDict({node.name: CONSTANT[getter]}))))

    def joined_home(self, var: str) -> str | None:
        """For a lowered command line (v_CommandLine) that is its argv joined with spaces,
        the local of that argv lowered and NUL-joined (j_Argv): a needle without a space is
        in the one exactly when it is in the other, so one automaton pass serves both."""
        if self.getters is None or var[:2] != "v_":
            return None
        getter = self.getters.get(var[2:])
        listed = SPACE_JOINED.get(getter) if getter is not None else None
        for name, other in self.getters.items():
            if other is listed and other in LOWER_JOINED:
                return f"j_{name}"
        return None

    def needle_home(self, var: str, needle: str) -> tuple[str, str]:
        """Where the index looks for `needle` of text `var`: a command line's needles in
        its argv's automaton pass (see joined_home), a needle with spaces by its longest
        piece without (which any text holding the needle holds too)."""
        home = self.joined_home(var)
        if home is None or "\0" in needle:
            return var, needle
        piece = max(needle.split(" "), key=len)
        return (home, piece) if len(piece) >= 2 else (var, needle)

    def contains_any(self, var: str, needles: Iterable[str]) -> str:
        """Code true when the text in local `var` (already loaded, not None) contains any of
        `needles`. Every needle of every rule on that text goes into one Aho-Corasick
        automaton, run once per event: the tests become set intersections, where one
        regular expression per test would scan the text again."""
        wanted = frozenset(needles)
        if len(wanted) == 1:
            return f"({self.const(next(iter(wanted)))} in {var})"
        # An automaton has no empty word, and single characters would make its every pass
        # long: a regular expression takes those.
        if not wanted or min(map(len, wanted)) < 2:
            rx = re.compile("|".join(re.escape(n) for n in sorted(wanted)), re.DOTALL)
            return f"({self.const(rx.search)}({var}) is not None)"
        home = self.joined_home(var)
        if home is not None:  # the argv's pass finds the needles without spaces (and NULs)
            plain = frozenset(n for n in wanted if " " not in n and "\0" not in n)
            self.joined_fields.add(home[2:])
            joined = self.lazy(home, self.load(home))
            self.needles.setdefault(home, set()).update(plain)
            found = self.lazy(f"p_{home}", f"F_{home}({joined})")
            tests = [f"not {found}.isdisjoint({self.const(plain)})"] if plain else []
            tests += [f"{self.const(n)} in {var}" for n in sorted(wanted - plain)]
            return f"({' or '.join(tests)})"
        self.needles.setdefault(var, set()).update(wanted)
        found = self.lazy(f"p_{var}", f"F_{var}({var})")
        return f"(not {found}.isdisjoint({self.const(wanted)}))"

    def namespace(self, masks: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, Any]:
        """The constants and needle finders the generated code refers to: per text local
        `x`, F_x(text) gives the needles in the text and S_x(text) iterates over
        (end, (needle, mask)) for each occurrence, `mask` from `masks[x]` (0 if absent)."""
        out = {**EXPR_SCOPE, **self.consts}
        if self.getters is not None:
            getters = self.getters
            out["_F"] = lambda e: FieldDict.of(e, getters)
        for var, needles in self.needles.items():
            out[f"F_{var}"], out[f"S_{var}"] = needle_finder(needles, (masks or {}).get(var, {}))
        return out


def needle_finder(
    needles: Iterable[str], masks: Mapping[str, int]
) -> tuple[Callable[[str], frozenset[str]], Callable[[str], Any]]:
    """Which of `needles` occur in a text (overlapping ones included), and the automaton's
    own iterator over their occurrences with their masks."""
    automaton = ahocorasick.Automaton()
    for needle in needles:
        automaton.add_word(needle, (needle, masks.get(needle, 0)))
    automaton.make_automaton()
    search = automaton.iter

    def found(text: str) -> frozenset[str]:
        return frozenset([n for _, (n, _mask) in search(text)])

    return found, search


def _var(field: str) -> str:
    return f"v_{field}"


def _lazy(var: str, load: str) -> str:
    """An expression that loads a field into its local on first use only (the generated
    function starts every local at the sentinel _U)."""
    return f"({var} if {var} is not _U else ({var} := {load}))"


class _Join(Node):
    """AND or OR of conditions."""

    def __init__(self, op: str, parts: list[Node]) -> None:
        self.op = op
        self.parts = parts
        self.test = (_all if op == "and" else _any)([p.test for p in parts])

    def code(self, ctx: CodeContext) -> str:
        return "(" + f" {self.op} ".join(p.code(ctx) for p in self.parts) + ")"

    def guard(self) -> list[Atom] | None:
        guards = [p.guard() for p in self.parts]
        if self.op == "or":
            if any(g is None for g in guards):
                return None
            return [a for g in guards for a in g]  # type: ignore[union-attr]
        known = [g for g in guards if g]
        if not known:
            return None
        # AND: any one part's atoms will do; take the cheapest to look up, then the fewest.
        return min(known, key=lambda g: (max(ATOM_COST[a[0]] for a in g), len(g)))


def _And(parts: list[Node]) -> Node:
    return _Join("and", parts)


def _Or(parts: list[Node]) -> Node:
    return _Join("or", parts)


class _Not(Node):
    def __init__(self, inner: Node) -> None:
        self.inner = inner
        self.test = lambda f: not inner.test(f)

    def code(self, ctx: CodeContext) -> str:
        return f"(not {self.inner.code(ctx)})"


class _Strings(Node):
    def __init__(self, name: str, simple: list[tuple[str, str]]) -> None:
        self.name = name
        self.simple = simple
        self.test = _strings_test(name, simple)

    def code(self, ctx: CodeContext) -> str:
        if (fixed := ctx.fixed(self)) is not None:
            return fixed
        if self.name in LIST_FIELDS:
            # Elements joined with NUL (which no argv element or path holds) turn "any
            # element equals / starts with / ends with / contains" into one substring search.
            ctx.joined_fields.add(self.name)
            joined = ctx.lazy(f"j_{self.name}", ctx.load(f"j_{self.name}"))
            wrapped = {"exact": "\0{}\0", "prefix": "\0{}", "suffix": "{}\0", "contains": "{}"}
            wanted = {wrapped[shape].format(n) for shape, n in self.simple}
            return f"({joined} is not None and {ctx.contains_any(f'j_{self.name}', wanted)})"
        ctx.low_fields.add(self.name)
        v = _var(self.name)
        exact = frozenset(n for shape, n in self.simple if shape == "exact")
        prefixes = tuple(n for shape, n in self.simple if shape == "prefix")
        suffixes = tuple(n for shape, n in self.simple if shape == "suffix")
        needles = [n for shape, n in self.simple if shape == "contains"]
        terms = []
        if len(exact) == 1:
            terms.append(f"{v} == {ctx.const(next(iter(exact)))}")
        elif exact:
            terms.append(f"{v} in {ctx.const(exact)}")
        if prefixes:
            terms.append(f"{v}.startswith({ctx.const(prefixes)})")
        if suffixes:
            terms.append(f"{v}.endswith({ctx.const(suffixes)})")
        if len(needles) == 1:
            terms.append(f"{ctx.const(needles[0])} in {v}")
        elif needles:
            terms.append(ctx.contains_any(v, needles))
        return f"({ctx.lazy(v, ctx.load(v))} is not None and ({' or '.join(terms)}))"

    def guard(self) -> list[Atom] | None:
        if self.name in LIST_FIELDS:
            wrapped = {"exact": "\0{}\0", "prefix": "\0{}", "suffix": "{}\0", "contains": "{}"}
            needles = {wrapped[shape].format(n) for shape, n in self.simple}
            return [("needle", f"j_{self.name}", n) for n in sorted(needles)]
        out: list[Atom] = []
        for shape, n in self.simple:
            if shape == "suffix" and n.startswith("/") and len(n) > 1 and "/" not in n[1:]:
                out.append(("base", _var(self.name), n[1:]))
            elif shape == "exact":
                out.append(("eq", _var(self.name), n))
            elif (shape == "contains" and n) or (shape == "prefix" and len(n) >= 2):
                out.append(("needle", _var(self.name), n))  # a prefix is contained too
            else:
                return None
        return out


class _Regex(Node):
    """|re: on a text field, a length check and a substring prefilter in C, then the
    expression; on other fields, the expression over the value the matcher read."""

    def __init__(self, name: str, value: SigmaRegularExpression) -> None:
        self.name = name
        self.rx = _regex(value)
        sets = _required_literal_sets(self.rx)
        self.needles = _required_literals(self.rx, sets)
        # single characters every match holds besides the needles: `in` tests, nearly free
        self.chars = sorted({next(iter(s)) for s in sets if len(s) == 1} - {""})
        # characters every match holds several times: a count in C instead of `in`
        self.counts = _required_counts(self.rx)
        # the other small sets of which every match holds one: `in` tests, before the
        # expression (which, without a literal prefix, tries every position of the text)
        self.others = [
            sorted(s) for s in dict.fromkeys(sets)
            if s != self.needles and 1 < len(s) <= 4 and all(s)
        ]  # fmt: skip
        self.min_width = _min_width(self.rx)
        self.spread = _element_search(self.rx) if name in LIST_FIELDS else None
        self.value_test = _regex_value_test(self.rx)
        self.test = _regex_test(name, value)

    def code(self, ctx: CodeContext) -> str:
        if (fixed := ctx.fixed(self)) is not None:
            return fixed
        if self.name not in TEXT_FIELDS:  # lists element by element, numbers as text
            ctx.raw_fields.add(self.name)
            raw = ctx.lazy(f"r_{self.name}", ctx.load(f"r_{self.name}"))
            test = f"{ctx.const(self.value_test)}({raw})"
            fold = bool(self.rx.flags & re.IGNORECASE)
            search = self.spread.search if self.spread is not None else None
            spread = ctx.raw_joined(self.name) if search is not None else None
            if spread is not None:  # one search over all the elements before one per element
                test = f"{spread} is not None and {ctx.const(search)}({spread}) is not None " \
                       f"and {test}"  # fmt: skip
            if (
                self.name in LIST_FIELDS
                and self.needles
                and (fold or all(n.isascii() for n in self.needles))
            ):
                # A needle in an element is (lowered) in the lowered, joined elements: one
                # automaton pass over the list instead of a prefilter per element.
                ctx.joined_fields.add(self.name)
                var = f"j_{self.name}"
                joined = ctx.lazy(var, ctx.load(var))
                lowered = {n.lower() for n in self.needles}
                return f"({joined} is not None and {ctx.contains_any(var, lowered)} and {test})"
            return f"({test})"
        fold = bool(self.rx.flags & re.IGNORECASE)
        if fold:  # matching the lowered text ignoring case is the same match
            ctx.low_fields.add(self.name)
            v = _var(self.name)
            load = ctx.load(v)
        else:
            ctx.raw_fields.add(self.name)
            v = f"r_{self.name}"
            load = ctx.load(v)
        terms = [f"{ctx.lazy(v, load)} is not None"]
        if self.min_width > 1:  # a text shorter than any match cannot hold one
            terms.append(f"len({v}) >= {self.min_width}")
        if self.needles:
            terms.append(ctx.contains_any(v, self.needles))
        terms += [
            f"{v}.count({ctx.const(ch)}) >= {self.counts[ch]}" if ch in self.counts
            else f"{ctx.const(ch)} in {v}"
            for ch in self.chars if self.needles != frozenset(ch) or ch in self.counts
        ]  # fmt: skip
        terms += [
            "(" + " or ".join(f"{ctx.const(x)} in {v}" for x in others) + ")"
            for others in self.others
        ]
        terms.append(f"{ctx.const(self.rx.search)}({v}) is not None")
        return "(" + " and ".join(terms) + ")"

    def guard(self) -> list[Atom] | None:
        if self.name not in TEXT_FIELDS:
            return None
        # A single character selects nothing, unless needed several times (a punctuation
        # mark: letters come in words); a long minimum width selects short texts out.
        if not self.needles or min(map(len, self.needles)) < 2:
            fold = bool(self.rx.flags & re.IGNORECASE)
            text = _var(self.name) if fold else f"r_{self.name}"
            counts = [(c, n) for c, n in self.counts.items() if not c.isalnum()]
            if counts:  # the rarest: needed most often
                return [("count", text, max(counts, key=lambda cn: (cn[1], cn[0])))]
            if self.min_width < _MINLEN_GUARD:
                return None
            return [("minlen", text, self.min_width)]
        if bool(self.rx.flags & re.IGNORECASE) or all(n.isascii() for n in self.needles):
            # An ASCII needle in the text is its lowercase in the lowered text (ASCII letters
            # lower one by one, whatever surrounds them): one automaton pass serves both.
            return [("needle", _var(self.name), n.lower()) for n in sorted(self.needles)]
        return [("needle", f"r_{self.name}", n) for n in sorted(self.needles)]


class _Cidrs(Node):
    """|cidr (one or several networks) on an address field, parsed once per event."""

    def __init__(self, name: str, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]):
        self.name = name
        self.nets = tuple(nets)
        self.ints = ints = net_ints(nets)
        self.test: Matcher = lambda f: in_nets(f.ip(name), ints)

    def code(self, ctx: CodeContext) -> str:
        return f"{ctx.const(in_nets)}({ctx.ip(self.name)}, {ctx.const(self.ints)})"


class _Numbers(Node):
    def __init__(self, name: str, numbers: frozenset[int | float]) -> None:
        self.name = name
        self.numbers = numbers
        self.test = _numbers_test(name, numbers)

    def code(self, ctx: CodeContext) -> str:
        ctx.raw_fields.add(self.name)
        load = ctx.lazy(f"r_{self.name}", ctx.load(f"r_{self.name}"))
        return f"(type({load}) is int and r_{self.name} in {ctx.const(self.numbers)})"

    def guard(self) -> list[Atom] | None:
        return [("num", f"r_{self.name}", n) for n in sorted(self.numbers)]


class _Call(Node):
    def __init__(self, test: Matcher) -> None:
        self.test = test

    def code(self, ctx: CodeContext) -> str:
        return f"{ctx.const(self.test)}({ctx.fields})"


LIST_FIELDS = frozenset({"Argv", "AncestorImages"})
# Fields whose values are always text (str), so a regex can run on them as they are.
TEXT_FIELDS = frozenset({"Image", "CommandLine", "ParentImage", "ParentCommandLine",
                         "CurrentDirectory", "OriginalFileName", "User", "Comm"})  # fmt: skip


def _compile(node: Any, fields: Mapping[str, str], used: set[str]) -> Node:
    if isinstance(node, ConditionAND):
        return _And([_compile(a, fields, used) for a in node.args])
    if isinstance(node, ConditionOR):
        # Sigma lists (Image|endswith: [a, b, c]) arrive as ORs of one field: test them at once.
        by_field: dict[str, list[tuple[str, str]]] = {}
        numbers: dict[str, set[int | float]] = {}
        cidrs: dict[str, list[Any]] = {}
        rest = []
        for arg in node.args:
            if not isinstance(arg, ConditionFieldEqualsValueExpression) or arg.field not in fields:
                rest.append(arg)
            elif (simple := _simple(arg.value)) is not None:
                by_field.setdefault(arg.field, []).append(simple)
                used.add(arg.field)
            elif type(arg.value) is SigmaNumber:
                numbers.setdefault(arg.field, set()).add(arg.value.number)
                used.add(arg.field)
            elif isinstance(arg.value, SigmaCIDRExpression):
                cidrs.setdefault(arg.field, []).append(arg.value.network)
                used.add(arg.field)
            else:
                rest.append(arg)
        parts: list[Node] = [_Strings(name, simple) for name, simple in by_field.items()]
        parts += [_Numbers(name, frozenset(ns)) for name, ns in numbers.items()]
        parts += [_Cidrs(name, nets) for name, nets in cidrs.items()]
        parts += [_compile(a, fields, used) for a in rest]
        return parts[0] if len(parts) == 1 else _Or(parts)
    if isinstance(node, ConditionNOT):
        return _Not(_compile(node.args[0], fields, used))
    if isinstance(node, ConditionFieldEqualsValueExpression):
        if node.field not in fields:
            raise RuleError(f"field {node.field!r} is not provided for this log source")
        used.add(node.field)
        if (simple := _simple(node.value)) is not None:
            return _Strings(node.field, [simple])
        if type(node.value) is SigmaNumber:
            return _Numbers(node.field, frozenset([node.value.number]))
        if isinstance(node.value, SigmaCIDRExpression):
            return _Cidrs(node.field, [node.value.network])
        if isinstance(node.value, SigmaExpansion) and all(_simple(v) for v in node.value.values):
            return _Strings(node.field, [_simple(v) for v in node.value.values])  # type: ignore[misc]
        if isinstance(node.value, SigmaRegularExpression):
            return _Regex(node.field, node.value)
        return _Call(_field_test(node.field, node.value))
    if isinstance(node, ConditionValueExpression):
        keyword = _as_keyword(node.value)
        if (simple := _simple(keyword)) is not None:
            return _Or([_Strings(k, [simple]) for k in KEYWORD_FIELDS])
        return _Or([_Call(_field_test(k, keyword)) for k in KEYWORD_FIELDS])
    raise RuleError(f"condition element {type(node).__name__} is not supported")


# -- rules -----------------------------------------------------------------------------------


def _level(rule: SigmaRule | SigmaCorrelationRule) -> str:
    return rule.level.name.lower() if rule.level else "medium"


def _tags(rule: SigmaRule | SigmaCorrelationRule) -> list[str]:
    return [str(t) for t in rule.tags]


def compile_rule(rule: SigmaRule, source: str) -> Rule:
    ls = rule.logsource
    if ls.product != PRODUCT or ls.category not in CATEGORY_FIELDS or ls.service:
        raise RuleError(
            f"log source product={ls.product} category={ls.category} service={ls.service} "
            f"is not one sandtrace provides (product linux, categories "
            f"{', '.join(sorted(CATEGORY_FIELDS))})"
        )
    fields = CATEGORY_FIELDS[ls.category]
    used: set[str] = set()
    try:
        parts = [_compile(c.parse(), fields, used) for c in rule.detection.parsed_condition]
    except SigmaError as exc:
        raise RuleError(str(exc)) from None
    node = parts[0] if len(parts) == 1 else _Or(parts)
    rid = str(rule.id) if rule.id else rule.title
    return Rule(
        id=rid,
        name=rule.name or rid,
        title=rule.title,
        level=_level(rule),
        category=ls.category,
        description=rule.description or "",
        tags=_tags(rule),
        falsepositives=list(rule.falsepositives),
        source=source,
        test=node.test,
        node=node,
    )


def _correlation(rule: SigmaCorrelationRule, source: str) -> Correlation:
    kind = rule.type.name.lower()
    if kind not in ("event_count", "value_count", "temporal", "temporal_ordered"):
        raise RuleError(f"correlation type {kind} is not supported")
    cond = rule.condition
    if cond is not None and not isinstance(cond, SigmaCorrelationCondition):
        raise RuleError("extended correlation conditions are not supported")
    op = cond.op.name.lower() if cond is not None else "gte"
    count = cond.count if cond is not None else len(rule.rules or [])
    fieldref = cond.fieldref if cond is not None else None
    if isinstance(fieldref, list):
        if len(fieldref) != 1:
            raise RuleError("a value_count over several fields is not supported")
        fieldref = fieldref[0]
    return Correlation(
        id=str(rule.id) if rule.id else rule.title,
        title=rule.title,
        level=_level(rule),
        description=rule.description or "",
        tags=_tags(rule),
        kind=kind,
        rules=[r.reference for r in rule.rules or []],
        group_by=list(rule.group_by or []),
        seconds=float(rule.timespan.seconds),
        op=op,
        count=int(count),
        field=fieldref,
        source=source,
        generate=bool(getattr(rule, "generate", False)),
    )


def load_text(text: str, source: str, into: RuleSet) -> None:
    """Load the rules of one YAML document stream; refusals are recorded, not raised."""
    try:
        collection = SigmaCollection.from_yaml(text, collect_errors=True)
    except (SigmaError, yaml.YAMLError) as exc:
        into.refused.append((source, f"not a Sigma rule file: {exc}"))
        return
    for item in collection.rules:
        where = f"{source}: {getattr(item, 'title', '?')}"
        errors = getattr(item, "errors", [])
        if errors:
            into.refused.append((where, "; ".join(str(e) for e in errors)))
            continue
        try:
            if isinstance(item, SigmaCorrelationRule):
                into.correlations.append(_correlation(item, source))
            elif isinstance(item, SigmaRule):
                into.rules.append(compile_rule(item, source))
        except RuleError as exc:
            into.refused.append((where, str(exc)))


def load_paths(paths: Iterable[Path], into: RuleSet | None = None) -> RuleSet:
    """Load every .yml/.yaml file under the given files or directories (tests/ excluded)."""
    out = into if into is not None else RuleSet()
    for path in paths:
        files = (
            sorted(p for p in path.rglob("*.y*ml") if "tests" not in p.relative_to(path).parts)
            if path.is_dir()
            else [path]
        )
        for file in files:
            try:
                load_text(file.read_text(encoding="utf-8"), str(file), out)
            except (OSError, UnicodeDecodeError) as exc:
                out.refused.append((str(file), f"cannot read: {exc}"))
    _mark_correlated(out)
    return out


def _mark_correlated(rules: RuleSet) -> None:
    """Drop correlations whose rules did not load, saying so."""
    known = {r.name for r in rules.rules} | {r.id for r in rules.rules}
    for c in rules.correlations:
        missing = [ref for ref in c.rules if ref not in known]
        if missing:
            rules.refused.append((f"{c.source}: {c.title}",
                                  f"refers to rules that were not loaded: {missing}"))  # fmt: skip
    rules.correlations = [c for c in rules.correlations if all(ref in known for ref in c.rules)]
