"""The engine's generated matchers: per event type, one Python function testing every rule.

Each compiled condition (detect.conditions) is written out as Python source (code):
fields read straight from the event into locals on first use, lowered once, tests inlined
as C-level str/set/tuple/regex calls, the needles of every rule on a text found in one
Aho-Corasick pass. Each condition also has a guard: atoms of which one holds whenever it
does. generate_matcher indexes the rules by their guards, so that an event enters only the
rules one of whose atoms it satisfies. Correlations' observers (detect.correlation) read
fields through the same CodeContext.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, assert_never, cast, overload

import ahocorasick  # type: ignore[import-not-found]

from api.events import AnyEvent
from detect.addresses import in_nets, ip_int
from detect.conditions import Call, Cidrs, Join, Node, Not, Numbers, Regex, Strings
from detect.fieldcache import FieldDict, joined, lowered
from detect.fields import (
    ALWAYS_LOWER,
    ALWAYS_STR,
    CONSTANT,
    DECODES,
    EXPR_SCOPE,
    INLINE,
    LIST_FIELDS,
    LOWER_JOINED,
    RAW_JOINED,
    SPACE_JOINED,
    TEXT_FIELDS,
    Getter,
    text_expression,
)
from detect.ruleset import Rule

AtomKey = str | int | float | tuple[str, int]
Atom = tuple[str, str, AtomKey]
"""(kind, local, key) over a generated matcher's local holding a field: ("base", v_X, name)
when the lowered text's last path element is `name`; ("needle", v_X/r_X/j_X, text) when
the text contains `text`; ("num", r_X, n) when the number is `n`; ("eq", v_X, text) when
the lowered text is `text`; ("minlen", v_X/r_X, n) when the text has at least n characters;
("count", v_X/r_X, (c, n)) when the text holds the character c at least n times."""
ATOM_COST = {"base": 0, "minlen": 0, "eq": 1, "num": 1, "count": 1, "needle": 2}
_MINLEN_GUARD = 16  # a regex needing fewer characters than this is not indexed by length

Occurrences = Callable[[str], Iterator[tuple[int, tuple[str, int]]]]
"""An automaton's pass over a text: (end, (needle, mask)) for each occurrence."""


class CodeContext:
    """Constants and preloaded fields a generated matcher refers to.

    With `getters` (one event type's, see detect.fields.GETTERS), the generated code reads
    fields straight from the event (local `e`), a call per field instead of a walk through
    FieldDict's caches; closures it calls still read the FieldDict."""

    def __init__(self, getters: Mapping[str, Getter] | None = None) -> None:
        self.getters = getters
        self.consts: dict[str, object] = {}
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
        nul_joined = RAW_JOINED.get(getter) if getter is not None else None
        if nul_joined is None:
            return None
        self.raw_joined_fields.add(name)
        return self.lazy(f"k_{name}", self.read(nul_joined))

    def ip(self, name: str) -> str:
        """Code giving the field as FieldDict.ip gives it, parsed once per event."""
        if self.getters is None:
            return f"f.ip({name!r})"
        self.ip_fields.add(name)
        self.raw_fields.add(name)
        raw = self.lazy(f"r_{name}", self.load(f"r_{name}"))
        parse = f"({self.const(ip_int)}(str({raw})) if {raw} else None)"
        return _lazy(f"i_{name}", parse)

    def const(self, value: object) -> str:
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
        # text fields are always str: lowered in place, without lowered()'s checks
        if getter in ALWAYS_LOWER:
            low = raw
        elif name in TEXT_FIELDS or getter in ALWAYS_STR:
            low = f"{raw}.lower()"
        else:
            low = f"{self.const(lowered)}({raw})"
        return low if kind == "v" else f"{self.const(joined)}({low})"

    def read(self, getter: Getter) -> str:
        """Code reading a field from the event `e`: the getter's own expression when it has
        one (detect.fields.INLINE), saving a call, else a call to it."""
        source = INLINE.get(getter)
        return f"({source})" if source is not None else f"{self.const(getter)}(e)"

    def fixed(self, node: Strings | Regex) -> str | None:
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
            elements = self.lazy(home, self.load(home))
            self.needles.setdefault(home, set()).update(plain)
            found = self.lazy(f"p_{home}", f"F_{home}({elements})")
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
) -> tuple[Callable[[str], frozenset[str]], Occurrences]:
    """Which of `needles` occur in a text (overlapping ones included), and the automaton's
    own iterator over their occurrences with their masks."""
    automaton = ahocorasick.Automaton()
    for needle in needles:
        automaton.add_word(needle, (needle, masks.get(needle, 0)))
    automaton.make_automaton()
    search: Occurrences = automaton.iter

    def found(text: str) -> frozenset[str]:
        return frozenset([n for _, (n, _mask) in search(text)])

    return found, search


