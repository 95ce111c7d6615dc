"""`sandtrace rules check` and `sandtrace rules test`: a rule author's tools.

check loads rules with the engine's own loader (detect.loader) and says what loaded and what
was refused, with the reason; test runs rule test cases (detect.testing) through the engine,
one fresh engine per case, and names every case that did not do what it declares.

Exit codes: 0 all good; 1 a rule refused or a case failed (or none to run); 2 a path that
does not exist or holds no rules.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from api.render import escape
from detect.engine import Engine
from detect.loader import load_paths
from detect.ruleset import RuleSet
from detect.testing import Case, CaseError, CaseResult, load_cases, rules_of, run_case

OK, FAILED, USAGE = 0, 1, 2


class UsageError(Exception):
    """A path that cannot be used; the message says which and why (exit 2)."""


def _existing(paths: Iterable[str], what: str) -> list[Path]:
    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise UsageError(f"{what} path {p} does not exist")
        out.append(path)
    return out


def _load(paths: list[Path]) -> RuleSet:
    rules = load_paths(paths)
    if not rules.rules and not rules.correlations and not rules.refused:
        where = ", ".join(map(str, paths))
        raise UsageError(f"no .yml/.yaml rule files in {where}")
    return rules


# -- check ------------------------------------------------------------------------------------


def check_report(rules: RuleSet) -> dict[str, Any]:
    """What `check --json` prints: the rules and correlations loaded, and the refusals."""
    silent = Engine(rules).silent
    return {
        "rules": [
            {
                "id": r.id,
                "title": r.title,
                "level": r.level,
                "logsource": {"product": "linux", "category": r.category},
                "alerts": r.id not in silent,  # false: it only feeds correlations
                "source": r.source,
            }
            for r in rules.rules
        ],
        "correlations": [
            {
                "id": c.id,
                "title": c.title,
                "level": c.level,
                "type": c.kind,
                "rules": list(c.rules),
                "source": c.source,
            }
            for c in rules.correlations
        ],
        "refused": [{"where": where, "why": why} for where, why in rules.refused],
    }


def _print_check(report: dict[str, Any], out: TextIO) -> None:
    rows = [
        (
            r["id"],
            r["level"],
            r["logsource"]["category"],
            r["title"] + ("" if r["alerts"] else " [feeds correlations only]"),
        )
        for r in report["rules"]
    ] + [
        (c["id"], c["level"], f"correlation/{c['type']}", c["title"])
        for c in report["correlations"]
    ]
    if rows:
        id_width = max(len(escape(r[0])) for r in rows)
        out.write(f"{'ID':<{id_width}}  {'LEVEL':<13}  {'LOG SOURCE':<26}  TITLE\n")
        for rid, level, source, title in rows:
            out.write(f"{escape(rid):<{id_width}}  {level:<13}  {source:<26}  {escape(title)}\n")
    for refusal in report["refused"]:
        out.write(f"REFUSED {escape(refusal['where'])}: {escape(refusal['why'])}\n")
    n, c, r = len(report["rules"]), len(report["correlations"]), len(report["refused"])
    out.write(f"sandtrace: {n} rules and {c} correlations loaded, {r} refused\n")


def check_command(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    rules = _load(_existing(args.paths, "rules"))
    report = check_report(rules)
    if args.json:
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        _print_check(report, out)
    return FAILED if rules.refused else OK


# -- test -------------------------------------------------------------------------------------


def _yaml_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())


def case_files(paths: list[Path], extra: list[Path]) -> list[Path]:
    """Where cases are: every YAML file in a tests/ directory under each rules directory (the
    files the loader leaves out), tests/<stem>.yml beside each rule file, and the given
    --cases files and directories; each file once, in that order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += [p for p in _yaml_files(path) if "tests" in p.relative_to(path).parts[:-1]]
        else:
            found += [
                beside
                for suffix in (".yml", ".yaml")
                if (beside := path.parent / "tests" / f"{path.stem}{suffix}").is_file()
            ]
    for path in extra:
        found += _yaml_files(path) if path.is_dir() else [path]
    seen: set[Path] = set()
    unique = []
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


