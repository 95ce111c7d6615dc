"""The `[[output]]` sinks (service/outputs: jsonl, syslog, http) of a fleet worker, fed from
the fleet's streams by durable consumers, so that each alert and event reaches each sink once
whichever process feeds it and however often that process restarts.

Per output, one durable consumer per stream it reads, named after the output:
    sandtrace-out-<name>-alerts   on SANDTRACE_ALERTS (every alert once: ids from the input)
    sandtrace-out-<name>-events   on SANDTRACE_EVENTS (the collectors' batches, decoded: any
                                  schema, whatever `siem_events` says)
A feeder fetches a chunk of messages, submits what they hold to the output, waits until the
output has delivered (or, refused for good by the receiver, dropped and counted) all of it,
and only then acknowledges the chunk. So a feeder stopped cleanly (SIGTERM) resumes exactly
where it left off, and one killed between a delivery and its acknowledgement delivers that
one chunk again (at least once; an alert keeps its id, fleet/names.py, so a repeat can be
recognised). Every worker configured with the same output shares its consumers: JetStream
gives each message to one of them (a network sink fed by several workers for availability);
a file output belongs in one process only.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from api.backoff import Backoff
from api.events import Alert, decode
from api.wire import BadBatch, decode_batch
from fleet import names
from service.outputs.base import Output
from service.schemas.common import Item

log = structlog.get_logger("sandtrace.fleet")

CHUNK = 100  # messages fetched and acknowledged together (an event batch holds up to 8 MiB)
STOP_SECONDS = 10.0  # for the chunk in hand at a stop


def consumer_name(output: str, what: str) -> str:
    """The durable consumer of `output` on the stream of `what` (alerts or events): the
    output's name as a NATS name (letters, digits, '-' and '_' kept, others '_')."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in output)
    return f"sandtrace-out-{safe}-{what}"


class OutputFeeder:
    """One output fed from one stream: the alerts or the events (see module docstring)."""

    def __init__(self, js: Any, output: Output, what: str, ack_wait: float) -> None:
        self.js = js
        self.output = output
        self.what = what  # "alerts" or "events"
        self.ack_wait = ack_wait
        self.stream = names.ALERTS_STREAM if what == "alerts" else names.EVENTS_STREAM
        self.name = consumer_name(output.name, what)
        self.delivered = 0  # messages acknowledged after their items were delivered
        self.undecodable = 0
        self.stopping = False  # set to end after the chunk in hand

    async def run(self) -> None:
        """Feed the output until stopping (or cancelled); NATS unavailable for a while:
        start over."""
        backoff = Backoff(0.5, 5.0)
        while not self.stopping:
            try:
                await self._feed()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "output feeder failed; retrying",
                    output=self.output.name,
                    stream=self.stream,
                    error=repr(exc),
                )
                await asyncio.sleep(backoff.next())

    async def _feed(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy  # noqa: PLC0415
        from nats.js.errors import ServiceUnavailableError  # noqa: PLC0415

        config = ConsumerConfig(
            durable_name=self.name,
            ack_policy=AckPolicy.ALL,  # the chunk's last message acknowledges it whole
            ack_wait=self.ack_wait,
            max_deliver=-1,
            max_ack_pending=CHUNK,
            deliver_policy=DeliverPolicy.ALL,
        )
        await self.js.add_consumer(self.stream, config)
        sub = await self.js.pull_subscribe_bind(self.name, self.stream)
        try:
            while not self.stopping:
                try:
                    msgs = await sub.fetch(CHUNK, timeout=1.0)
                except TimeoutError:
                    continue
                except ServiceUnavailableError:  # the consumer's leader is being elected
                    await asyncio.sleep(0.5)
                    continue
                if not msgs:
                    continue
                items: list[Item] = []
                for msg in msgs:
                    items += self._items(msg)
                await self._deliver(items, msgs)
                await msgs[-1].ack()
                self.delivered += len(msgs)
        finally:  # else the connection's drain at shutdown waits for it
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _items(self, msg: Any) -> list[Item]:
        if self.what == "alerts":
            try:
                alert = decode(msg.data)
            except Exception as exc:  # not an alert a worker published: counted, logged
                return self._undecodable(msg, repr(exc))
            if not isinstance(alert, Alert):
                return self._undecodable(msg, f"a {alert.kind}, not an alert")
            return [alert]
        try:
            _collector, _seq, events = decode_batch(msg.data)
        except BadBatch as exc:
            return self._undecodable(msg, exc.reason)
        return list(events)

    def _undecodable(self, msg: Any, why: str) -> list[Item]:
        self.undecodable += 1
        log.warning(
            "undecodable message skipped by an output",
            output=self.output.name,
            subject=msg.subject,
            error=why,
        )
        return []

    async def _deliver(self, items: list[Item], msgs: list[Any]) -> None:
        """Submit items (at most a queue's worth at a time) and wait until the output has
        finished them: delivered, or dropped with a count (a receiver's refusal). While a
        sink is down this waits, the chunk's messages kept from redelivery (in progress)."""
        out = self.output
        room = max(1, out.queue_size)
        for start in range(0, len(items), room):
            for item in items[start : start + room]:
                out.submit(item)
            while True:
                try:
                    await asyncio.wait_for(out.finished(), self.ack_wait / 3)
                    break
                except TimeoutError:
                    for msg in msgs:
                        await msg.in_progress()


async def start_outputs(js: Any, outputs: list[Output], ack_wait: float) -> list[OutputFeeder]:
    """Start every output; its feeders (alerts, events or both, as its `what` says), for
    the caller to run."""
    feeders = []
    for out in outputs:
        await out.start()
        for what in ("alerts", "events"):
            if out.what in (what, "both"):
                feeders.append(OutputFeeder(js, out, what, ack_wait))
    return feeders


async def stop_outputs(
    feeders: list[OutputFeeder], tasks: list[asyncio.Task[None]], outputs: list[Output]
) -> None:
    """Stop feeding: each feeder delivers and acknowledges the chunk in hand (for up to
    STOP_SECONDS: a sink that is down keeps its chunk unacknowledged, and it is fed again
    at the next start), then each output closes."""
    for feeder in feeders:
        feeder.stopping = True
    if tasks:
        _done, late = await asyncio.wait(tasks, timeout=STOP_SECONDS)
        for task in late:
            task.cancel()
        for task in late:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    await asyncio.gather(*(out.aclose(5.0) for out in outputs))
