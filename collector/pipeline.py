"""The asyncio side of the collector: records from the probes' reader thread, through the
assembler, to every sink; loss checked and reported as it happens and in the totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from api.events import Alert, AnyEvent, CgroupMoveEvent, LostEvent
from api.render import json_line
from collector import records as R
from collector.assemble import Assembler
from collector.enrich import ExecEnricher

log = structlog.get_logger("sandtrace.collector")


class LossCounts(Protocol):
    """Cumulative losses so far (probes.loader.LossCounters)."""

    @property
    def kernel(self) -> Mapping[int, int]: ...  # per record type
    @property
    def user(self) -> int: ...
    @property
    def errors(self) -> Mapping[int, int]: ...
    @property
    def sandboxes(self) -> Mapping[int, int]: ...  # kernel losses per sandbox index


class BatchQueue(Protocol):
    """The hand-off from the probes' reader thread (probes.loader.RecordQueue)."""

    def drain(self) -> list[list[bytes]]: ...


class RecordSource(Protocol):
    """What the pipeline needs of the probes (probes.loader.Probes, or a test's fake)."""

    def start(self, wake: Callable[[], None]) -> None: ...
    def collect(self) -> list[list[bytes]]: ...  # the records to assemble now
    def look_again(self) -> float | None: ...  # seconds until collect() must be called again
    def drain_now(self) -> None: ...
    def losses(self) -> LossCounts: ...
    @property
    def queue(self) -> BatchQueue: ...


class Sink(Protocol):
    """Where events and alerts go. emit() may buffer; flush() is called once per batch."""

    def emit(self, event: AnyEvent | Alert) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class JsonFileSink:
    """JSON lines appended to a file: everything, or only alerts."""

    def __init__(self, path: str, *, alerts_only: bool = False) -> None:
        self._f = Path(path).open("a", encoding="ascii")  # noqa: SIM115 - closed in close()
        self.alerts_only = alerts_only

    def emit(self, event: AnyEvent | Alert) -> None:
        if self.alerts_only and not isinstance(event, Alert):
            return
        self._f.write(json_line(event) + "\n")

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class CallbackSink:
    """Hands each event to a function (used by tests and embedding code)."""

    def __init__(self, fn: Callable[[AnyEvent | Alert], object]) -> None:
        self._fn = fn

    def emit(self, event: AnyEvent | Alert) -> None:
        self._fn(event)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


class Detector(Protocol):
    """The detection engine as the pipeline uses it (detect.engine.Engine)."""

    def feed(self, event: AnyEvent) -> list[Alert]: ...
    def expire(self, now_ns: int) -> list[Alert]: ...
    def flush(self) -> list[Alert]: ...


class CgroupAttacher(Protocol):
    def attach_cgroup(self, cgroup_dir: Path) -> None: ...


class EscapeFollower:
    """Attaches the socket hooks to the cgroup a traced process moved to.

    Membership is sticky in the kernel, but the connect and bind hooks are attached per
    cgroup: without this, UDP connects and binds of a process that left its sandbox would go
    unseen (its TCP connects are seen through the TCP state tracepoint anyway). What it does
    between its move and this attach is not seen by those hooks.
    """

    def __init__(self, probes: CgroupAttacher, cgroup_root: Path) -> None:
        self.probes = probes
        self.cgroup_root = cgroup_root

    def emit(self, event: AnyEvent | Alert) -> None:
        if isinstance(event, CgroupMoveEvent) and event.left_sandbox:
            target = self.cgroup_root / event.dst_cgroup_path.lstrip("/")
            try:
                self.probes.attach_cgroup(target)
            except (RuntimeError, OSError) as exc:  # ProbeError, or the cgroup is gone
                log.warning(
                    "cannot follow a process out of its sandbox",
                    pid=event.target_pid,
                    cgroup=str(target),
                    error=str(exc),
                )

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass(slots=True)
class Totals:
    events: Counter[str] = field(default_factory=Counter)
    lost_kernel: int = 0
    lost_user: int = 0
    decode_errors: int = 0
    map_errors: int = 0
    # exec identity and standard streams (ExecEnricher.counters()): cache hits, files read,
    # failures, bytes hashed, socket lookups
    enrich: dict[str, int] = field(default_factory=dict)


IDLE_LOOK = 0.1
"""Seconds the loop sleeps at most while nothing wakes it: expiry, polls and loss checks."""


