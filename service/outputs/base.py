"""What every output has: a bounded queue, one sender task, rendering, retries with backoff.

submit() never blocks and never waits for the network or the disk: it enqueues, or, when the
queue is full, counts the item as dropped with cause "queue_full". The sender takes up to
`batch` items at a time, renders them in the output's schema (service/schemas/) and delivers
them, retrying transient failures (connection errors, disk full, HTTP 429/5xx) with
exponential backoff (api.backoff) for as long as it takes: a slow or dead output only fills
its own queue. What a receiver rejects for good is dropped with cause "rejected" and logged
with the reason. aclose() delivers what is queued within its deadline and counts the rest as
dropped with cause "shutdown". Nothing is lost without a count in OutputStats.

A kind of output (jsonl.py, syslog.py, http.py) provides _payload (the bytes sent for one
item) and _deliver (sending a batch of them), and may open, reset and close what it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Required, TypedDict

import aiohttp
import structlog

from api.backoff import Backoff
from api.events import Alert
from service.schemas import SCHEMAS
from service.schemas.common import Doc, Item, Schema

log = structlog.get_logger("sandtrace.outputs")

WHAT = ("events", "alerts", "both")
DROP_CAUSES = ("queue_full", "rejected", "shutdown", "format_error")
RESPONSE_TEXT_LIMIT = 500


class OutputSection(TypedDict, total=False):
    """An [[output]] table once service/outputs/config.py has checked it: which keys each
    type of output takes, requires and what they mean is there."""

    type: Required[str]
    name: str
    what: str
    schema: str
    queue: int
    batch: int
    backoff: float
    backoff_max: float
    # jsonl
    path: str
    max_bytes: int
    backups: int
    # syslog
    address: str
    tls: bool
    ca_file: str
    app_name: str
    facility: str | int
    connect_timeout: float
    # splunk_hec, elasticsearch
    url: str
    token_file: str
    api_key_file: str
    index: str
    sourcetype: str
    insecure: bool
    timeout: float


class OutputConfigError(ValueError):
    """[[output]] tables that cannot work: every problem, each naming the output and key."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class RetryableError(Exception):
    """A delivery that failed for now (connection lost, 5xx, disk full): try again later,
    with `rest` when only those items are left to send (the others got through)."""

    def __init__(self, cause: str, detail: str, rest: list[Pending] | None = None) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.rest = rest


@dataclass(slots=True)
class OutputStats:
    sent: int = 0  # items the receiver accepted
    retries: int = 0  # delivery attempts that failed and were retried
    dropped: Counter[str] = field(default_factory=Counter)  # items lost, per cause
    errors: Counter[str] = field(default_factory=Counter)  # failed attempts, per cause
    queued: int = 0  # items waiting or being delivered, as of the last submit or batch


@dataclass(slots=True)
class Pending:
    item: Item
    payload: bytes  # what the output sends for it, rendered once


def dumps(doc: object) -> str:
    """A document as compact ASCII JSON (what every output sends)."""
    return json.dumps(doc, ensure_ascii=True, separators=(",", ":"))