def _var(field: str) -> str:
    return f"v_{field}"


def _lazy(var: str, load: str) -> str:
    """An expression that loads a field into its local on first use only (the generated
    function starts every local at the sentinel _U)."""
    return f"({var} if {var} is not _U else ({var} := {load}))"


# -- conditions as code ----------------------------------------------------------------------


def code(node: Node, ctx: CodeContext) -> str:
    """A Python expression testing what `node` tests, in the generated matcher of `ctx`."""
    if isinstance(node, Join):
        return "(" + f" {node.op} ".join(code(p, ctx) for p in node.parts) + ")"
    if isinstance(node, Not):
        return f"(not {code(node.inner, ctx)})"
    if isinstance(node, Strings):
        return _strings_code(node, ctx)
    if isinstance(node, Regex):
        return _regex_code(node, ctx)
    if isinstance(node, Cidrs):
        return f"{ctx.const(in_nets)}({ctx.ip(node.name)}, {ctx.const(node.ints)})"
    if isinstance(node, Numbers):
        ctx.raw_fields.add(node.name)
        load = ctx.lazy(f"r_{node.name}", ctx.load(f"r_{node.name}"))
        return f"(type({load}) is int and r_{node.name} in {ctx.const(node.numbers)})"
    if isinstance(node, Call):
        return f"{ctx.const(node.test)}({ctx.fields})"
    assert_never(node)


# List fields' elements joined with NUL: a shape's needle in the joined text.
_WRAPPED = {"exact": "\0{}\0", "prefix": "\0{}", "suffix": "{}\0", "contains": "{}"}


def _strings_code(node: Strings, ctx: CodeContext) -> str:
    if (fixed := ctx.fixed(node)) is not None:
        return fixed
    if node.name in LIST_FIELDS:
        # Elements joined with NUL (which no argv element or path holds) turn "any
        # element equals / starts with / ends with / contains" into one substring search.
        ctx.joined_fields.add(node.name)
        elements = ctx.lazy(f"j_{node.name}", ctx.load(f"j_{node.name}"))
        wanted = {_WRAPPED[shape].format(n) for shape, n in node.simple}
        return f"({elements} is not None and {ctx.contains_any(f'j_{node.name}', wanted)})"
    ctx.low_fields.add(node.name)
    v = _var(node.name)
    exact = frozenset(n for shape, n in node.simple if shape == "exact")
    prefixes = tuple(n for shape, n in node.simple if shape == "prefix")
    suffixes = tuple(n for shape, n in node.simple if shape == "suffix")
    needles = [n for shape, n in node.simple if shape == "contains"]
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


