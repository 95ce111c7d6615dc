"""`sandtrace serve --nats`: one of N detection workers of a fleet on NATS JetStream.

Collectors publish their batches to the stream SANDTRACE_EVENTS, one subject per host; the
stream maps each host to one of P partitions as it stores the batch (fleet/names.py). A
worker handles the partitions it holds a lease on, each with one durable pull consumer,
batch after batch in stream order, so each host's events are handled by one worker at a
time, in order.

Leases (KV bucket sandtrace-partitions, every key living `lease_seconds` unless renewed):
    w.<worker>   a worker's heartbeat: how many workers are alive
    p.<n>        partition n's owner, created only where absent (compare-and-set), renewed
                 by revision every lease/4 by its owner alone
A worker holds at most ceil(P / live workers) partitions: it claims free ones up to that
share and releases the rest, so partitions spread over the workers and move off a worker
that goes away once its leases expire. A worker that cannot renew for half a lease (a
NATS outage) stops fetching until it can; one whose lease is gone (renewed by another)
drops the partition's state at once.

Taking a partition over, the new owner
  1. finds where its predecessors stopped: the highest acknowledged batch over every
     consumer of the partition (each owner acknowledges in order);
  2. rebuilds the detection state from the stream (rebuild_seconds, by default the rules'
     longest correlation window and the fold span): it feeds the batches of that span
     before the resume point through fresh engines, their alerts discarded (they were
     published when those batches were first handled);
  3. makes its own consumer `p<n>-<worker>-<lease revision>` starting after the resume
     point and deletes the older ones, so a worker that lost its lease cannot take or
     acknowledge this owner's batches.

A batch is acknowledged only after its outputs are stored: alerts in SANDTRACE_ALERTS and,
where configured, its events in SIEM schemas in SANDTRACE_SIEM, with message ids derived
from (collector, batch sequence, index), so a batch handled again after a worker died
stores no output twice within the duplicate window.

Every second each partition's engines end what is over (Ingest.expire, as serve runs it):
fold summaries go to SANDTRACE_ALERTS with the id `<alert id>:s` of the alert they fold
(alert ids are derived from message ids, fleet/names.py), so the same fold is stored once
whoever brings it out. The owner notes how far it ended windows in the KV bucket
sandtrace-expiry; a new owner's rebuild ends windows at each replayed batch's stored time
and stores only the summaries due after that mark. A worker stopped while others run
leaves its open folds to the next owner; the last one stores them and marks the partition
flushed, so that a later owner ends its rebuilt folds without storing them again.

What a failover loses: nothing of the events (unacknowledged batches are handled again);
of detection state, what is older than rebuild_seconds (a correlation window longer than
it starts empty) and the repeat counts of alerts folded before the rebuilt span. With the
default rebuild span the new owner's engines are those the old owner had, and a batch
handled again raises the alerts it raised the first time, under the same ids.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import secrets
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from api.backoff import Backoff
from api.events import Alert, AnyEvent, encode
from api.wire import BadBatch, decode_batch
from detect.engine import Engine
from detect.ruleset import RuleSet
from fleet import names
from fleet.connect import NatsConfigError, NatsRefused, NatsTarget, connect
from fleet.streams import FleetSettings, FleetSetupError, ensure
from service.app import Ingest
from service.metrics import IngestMetrics, Stats

log = structlog.get_logger("sandtrace.fleet")

CREDENTIALS_HINT = "check --nats-nkey-file, --nats-creds-file or --nats-token-file"
FETCH = 32  # batches asked for at once; all handled well within ack_wait
EXPIRY_INTERVAL = 1.0  # seconds between expiries of a partition's engines, as serve's


@dataclass(slots=True)
class PartitionStats:
    batches: int = 0
    events: int = 0
    alerts: int = 0
    redelivered: int = 0  # batches delivered more than once (a worker died holding them)
    rejected: int = 0
    rebuilt_batches: int = 0
    pending: int = 0  # batches in the partition after the last one fetched (the lag)
    last_handled_ns: int = 0
    takeovers: int = 0


@dataclass(slots=True)
class Partition:
    """One partition this worker holds: its lease, its engines, its consumer task."""

    number: int
    revision: int  # of the lease key, for compare-and-set renewals
    renewed: float  # monotonic time of the last renewal that succeeded
    ingest: Ingest = field(init=False)
    active: bool = True  # cleared to stop the consumer after the batch in hand
    task: asyncio.Task[None] | None = None
    alerts: list[Alert] = field(default_factory=list)  # of the batch being handled
    rebuilding: bool = False
    attempt: int = 0  # consumers made for this lease
    # While a rebuild replays a batch: the wall time it was stored at, which the engines'
    # expiry takes for "now" (as the owner that first handled it did, about then).
    replay_wall: float | None = None
    expired_to: float = 0.0  # wall time of the last expiry whose summaries are stored
    expired_saved: float = 0.0  # expired_to as last written to the expiry bucket
    # when the last worker standing ended every window it held (0: not known to have)
    flushed_at: float = 0.0
    unstored: list[tuple[Alert, str]] = field(default_factory=list)  # summaries in flight

    def clock(self) -> float:
        """The wall clock of this partition's expiry (Ingest's clock)."""
        return time.time() if self.replay_wall is None else self.replay_wall

    def mark(self) -> bytes:
        """The expiry mark (the bucket sandtrace-expiry): `<expired_to> [<flushed_at>]`."""
        flushed = f" {self.flushed_at:.3f}" if self.flushed_at else ""
        return f"{self.expired_to:.3f}{flushed}".encode()


def rebuild_span(rules: RuleSet, fold_seconds: float) -> float:
    """How far back a new owner replays: the longest window any state of the engine spans."""
    windows = [c.seconds for c in rules.correlations]
    return max([fold_seconds, *windows])


class Worker:
    def __init__(
        self,
        target: NatsTarget,
        settings: FleetSettings,
        rules: RuleSet,
        make_engine: Any,
        *,
        worker_id: str | None = None,
        fold_seconds: float = 60.0,
    ) -> None:
        self.target = target
        self.settings = settings
        self.rules = rules
        self.make_engine = make_engine
        raw = worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.id = "".join(c if c.isalnum() or c in "-_" else "_" for c in raw)
        span = settings.rebuild_seconds
        self.rebuild_seconds = rebuild_span(rules, fold_seconds) if span < 0 else span
        self.owned: dict[int, Partition] = {}
        self.stats: dict[int, PartitionStats] = {}
        self.totals = Stats()  # of partitions this worker no longer holds
        self.live_workers = 0
        self.nc: Any = None
        self.js: Any = None
        self.kv: Any = None
        self.xkv: Any = None  # the expiry bucket
        self.stopping = False
        self.publish_failures = 0
        self.duplicates = 0  # outputs already stored (their batch was handled before)
        self.lease_losses = 0

    # -- lifetime ---------------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Connect and make or check the streams; notes for the operator."""
        if self.nc is not None:  # an earlier attempt that failed half-way
            with contextlib.suppress(Exception):
                await self.nc.close()
        self.nc = await connect(
            self.target,
            f"sandtrace-worker {self.id}",
            error_cb=self._nats_error,
            disconnected_cb=self._nats_disconnected,
            reconnected_cb=self._nats_reconnected,
        )
        self.js = self.nc.jetstream(timeout=10)
        notes = await ensure(self.js, self.settings)
        self.kv = await self.js.key_value(names.LEASES_BUCKET)
        self.xkv = await self.js.key_value(names.EXPIRY_BUCKET)
        return notes

    async def run(
        self, stop: asyncio.Event, before_close: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Hold partitions until stop is set; then (after `before_close`, while the
        connection is still up) hand them back."""
        tick = self.settings.lease_seconds / 4
        saving: asyncio.Task[None] | None = None
        try:
            while not stop.is_set():
                try:
                    await self._leases()
                except Exception as exc:  # NATS unreachable for now: leases run out locally
                    log.warning("lease round failed; retrying", error=repr(exc))
                self._pause_stale()
                if saving is None or saving.done():  # beside the leases, never delaying them
                    saving = asyncio.get_running_loop().create_task(self._save_marks())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), tick)
        finally:
            if saving is not None:
                with contextlib.suppress(Exception):
                    await saving
            if before_close is not None:
                await before_close()
            await self.close()

    async def close(self) -> None:
        """Hand every partition back. The last worker standing ends the fold windows its
        engines hold and stores their summaries; otherwise the next owner rebuilds those
        windows from the stream and stores each summary when its window ends (once: the
        same message id, whoever brings it out)."""
        self.stopping = True
        last = self.live_workers <= 1
        for part in list(self.owned.values()):
            await self._release(part, last=last)
        if self.kv is not None:
            with contextlib.suppress(Exception):
                await self.kv.delete(f"w.{self.id}")
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    async def _nats_error(self, exc: Exception) -> None:
        log.debug("nats", error=repr(exc))

    async def _nats_disconnected(self) -> None:
        log.info("disconnected from NATS; reconnecting")

    async def _nats_reconnected(self) -> None:
        log.info("reconnected to NATS", server=str(self.nc.connected_url.netloc))

    # -- leases -----------------------------------------------------------------------------

    async def _leases(self) -> None:
        from nats.js.errors import KeyWrongLastSequenceError  # noqa: PLC0415

        kv = self.kv
        await kv.put(f"w.{self.id}", self.id.encode())
        now = time.monotonic()
        for part in list(self.owned.values()):
            try:
                part.revision = await kv.update(
                    f"p.{part.number}", self.id.encode(), last=part.revision
                )
                part.renewed = now
            except KeyWrongLastSequenceError:
                self.lease_losses += 1
                log.warning("partition lease lost to another worker", partition=part.number)
                await self._drop(part)
        keys = await self._keys()
        self.live_workers = max(1, sum(1 for k in keys if k.startswith("w.")))
        share = math.ceil(self.settings.partitions / self.live_workers)
        held = {int(k[2:]) for k in keys if k.startswith("p.")}
        if len(self.owned) > share:
            for number in sorted(self.owned, reverse=True)[: len(self.owned) - share]:
                await self._release(self.owned[number])
            return
        start = sum(self.id.encode()) % self.settings.partitions
        order = [(start + i) % self.settings.partitions for i in range(self.settings.partitions)]
        for number in order:
            if len(self.owned) >= share or self.stopping:
                break
            if number in held or number in self.owned:
                continue
            try:
                revision = await kv.create(f"p.{number}", self.id.encode())
            except KeyWrongLastSequenceError:
                continue  # another worker was quicker
            self._take(number, revision)

    async def _save_marks(self) -> None:
        """Each held partition's expiry mark, where it moved, saved (all at once: a round of
        one put after another would hold up the lease renewals of a busy worker)."""
        parts = [(p, p.expired_to) for p in self.owned.values() if p.expired_to > p.expired_saved]
        done = await asyncio.gather(
            *(self.xkv.put(f"p.{p.number}", p.mark()) for p, _ in parts), return_exceptions=True
        )
        for (part, mark), result in zip(parts, done, strict=True):
            if isinstance(result, BaseException):  # tried again next round
                log.warning("expiry mark not saved", partition=part.number, error=repr(result))
            else:
                part.expired_saved = max(part.expired_saved, mark)

    async def _keys(self) -> list[str]:
        from nats.js.errors import NoKeysError  # noqa: PLC0415

        try:
            return list(await self.kv.keys())
        except NoKeysError:
            return []

    def _pause_stale(self) -> None:
        """A partition whose lease could not be renewed for half its length stops fetching
        (another worker may hold it soon); it resumes when a renewal succeeds."""
        limit = self.settings.lease_seconds / 2
        now = time.monotonic()
        for part in self.owned.values():
            part.active = now - part.renewed < limit

    def _take(self, number: int, revision: int) -> None:
        part = Partition(number, revision, time.monotonic())
        part.ingest = ingest = Ingest(self.rules, engine_factory=self.make_engine, clock=part.clock)
        ingest.on_alert = part.alerts.append
        self.owned[number] = part
        self.stats.setdefault(number, PartitionStats()).takeovers += 1
        part.task = asyncio.get_running_loop().create_task(
            self._consume(part), name=f"partition {number}"
        )
        log.info("partition taken", partition=number, worker=self.id)

    async def _release(self, part: Partition, *, last: bool = False) -> None:
        """Hand a partition back: stop its consumer (a batch in hand and not acknowledged is
        handled again by the next owner), say how far its fold windows were ended (with
        `last`, all of them, their summaries stored first), free the lease."""
        await self._drop(part)
        if last:
            part.alerts.clear()
            part.ingest.flush()
            named = part.unstored + self._name(part.alerts, "", 0)
            part.alerts.clear()
            try:
                await asyncio.wait_for(self._publish(_alert_outputs(named)), 10.0)
            except TimeoutError:
                log.warning(
                    "fold summaries not stored at shutdown; the next owner writes them",
                    partition=part.number,
                    summaries=len(named),
                )
            else:
                self.stats[part.number].alerts += len(named)
                part.expired_to = part.flushed_at = time.time()
        if part.expired_to:  # (0: no expiry ran here, the mark found stays)
            with contextlib.suppress(Exception):
                await self.xkv.put(f"p.{part.number}", part.mark())
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=5)
            await self.kv.delete(f"p.{part.number}", last=part.revision)
        log.info("partition released", partition=part.number, worker=self.id)

    async def _drop(self, part: Partition) -> None:
        part.active = False
        self.owned.pop(part.number, None)
        if part.task is not None:
            part.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await part.task
        _merge(self.totals, part.ingest.stats)

    # -- one partition ----------------------------------------------------------------------

    async def _consume(self, part: Partition) -> None:
        backoff = Backoff(0.5, 5.0)
        while part.number in self.owned:
            try:
                await self._consume_once(part)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS unavailable for a moment: start over
                log.warning(
                    "partition consumer failed; retrying",
                    partition=part.number,
                    error=repr(exc),
                    exc_info=exc,
                )
                await asyncio.sleep(backoff.next())
            else:
                return

    async def _consume_once(self, part: Partition) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy  # noqa: PLC0415
        from nats.js.errors import ServiceUnavailableError  # noqa: PLC0415

        while not part.active:  # a lease not renewed lately: another may hold it by now
            if part.number not in self.owned:
                return
            await asyncio.sleep(0.2)
        js = self.js
        subject = names.partition_subject(part.number)
        resume, old = await self._resume_point(part.number)
        await self._rebuild(part, resume)
        part.attempt += 1  # a consumer of its own per attempt: an earlier one may linger
        name = f"p{part.number}-{self.id}-{part.revision}-{part.attempt}"
        config = ConsumerConfig(
            durable_name=name,
            filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait,
            max_deliver=-1,
            max_ack_pending=4 * FETCH,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if resume else DeliverPolicy.ALL,
            opt_start_seq=resume + 1 if resume else None,
        )
        await js.add_consumer(names.EVENTS_STREAM, config)
        for stale in old:
            if stale != name:
                with contextlib.suppress(Exception):
                    await js.delete_consumer(names.EVENTS_STREAM, stale)
        sub = await js.pull_subscribe_bind(name, names.EVENTS_STREAM)
        stats = self.stats[part.number]
        stats.pending = FETCH  # not known yet: assume a backlog
        log.info("partition consuming", partition=part.number, after=resume, consumer=name)
        try:
            while part.number in self.owned:
                if not part.active:
                    await asyncio.sleep(0.2)
                    continue
                if time.time() - part.expired_to >= EXPIRY_INTERVAL:
                    await self._expire(part)
                # Ask for what is known to wait, at most FETCH: a pull for more batches than are
                # stored is held by the server until it fills or expires, and the first batch
                # would wait with it; caught up, one batch at a time comes as soon as it is stored.
                want = max(1, min(FETCH, stats.pending))
                try:
                    msgs = await sub.fetch(want, timeout=1.0)
                except TimeoutError:  # nats' own, or asyncio's from a fetch cut short
                    stats.pending = 0  # nothing waits: the next pull is for one batch
                    continue
                except ServiceUnavailableError:  # the consumer's leader is being elected
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    if not part.active:
                        break  # left unacknowledged: the next owner (or this one) takes it again
                    meta = msg.metadata
                    stats.pending = meta.num_pending
                    if meta.num_delivered > 1:
                        stats.redelivered += 1
                    await self._handle(part, msg)
                    await asyncio.sleep(0)  # the other partitions, the leases and /metrics too
        finally:  # a subscription left behind holds the connection's drain at shutdown
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _resume_point(self, number: int) -> tuple[int, list[str]]:
        """The stream sequence every batch up to which was handled, and the partition's
        consumers (its earlier owners')."""
        subject = names.partition_subject(number)
        resume = 0
        found = []
        for info in await self.js.consumers_info(names.EVENTS_STREAM):
            config = info.config
            if config.filter_subject != subject:
                continue
            found.append(config.durable_name or info.name)
            start = (config.opt_start_seq or 1) - 1
            resume = max(resume, info.ack_floor.stream_seq if info.ack_floor else 0, start)
        return resume, found

    async def _rebuild(self, part: Partition, resume: int) -> None:
        """Feed the batches of the last rebuild_seconds up to `resume` through the engines,
        their alerts discarded (published already, when those batches were handled)."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy  # noqa: PLC0415

        if resume == 0 or self.rebuild_seconds <= 0:
            return
        mark, flushed_at = await self._expiry_mark(part.number)
        part.flushed_at = flushed_at
        unflushed = flushed_at > 0  # the replay must end every window where the flush was
        since = time.time() - self.rebuild_seconds
        config = ConsumerConfig(
            filter_subject=names.partition_subject(part.number),
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=datetime.fromtimestamp(since, UTC),
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        )
        sub = await self.js.pull_subscribe(
            names.partition_subject(part.number), None, stream=names.EVENTS_STREAM, config=config
        )
        stats = self.stats[part.number]
        part.rebuilding = True
        expired = 0.0
        try:
            done = False
            while not done:
                try:
                    msgs = await sub.fetch(FETCH * 4, timeout=2.0)
                except TimeoutError:  # nats' own, or asyncio's from a fetch cut short
                    break
                for msg in msgs:
                    if msg.metadata.sequence.stream > resume:
                        done = True
                        break
                    # expiry as the first owner ran it, about when the batch came
                    stored = msg.metadata.timestamp.timestamp()
                    part.replay_wall = stored
                    if unflushed and stored > flushed_at:
                        part.ingest.flush()  # stored by the last worker, as it stopped
                        part.alerts.clear()
                        unflushed = False
                    if stored - expired >= EXPIRY_INTERVAL:
                        await self._expire(part, now=stored, publish=stored > mark)
                        expired = stored
                    batch = self._feed(part, msg.data)
                    if batch is not None:  # named as first handled: their folds' summaries
                        self._name(part.alerts, batch[0], batch[1])  # name them alike
                    part.alerts.clear()  # published when the batch was first handled
                    stats.rebuilt_batches += 1
                    await asyncio.sleep(0)  # leases are renewed while a long span replays
                    if msg.metadata.sequence.stream == resume:
                        done = True
                        break
        finally:
            part.rebuilding = False
            part.replay_wall = None
            part.alerts.clear()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        # What the last owners ended (and stored) after the replayed batches ends here too.
        if unflushed:
            part.ingest.flush()
        if mark:
            part.ingest.expire(mark)
        part.alerts.clear()
        part.expired_to = max(part.expired_to, mark)
        if stats.rebuilt_batches:
            log.info(
                "partition state rebuilt", partition=part.number, batches=stats.rebuilt_batches
            )

    async def _expiry_mark(self, number: int) -> tuple[float, float]:
        """How far the partition's last owner ended fold windows, and when a last worker
        standing last ended all it held (wall times, 0 when not known): Partition.mark."""
        try:
            entry = await self.xkv.get(f"p.{number}")
        except Exception as exc:  # the client raises KeyNotFoundError
            if type(exc).__name__ not in ("KeyNotFoundError", "NotFoundError"):
                raise
            return 0.0, 0.0
        text = (entry.value or b"").decode(errors="replace")
        try:
            values = [float(v) for v in text.split()]
        except ValueError:
            values = []
        if len(values) not in (1, 2):
            log.warning("expiry mark unreadable; taken as none", partition=number, mark=text)
            return 0.0, 0.0
        return values[0], values[1] if len(values) == 2 else 0.0

    async def _expire(
        self, part: Partition, now: float | None = None, publish: bool = True
    ) -> None:
        """End what the partition's engines hold that is over, as serve does every second
        (Ingest.expire: each host's fold windows in its own event time, idle hosts' engines
        dropped), and store the fold summaries that come out (unless not `publish`: a
        rebuild's, stored by the owner that first handled those batches)."""
        when = time.time() if now is None else now
        part.alerts.clear()
        part.ingest.expire(when)
        named = self._name(part.alerts, "", 0)
        part.alerts.clear()
        if named and publish:
            part.unstored = named  # stored at a release if this is cut short
            await self._publish(_alert_outputs(named))
            part.unstored = []
            self.stats[part.number].alerts += len(named)
        if now is None:
            part.expired_to = when

    def _name(self, alerts: list[Alert], collector: str, seq: int) -> list[tuple[Alert, str]]:
        """Each alert with its message id, its own id derived from that (fleet/names.py): the
        i-th alert of batch (collector, seq) `<collector>:<seq>:a<i>`, a fold summary
        `<the id of the alert it folds>:s`. Renaming the alert object itself renames the one
        the engine's fold keeps, so the fold's summary names the alert as stored."""
        out = []
        i = 0
        for alert in alerts:
            if alert.repeat:
                msg_id = names.summary_msg_id(alert.folds)
            else:
                msg_id = names.alert_msg_id(collector, seq, i)
                i += 1
            alert.alert_id = names.alert_uuid(msg_id, alert.time_ns)
            out.append((alert, msg_id))
        return out

    def _feed(self, part: Partition, body: bytes) -> tuple[str, int, list[AnyEvent]] | None:
        try:
            collector, seq, events = decode_batch(body)
        except BadBatch as exc:
            part.ingest.stats.rejected[exc.reason] += 1
            return None
        part.ingest.handle(collector, seq, events)
        return collector, seq, events

    async def _handle(self, part: Partition, msg: Any) -> None:
        stats = self.stats[part.number]
        part.alerts.clear()
        batch = self._feed(part, msg.data)
        if batch is None:
            stats.rejected += 1
            log.warning("undecodable batch dropped", partition=part.number, subject=msg.subject)
            await msg.term()
            return
        collector, seq, events = batch
        outputs = _alert_outputs(self._name(part.alerts, collector, seq))
        if self.settings.siem_events and events:
            outputs += self._siem(collector, seq, events)
        part.alerts.clear()
        await self._publish(outputs)
        await msg.ack()
        stats.batches += 1
        stats.events += len(events)
        stats.alerts += sum(1 for s, _, _ in outputs if s.startswith(names.ALERTS_PREFIX))
        stats.last_handled_ns = time.time_ns()
        self._note(part, msg, collector)

    def _siem(
        self, collector: str, seq: int, events: list[AnyEvent]
    ) -> list[tuple[str, bytes, str]]:
        from service.outputs.base import dumps  # noqa: PLC0415
        from service.schemas import SCHEMAS  # noqa: PLC0415

        out = []
        host = events[0].host
        for schema in self.settings.siem_events:
            render = SCHEMAS[schema]
            body = "\n".join(dumps(render(e)) for e in events).encode()
            out.append(
                (names.siem_subject(schema, host), body, names.siem_msg_id(collector, seq, schema))
            )
        return out

    async def _publish(self, outputs: list[tuple[str, bytes, str]]) -> None:
        """Store every output of a batch; retried (same ids, so never twice) until stored."""
        backoff = Backoff(0.2, 5.0)
        while outputs:
            try:
                futures = [
                    await self.js.publish_async(
                        subject, body, headers={names.MSG_ID_HEADER: msg_id}
                    )
                    for subject, body, msg_id in outputs
                ]
                gathered = asyncio.gather(*futures)
                gathered.add_done_callback(_retrieve)  # cancelled with the partition: quiet
                acks = await asyncio.wait_for(gathered, 10.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.publish_failures += 1
                log.warning("publishing outputs failed; retrying", error=repr(exc))
                await asyncio.sleep(backoff.next())
            else:
                self.duplicates += sum(1 for ack in acks if ack.duplicate)
                return

    def _note(self, part: Partition, msg: Any, collector: str) -> None:
        headers = msg.headers or {}
        spool = headers.get(names.SPOOL_BYTES_HEADER, "0")
        held = headers.get(names.HELD_BATCHES_HEADER, "0")
        part.ingest.note_collector(
            collector, int(spool) if spool.isdigit() else 0, int(held) if held.isdigit() else 0
        )

    # -- metrics ----------------------------------------------------------------------------

    def ingest_stats(self) -> Stats:
        """This worker's service counters, over every partition it holds and held."""
        total = Stats()
        _merge(total, self.totals)
        for part in self.owned.values():
            _merge(total, part.ingest.stats)
        return total


def _alert_outputs(named: list[tuple[Alert, str]]) -> list[tuple[str, bytes, str]]:
    return [(names.alerts_subject(a.host), encode(a), msg_id) for a, msg_id in named]


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _merge(into: Stats, other: Stats) -> None:
    into.events_in.update(other.events_in)
    into.batches.update(other.batches)
    into.alerts.update(other.alerts)
    into.rejected.update(other.rejected)
    into.collector_lost.update(other.collector_lost)
    into.collectors.update(other.collectors)
    for i, n in enumerate(other.lag.counts):
        into.lag.counts[i] += n
    into.lag.total += other.lag.total
    into.lag.n += other.lag.n


class FleetMetrics(Collector):
    """Per worker and per partition: what is held, handled, redelivered and still pending."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        yield from IngestMetrics(w.ingest_stats()).collect()
        owned = GaugeMetricFamily(
            "sandtrace_fleet_partition_owned",
            "1 for each partition this worker holds",
            labels=["worker", "partition"],
        )
        for number in sorted(w.owned):
            owned.add_metric([w.id, str(number)], 1)
        yield owned
        yield GaugeMetricFamily(
            "sandtrace_fleet_workers",
            "Workers alive, as this worker last counted them",
            value=w.live_workers,
        )
        families: list[tuple[str, str, str, type]] = [
            ("sandtrace_fleet_batches", "Batches handled, per partition", "batches", Counter),
            ("sandtrace_fleet_events", "Events handled, per partition", "events", Counter),
            ("sandtrace_fleet_alerts", "Alerts published, per partition", "alerts", Counter),
            (
                "sandtrace_fleet_redeliveries",
                "Batches delivered again (a worker died or let go holding them), per partition",
                "redelivered",
                Counter,
            ),
            (
                "sandtrace_fleet_rejected",
                "Undecodable batches dropped, per partition",
                "rejected",
                Counter,
            ),
            (
                "sandtrace_fleet_rebuilt_batches",
                "Batches replayed to rebuild detection state on taking a partition over",
                "rebuilt_batches",
                Counter,
            ),
            (
                "sandtrace_fleet_takeovers",
                "Times this worker took the partition",
                "takeovers",
                Counter,
            ),
            (
                "sandtrace_fleet_partition_lag_batches",
                "Batches stored in the partition and not yet handled (at the last fetch)",
                "pending",
                GaugeMetricFamily,
            ),
        ]
        for name, help_text, attr, kind in families:
            family: Metric = (
                CounterMetricFamily(name, help_text, labels=["worker", "partition"])
                if kind is Counter
                else GaugeMetricFamily(name, help_text, labels=["worker", "partition"])
            )
            for number, st in sorted(w.stats.items()):
                family.add_metric([w.id, str(number)], getattr(st, attr))  # type: ignore[attr-defined]
            yield family
        yield CounterMetricFamily(
            "sandtrace_fleet_outputs_deduplicated",
            "Outputs JetStream had already stored (a batch handled again after a failover)",
            value=w.duplicates,
        )
        yield CounterMetricFamily(
            "sandtrace_fleet_publish_failures",
            "Failed attempts to store a batch's outputs (each retried)",
            value=w.publish_failures,
        )


# -- `sandtrace serve --nats` ---------------------------------------------------------------


def _say(line: str) -> None:
    print(f"sandtrace: {line}", file=sys.stderr, flush=True)


def _engines(worker: Worker) -> Iterator[Engine]:
    """The engines of every partition this worker holds (a reload puts its policy in each;
    engines made later take it from the holder)."""
    for part in worker.owned.values():
        yield from part.ingest.engines.values()


async def serve_fleet(args: argparse.Namespace) -> int:
    """Run one worker until SIGINT or SIGTERM (or, with --check-config, check and exit)."""
    from aiohttp import web  # noqa: PLC0415

    from service.config import ConfigError  # noqa: PLC0415
    from service.fleetconfig import fleet_options  # noqa: PLC0415
    from service.fleetoutputs import start_outputs, stop_outputs  # noqa: PLC0415
    from service.main import prepare, reload_egress  # noqa: PLC0415
    from service.outputs.metrics import OutputMetrics  # noqa: PLC0415

    try:
        p = prepare(args)
        target, settings = fleet_options(args, p.cfg)
    except (ConfigError, NatsConfigError, ValueError) as exc:
        _say(f"configuration error: {exc}")
        if not args.check_config:
            _say("check it with: sandtrace serve --nats ... --check-config")
        return 2
    for where, why in p.rules.refused:
        _say(f"rule not loaded: {where}: {why}")
    cfg = p.cfg
    if args.check_config:
        return await _check(target, settings, p)

    current_egress = [p.egress]  # the policy engines made from now on take (SIGHUP)

    def make_engine(rules: RuleSet) -> Engine:
        return Engine(rules, current_egress[0], cfg.fold_seconds)

    # As serve does (service/main.py): Ingest makes many short-lived objects per event;
    # collect the young generation every 50,000 allocations and keep the rules out of scans.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    worker = Worker(
        target,
        settings,
        p.rules,
        make_engine,
        worker_id=getattr(args, "worker_id", None),
        fold_seconds=cfg.fold_seconds,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(
        signal.SIGHUP, reload_egress, cfg.egress_policy, partial(_engines, worker), current_egress
    )
    backoff = Backoff(0.5, 8.0)
    told = False
    while True:
        try:
            notes = await asyncio.wait_for(worker.start(), 30)
            break
        except FleetSetupError as exc:
            _say(f"configuration error: {exc}")
            return 2
        except NatsRefused as exc:
            _say(f"the NATS cluster refused this worker: {exc} ({CREDENTIALS_HINT})")
            return 2
        except Exception as exc:  # unreachable for now: the cluster may still be starting
            from nats.js.errors import APIError  # noqa: PLC0415

            if isinstance(exc, APIError) and exc.code not in (None, 503):
                _say(f"configuration error: JetStream refused the fleet's streams: {exc}")
                return 2
            if not told:
                _say(f"cannot reach NATS at {target.label} ({exc!r}); retrying, Ctrl-C stops")
                told = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff.next())
            if stop.is_set():
                return 0
    for note in notes:
        _say(note)
    registry = CollectorRegistry()
    registry.register(FleetMetrics(worker))
    registry.register(OutputMetrics(p.outputs))
    state_dir = Path(cfg.state_dir) if cfg.state_dir else None
    feeders, output_notes = await start_outputs(worker.js, p.outputs, settings.ack_wait, state_dir)
    for note in output_notes:
        _say(note)
    feeding = [loop.create_task(f.run(), name=f"output {f.output.name} {f.what}") for f in feeders]

    async def stop_feeding() -> None:
        await stop_outputs(feeders, feeding, p.outputs)

    async def metrics_page(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "worker": worker.id, "partitions": sorted(worker.owned)}
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    host, port = cfg.host_port
    try:
        await web.TCPSite(runner, host, port, ssl_context=p.ssl_ctx).start()
    except OSError as exc:
        await runner.cleanup()
        await stop_feeding()
        await worker.close()
        _say(f"cannot listen on {host}:{port} for /metrics: {exc.strerror or exc} (--listen)")
        return 2
    _say(
        f"worker {worker.id} serving the fleet at {target.label} ({len(p.rules.rules)} rules, "
        f"{settings.partitions} partitions, rebuild {worker.rebuild_seconds:g} s, "
        f"{len(p.outputs)} outputs; metrics on "
        f"{'https' if p.ssl_ctx else 'http'}://{host}:{port}/metrics); Ctrl-C or SIGTERM stops"
    )
    try:
        await worker.run(stop, before_close=stop_feeding)
    finally:
        await runner.cleanup()
    return 0


async def _check(target: NatsTarget, settings: FleetSettings, p: Any) -> int:
    """--check-config with --nats: the cluster reachable, the streams as configured."""
    from nats.js.errors import NotFoundError  # noqa: PLC0415

    try:
        nc = await asyncio.wait_for(connect(target, "sandtrace-check"), 10)
    except TimeoutError:
        _say(
            f"configuration error: cannot reach NATS at {target.label}: no server answered in 10 s"
        )
        return 2
    except NatsRefused as exc:
        _say(
            f"configuration error: the NATS cluster refused this worker: {exc} ({CREDENTIALS_HINT})"
        )
        return 2
    except Exception as exc:
        _say(f"configuration error: cannot reach NATS at {target.label}: {exc!r}")
        return 2
    try:
        js = nc.jetstream(timeout=5)
        try:
            await js.account_info()
        except NotFoundError:
            _say(f"configuration error: JetStream is not enabled at {target.label}")
            return 2
        notes = await ensure(js, settings, create=False)
    except FleetSetupError as exc:
        _say(f"configuration error: {exc}")
        return 2
    except Exception as exc:
        _say(f"configuration error: JetStream at {target.label}: {exc!r}")
        return 2
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    for note in notes:
        _say(f"note: {note}")
    _say(
        f"configuration OK ({p.cfg.source}): fleet at {target.label}, {settings.partitions} "
        f"partitions, {settings.replicas} replicas, {len(p.rules.rules)} rules"
    )
    return 0
