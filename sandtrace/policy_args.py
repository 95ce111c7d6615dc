"""The command line of `sandtrace policy suggest`: argparse only."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  sandtrace policy suggest run.jsonl                 # per sandbox, with counts
  sandtrace policy suggest --any-sandbox --format flags run-*.jsonl
  sandtrace policy suggest --format toml events.jsonl >> service.toml
  sandtrace policy suggest --any-sandbox --format policy run.jsonl > egress.toml
  sandtrace policy suggest --wildcards 3 run.jsonl   # *.example.org for 3+ names below it
  sandtrace run --egress-policy egress.toml -- CMD
"""


def _at_least_two(text: str) -> int:
    """--wildcards N: a whole number of names, 2 or more (a wildcard for one name would
    allow more than was seen, for nothing)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of names, 2 or more")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`policy suggest`."""
    policy = sub.add_parser(
        "policy",
        help="propose an egress allow-list from recorded events",
        description="Policies made from what sandboxes did.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = policy.add_subparsers(dest="policy_command", required=True)
    suggest = what.add_parser(
        "suggest",
        help="an egress allow-list that lets every recorded connect pass",
        description="Read the JSON lines `run`/`watch --events` write (- for stdin) and "
        "propose the egress\nallow-list entries ([SANDBOX=]DEST[:PORTS]; DEST is the name "
        "the sandbox resolved, else\nthe address) that let every connect they recorded "
        "pass, with the count of each: a start\nfor moving from audit to enforcement. "
        "Loopback and unix socket connects are left out\n(a note says how many).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    suggest.add_argument("files", nargs="+", metavar="FILE", help="events, as JSON lines")
    suggest.add_argument(
        "--format",
        choices=["text", "flags", "toml", "policy"],
        default="text",
        help="entries with counts (default), run/watch options, the service's TOML, or an "
        "--egress-policy file (names the DNS servers asked as resolvers)",
    )
    suggest.add_argument(
        "--any-sandbox",
        action="store_true",
        help="one list for every sandbox (entries without SANDBOX=): for `run`, whose "
        "sandbox ids are new on every run",
    )
    suggest.add_argument(
        "--wildcards",
        type=_at_least_two,
        default=0,
        metavar="N",
        help="propose *.DOMAIN for N or more names below one registrable domain (by the "
        "Public Suffix List: names below a public suffix such as github.io are never "
        "grouped); default: every name on its own",
    )
    suggest.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
