"""Streaming events to the detection service: batched, acknowledged, retried, bounded.

A StreamSink is one more sink of the pipeline. Events wait in a bounded in-memory buffer;
a background task sends them in order as msgpack batches (by size, or after a short linger),
each with this collector's id and a sequence number, and drops a batch from the buffer only
once the service has acknowledged it. While the service is unreachable or failing, it
retries with exponential backoff; when the buffer is full, the oldest events are discarded
and counted. (A disk spool for long outages is the next step.)
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections import deque
from dataclasses import dataclass

import aiohttp
import structlog

from collector.events import Alert, AnyEvent
from service.wire import CONTENT_TYPE, encode_batch

log = structlog.get_logger("sandtrace.stream")


@dataclass(slots=True)
class StreamStats:
    sent_batches: int = 0
    sent_events: int = 0
    retries: int = 0
    discarded: int = 0  # events dropped because the buffer was full


class StreamSink:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        batch_events: int = 500,
        linger: float = 0.2,
        max_buffered: int = 200_000,
        max_backoff: float = 8.0,
        collector_id: str | None = None,
    ) -> None:
        self.url = url.rstrip("/") + "/v1/batches"
        self.token = token
        self.batch_events = batch_events
        self.linger = linger
        self.max_buffered = max_buffered
        self.max_backoff = max_backoff
        # A new id per run: sequence numbers start again at 0 with it.
        self.collector_id = collector_id or f"{socket.gethostname()}/{secrets.token_hex(4)}"
        self.stats = StreamStats()
        self._buffer: deque[AnyEvent] = deque()
        self._seq = 0
        self._inflight = 0  # events at the head of the buffer in the batch being sent
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    # -- Sink -------------------------------------------------------------------------------

    def emit(self, event: AnyEvent | Alert) -> None:
        if isinstance(event, Alert):
            return  # the service detects; alerts are its to raise
        if len(self._buffer) >= self.max_buffered:
            # The oldest event not in the batch on its way goes (that batch may yet be acked).
            if len(self._buffer) > self._inflight:
                del self._buffer[self._inflight]
                self.stats.discarded += 1
            else:
                self.stats.discarded += 1
                return
        self._buffer.append(event)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        if len(self._buffer) >= self.batch_events:
            self._wake.set()

    def flush(self) -> None:
        return None  # the sender keeps its own pace

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    async def aclose(self, deadline: float = 10.0) -> None:
        """Send what is buffered (for at most `deadline` seconds), then stop."""
        self.close()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), deadline)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._buffer:
            log.warning("events not delivered to the service", count=len(self._buffer),
                        url=self.url)  # fmt: skip

    # -- sender -----------------------------------------------------------------------------

    async def _run(self) -> None:
        headers = {"Content-Type": CONTENT_TYPE}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        backoff = 0.25
        async with aiohttp.ClientSession(headers=headers) as session:
            while True:
                if not self._buffer:
                    if self._closing:
                        return
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.linger)
                    continue
                if len(self._buffer) < self.batch_events and not self._closing:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.linger)
                    self._wake.clear()
                batch = [self._buffer[i] for i in range(min(self.batch_events, len(self._buffer)))]
                self._inflight = len(batch)
                sent = await self._send(session, batch)
                self._inflight = 0
                if sent:
                    for _ in batch:
                        self._buffer.popleft()
                    self._seq += 1
                    backoff = 0.25
                    continue
                self.stats.retries += 1
                if self._closing and backoff >= self.max_backoff:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    async def _send(self, session: aiohttp.ClientSession, batch: list[AnyEvent]) -> bool:
        body = encode_batch(self.collector_id, self._seq, batch)
        try:
            async with session.post(self.url, data=body,
                                    timeout=aiohttp.ClientTimeout(total=10)) as resp:  # fmt: skip
                if resp.status == 200:
                    self.stats.sent_batches += 1
                    self.stats.sent_events += len(batch)
                    return True
                text = await resp.text()
                log.warning("service refused a batch", status=resp.status, answer=text[:200])
                return False
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.debug("service unreachable", url=self.url, error=str(exc))
            return False
