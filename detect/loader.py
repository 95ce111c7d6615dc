"""Sigma rule files loaded: parsed by pySigma, compiled for sandtrace's events.

Each file's rules are compiled (detect.conditions) against the fields of their log source
(detect.fields); correlations are kept for the engine. A rule sandtrace cannot evaluate
(another log source, a field it does not provide, a value type it does not support) and a
file that is not Sigma are refused with the reason, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml
from sigma.collection import SigmaCollection
from sigma.correlations import SigmaCorrelationCondition, SigmaCorrelationRule
from sigma.exceptions import SigmaError
from sigma.rule import SigmaRule

from detect.conditions import Join, compile_condition
from detect.fields import CATEGORY_FIELDS, GROUP_LIST_FIELDS, PRODUCT
from detect.ruleset import Correlation, Rule, RuleError, RuleSet


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
        parts = [
            compile_condition(c.parse(), fields, used) for c in rule.detection.parsed_condition
        ]
    except SigmaError as exc:
        raise RuleError(str(exc)) from None
    node = parts[0] if len(parts) == 1 else Join("or", parts)
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
    refs = [r.reference for r in rule.rules or []]
    group_by = list(rule.group_by or [])
    aliases: dict[str, dict[str, str]] = rule.aliases.to_dict() if rule.aliases else {}
    for alias, mapping in aliases.items():
        unmapped = [ref for ref in refs if ref not in mapping]
        if alias in group_by and unmapped:
            raise RuleError(f"alias {alias} names no field for rule(s) {unmapped}")
    group_fields = {aliases.get(g, {}).get(ref, g) for g in group_by for ref in refs}
    lists = sorted(group_fields & GROUP_LIST_FIELDS)
    if lists and len(group_by) != 1:
        raise RuleError(f"list field {lists[0]} can group only on its own (one group-by)")
    return Correlation(
        id=str(rule.id) if rule.id else rule.title,
        title=rule.title,
        level=_level(rule),
        description=rule.description or "",
        tags=_tags(rule),
        kind=kind,
        rules=refs,
        group_by=group_by,
        seconds=float(rule.timespan.seconds),
        op=op,
        count=int(count),
        field=fieldref,
        source=source,
        generate=bool(getattr(rule, "generate", False)),
        aliases=aliases,
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
            why = f"refers to rules that were not loaded: {missing}"
            rules.refused.append((f"{c.source}: {c.title}", why))
    rules.correlations = [c for c in rules.correlations if all(ref in known for ref in c.rules)]