def _regex_code(node: Regex, ctx: CodeContext) -> str:
    """|re: on a text field, a length check and a substring prefilter in C, then the
    expression; on other fields, the expression over the value the matcher read."""
    if (fixed := ctx.fixed(node)) is not None:
        return fixed
    name = node.name
    if name not in TEXT_FIELDS:  # lists element by element, numbers as text
        ctx.raw_fields.add(name)
        raw = ctx.lazy(f"r_{name}", ctx.load(f"r_{name}"))
        test = f"{ctx.const(node.value_test)}({raw})"
        fold = bool(node.rx.flags & re.IGNORECASE)
        search = node.spread.search if node.spread is not None else None
        spread = ctx.raw_joined(name) if search is not None else None
        if spread is not None:  # one search over all the elements before one per element
            found = f"{ctx.const(search)}({spread}) is not None"
            test = f"{spread} is not None and {found} and {test}"
        if (
            name in LIST_FIELDS
            and node.needles
            and (fold or all(n.isascii() for n in node.needles))
        ):
            # A needle in an element is (lowered) in the lowered, joined elements: one
            # automaton pass over the list instead of a prefilter per element.
            ctx.joined_fields.add(name)
            var = f"j_{name}"
            elements = ctx.lazy(var, ctx.load(var))
            needles = {n.lower() for n in node.needles}
            return f"({elements} is not None and {ctx.contains_any(var, needles)} and {test})"
        return f"({test})"
    fold = bool(node.rx.flags & re.IGNORECASE)
    if fold:  # matching the lowered text ignoring case is the same match
        ctx.low_fields.add(name)
        v = _var(name)
        load = ctx.load(v)
    else:
        ctx.raw_fields.add(name)
        v = f"r_{name}"
        load = ctx.load(v)
    terms = [f"{ctx.lazy(v, load)} is not None"]
    if node.min_width > 1:  # a text shorter than any match cannot hold one
        terms.append(f"len({v}) >= {node.min_width}")
    if node.needles:
        terms.append(ctx.contains_any(v, node.needles))
    for ch in node.chars:
        if node.needles != frozenset(ch) or ch in node.counts:
            if ch in node.counts:
                terms.append(f"{v}.count({ctx.const(ch)}) >= {node.counts[ch]}")
            else:
                terms.append(f"{ctx.const(ch)} in {v}")
    terms += [
        "(" + " or ".join(f"{ctx.const(x)} in {v}" for x in others) + ")" for others in node.others
    ]
    terms.append(f"{ctx.const(node.rx.search)}({v}) is not None")
    return "(" + " and ".join(terms) + ")"


# -- guards ----------------------------------------------------------------------------------


def guard(node: Node) -> list[Atom] | None:
    """Atoms of which at least one holds whenever `node` does (None when there is no such
    list): generate_matcher indexes rules by them, so that an event enters only the rules
    one of whose atoms it satisfies."""
    if isinstance(node, Join):
        guards = [guard(p) for p in node.parts]
        if node.op == "or":
            if any(g is None for g in guards):
                return None
            return [a for g in guards if g is not None for a in g]
        known = [g for g in guards if g]
        if not known:
            return None
        # AND: any one part's atoms will do; take the cheapest to look up, then the fewest.
        return min(known, key=lambda g: (max(ATOM_COST[a[0]] for a in g), len(g)))
    if isinstance(node, Strings):
        return _strings_guard(node)
    if isinstance(node, Regex):
        return _regex_guard(node)
    if isinstance(node, Numbers):
        return [("num", f"r_{node.name}", n) for n in sorted(node.numbers)]
    return None


def _strings_guard(node: Strings) -> list[Atom] | None:
    if node.name in LIST_FIELDS:
        needles = {_WRAPPED[shape].format(n) for shape, n in node.simple}
        return [("needle", f"j_{node.name}", n) for n in sorted(needles)]
    out: list[Atom] = []
    for shape, n in node.simple:
        if shape == "suffix" and n.startswith("/") and len(n) > 1 and "/" not in n[1:]:
            out.append(("base", _var(node.name), n[1:]))
        elif shape == "exact":
            out.append(("eq", _var(node.name), n))
        elif (shape == "contains" and n) or (shape == "prefix" and len(n) >= 2):
            out.append(("needle", _var(node.name), n))  # a prefix is contained too
        else:
            return None
    return out