class Pipeline:
    def __init__(
        self,
        probes: RecordSource,
        assembler: Assembler,
        sinks: list[Sink],
        loss_interval: float = 1.0,
        engine: Detector | None = None,
        *,
        enricher: ExecEnricher | None = None,
        pollers: Sequence[Callable[[], list[AnyEvent]]] = (),
    ) -> None:
        self.engine = engine
        self.enricher = enricher
        # What the kernel cannot report and is looked up instead, each called every turn
        # (it decides how often it looks): packet sockets without kprobes.
        self.pollers = list(pollers)
        self.probes = probes
        self.assembler = assembler
        if enricher is not None:  # the execs of known files are complete as assembled
            assembler.known_file = enricher.known_at_exec
        self.sinks = sinks
        self.loss_interval = loss_interval
        self.totals = Totals()
        # Set on the event loop when the probes handed records over (or stop was set) since
        # the loop last looked; the loop sleeps on _waiter until then.
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None
        self._reported_kernel: Counter[int] = Counter()
        self._reported_user = 0
        self._reported_errors: Counter[int] = Counter()
        self._reported_sandboxes: Counter[int] = Counter()

    def emit(self, event: AnyEvent | Alert) -> None:
        self.totals.events[event.kind] += 1
        for sink in self.sinks:
            sink.emit(event)
        if self.engine is not None and not isinstance(event, Alert):
            for alert in self.engine.feed(event):
                self.emit(alert)

    async def _process_batches(self) -> None:
        events, errors = self.assembler.feed_batches(self.probes.collect())
        for error in errors:
            log.warning("undecodable record", error=error)
        self.totals.decode_errors += len(errors)
        await self._enrich(events)
        self._emit_events(events)

    def _emit_events(self, events: list[AnyEvent]) -> None:
        """emit() of each event (none an alert), with what it looks up taken once a batch."""
        counts = self.totals.events
        emits = [sink.emit for sink in self.sinks]
        feed = self.engine.feed if self.engine is not None else None
        for ev in events:
            counts[ev.kind] += 1
            for emit in emits:
                emit(ev)
            if feed is not None:
                for alert in feed(ev):
                    self.emit(alert)

    async def _enrich(self, events: list[AnyEvent]) -> None:
        """Exec events completed with the executed file's identity and standard streams,
        before anything sees them: the few files new to the cache are read in the
        enricher's worker thread while this awaits, so the order of events holds."""
        if self.enricher is None:
            return
        batch = self.enricher.begin(
            events, self.assembler.exec_file_keys, self.assembler.exec_complete
        )
        if batch is not None:
            await asyncio.get_running_loop().run_in_executor(self.enricher.pool, batch.work)
            batch.apply()
        self.enricher.carry(events, self.assembler.identify)

    def check_losses(self) -> None:
        """Emit a LostEvent for whatever was lost since the last check."""
        now = self.probes.losses()
        kernel = Counter(now.kernel)
        errors = Counter(now.errors)
        sandboxes = Counter(now.sandboxes)
        dk = kernel - self._reported_kernel
        de = errors - self._reported_errors
        du = now.user - self._reported_user
        ds = sandboxes - self._reported_sandboxes
        if not dk and not de and du <= 0:
            return
        self._reported_kernel, self._reported_errors, self._reported_user = kernel, errors, now.user
        self._reported_sandboxes = sandboxes
        self.totals.lost_kernel += sum(dk.values())
        self.totals.lost_user += max(du, 0)
        self.totals.map_errors += sum(de.values())
        self.emit(
            LostEvent(
                time_ns=time.time_ns(),
                host=self.assembler.host,
                kernel={R.RECORD_NAMES.get(k, "unknown"): v for k, v in dk.items()},
                user=max(du, 0),
                errors={R.ERROR_NAMES.get(k, str(k)): v for k, v in de.items()},
                sandboxes=self._sandbox_losses(ds),
            )
        )

    def _sandbox_losses(self, by_index: Counter[int]) -> dict[str, int]:
        """Kernel losses by sandbox id, from the kernel's counts by sandbox index."""
        by_name: Counter[str] = Counter()
        for index, n in by_index.items():
            by_name[self.assembler.sandbox_name(index)] += n
        return dict(by_name)

    async def run(self, stop: asyncio.Event) -> Totals:
        loop = asyncio.get_running_loop()

        def wake() -> None:  # called from the probes' reader thread
            loop.call_soon_threadsafe(self._wake_up)

        # What exists now (rules, compiled matchers, probes, package index, tables) lives as
        # long as the collector: moved out of the collector's reach, so that each full
        # collection, every few thousand processes, stops scanning it (that scan cost ~50
        # ms, a quarter of the CPU spent per process between collections).
        gc.freeze()
        self.probes.start(wake)
        next_loss = time.monotonic() + self.loss_interval
        stop_wait = asyncio.ensure_future(stop.wait())
        stop_wait.add_done_callback(lambda _: self._wake_up())
        try:
            while not stop.is_set():
                # Woken by the probes' reader thread, or by its own timer while it reads
                # the rings itself (look_again; see probes.loader.Probes.start).
                look = self.probes.look_again()
                await self._sleep(loop, IDLE_LOOK if look is None else look)
                await self._process_batches()
                for ev in self.assembler.expire():
                    self.emit(ev)
                for poll in self.pollers:
                    for ev in poll():
                        self.emit(ev)
                if self.engine is not None:
                    for alert in self.engine.expire(time.time_ns()):
                        self.emit(alert)
                if time.monotonic() >= next_loss:
                    self.check_losses()
                    next_loss = time.monotonic() + self.loss_interval
                for sink in self.sinks:
                    sink.flush()
        finally:
            stop_wait.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop_wait
        await self.finish()
        return self.totals

    def _wake_up(self) -> None:
        """On the event loop: records were handed over, stop was set, or time is up."""
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _sleep(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """Return once _wake_up() was called since the last return (at once if it was), or
        after `seconds`. One future and one timer per wake-up: this runs for every
        hand-over of the probes, tens of times a second on a busy host."""
        if not self._woken:
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(seconds, self._wake_up)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        self._woken = False

    async def finish(self) -> None:
        """Everything the kernel wrote is read, assembled and emitted before this returns."""
        await asyncio.to_thread(self.probes.drain_now)
        await self._process_batches()
        for ev in self.assembler.flush_all():
            self.emit(ev)
        if self.engine is not None:
            for alert in self.engine.flush():
                self.emit(alert)
        self.check_losses()
        if self.enricher is not None:
            self.enricher.close()
            self.totals.enrich = self.enricher.counters()
        for sink in self.sinks:
            aclose = getattr(sink, "aclose", None)
            if aclose is not None:
                await aclose()  # a network sink delivers what it holds first
            else:
                sink.close()
