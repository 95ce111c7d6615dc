"""The command lines of `sandtrace run` and `sandtrace watch`: argparse only, so that the
entry point can build every subcommand's help without loading the collector."""

from __future__ import annotations

import argparse
from pathlib import Path

from api.orders import LEVELS
from api.tail import DEFAULT_SOCKET
from tail.args import WIDTH_HELP, width_arg

DEFAULT_SPOOL = Path("/var/lib/sandtrace/spool")

EXAMPLES_RUN = """examples:
  sudo sandtrace run -- curl -s http://192.0.2.10/
  sudo sandtrace run --json --events run.jsonl -- python3 agent.py
  sudo sandtrace run --json -- ./build.sh | jq -c 'select(.kind == "alert")'
  sudo sandtrace run --wait-all -- ./start-services.sh
  sudo sandtrace run --kill-on high -- ./install.sh   # kill what raises a high alert
"""
EXAMPLES_WATCH = """examples:
  sudo sandtrace watch                       # sandtrace's sandboxes and container cgroups
  sudo sandtrace watch --cgroup /sys/fs/cgroup/mybox --cgroup /sys/fs/cgroup/other
  sudo sandtrace watch --cgroup /sandtrace/st-1a2b3c4d   # as run's startup line names it
  sudo sandtrace watch --pid 4242            # a process and all its descendants
  sudo sandtrace watch --all --json          # the whole host, as JSON lines
  sudo sandtrace watch --cgroup /sandtrace/st-1a2b3c4d --freeze-on critical
"""


