"""`sandtrace tail --server nats://...`: follow a whole fleet on NATS JetStream live.

Alerts come from the alert stream SANDTRACE_ALERTS (every alert of every worker, once),
read by an ordered consumer: from now on, or with --from-start from the stream's beginning
(as far back as its retention keeps). Events, unless --alerts-only, are the collectors'
batches as they are published (sandtrace.events.<host>, a plain subscription: live only,
nothing stored for it). The same filters as for a service (api.tail.TailFilter) apply
here, on this side; lines are rendered as `sandtrace tail` renders them from a service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from typing import IO, Any

import structlog

from api.events import Alert, EventFormatError, WireVersionError, decode
from api.render import TerminalSink, TextRenderer
from api.tail import TailFilter
from api.wire import BadBatch, decode_batch
from fleet import names
from fleet.connect import NatsConfigError, NatsRefused, NatsTarget, connect, target

log = structlog.get_logger("sandtrace.tail")


def _say(message: str) -> None:
    print(f"sandtrace: {message}", file=sys.stderr, flush=True)


class FleetFollower:
    def __init__(
        self,
        where: NatsTarget,
        flt: TailFilter,
        stream: IO[str],
        renderer: TextRenderer | None,
        from_start: bool,
    ) -> None:
        self.where = where
        self.filter = flt
        self.out = TerminalSink(stream, renderer)
        self.from_start = from_start
        self.closed = False  # stdout went away

    def show(self, item: Any) -> None:
        if self.closed or not self.filter.matches(item):
            return
        try:
            self.out.emit(item)
            self.out.flush()
        except BrokenPipeError:
            self.closed = True

    async def on_alert(self, msg: Any) -> None:
        try:
            item = decode(msg.data)
        except (WireVersionError, EventFormatError) as exc:
            log.warning("undecodable alert in the alert stream", error=str(exc))
            return
        if isinstance(item, Alert):
            self.show(item)

    async def on_batch(self, msg: Any) -> None:
        try:
            _collector, _seq, events = decode_batch(msg.data)
        except BadBatch as exc:
            log.warning("undecodable batch on the events subject", error=str(exc))
            return
        for event in events:
            self.show(event)

    async def run(self, stop: asyncio.Event) -> None:
        from nats.js.api import DeliverPolicy  # noqa: PLC0415

        async def disconnected() -> None:
            _say(f"lost {self.where.label}; reconnecting, Ctrl-C stops")

        async def reconnected() -> None:
            _say(f"reconnected to {self.where.label}")

        async def error(exc: Exception) -> None:
            log.debug("nats", error=repr(exc))

        nc = await connect(
            self.where,
            "sandtrace-tail",
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
        try:
            js = nc.jetstream(timeout=10)
            hosts = sorted(self.filter.hosts)
            alert_subjects = [names.alerts_subject(h) for h in hosts] or [
                f"{names.ALERTS_PREFIX}.*"
            ]
            policy = DeliverPolicy.ALL if self.from_start else DeliverPolicy.NEW
            for subject in alert_subjects:
                await js.subscribe(
                    subject,
                    stream=names.ALERTS_STREAM,
                    cb=self.on_alert,
                    ordered_consumer=True,
                    deliver_policy=policy,
                )
            if not self.filter.alerts_only:
                for subject in [names.events_subject(h) for h in hosts] or [
                    f"{names.EVENTS_PREFIX}.*"
                ]:
                    await nc.subscribe(subject, cb=self.on_batch, pending_bytes_limit=256 << 20)
            parts = [f"{k}={v}" for k, v in self.filter.query().items()]
            since = "from the start of the alert stream" if self.from_start else "live"
            _say(
                f"following the fleet at {self.where.label} ({', '.join(parts) or 'everything'}; "
                f"alerts {since}); Ctrl-C stops"
            )
            while not stop.is_set() and not self.closed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()


async def follow_fleet(
    args: argparse.Namespace, flt: TailFilter, renderer: TextRenderer | None
) -> int:
    try:
        where = target(
            args.server,
            token_file=args.token_file,
            nkey_file=getattr(args, "nkey_file", None),
            creds_file=getattr(args, "creds_file", None),
            ca_file=args.ca_file,
            insecure=args.insecure,
        )
    except NatsConfigError as exc:
        _say(f"--server: {exc}")
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    follower = FleetFollower(where, flt, sys.stdout, renderer, args.from_start)
    try:
        await asyncio.wait_for(follower.run(stop), None)
    except NatsRefused as exc:
        _say(
            f"the NATS cluster refused this tail: {exc} (check --nkey-file, --creds-file or "
            "--token-file)"
        )
        return 2
    except Exception as exc:
        _say(f"cannot follow the fleet at {where.label}: {exc!r}")
        return 2
    if follower.closed:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0
