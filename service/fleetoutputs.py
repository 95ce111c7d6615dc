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

A JSON-lines file fed by one stream (`what` alerts or events) is exactly once also across a
kill, given a state directory (`[service] state_dir`): before acknowledging a chunk, the
feeder saves where the file ends and the chunk's stream sequences (fleet-outputs.json); at
the next start the file is cut back to that point (JsonlOutput.take_back), and the saved
chunk's messages, delivered again, are acknowledged without being written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import structlog

from api.backoff import Backoff
from api.events import Alert, decode
from api.wire import BadBatch, decode_batch
from fleet import names
from service.outputs.base import Output
from service.outputs.jsonl import JsonlOutput
from service.schemas.common import Item

log = structlog.get_logger("sandtrace.fleet")

CHUNK = 100  # messages fetched and acknowledged together (an event batch holds up to 8 MiB)
STOP_SECONDS = 10.0  # for the chunk in hand at a stop


def consumer_name(output: str, what: str) -> str:
    """The durable consumer of `output` on the stream of `what` (alerts or events): the
    output's name as a NATS name (letters, digits, '-' and '_' kept, others '_')."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in output)
    return f"sandtrace-out-{safe}-{what}"


class FeederState:
    """Where each exactly-once file's fed lines end, and the stream sequence they end with,
    by consumer name, in one JSON file of the state directory (written whole, replaced)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / "fleet-outputs.json"
        self.saved: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning(
                "output state unreadable; lines fed before a kill may appear twice",
                path=str(self.path),
                error=str(exc),
            )
            return
        if isinstance(data, dict):
            self.saved = {k: v for k, v in data.items() if isinstance(v, dict)}

    def get(self, name: str) -> tuple[tuple[int, int, int] | None, set[int]]:
        """The saved (device, inode, size) of `name`'s file, or None, and the stream
        sequences of the chunk written last (in the file, perhaps not acknowledged)."""
        entry = self.saved.get(name, {})
        point, seqs = entry.get("point"), entry.get("chunk", [])
        chunk = {n for n in seqs if isinstance(n, int)} if isinstance(seqs, list) else set()
        if isinstance(point, list) and len(point) == 3 and all(isinstance(v, int) for v in point):
            return (point[0], point[1], point[2]), chunk
        return None, set()

    def save(self, name: str, point: tuple[int, int, int], chunk: list[int]) -> None:
        self.saved[name] = {"point": list(point), "chunk": chunk}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.saved))
        tmp.replace(self.path)


class OutputFeeder:
    """One output fed from one stream: the alerts or the events (see module docstring)."""

    def __init__(
        self, js: Any, output: Output, what: str, ack_wait: float, state: FeederState | None
    ) -> None:
        from service.main import failpoint  # noqa: PLC0415

        # tests: SANDTRACE_FAILPOINT=kill-before-commit:alerts>=N kills the process once N
        # items are delivered, before their chunk's point is saved and acknowledged
        self.failpoint = failpoint()
        self.js = js
        self.output = output
        self.what = what  # "alerts" or "events"
        self.ack_wait = ack_wait
        self.stream = names.ALERTS_STREAM if what == "alerts" else names.EVENTS_STREAM
        self.name = consumer_name(output.name, what)
        self.delivered = 0  # messages acknowledged after their items were delivered
        self.items = 0  # delivered (or dropped with a count)
        self.undecodable = 0
        self.stopping = False  # set to end after the chunk in hand
        # exactly once: a JSON-lines file that only this feeder writes, and where to say so
        alone = isinstance(output, JsonlOutput) and output.what == what
        self.file = output if alone and isinstance(output, JsonlOutput) else None
        self.state = state if self.file is not None else None
        self.written: set[int] = set()  # stream sequences in the file, not acknowledged

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
            # each message on its own: with AckPolicy.ALL, acknowledging a later message
            # would also acknowledge those a killed feeder took and that are yet to come again
            ack_policy=AckPolicy.EXPLICIT,
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
                    if msg.metadata.sequence.stream not in self.written:  # else in the file
                        items += self._items(msg)
                await self._deliver(items, msgs)
                self.items += len(items)
                if self.failpoint is not None:
                    self.failpoint(self.delivered, self.items)
                self._save([m.metadata.sequence.stream for m in msgs])
                for msg in msgs[:-1]:
                    await msg.ack()
                # the last one confirmed: the server has taken every acknowledgement before
                # it, so no message of the chunk comes again (the saved chunk is the only one
                # in the file and perhaps not acknowledged)
                await msgs[-1].ack_sync()
                self.written.clear()
                self.delivered += len(msgs)
        finally:  # else the connection's drain at shutdown waits for it
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def take_back(self) -> str | None:
        """Before the output opens: cut the file back to where the last saved chunk ended
        (lines after it were not acknowledged: they come again); what was done, for the log."""
        if self.state is None or self.file is None:
            return None
        point, self.written = self.state.get(self.name)
        return None if point is None else self.file.take_back(point)

    def _save(self, chunk: list[int]) -> None:
        if self.state is None or self.file is None:
            return
        point = self.file.point()
        if point is not None:
            self.state.save(self.name, point, chunk)

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


async def start_outputs(
    js: Any, outputs: list[Output], ack_wait: float, state_dir: Path | None
) -> tuple[list[OutputFeeder], list[str]]:
    """Start every output (a file cut back to its saved point first); its feeders (alerts,
    events or both, as its `what` says), for the caller to run, and notes for the log."""
    state = FeederState(state_dir) if state_dir is not None else None
    feeders, notes = [], []
    for out in outputs:
        mine = [
            OutputFeeder(js, out, what, ack_wait, state)
            for what in ("alerts", "events")
            if out.what in (what, "both")
        ]
        for feeder in mine:
            note = feeder.take_back()
            if note:
                notes.append(f"output {out.name}: {note}")
        await out.start()
        feeders += mine
    return feeders, notes


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