def _regex_guard(node: Regex) -> list[Atom] | None:
    if node.name not in TEXT_FIELDS:
        return None
    # A single character selects nothing, unless needed several times (a punctuation
    # mark: letters come in words); a long minimum width selects short texts out.
    if not node.needles or min(map(len, node.needles)) < 2:
        fold = bool(node.rx.flags & re.IGNORECASE)
        text = _var(node.name) if fold else f"r_{node.name}"
        counts = [(c, n) for c, n in node.counts.items() if not c.isalnum()]
        if counts:  # the rarest: needed most often
            return [("count", text, max(counts, key=lambda cn: (cn[1], cn[0])))]
        if node.min_width < _MINLEN_GUARD:
            return None
        return [("minlen", text, node.min_width)]
    if bool(node.rx.flags & re.IGNORECASE) or all(n.isascii() for n in node.needles):
        # An ASCII needle in the text is its lowercase in the lowered text (ASCII letters
        # lower one by one, whatever surrounds them): one automaton pass serves both.
        return [("needle", _var(node.name), n.lower()) for n in sorted(node.needles)]
    return [("needle", f"r_{node.name}", n) for n in sorted(node.needles)]


# -- matchers --------------------------------------------------------------------------------


@overload
def generate_matcher(
    rules: list[Rule], getters: None = None
) -> Callable[[FieldDict], list[int]]: ...
@overload
def generate_matcher(
    rules: list[Rule], getters: Mapping[str, Getter]
) -> Callable[[AnyEvent], list[int]]: ...
def generate_matcher(
    rules: list[Rule], getters: Mapping[str, Getter] | None = None
) -> Callable[[FieldDict], list[int]] | Callable[[AnyEvent], list[int]]:
    """One Python function that tests every rule of a category against an event's fields,
    returning the indices of those that match. Each field a string test reads is lowered
    once, when first needed; tests are inlined as C-level str/set/tuple/regex calls; anything else
    calls the rule's compiled closure. Same semantics as Rule.test, which tests check.

    Rules are indexed by their guards (see guard): the function first looks the event up
    by the last path element of a field, the needles its text contains (one Aho-Corasick
    pass per text; a command line's in its argv's), how often it holds a character and its
    numbers, and enters only the rules one of whose atoms holds, plus those without a
    guard, testing them in groups of eight. A path field's part of the index is worked out
    once per value (_memoised).

    Without getters the function takes a FieldDict. With `getters` (those of the one event
    type it will see) it takes the event and reads fields straight from it; it makes a
    FieldDict only if a test it calls as a closure needs one."""
    ctx = CodeContext(getters)
    always = 0
    index: dict[tuple[str, str], dict[AtomKey, int]] = {}
    for i, rule in enumerate(rules):
        atoms = guard(rule.node)
        if atoms is None or any(_holds(getters, atom) for atom in atoms):
            always |= 1 << i
            continue
        for atom in atoms:
            if _holds(getters, atom) is False:
                continue  # a fixed value that is never this one
            kind, var, key = atom
            if kind == "needle" and isinstance(key, str):  # (a needle's key is its text)
                var, key = ctx.needle_home(var, key)
                ctx.needles.setdefault(var, set()).add(key)
            table = index.setdefault((kind, var), {})
            table[key] = table.get(key, 0) | 1 << i
    # Fields whose values repeat (a host runs few executables) have their part of the index
    # worked out once per value: lowered, looked up, searched, kept with what it gave.
    # Each is keyed by the bytes it decodes when it decodes one attribute, else by its text.
    memo = {
        var[2:]: DECODES.get(getters[var[2:]])
        for _, var in index
        if getters is not None and var[2:] in _MEMO_FIELDS
    }
    derived = {f"{f}_{name}" for name in memo for f in ("v", "r")}
    # raw forms first: the lowered and joined forms of a field read its raw local on the way
    loaded = {var for _, var in index if var not in derived}
    loaded |= {f"r_{name}" for name, source in memo.items() if source is None}
    assigned: set[str] = set()
    loads = []
    for var in sorted(loaded, key=lambda var: (var[0] != "r", var)):
        loads.append(f"    {var} = {ctx.load(var, assigned)}")
        assigned.add(var)
    namespace: dict[str, Any] = {}
    tables = {key: f"T{n}" for n, key in enumerate(sorted(index))}
    for name, source in sorted(memo.items()):
        own = {entry: index[entry] for entry in index if entry[1] in (f"v_{name}", f"r_{name}")}
        lines, out = _memoised(name, source, own, tables=tables, ctx=ctx, namespace=namespace)
        loads += lines
        assigned.update(out)
    # Every rule is tested after the index has read its fields: no first-use checks for those.
    ctx.preloaded = {var for _, var in index}
    ctx.preloaded |= {f"p_{var}" for kind, var in index if kind == "needle"}
    ctx.preloaded |= ctx.raw_loaded  # lowered forms read the raw value on the way
    exprs = [code(rule.node, ctx) for rule in rules]
    if getters is None:
        lines, unset = ["def match(f):", "    low = f.low"], []
    else:  # the event itself; a FieldDict only for the closures some tests call
        lines, unset = ["def match(e):"], ["f"]
    # Fields load on first use (see _lazy): most rules stop at their first test.
    # Every local starts unset (_U) but those the index loads, in one chained assignment.
    unset += [f"i_{name}" for name in sorted(ctx.ip_fields)]
    unset += [f"k_{name}" for name in sorted(ctx.raw_joined_fields)]
    unset += [f"v_{name}" for name in sorted(ctx.low_fields)]
    unset += [f"r_{name}" for name in sorted(ctx.raw_fields)]
    unset += [f"j_{name}" for name in sorted(ctx.joined_fields)]
    unset += [f"p_{var}" for var in sorted(ctx.needles)]
    unset = [var for var in unset if var not in assigned]
    if unset:
        lines.append(f"    {' = '.join(unset)} = _U")
    lines.append(f"    cand = {always}")
    lines += loads
    for entry, table in sorted(index.items()):
        if entry[1] not in derived:
            lines += _index_lines(*entry, table, tables[entry], namespace)
    lines.append("    found = []")
    tests = [
        f"if cand & {1 << i} and {expr}:\n    found.append({i})" for i, expr in enumerate(exprs)
    ]
    if len(tests) <= _GROUP:
        lines += [textwrap.indent(test, "    ") for test in tests]
    else:  # most events enter one rule or none: rules in groups, a group tested only when
        lines.append("    if cand:")  # one of its rules is a candidate
        for start in range(0, len(tests), _GROUP):
            group = tests[start : start + _GROUP]
            lines.append(f"        if cand & {((1 << len(group)) - 1) << start}:")
            lines += [textwrap.indent(test, " " * 12) for test in group]
    lines.append("    return found")
    masks = {
        var: cast("dict[str, int]", table)
        for (kind, var), table in index.items()
        if kind == "needle"
    }
    namespace.update(ctx.namespace(masks))
    namespace["_U"] = object()
    exec(compile("\n".join(lines), "<sandtrace rules>", "exec"), namespace)  # noqa: S102
    matcher: Callable[[FieldDict], list[int]] | Callable[[AnyEvent], list[int]]
    matcher = namespace["match"]
    return matcher


