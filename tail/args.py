"""The command line of `sandtrace tail`: argparse only."""

from __future__ import annotations

import argparse

from api.tail import DEFAULT_SOCKET, FILTER_KINDS

EXAMPLES = f"""examples:
  sudo sandtrace tail                        # the local `sandtrace watch` ({DEFAULT_SOCKET})
  sudo sandtrace tail --alerts-only --kind exec
  sandtrace tail --server https://sandtrace.example:8780 --token-file ~/.sandtrace-token \\
      --host build-7 -o json
  sandtrace tail --server nats://10.0.0.1:4222,10.0.0.2:4222 --ca-file nats-ca.pem \\
      --alerts-only --from-start                # a whole fleet, its alert stream replayed
"""


def width_arg(text: str) -> int:
    """--width: a line width of at least 1 column (argparse says so, with usage, exit 2)."""
    try:
        width = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"want a line width in columns (at least 1), not {text!r}"
        ) from None
    if width < 1:
        raise argparse.ArgumentTypeError(
            f"want a line width of at least 1 column, not {width} (leave --width out for the "
            "terminal's width, or whole lines when the output is not a terminal)"
        )
    return width


WIDTH_HELP = (
    "cut text lines at N columns (default: the terminal's width; lines are not cut when "
    "the output is not a terminal)"
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tail",
        help="follow live events and alerts of a watch or of the detection service",
        description="Follow the events and alerts of the local `sandtrace watch` (over its "
        "Unix socket) or of a detection service (--server), filtered by the server, until "
        "Ctrl-C or SIGTERM. Reconnects when the server goes away.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--server",
        metavar="URL",
        help="the detection service (http or https), or a fleet's NATS cluster "
        "(nats://HOST:PORT[,HOST:PORT...], tls:// for TLS)",
    )
    p.add_argument(
        "--from-start",
        action="store_true",
        help="with nats://: replay the fleet's alert stream from its beginning, then follow",
    )
    p.add_argument("--nkey-file", metavar="FILE", help="NATS NKey seed for a nats:// --server")
    p.add_argument("--creds-file", metavar="FILE", help="NATS credentials for a nats:// --server")
    p.add_argument("--token-file", metavar="FILE", help="bearer token for --server, from FILE")
    p.add_argument("--ca-file", metavar="FILE", help="CA certificate(s) to verify an https server")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain http:// to a --server that is not on this host",
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        default=DEFAULT_SOCKET,
        help=f"the local watch's Unix socket (default {DEFAULT_SOCKET})",
    )
    p.add_argument("--alerts-only", action="store_true", help="alerts (and losses) only")
    p.add_argument(
        "--sandbox",
        action="append",
        default=[],
        metavar="ID",
        help="only this sandbox (repeatable, or ID,ID)",
    )
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="H",
        help="only this host (repeatable, or H,H)",
    )
    p.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="KINDS",
        help=f"only these event kinds, comma-separated "
        f"({', '.join(sorted(FILTER_KINDS))}); alerts raised by them too",
    )
    p.add_argument(
        "-o",
        "--output",
        choices=["compact", "json"],
        default="compact",
        help="compact coloured lines (default) or JSON lines",
    )
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--width", type=width_arg, default=None, metavar="N", help=WIDTH_HELP)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
