"""The command line of `sandtrace sandbox freeze|thaw|kill NAME`: argparse only, so that the
entry point can build every subcommand's help without loading the collector."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  sudo sandtrace sandbox thaw st-1a2b3c4d            # end a --freeze-on freeze
  sudo sandtrace sandbox kill /sandtrace/st-1a2b3c4d # kill every process in it
  sudo sandtrace sandbox freeze st-1a2b3c4d --json   # the action as a JSON event
"""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number of seconds, not {text!r}") from None
    if not 0 < value <= 600:  # also refuses nan
        raise argparse.ArgumentTypeError(f"want seconds above 0, at most 600, not {text}")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`sandbox`."""
    p = sub.add_parser(
        "sandbox",
        help="freeze, thaw or kill a sandbox",
        description="Act on a sandbox's cgroup v2 subtree: freeze or thaw it (cgroup.freeze), "
        "or kill every\nprocess in it (cgroup.kill, or SIGKILL to each where the kernel lacks "
        "it). Waits until\nthe kernel reports it done; exit 1 when it does not within "
        "--timeout.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=["freeze", "thaw", "kill"])
    p.add_argument(
        "name",
        metavar="NAME",
        help="the sandbox: its id as sandtrace printed it (st-1a2b3c4d), its cgroup path "
        "(/sandtrace/st-1a2b3c4d), its directory, or its cgroup id",
    )
    p.add_argument("--json", action="store_true", help="print the action as a JSON event")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the kernel (default 5)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