_GROUP = 8  # rules per group in a generated matcher
_MEMO_FIELDS = frozenset({"Image", "ParentImage", "OriginalFileName", "CurrentDirectory"})
_MEMO_SIZE = 4096  # values kept per field; all forgotten at once when full


def _memoised(
    name: str,
    source: str | None,
    own: Mapping[tuple[str, str], dict[AtomKey, int]],
    *,
    tables: Mapping[tuple[str, str], str],
    ctx: CodeContext,
    namespace: dict[str, Any],
) -> tuple[list[str], list[str]]:
    """Field `name`'s part of the index (its entries `own`) as a function D_<name> of the
    field's value, run once per value and its results kept in M_<name>; the value is looked
    up by the bytes attribute `source` when the field decodes one (and decoded there), else
    by the text (r_<name>). The matcher's lines that look it up, and the locals they set."""
    raw = f"r_{name}"
    out = [var for var in (f"v_{name}",) if any(v == var for _, v in own)]
    out += [f"p_{var}" for kind, var in own if kind == "needle"]
    lines = []
    if source is None:
        body = [f"def D_{name}({raw}):", "    cand = 0"]
        lookup = raw
    else:  # the text is decoded here, once per value, and kept with the rest
        body = [f"def D_{name}(b):", f"    {raw} = {text_expression('b')}", "    cand = 0"]
        out.insert(0, raw)
        lookup = f"b_{name}"  # the bytes behind r_X
        lines.append(f"    {lookup} = {source}")
    body += [f"    {var} = _U" for var in out if var.startswith("p_")]
    if f"v_{name}" in out:
        body.append(f"    v_{name} = {ctx.load(f'v_{name}', {raw})}")
    for entry, table in sorted(own.items()):
        body += _index_lines(*entry, table, tables[entry], namespace)
    body.append(f"    return cand, {', '.join(out)}")
    exec(compile("\n".join(body), f"<sandtrace {name}>", "exec"), namespace)  # noqa: S102
    namespace[f"M_{name}"] = {}
    lines += [
        f"    m_{name} = M_{name}.get({lookup})",
        f"    if m_{name} is None:",
        f"        if len(M_{name}) >= {_MEMO_SIZE}:",
        f"            M_{name}.clear()",
        f"        m_{name} = M_{name}[{lookup}] = D_{name}({lookup})",
        f"    c, {', '.join(out)} = m_{name}",
        "    cand |= c",
    ]
    return lines, out