class Output:
    """One configured output: a bounded queue and a sender task (see module docstring)."""

    output_type: ClassVar[str] = ""
    default_batch: ClassVar[int] = 1

    def __init__(self, section: OutputSection, index: int) -> None:
        self.name: str = section.get("name", f"{self.output_type}{index}")
        self.what: str = section.get("what", "both")
        self.schema_name: str = section.get("schema", "native")
        self.schema: Schema = SCHEMAS[self.schema_name]
        self.queue_size: int = section.get("queue", 10000)
        self.batch: int = section.get("batch", self.default_batch)
        self.backoff: float = float(section.get("backoff", 0.5))
        self.backoff_max: float = float(section.get("backoff_max", 30.0))
        self.stats = OutputStats()
        self._queue: asyncio.Queue[Item] = asyncio.Queue(maxsize=self.queue_size)
        self._inflight: list[Pending] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # no more submits
        self._stopping = False  # the sender must end
        self._idle = asyncio.Event()
        self._idle.set()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} what={self.what} schema={self.schema_name}>"

    # --- the ingestion side ----------------------------------------------------------------

    def wants(self, item: Item) -> bool:
        """Whether this output takes item: alerts, events (LostEvent included) or both."""
        if self.what == "both":
            return True
        return (self.what == "alerts") == isinstance(item, Alert)

    def submit(self, item: Item) -> bool:
        """Enqueue item if this output wants it; never blocks. A full queue (or a closed
        output) counts it as dropped. True when it was queued."""
        if not self.wants(item):
            return False
        if self._closing:
            self.stats.dropped["shutdown"] += 1
            return False
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.stats.dropped["queue_full"] += 1
            return False
        self._idle.clear()
        self.stats.queued = self.depth()
        return True

    def depth(self) -> int:
        """Items waiting in the queue or being delivered now."""
        return self._queue.qsize() + len(self._inflight)

    async def finished(self) -> None:
        """Return once every item submitted so far is delivered or dropped (counted)."""
        await self._idle.wait()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open what the output needs and start its sender task."""
        await self._open()
        self._task = asyncio.create_task(self._run(), name=f"output {self.name}")
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # a bug: _run handles every delivery failure itself
            log.error("output sender died", output=self.name, error=repr(exc), exc_info=exc)

    async def aclose(self, deadline: float = 5.0) -> None:
        """Deliver what is queued within deadline seconds, then stop; whatever is left
        counts as dropped with cause "shutdown"."""
        self._closing = True
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline):
                    await self._idle.wait()
            self._stopping = True
            # Cancel until the task ends: a cancellation that lands as an awaited operation
            # completes can be lost (asyncio.wait_for in 3.11, SSL handshakes), and the
            # _stopping flag ends the task at its next step anyway.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=0.5)
        left = self.depth()
        if left:
            self.stats.dropped["shutdown"] += left
            log.warning("output closed with items undelivered", output=self.name, dropped=left)
        self._inflight = []
        while not self._queue.empty():
            self._queue.get_nowait()
        self.stats.queued = 0
        await self._close()

    # --- the sender ------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff(self.backoff, self.backoff_max)
        while not self._stopping:
            if self._queue.empty() and not self._inflight:
                self._idle.set()
            item = await self._queue.get()
            batch = [item]
            limit = self._batch_limit()
            while len(batch) < limit and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._inflight = self._render(batch)
            backoff.reset()
            await self._deliver_inflight(backoff)
            if self._inflight:  # stopping with items undelivered
                return
            self.stats.queued = self.depth()
            self._batch_done(len(batch))

    def _batch_limit(self) -> int:
        """How many items the sender may take for its next batch."""
        return self.batch

    def _batch_done(self, items: int) -> None:
        """The sender has finished (sent or dropped) a batch of this many items."""

    def _render(self, items: list[Item]) -> list[Pending]:
        pending = []
        for item in items:
            try:
                pending.append(Pending(item, self._payload(item, self.schema(item))))
            except Exception as exc:  # a bug in a schema must not stop the output
                self.stats.dropped["format_error"] += 1
                log.exception(
                    "output cannot render item",
                    output=self.name,
                    kind=getattr(item, "kind", "?"),
                    error=repr(exc),
                )
        return pending

    async def _deliver_inflight(self, backoff: Backoff) -> None:
        while self._inflight:
            try:
                self._inflight = await self._deliver(self._inflight)
                if not self._inflight:
                    return
                cause, detail = "partial", "some items must be sent again"
            except RetryableError as exc:
                cause, detail = exc.cause, str(exc)
                if exc.rest is not None:
                    self._inflight = exc.rest
            except (OSError, aiohttp.ClientError, TimeoutError) as exc:
                cause, detail = type(exc).__name__, str(exc) or repr(exc)
                await self._reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # unexpected: log it whole, keep the items, go on
                cause, detail = type(exc).__name__, repr(exc)
                log.exception("output delivery failed unexpectedly", output=self.name)
                await self._reset()
            self.stats.retries += 1
            self.stats.errors[cause] += 1
            delay = backoff.next()
            log.warning(
                "output delivery failed, will retry",
                output=self.name,
                cause=cause,
                detail=detail,
                items=len(self._inflight),
                retry_in=delay,
            )
            await asyncio.sleep(delay)
            if self._stopping:
                return

    def _reject(self, pending: list[Pending], reason: str) -> None:
        self.stats.dropped["rejected"] += len(pending)
        log.error(
            "output receiver rejected items",
            output=self.name,
            items=len(pending),
            reason=reason[:RESPONSE_TEXT_LIMIT],
        )

    # --- what a kind of output provides ----------------------------------------------------

    def _payload(self, item: Item, doc: Doc) -> bytes:
        """What is sent for one item, given its schema document."""
        raise NotImplementedError

    async def _deliver(self, pending: list[Pending]) -> list[Pending]:
        """Send pending; return those to send again (empty when done). Raise RetryableError
        or OSError/aiohttp.ClientError/TimeoutError when the whole lot must be retried.
        Counts sent and rejected items in self.stats."""
        raise NotImplementedError

    async def _open(self) -> None:
        """Prepare before the sender starts (files, sessions)."""

    async def _reset(self) -> None:
        """Forget a connection after an error so the next attempt opens a new one."""

    async def _close(self) -> None:
        """Release what _open and _deliver acquired."""