@dataclass(slots=True)
class CaseRun:
    results: list[CaseResult] = field(default_factory=list)
    unknown: list[Case] = field(default_factory=list)  # cases naming no loaded rule
    errors: list[str] = field(default_factory=list)  # case files that cannot be run
    files: int = 0

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]


def run_tests(rules: RuleSet, files: list[Path]) -> CaseRun:
    known = {r.id for r in rules.rules} | {c.id for c in rules.correlations}
    run = CaseRun(files=len(files))
    scopes: dict[str, RuleSet] = {}
    for file in files:
        try:
            cases = load_cases(file)
        except CaseError as exc:
            run.errors.append(str(exc))
            continue
        for case in cases:
            if case.rule not in known:
                run.unknown.append(case)  # a near-miss for a mistyped id would pass: fail it
            else:
                if case.rule not in scopes:
                    scopes[case.rule] = rules_of(rules, case.rule)
                run.results.append(run_case(rules, case, scopes[case.rule]))
    return run


def _titles(rules: RuleSet) -> dict[str, str]:
    return {r.id: r.title for r in rules.rules} | {c.id: c.title for c in rules.correlations}


def cases_report(rules: RuleSet, run: CaseRun) -> dict[str, Any]:
    """What `test --json` prints."""
    titles = _titles(rules)
    return {
        "cases": len(run.results) + len(run.unknown),
        "passed": len(run.results) - len(run.failed),
        "failed": [
            {
                "file": r.case.source,
                "case": r.case.name,
                "rule": r.case.rule,
                "title": titles.get(r.case.rule, ""),
                "expected": "fire" if r.case.fire else "silent",
                "got": "silent" if r.case.fire else "fired",
                "fired": r.fired,
            }
            for r in run.failed
        ]
        + [
            {
                "file": c.source,
                "case": c.name,
                "rule": c.rule,
                "title": "",
                "expected": "fire" if c.fire else "silent",
                "got": "no such rule loaded",
                "fired": [],
            }
            for c in run.unknown
        ],
        "errors": list(run.errors),
        "refused": [{"where": where, "why": why} for where, why in rules.refused],
    }


def _print_test(report: dict[str, Any], files: int, out: TextIO) -> None:
    for f in report["failed"]:
        rule = f"rule {escape(f['rule'])}" + (f" ({escape(f['title'])})" if f["title"] else "")
        fired = f" (alerts: {', '.join(f['fired'])})" if f["fired"] else ""
        out.write(
            f"FAIL {escape(f['file'])}: {escape(f['case'])}: {rule}: expected {f['expected']}, "
            f"got {f['got']}{fired}\n"
        )
    for error in report["errors"]:
        out.write(f"ERROR {escape(error)}\n")
    for refusal in report["refused"]:
        out.write(f"REFUSED {escape(refusal['where'])}: {escape(refusal['why'])}\n")
    out.write(
        f"sandtrace: {report['cases']} cases in {files} files: {report['passed']} passed, "
        f"{len(report['failed'])} failed; {len(report['errors'])} case files unreadable, "
        f"{len(report['refused'])} rules refused\n"
    )


def run_cases_command(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    paths = _existing(args.paths, "rules")
    extra = _existing(args.cases, "--cases")
    rules = _load(paths)
    files = case_files(paths, extra)
    if not files:
        raise UsageError(
            "no test cases: put case files in a tests/ directory beside the rules "
            "(DIR/tests/*.yml, or tests/<stem>.yml beside a rule file) or give --cases FILE"
        )
    run = run_tests(rules, files)
    report = cases_report(rules, run)
    if args.json:
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        _print_test(report, len(files), out)
    bad = report["failed"] or report["errors"] or report["refused"] or not report["cases"]
    return FAILED if bad else OK


def main(args: argparse.Namespace) -> int:
    """Run `sandtrace rules check|test` with parsed arguments."""
    try:
        return check_command(args) if args.rules_command == "check" else run_cases_command(args)
    except UsageError as exc:
        print(f"sandtrace: {exc}", file=sys.stderr)
        return USAGE
