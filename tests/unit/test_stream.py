"""Streaming to a real service on loopback that goes away and comes back: every event
arrives, in order, none twice."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from aiohttp import web

from collector.events import AnyEvent, Event
from collector.stream import StreamSink
from detect.sigma import RuleSet
from detect.testing import event_from_fields
from service.app import Ingest, make_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Service:
    """A real aiohttp service that can be stopped and started again on the same port."""

    def __init__(self, port: int, received: list[tuple[str, int, list[AnyEvent]]]) -> None:
        self.port = port
        self.ingest = Ingest(RuleSet(), on_batch=lambda c, s, e: received.append((c, s, e)))
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.runner = web.AppRunner(make_app(self.ingest, "tok"))
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def events(n: int, start: int = 0) -> list[Any]:
    return [event_from_fields("network_connection", {"ProcessId": start + i, "DestinationPort": 9})
            for i in range(n)]  # fmt: skip


@pytest.mark.asyncio
async def test_outage_loses_nothing_and_duplicates_nothing() -> None:
    received: list[tuple[str, int, list[AnyEvent]]] = []
    service = Service(free_port(), received)
    await service.start()
    sink = StreamSink(f"http://127.0.0.1:{service.port}", "tok", batch_events=100, linger=0.05,
                      max_backoff=0.5)  # fmt: skip
    try:
        for event in events(1000):
            sink.emit(event)
        await asyncio.sleep(0.5)
        await service.stop()  # the service dies mid-stream
        for event in events(1000, start=1000):
            sink.emit(event)
        await asyncio.sleep(1.0)
        await service.start()  # and comes back a second later
        await sink.aclose(deadline=20)
    finally:
        await service.stop()
    pids = [e.process.pid for _, _, batch in received for e in batch if isinstance(e, Event)]
    assert pids == list(range(2000))  # all, in order, once
    seqs = [seq for _, seq, _ in received]
    assert seqs == list(range(len(seqs)))
    assert sink.stats.retries > 0 and sink.stats.discarded == 0
    assert sink.stats.sent_events == 2000


@pytest.mark.asyncio
async def test_full_buffer_discards_the_oldest_and_counts_them() -> None:
    sink = StreamSink("http://127.0.0.1:9", None, max_buffered=50, max_backoff=0.05)
    for event in events(80):
        sink.emit(event)
    assert sink.stats.discarded == 30
    await sink.aclose(deadline=0.5)  # nothing listens: gives up after its deadline
    assert sink.stats.sent_events == 0