def _number(text: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number, not {text!r}") from None


def _ring_pages(text: str) -> int:
    pages = int(_number(text, int))
    if pages < 1 or pages & (pages - 1):
        raise argparse.ArgumentTypeError(f"want a power of two (1, 2, 4, ... 1024), not {pages}")
    return pages


def _mib(text: str) -> int:
    mib = int(_number(text, int))
    if mib <= 0:
        raise argparse.ArgumentTypeError(f"want a positive number of MiB, not {mib}")
    return mib


def _linger(text: str) -> float:
    seconds = float(_number(text, float))
    if not 0 < seconds <= 60:  # also refuses nan
        raise argparse.ArgumentTypeError(f"want seconds above 0, at most 60, not {text}")
    return seconds


def _pid(text: str) -> int:
    pid = int(_number(text, int))
    if pid < 1:
        raise argparse.ArgumentTypeError(f"want a process id (1 or more), not {pid}")
    return pid


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    p.add_argument("--events", metavar="FILE", help="also append every event to FILE as JSON")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--width", type=width_arg, default=None, metavar="N", help=WIDTH_HELP)
    p.add_argument(
        "--ring-pages",
        type=_ring_pages,
        default=1024,
        help="kernel ring buffer size in pages, a power of two (default 1024 = 4 MiB)",
    )
    p.add_argument(
        "--perf-buffer",
        action="store_true",
        help="use the perf buffer even where the BPF ring buffer exists",
    )
    p.add_argument(
        "--no-connect-hook",
        action="store_true",
        help="do not hook connect(): spares every process on the host the kernel's per-connect "
        "hook cost; TCP connects are still traced, UDP connects are not",
    )
    p.add_argument(
        "--no-bind-hook",
        action="store_true",
        help="do not hook bind(): spares every process on the host the kernel's per-bind hook "
        "cost; TCP listeners are still traced, binds (and UDP servers) are not",
    )
    p.add_argument(
        "--server",
        metavar="URL",
        help="stream events to a detection service (sandtrace serve: http[s]://HOST:PORT) or "
        "to a fleet on NATS JetStream (nats://HOST:PORT[,HOST:PORT...], tls:// for TLS) "
        "instead of detecting here",
    )
    p.add_argument(
        "--server-nkey-file", metavar="FILE", help="NATS NKey seed for a nats:// --server"
    )
    p.add_argument(
        "--server-creds-file", metavar="FILE", help="NATS credentials file for a nats:// --server"
    )
    p.add_argument(
        "--server-token-file", metavar="FILE", help="bearer token for --server, read from FILE"
    )
    p.add_argument(
        "--server-ca-file",
        metavar="FILE",
        help="verify an https:// --server's certificate against the CA in FILE",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain http:// to a --server that is not on this host",
    )
    p.add_argument(
        "--server-transport",
        choices=["http", "websocket"],
        default="http",
        help="one POST per batch (default), or one WebSocket for all of them",
    )
    p.add_argument(
        "--server-linger",
        type=_linger,
        default=0.05,
        metavar="SECONDS",
        help="send a batch once its first event is this old, if it has not filled (500 "
        "events) before; default 0.05",
    )
    p.add_argument(
        "--spool-dir",
        metavar="DIR",
        type=Path,
        default=None,
        help="keep batches the service has not taken yet in DIR, also across restarts "
        f"(watch: default {DEFAULT_SPOOL}; run: no spool unless given)",
    )
    p.add_argument(
        "--spool-max",
        metavar="MIB",
        type=_mib,
        default=256,
        help="size bound of the spool in MiB; beyond it the oldest batches are "
        "discarded and counted (default 256)",
    )
    p.add_argument(
        "--no-spool",
        action="store_true",
        help="hold undelivered batches in memory only (16 MiB, then discard)",
    )
    d = p.add_argument_group("detection")
    d.add_argument(
        "--rules",
        action="append",
        default=[],
        metavar="DIR",
        help="add the Sigma rules in DIR (or a file) to the built-in pack (repeatable)",
    )
    d.add_argument("--no-builtin-rules", action="store_true", help="leave the built-in pack out")
    d.add_argument("--no-detect", action="store_true", help="trace only, raise no alerts")
    d.add_argument("--alerts", metavar="FILE", help="also append every alert to FILE as JSON")
    d.add_argument("--alerts-only", action="store_true", help="show only alerts (and losses)")
    d.add_argument(
        "--egress-allow",
        action="append",
        default=None,
        metavar="[SANDBOX=]DEST[:PORTS]",
        help="allow connects to DEST: a network or address (192.0.2.0/24), a name "
        "(pypi.org) or a wildcard (*.example.org: any name below it) the sandbox resolved; "
        "optional ports 1-65535: 443, 8000-8100, 80,443; for every sandbox or only "
        "SANDBOX; any other destination "
        "alerts, except loopback (see --egress-check-loopback); repeatable "
        "(default: no allow-list)",
    )
    d.add_argument(
        "--egress-check-loopback",
        action="store_true",
        help="judge loopback connects (127.0.0.0/8, ::1) by the egress allow-list too; by "
        "default a sandbox may always connect to its own host's loopback",
    )
    d.add_argument(
        "--resolver",
        action="append",
        default=None,
        metavar="[SANDBOX=]ADDR",
        help="the only DNS servers the sandbox (or only SANDBOX) may query; DNS to any "
        "other alerts; repeatable (default: the nameservers of the host's /etc/resolv.conf); "
        "needs --egress-allow",
    )
    d.add_argument(
        "--egress-policy",
        metavar="FILE",
        help="the egress policy in a TOML file (allow entries, resolvers, check_loopback, "
        "per sandbox; see README, 'Egress policy'), re-read on SIGHUP; instead of "
        "--egress-allow, --resolver and --egress-check-loopback",
    )
    d.add_argument(
        "--enforce",
        action="store_true",
        help="refuse in the kernel (EPERM) every connect, datagram, DNS query and container "
        "runtime socket connect of a sandboxed process that its egress allow-list does not "
        "allow; each refusal is an event and a high alert (README, Enforcement)",
    )
    d.add_argument(
        "--dns-ttl-floor",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --enforce: an address learnt from a DNS answer for an allowed name stays "
        "allowed at least this long, whatever its TTL (default 30)",
    )
    r = p.add_argument_group("response")
    r.add_argument(
        "--kill-on",
        choices=LEVELS,
        metavar="LEVEL",
        help="kill the process that raised an alert of LEVEL or higher, and its descendants "
        f"in the sandbox ({', '.join(LEVELS)}); with --server, the service orders it when it "
        "is set to respond (kill_on)",
    )
    r.add_argument(
        "--freeze-on",
        choices=LEVELS,
        metavar="LEVEL",
        help="freeze the whole sandbox (cgroup.freeze) on an alert of LEVEL or higher, for "
        "inspection; `sandtrace sandbox thaw|kill NAME` ends the freeze",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`run` and `watch`."""
    run = sub.add_parser(
        "run",
        help="run a command in a fresh sandbox and trace it",
        description="Start CMD in a new cgroup v2 sandbox, trace it and every descendant, "
        "and exit with CMD's exit code\nonce every event has been printed (or 3 when CMD "
        "succeeded but events were discarded on the way\nto --server).\n\n"
        "With --json, stdout carries JSON lines only: CMD's own stdout goes to stderr, or "
        "to\n--command-output FILE.",
        epilog=EXAMPLES_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_args(run)
    _tail_args(run)
    run.add_argument(
        "--wait-all",
        action="store_true",
        help="after CMD exits, wait for every process left in the sandbox (default: kill them)",
    )
    run.add_argument(
        "--summary",
        metavar="FILE",
        help="also write the end-of-run summary (alerts, executables, destinations, losses) "
        "to FILE as JSON",
    )
    run.add_argument(
        "--command-output",
        metavar="FILE",
        help="write CMD's stdout to FILE (default: stdout, or stderr with --json, so that "
        "stdout is JSON lines only)",
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    watch = sub.add_parser(
        "watch",
        help="trace existing sandboxes until stopped",
        description="Trace cgroup subtrees, process subtrees, or the whole host until "
        "Ctrl-C or SIGTERM.",
        epilog=EXAMPLES_WATCH,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_args(watch)
    _tail_args(watch)
    watch.add_argument(
        "--cgroup",
        action="append",
        default=[],
        metavar="CGROUP",
        help="trace this cgroup v2 subtree (repeatable): its directory "
        "(/sys/fs/cgroup/...), its path under the cgroup root as sandtrace prints it "
        "(/sandtrace/st-1a2b3c4d or sandtrace/st-1a2b3c4d), or its cgroup id (inode number)",
    )
    watch.add_argument(
        "--pid",
        action="append",
        type=_pid,
        default=[],
        metavar="PID",
        help="trace this process and all its descendants (repeatable)",
    )
    watch.add_argument("--all", action="store_true", help="trace every process on the host")


def _tail_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tail-socket",
        metavar="PATH",
        default=DEFAULT_SOCKET,
        help=f"serve `sandtrace tail` on this Unix socket, mode 0600 (default {DEFAULT_SOCKET})",
    )
    p.add_argument("--no-tail", action="store_true", help="serve no live tail")
