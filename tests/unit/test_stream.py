"""Streaming to a real service on loopback that goes away and comes back: every event
arrives, in order, none twice; what has to be discarded is counted and reported."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from api.endpoints import InsecureURL, check_url, read_token_file
from api.events import AnyEvent, Event, LostEvent
from api.wire import MAX_BATCH_BYTES, encode_batch
from collector.spool import SpoolBusy
from collector.stream import StreamSink
from detect.ruleset import RuleSet
from detect.testing import event_from_fields
from service.app import Ingest, make_app

TRANSPORTS = pytest.mark.parametrize("transport", ["http", "websocket"])


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
        self.middlewares: list[Any] = []

    async def start(self) -> None:
        app = make_app(self.ingest, "tok")
        app.middlewares.extend(self.middlewares)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def events(n: int, start: int = 0) -> list[Any]:
    return [
        event_from_fields("network_connection", {"ProcessId": start + i, "DestinationPort": 9})
        for i in range(n)
    ]


@pytest.mark.asyncio
@TRANSPORTS
async def test_outage_loses_nothing_and_duplicates_nothing(transport: str) -> None:
    received: list[tuple[str, int, list[AnyEvent]]] = []
    service = Service(free_port(), received)
    await service.start()
    sink = StreamSink(
        f"http://127.0.0.1:{service.port}",
        "tok",
        transport=transport,
        batch_events=100,
        linger=0.05,
        max_backoff=0.5,
    )
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


def spooled(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.batch"))


def delivered(received: list[tuple[str, int, list[AnyEvent]]]) -> list[int]:
    return [e.process.pid for _, _, batch in received for e in batch if isinstance(e, Event)]


def reported_losses(received: list[tuple[str, int, list[AnyEvent]]]) -> int:
    return sum(e.spool for _, _, batch in received for e in batch if isinstance(e, LostEvent))


@pytest.mark.asyncio
@TRANSPORTS
async def test_memory_bound_without_spool_discards_oldest_and_reports_them(transport: str) -> None:
    received: list[tuple[str, int, list[AnyEvent]]] = []
    service = Service(free_port(), received)
    sink = StreamSink(
        f"http://127.0.0.1:{service.port}",
        "tok",
        transport=transport,
        batch_events=10,
        linger=0.05,
        memory_bytes=20_000,
        max_backoff=0.2,
    )
    try:
        for event in events(200):  # nothing listens yet: 20 batches, ~4 fit in memory
            sink.emit(event)
        held = sink.held_batches
        assert 1 <= held < 20
        assert sink.stats.discarded == 200 - 10 * held
        assert sink.stats.discarded_by == {"memory_full": 200 - 10 * held}
        await service.start()
        await sink.aclose(deadline=10)
    finally:
        await service.stop()
    pids = delivered(received)
    assert pids == list(range(200 - 10 * held, 200))  # the newest survive, in order
    assert reported_losses(received) == 200 - 10 * held  # and the service learns the count
    assert sink.stats.discarded == 200 - len(pids)


@pytest.mark.asyncio
@TRANSPORTS
async def test_spool_holds_an_outage_and_replays_in_order(transport: str, tmp_path: Path) -> None:
    received: list[tuple[str, int, list[AnyEvent]]] = []
    service = Service(free_port(), received)
    sink = StreamSink(
        f"http://127.0.0.1:{service.port}",
        "tok",
        transport=transport,
        batch_events=50,
        linger=0.05,
        memory_bytes=3000,
        spool_dir=tmp_path,
        max_backoff=0.2,
    )
    try:
        for event in events(1000):
            sink.emit(event)
        assert sink.spool_batches >= 15  # most went to disk
        assert spooled(tmp_path)[0].startswith("0" * 19)
        await asyncio.sleep(0.3)
        await service.start()
        await sink.aclose(deadline=10)
    finally:
        await service.stop()
    assert delivered(received) == list(range(1000))
    assert sink.stats.discarded == 0 and sink.spool_batches == 0
    assert spooled(tmp_path) == []


@pytest.mark.asyncio
@TRANSPORTS
async def test_full_spool_discards_oldest_counts_and_reports(
    transport: str, tmp_path: Path
) -> None:
    received: list[tuple[str, int, list[AnyEvent]]] = []
    service = Service(free_port(), received)
    sink = StreamSink(
        f"http://127.0.0.1:{service.port}",
        "tok",
        transport=transport,
        batch_events=50,
        linger=0.05,
        memory_bytes=1,
        spool_dir=tmp_path,
        spool_bytes=100_000,
        max_backoff=0.2,
    )
    try:
        for event in events(2000):
            sink.emit(event)
        assert sink.spool_bytes <= 100_000
        lost = sink.stats.discarded
        assert lost > 0 and lost % 50 == 0
        assert sink.stats.discarded_by == {"spool_full": lost}
        await service.start()
        await sink.aclose(deadline=10)
    finally:
        await service.stop()
    assert delivered(received) == list(range(lost, 2000))
    assert reported_losses(received) == lost


@pytest.mark.asyncio
@TRANSPORTS
async def test_restarted_collector_replays_its_spool_under_the_same_id(
    transport: str, tmp_path: Path
) -> None:
    received: list[tuple[str, int, list[AnyEvent]]] = []
    service = Service(free_port(), received)
    url = f"http://127.0.0.1:{service.port}"
    first = StreamSink(
        url,
        "tok",
        transport=transport,
        batch_events=20,
        linger=0.05,
        spool_dir=tmp_path,
        max_backoff=0.2,
    )
    await service.start()
    try:
        for event in events(100):
            first.emit(event)
        await asyncio.sleep(0.5)
        await service.stop()  # service gone: the rest stays with the collector
        for event in events(100, start=100):
            first.emit(event)
        await first.aclose(deadline=0.3)  # the collector stops too
        assert first.spool_batches > 0
        second = StreamSink(
            url,
            "tok",
            transport=transport,
            batch_events=20,
            linger=0.05,
            spool_dir=tmp_path,
            max_backoff=0.2,
        )
        assert second.collector_id == first.collector_id
        with pytest.raises(SpoolBusy, match="in use by another collector"):
            StreamSink(url, "tok", spool_dir=tmp_path)  # while the second holds it
        for event in events(100, start=200):
            second.emit(event)
        await service.start()
        await second.aclose(deadline=10)
    finally:
        await service.stop()
    assert delivered(received) == list(range(300))
    seqs = [seq for _, seq, _ in received]
    assert seqs == sorted(set(seqs))  # increasing, none reused across the restart
    assert {c for c, _, _ in received} == {first.collector_id}


@pytest.mark.asyncio
async def test_batch_refused_for_good_is_discarded_counted_and_reported() -> None:
    received: list[tuple[str, int, list[AnyEvent]]] = []
    service = Service(free_port(), received)
    refused = 0

    @web.middleware
    async def refuse_second(request: web.Request, handler: Any) -> web.StreamResponse:
        nonlocal refused
        if request.path == "/v1/batches" and refused == 0 and received:
            refused += 1
            await request.read()
            return web.json_response({"error": "malformed"}, status=400)
        resp: web.StreamResponse = await handler(request)
        return resp

    service.middlewares = [refuse_second]
    await service.start()
    sink = StreamSink(f"http://127.0.0.1:{service.port}", "tok", batch_events=10, linger=0.05)
    try:
        for event in events(30):
            sink.emit(event)
        await sink.aclose(deadline=10)
    finally:
        await service.stop()
    assert refused == 1
    assert delivered(received) == list(range(10)) + list(range(20, 30))
    assert sink.stats.discarded_by == {"rejected": 10}
    assert reported_losses(received) == 10


def test_plain_http_only_to_loopback_unless_insecure() -> None:
    assert check_url("http://127.0.0.1:8780/") == "http://127.0.0.1:8780"
    assert check_url("http://localhost:8780") == "http://localhost:8780"
    assert check_url("http://[::1]:8780") == "http://[::1]:8780"
    assert check_url("https://192.0.2.7:8780") == "https://192.0.2.7:8780"
    with pytest.raises(InsecureURL, match=r"clear text to 192\.0\.2\.7"):
        check_url("http://192.0.2.7:8780")
    assert check_url("http://192.0.2.7:8780", insecure=True) == "http://192.0.2.7:8780"
    with pytest.raises(ValueError, match="not http"):
        check_url("ftp://192.0.2.7/")


@pytest.mark.asyncio
async def test_websocket_stream_answers_each_frame_and_keeps_serving() -> None:
    received: list[tuple[str, int, list[AnyEvent]]] = []
    service = Service(free_port(), received)
    await service.start()
    url = f"http://127.0.0.1:{service.port}/v1/stream"
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url, headers={"Authorization": "Bearer wrong"})
            assert refused.value.status == 401
            auth = {"Authorization": "Bearer tok"}
            async with session.ws_connect(url, headers=auth) as ws:
                await ws.send_bytes(b"\xc1 not msgpack")
                bad = await ws.receive_json(timeout=5)
                assert (bad["status"], bad["error"]) == (400, "malformed")
                await ws.send_bytes(encode_batch("c9", 0, events(3)))
                assert await ws.receive_json(timeout=5) == {"ack": 0}
                await ws.send_bytes(encode_batch("c9", 0, events(3)))  # a replay
                assert await ws.receive_json(timeout=5) == {"ack": 0}
                await ws.send_str('{"spool_bytes": 4096, "held_batches": 2}')
                await ws.send_bytes(encode_batch("c9", 1, events(2, start=3)))
                assert await ws.receive_json(timeout=5) == {"ack": 1}
            async with session.ws_connect(url, headers=auth) as ws:
                with contextlib.suppress(ConnectionError):  # closed while still sending
                    await ws.send_bytes(b"x" * (MAX_BATCH_BYTES + 1))
                closed = await ws.receive(timeout=5)
                assert closed.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                )
    finally:
        await service.stop()
    assert delivered(received) == [0, 1, 2, 3, 4]
    info = service.ingest.stats.collectors["c9"]
    assert (info.spool_bytes, info.held_batches, info.last_seq) == (4096, 2, 1)
    assert service.ingest.stats.rejected == {"unauthorized": 1, "malformed": 1, "too_large": 1}


def test_token_files_are_read_one_way(tmp_path: Path) -> None:
    good, empty = tmp_path / "t", tmp_path / "e"
    good.write_text("  s3cret\n")
    empty.write_text("\n")
    assert read_token_file(str(good)) == "s3cret"
    with pytest.raises(ValueError, match=r"^.*/e is empty$"):
        read_token_file(str(empty))
    with pytest.raises(ValueError, match=r"cannot read .*/missing: No such file or directory"):
        read_token_file(str(tmp_path / "missing"))


@pytest.mark.asyncio
async def test_an_event_waits_at_most_the_linger_whenever_it_comes() -> None:
    """The sender, idle, sleeps a linger at a time; an event that comes in the middle of
    that sleep goes once it is a linger old, not at the end of the next whole sleep."""
    received: list[tuple[str, int, list[AnyEvent]]] = []
    service = Service(free_port(), received)
    loop = asyncio.get_running_loop()
    arrived: dict[int, float] = {}  # pid -> when its batch was handled
    came = {0: asyncio.Event(), 1: asyncio.Event()}

    def handled(collector: str, seq: int, batch: list[AnyEvent]) -> None:
        received.append((collector, seq, batch))
        for e in batch:
            if isinstance(e, Event):
                arrived[e.process.pid] = loop.time()
                came[e.process.pid].set()

    service.ingest = Ingest(RuleSet(), on_batch=handled)
    await service.start()
    linger = 1.0
    sink = StreamSink(f"http://127.0.0.1:{service.port}", "tok", batch_events=100, linger=linger)

    async def arrival(pid: int) -> float:
        await came[pid].wait()
        return arrived[pid]

    try:
        first, second = events(2)
        sink.emit(first)
        await arrival(0)  # the sender now sleeps a whole linger: nothing is pending
        await asyncio.sleep(0.6 * linger)
        emitted = loop.time()
        sink.emit(second)
        waited = await asyncio.wait_for(arrival(1), 5) - emitted
        await sink.aclose(deadline=5)
    finally:
        await service.stop()
    # a linger, not the rest of the sleep it came in plus another whole linger (1.4 s)
    assert 0.9 * linger <= waited < 1.25 * linger, waited
