"""Sigma values as tests of one field: closures over a FieldDict.

pySigma hands over every value with its modifiers already applied: ``contains`` becomes a
wildcard string, ``windash`` and ``base64offset`` become expansions, ``re`` a regular
expression, ``cidr`` a network. Each becomes a closure here; the common shapes (a plain,
prefix, suffix or substring match without case) take fast paths in C-level str, set and
tuple calls. A value sandtrace cannot test is refused (RuleError).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable

from sigma.types import (
    CompareOperators,
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
    SigmaType,
    SpecialChars,
)

from detect.addresses import in_nets, ip_int, net_ints
from detect.fieldcache import FieldDict, Lowered, Matcher, lowered
from detect.fields import Value
from detect.regexes import required_literals
from detect.ruleset import RuleError

Simple = tuple[str, str]
"""(shape, lowercased needle) of a case-insensitive string of a common shape: shape
"exact", "prefix" (x*), "suffix" (*x) or "contains" (*x*)."""

ValueTest = Callable[[Value], bool]
"""A test of one field's value (text, number, list, or None when absent)."""


def simple(value: SigmaType) -> Simple | None:
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


def simples(values: Iterable[SigmaType]) -> list[Simple] | None:
    """Each value's simple() shape, or None unless every value has one."""
    out = [simple(v) for v in values]
    return [s for s in out if s is not None] if all(out) else None


def strings_test(name: str, simple: list[Simple]) -> Matcher:
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


def numbers_test(name: str, numbers: frozenset[int | float]) -> Matcher:
    def match(f: FieldDict) -> bool:
        v = f.get(name)
        return type(v) is int and v in numbers

    return match


def all_of(parts: list[Matcher]) -> Matcher:
    """AND of matchers, as plain nested calls (no generator per event)."""
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        a, b = parts
        return lambda f: a(f) and b(f)
    head, tail = parts[0], all_of(parts[1:])
    return lambda f: head(f) and tail(f)


def any_of(parts: list[Matcher]) -> Matcher:
    """OR of matchers, as plain nested calls."""
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        a, b = parts
        return lambda f: a(f) or b(f)
    head, tail = parts[0], any_of(parts[1:])
    return lambda f: head(f) or tail(f)


def as_keyword(value: SigmaType) -> SigmaType:
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
        return SigmaExpansion([as_keyword(v) for v in value.values])
    return value


def compile_regex(value: SigmaRegularExpression) -> re.Pattern[str]:
    flags = 0
    for flag in value.flags:
        flags |= value.sigma_to_python_flags[flag]
    try:
        return re.compile(str(value.regexp), flags)
    except re.error as exc:
        raise RuleError(f"regular expression {str(value.regexp)!r}: {exc}") from None


def regex_test(name: str, value: SigmaRegularExpression) -> Matcher:
    test = regex_value_test(compile_regex(value))
    return lambda f: test(f.get(name))


def regex_value_test(rx: re.Pattern[str]) -> ValueTest:
    """|re over a field's value (text, number, list of either, or None)."""
    needles = required_literals(rx)
    if needles is None:
        search = rx.search

        def match(v: Value) -> bool:
            if isinstance(v, list):
                return any(search(str(x)) is not None for x in v)
            return v is not None and search(str(v)) is not None

        return match
    fold = bool(rx.flags & re.IGNORECASE)
    pre = re.compile("|".join(re.escape(n) for n in sorted(needles)))

    def one(raw: Value, low: Lowered) -> bool:
        seen = low if fold else str(raw)
        # folding, `low` is the lowered text of `raw`, a text or number, never a list
        return pre.search(seen) is not None and rx.search(str(raw)) is not None  # type: ignore[arg-type]

    def prefiltered(v: Value) -> bool:
        if v is None:
            return False
        lv = lowered(v) if fold else None
        if isinstance(v, list):
            return any(one(x, lv[i] if lv else None) for i, x in enumerate(v))
        return one(v, lv)

    return prefiltered


def field_test(name: str, value: SigmaType) -> Matcher:
    if isinstance(value, SigmaRegularExpression):
        return regex_test(name, value)
    if type(value) is SigmaNumber:
        return numbers_test(name, frozenset([value.number]))
    if (shape := simple(value)) is not None:
        return strings_test(name, [shape])
    if isinstance(value, SigmaExpansion) and (shapes := simples(value.values)) is not None:
        return strings_test(name, shapes)
    if isinstance(value, SigmaExists):
        want = value.exists
        return lambda f: (f.get(name) not in (None, "", [])) == want
    if isinstance(value, SigmaFieldReference):
        other = value.field
        return lambda f: f.get(name) is not None and f.get(name) == f.get(other)
    test = _scalar_test(value)

    def match(f: FieldDict) -> bool:
        v = f.get(name)
        if isinstance(v, list):
            return any(test(x) for x in v)
        return test(v)

    return match


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


_COMPARE: dict[CompareOperators, Callable[[float, float], bool]] = {
    CompareOperators.LT: operator.lt,
    CompareOperators.LTE: operator.le,
    CompareOperators.GT: operator.gt,
    CompareOperators.GTE: operator.ge,
    CompareOperators.NEQ: operator.ne,
}


def _scalar_test(value: SigmaType) -> ValueTest:
    """A test for one field value (a string, a number, or absent)."""
    if isinstance(value, SigmaExpansion):
        tests = [_scalar_test(v) for v in value.values]
        return lambda v: any(t(v) for t in tests)
    if isinstance(value, SigmaCasedString | SigmaString):
        stest = _string_test(value, cased=isinstance(value, SigmaCasedString))
        number = None
        texts = [p for p in value.s if isinstance(p, str)]
        if value.s and len(texts) == len(value.s):
            try:
                number = int("".join(texts))
            except ValueError:
                number = None

        def test_string(v: Value) -> bool:
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
        rx = compile_regex(value)
        return lambda v: v is not None and rx.search(str(v)) is not None
    if isinstance(value, SigmaCIDRExpression):
        nets = net_ints([value.network])
        return lambda v: bool(v) and in_nets(ip_int(str(v)), nets)
    if isinstance(value, SigmaCompareExpression):
        op = _COMPARE[value.op]
        ref = value.number.number
        ref_f = float(ref)

        def compare(v: Value) -> bool:
            n = _num(v)
            return n is not None and op(n, ref_f)

        return compare
    raise RuleError(f"value {value!r} ({type(value).__name__}) is not supported")


def _num(v: Value) -> float | None:
    try:
        return float(v)  # type: ignore[arg-type]  # a list: TypeError, as None's
    except (TypeError, ValueError):
        return None
