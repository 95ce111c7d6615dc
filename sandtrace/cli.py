"""The `sandtrace` command: one entry point for every part, each loaded only when it runs.

    sandtrace run|watch   the collector (root, BCC): probes -> collector
    sandtrace serve       the detection service (no root, no BCC): service -> detect
    sandtrace tail        follow a watch or a service live: tail
    sandtrace sandbox     freeze, thaw or kill a sandbox: collector (root)
    sandtrace policy      an egress allow-list proposed from recorded events

Building the parser imports only each part's argparse module, so `sandtrace serve` and
`sandtrace tail` start where BCC is absent, and `--help` is quick everywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import structlog

from collector import args as collector_args
from collector import sandbox_args
from sandtrace import __version__, policy_args, tools_args
from service import args as service_args
from tail import args as tail_args


def examples(*blocks: str) -> str:
    """One "examples:" section made of each subcommand's own (each starts "examples:")."""
    lines = ["examples:"]
    for block in blocks:
        head, _, body = block.partition("\n")
        if head != "examples:":
            raise ValueError(f"an examples block starts with 'examples:', not {head!r}")
        lines += [line for line in body.splitlines() if line.strip()]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandtrace",
        description="Trace exec, connect and bind of sandboxed processes with eBPF.",
        # Every subcommand's examples, once each, in the order of the subcommands below.
        epilog=examples(
            collector_args.EXAMPLES_RUN,
            collector_args.EXAMPLES_WATCH,
            service_args.EXAMPLES,
            tail_args.EXAMPLES,
            tools_args.EXAMPLES_RULES,
            tools_args.EXAMPLES_REPLAY,
            sandbox_args.EXAMPLES,
            policy_args.EXAMPLES,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sandtrace {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    collector_args.add_parsers(sub)
    service_args.add_parser(sub)
    tail_args.add_parser(sub)
    tools_args.add_parsers(sub)
    sandbox_args.add_parser(sub)
    policy_args.add_parser(sub)
    return parser


def configure_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # sys.stderr as it is when a logger is made, not when this ran: an embedding program
        # (or a test) may swap it afterwards
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except BrokenPipeError:  # e.g. `sandtrace --help | head -3`: the reader had enough
        return _reader_gone()
    configure_logging(args.verbose)
    try:
        if args.command == "serve":
            from service import main as service  # noqa: PLC0415

            return asyncio.run(service.serve(args))
        if args.command == "tail":
            from tail import client  # noqa: PLC0415

            return client.main(args)
        if args.command == "rules":
            from sandtrace import rules  # noqa: PLC0415

            return rules.main(args)
        if args.command == "policy":
            from sandtrace import policy  # noqa: PLC0415

            return policy.main(args)
        if args.command == "sandbox":
            from collector import response  # noqa: PLC0415

            return response.sandbox_main(
                args.action, args.name, as_json=args.json, timeout=args.timeout
            )
        if args.command == "replay":
            from sandtrace import replay  # noqa: PLC0415

            return replay.main(args)
        from collector import cli as collector  # noqa: PLC0415

        return collector.main(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """Whoever read stdout went away: no more output, not even the interpreter's last
    flush (which would fail again, with a traceback)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
