"""The command lines of `sandtrace rules check|test` and `sandtrace replay`: argparse only, so
that the entry point builds every subcommand's help without loading the rule engine."""

from __future__ import annotations

import argparse

EXAMPLES_RULES = """examples:
  sandtrace rules check ./my-rules                # what loads, what is refused and why
  sandtrace rules check --json ./my-rules/extra.yml
  sandtrace rules test ./my-rules                 # runs ./my-rules/tests/*.yml
  sandtrace rules test ./my-rules --cases ./more-cases.yml
"""
EXAMPLES_REPLAY = """examples:
  sandtrace replay run.jsonl                      # events written by run/watch --events
  sandtrace replay --rules ./my-rules --alerts alerts.jsonl run.jsonl
  zcat old.jsonl.gz | sandtrace replay --json -
"""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`rules` (with `check` and `test`) and `replay`."""
    rules = sub.add_parser(
        "rules",
        help="check Sigma rules and run their test cases",
        description="Load Sigma rules the way the engine does and say what loads and what "
        "is refused (check), or run their test cases (test).",
        epilog=EXAMPLES_RULES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = rules.add_subparsers(dest="rules_command", required=True, metavar="check|test")
    check = actions.add_parser(
        "check",
        help="list the rules that load and those refused, with the reason",
        description="Load every .yml/.yaml rule under each DIR (tests/ directories left out) "
        "and each FILE. Exit 0 when every rule loads, 1 when any is refused, 2 when a path "
        "does not exist.",
    )
    check.add_argument("paths", nargs="+", metavar="DIR|FILE")
    check.add_argument("--json", action="store_true", help="one JSON document on stdout")
    test = actions.add_parser(
        "test",
        help="run rule test cases: each must fire or stay silent as it says",
        description="Run the test cases of the rules in DIR|FILE...: the case files in every "
        "tests/ directory under each DIR, tests/<stem>.yml beside each FILE, and every "
        "--cases file or directory. Exit 0 when every case passes and every rule loads, 1 "
        "otherwise, 2 when a path does not exist.",
    )
    test.add_argument("paths", nargs="+", metavar="DIR|FILE")
    test.add_argument(
        "--cases",
        action="append",
        default=[],
        metavar="FILE|DIR",
        help="also run the cases in FILE (or every .yml/.yaml in DIR); repeatable",
    )
    test.add_argument("--json", action="store_true", help="one JSON document on stdout")
    for p in (check, test):
        p.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")

    replay = sub.add_parser(
        "replay",
        help="run recorded events through the detection engine",
        description="Read the JSON lines `sandtrace run|watch --events FILE` wrote (alert "
        "lines in them are skipped; `-` reads stdin), run them through the engine and show "
        "the alerts as run and watch do. Malformed lines are counted and named by line "
        "number. Exit 0, or 1 when any line could not be read, 2 when a file is missing.",
        epilog=EXAMPLES_REPLAY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("files", nargs="+", metavar="FILE")
    replay.add_argument("--json", action="store_true", help="print alerts as JSON lines")
    replay.add_argument("--alerts", metavar="FILE", help="also append every alert to FILE as JSON")
    replay.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    replay.add_argument("--width", type=int, default=80, help="line width of text output")
    replay.add_argument(
        "--rules",
        action="append",
        default=[],
        metavar="DIR",
        help="add the Sigma rules in DIR (or a file) to the built-in pack (repeatable)",
    )
    replay.add_argument(
        "--no-builtin-rules", action="store_true", help="leave the built-in pack out"
    )
    replay.add_argument(
        "--egress-allow",
        action="append",
        default=None,
        metavar="[SANDBOX=]NET[:PORTS]",
        help="allow connects to NET (CIDR or address, optional ports 80,443), for every "
        "sandbox or only SANDBOX; any other destination alerts; repeatable",
    )
    replay.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
