"""The command line of `sandtrace serve`: argparse only (the service loads when it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from api.orders import LEVELS

EXAMPLES = """examples:
  sandtrace serve --listen 127.0.0.1:8780 --token-file /etc/sandtrace/token
  sandtrace serve --config /etc/sandtrace/service.toml
  sandtrace serve --config /etc/sandtrace/service.toml --check-config
  sandtrace serve --kill-on high --freeze-on critical   # order collectors to respond
  sandtrace serve --nats nats://10.0.0.1:4222,10.0.0.2:4222 --nats-ca-file ca.pem \
      --nats-creds-file worker.creds --listen 0.0.0.0:9780   # one worker of a fleet
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the detection service (no root needed)",
        description="Receive event batches from collectors, detect, feed SIEM outputs and the "
        "live tail. Settings: built-in defaults < --config FILE < command-line options.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="TOML configuration (see README, 'Detection service')",
    )
    serve.add_argument(
        "--check-config",
        action="store_true",
        help="check the configuration (files, TLS, rules, outputs), list every problem, "
        "then exit (0: none)",
    )
    serve.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:8780")
    serve.add_argument(
        "--token-file", metavar="FILE", help="require 'Authorization: Bearer <the file's content>'"
    )
    serve.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate")
    serve.add_argument("--tls-key", metavar="FILE", help="and this private key")
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow plain HTTP on an address other than loopback",
    )
    serve.add_argument(
        "--state-dir",
        metavar="DIR",
        help="remember each collector's last batch here, across restarts",
    )
    serve.add_argument(
        "--rules",
        action="append",
        default=None,
        metavar="DIR",
        help="add the Sigma rules in DIR to the built-in pack (repeatable)",
    )
    serve.add_argument("--no-builtin-rules", action="store_true", default=None)
    serve.add_argument(
        "--allow-refused-rules",
        action="store_true",
        default=None,
        help="start even when rules cannot be loaded (each is named in a warning and raises "
        "no alerts); by default a refused rule is a configuration error",
    )
    serve.add_argument(
        "--egress-allow",
        action="append",
        default=None,
        metavar="[SANDBOX=]NET[:PORTS]",
        help="allow connects to NET (CIDR or address; optional ports 1-65535: 443, "
        "8000-8100, 80,443), for every sandbox or only SANDBOX; any other destination "
        "alerts, except loopback (see --egress-check-loopback); repeatable",
    )
    serve.add_argument(
        "--egress-check-loopback",
        action="store_true",
        default=None,
        help="judge loopback connects (127.0.0.0/8, ::1) by the egress allow-list too; by "
        "default a sandbox may always connect to its own host's loopback",
    )
    serve.add_argument(
        "--kill-on",
        choices=LEVELS,
        metavar="LEVEL",
        help="order the collector of an alert of LEVEL or higher to kill the alerting process "
        f"and its descendants ({', '.join(LEVELS)}); the collector acts when started with "
        "--kill-on too",
    )
    serve.add_argument(
        "--freeze-on",
        choices=LEVELS,
        metavar="LEVEL",
        help="order the collector of an alert of LEVEL or higher to freeze its sandbox",
    )
    serve.add_argument(
        "--alerts", metavar="FILE", help="also append every alert to FILE as JSON lines"
    )
    serve.add_argument(
        "--events", metavar="FILE", help="also append every event to FILE as JSON lines"
    )
    fleet = serve.add_argument_group(
        "fleet on NATS JetStream (see README, 'Fleet on NATS JetStream'; [fleet] in --config)"
    )
    fleet.add_argument(
        "--nats",
        metavar="nats://HOST:PORT[,HOST:PORT...]",
        help="run as one worker of a fleet: take batches from this NATS cluster's JetStream "
        "instead of serving HTTP (--listen then serves /metrics only)",
    )
    fleet.add_argument("--nats-token-file", metavar="FILE", help="NATS token, read from FILE")
    fleet.add_argument("--nats-nkey-file", metavar="FILE", help="NATS NKey seed file")
    fleet.add_argument("--nats-creds-file", metavar="FILE", help="NATS credentials file")
    fleet.add_argument("--nats-ca-file", metavar="FILE", help="verify NATS servers' TLS with FILE")
    fleet.add_argument(
        "--partitions", type=int, metavar="N", help="host partitions (default 16; fixed)"
    )
    fleet.add_argument("--replicas", type=int, metavar="N", help="stream replicas (default 3)")
    fleet.add_argument("--worker-id", metavar="ID", help="this worker's name (default host-pid)")
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