def _index_lines(
    kind: str, var: str, table: dict[AtomKey, int], name: str, namespace: dict[str, Any]
) -> list[str]:
    """The code adding to `cand` the rules the index entry (kind, var) lets in (its table
    is `name` in the namespace; needles' rules ride in their automaton's values)."""
    if kind == "base":
        namespace[name] = table
        return [
            f"    if {var} is not None:",
            f"        cand |= {name}.get({var}.rpartition('/')[2], 0)",
        ]
    if kind == "num":
        namespace[name] = table
        return [f"    if type({var}) is int:", f"        cand |= {name}.get({var}, 0)"]
    if kind == "eq":
        namespace[name] = table
        return [f"    if {var} is not None:", f"        cand |= {name}.get({var}, 0)"]
    lines = [f"    if {var} is not None:"]
    if kind == "minlen":  # each threshold's rules once the text is that long
        for width, mask in sorted(table.items()):
            lines += [f"        if len({var}) >= {width}:", f"            cand |= {mask}"]
    elif kind == "count":  # each character's rules once the text holds it that often
        counts = cast("dict[tuple[str, int], int]", table)
        for (char, times), mask in sorted(counts.items()):
            lines += [
                f"        if {var}.count({char!r}) >= {times}:",
                f"            cand |= {mask}",
            ]
    else:  # the automaton's values carry each needle's rules: one loop sets both
        lines += [
            f"        p_{var} = set()",
            f"        for _, (n, m) in S_{var}({var}):",
            f"            p_{var}.add(n)",
            "            cand |= m",
        ]
    return lines


def _holds(getters: Mapping[str, Getter] | None, atom: Atom) -> bool | None:
    """Whether an "eq" atom holds for every event (True) or none (False) because its field
    has one fixed value for the type (an Action or Initiated), None when it depends."""
    kind, var, key = atom
    getter = getters.get(var[2:]) if getters is not None and kind == "eq" else None
    if getter not in CONSTANT:
        return None
    return bool(CONSTANT[getter] == key)
