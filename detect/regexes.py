"""What every match of a regular expression holds, worked out from its parse tree.

Generated matchers test these in C (substring, count and length checks) to turn most texts
away before a |re rule's expression runs; the analyses may find less than a match holds,
never more.
"""

from __future__ import annotations

import functools
import operator
import re
from collections import Counter
from types import ModuleType
from typing import Any

# re's parse tree (re._parser.SubPattern and its items): internals, without types of their own
Tree = Any


def required_literals(
    rx: re.Pattern[str], sets: list[frozenset[str]] | None = None
) -> frozenset[str] | None:
    """Strings of which any match must contain at least one (lowercased when the pattern
    ignores case), or None when the pattern guarantees none worth checking: the best of
    `sets` (by default the pattern's required_literal_sets). A substring test with these in
    C turns most events away before the regular expression runs."""
    sets = required_literal_sets(rx) if sets is None else sets
    return max(sets, key=lambda s: min(map(len, s))) if sets else None


def required_literal_sets(rx: re.Pattern[str]) -> list[frozenset[str]]:
    """Sets of strings such that any match contains at least one string of every set
    (lowercased when the pattern ignores case), in the pattern's order."""
    parsed = parse(rx)
    if parsed is None:
        return []
    c, tree = parsed
    fold = bool(rx.flags & re.IGNORECASE)

    def best(seq: Tree) -> frozenset[str] | None:
        useful = required(seq)
        return max(useful, key=lambda s: min(map(len, s))) if useful else None

    def required(seq: Tree) -> list[frozenset[str]]:
        sets: list[frozenset[str]] = []
        run: list[str] = []
        for op, av in seq:
            if op is c.LITERAL:
                run.append(chr(av))
                continue
            if run:
                sets.append(frozenset(["".join(run)]))
                run = []
            inner: frozenset[str] | None
            if op is c.SUBPATTERN:  # a group ignoring case in a pattern that does not: none
                inner = None if av[1] & re.IGNORECASE and not fold else best(av[3])
            elif op is c.BRANCH:
                alts = [best(alt) for alt in av[1]]
                found = [a for a in alts if a]  # all of them, or no set for the branch
                inner = frozenset[str]().union(*found) if found == alts and alts else None
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


def required_counts(rx: re.Pattern[str]) -> dict[str, int]:
    """Single characters any match holds more than once, with the fewest times it holds each
    (lowercased when the pattern ignores case): `text.count(c) >= n` turns away, in C, texts
    that hold each character but too few times for a match (an IP:port:IP:port pattern
    needs six dots and three colons; a URL has some of both)."""
    parsed = parse(rx)
    if parsed is None:
        return {}
    c, tree = parsed
    fold = bool(rx.flags & re.IGNORECASE)

    def counts(seq: Tree) -> Counter[str]:
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


def element_search(rx: re.Pattern[str]) -> re.Pattern[str] | None:
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
        return re.compile(
            ("\\x00" if start else "") + body + ("(?=\\n?\\x00)" if end else ""), rx.flags
        )
    except re.error:
        return None


def min_width(rx: re.Pattern[str]) -> int:
    """The fewest characters any match of `rx` spans (0 when unknown)."""
    parsed = parse(rx)
    return int(parsed[1].getwidth()[0]) if parsed is not None else 0


@functools.cache
def parse(rx: re.Pattern[str]) -> tuple[ModuleType, Tree] | None:
    """The pattern's parse tree as the re module makes it, with the module of its opcodes;
    None when this Python's re has neither (they are internals): the analyses above then
    find nothing, and only prefilter less."""
    try:
        import importlib  # noqa: PLC0415

        constants = importlib.import_module("re._constants")
        return constants, importlib.import_module("re._parser").parse(rx.pattern, rx.flags)
    except Exception:
        return None
