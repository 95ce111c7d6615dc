"""The live tail's server side: a hub that fans events and alerts out to WebSocket clients
(protocol in api.tail), the /v1/tail endpoint, and the Unix socket `sandtrace watch` serves it on.

Publishing never blocks: each subscriber has a bounded queue, and a slow client only loses
its own items (counted, and told). The hub's counters are plain integers; TailMetrics
reads them for Prometheus (the service registers it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import socket
import stat
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from aiohttp import WSCloseCode, web
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.events import Alert, AnyEvent, encode
from api.tail import TAIL_PATH, BadFilter, TailFilter, dropped_message, hello_message

log = structlog.get_logger("sandtrace.tail")

DEFAULT_QUEUE = 4096
MAX_CLIENTS = 64


# --- the hub -------------------------------------------------------------------------------


@dataclass(slots=True)
class Dropped:
    """Queued in place of what a full queue could not take: count items missed here."""

    count: int


@dataclass(slots=True)
class Subscriber:
    """One client: its filter, its bounded queue of encoded items, and what it missed."""

    filter: TailFilter
    max_queue: int
    queue: deque[bytes | Dropped] = field(default_factory=deque)
    queued: int = 0  # items (not notices) in queue
    missed: int = 0  # dropped since the last notice was queued
    dropped: int = 0  # dropped in all
    closed: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, frame: bytes) -> bool:
        """Queue frame unless the queue is full; False when it was dropped."""
        if self.queued >= self.max_queue:
            self.missed += 1
            self.dropped += 1
            return False
        if self.missed:  # the notice goes where the gap is
            self.queue.append(Dropped(self.missed))
            self.missed = 0
        self.queue.append(frame)
        self.queued += 1
        self.wake.set()
        return True

    async def next(self) -> bytes | Dropped | None:
        """The next frame or notice, waiting for one; None once closed and drained."""
        while True:
            if self.queue:
                item = self.queue.popleft()
                if isinstance(item, bytes):
                    self.queued -= 1
                return item
            if self.missed:
                notice, self.missed = Dropped(self.missed), 0
                return notice
            if self.closed:
                return None
            self.wake.clear()
            await self.wake.wait()


class TailHub:
    """Fans events and alerts out to live-tail subscribers; publish() never blocks."""

    def __init__(
        self, max_queue: int = DEFAULT_QUEUE, max_clients: int = MAX_CLIENTS, notice: str = ""
    ) -> None:
        self.notice = notice  # told to every client in its hello (e.g. why no alerts come)
        self.max_queue = max_queue
        self.max_clients = max_clients  # each holds up to max_queue frames: memory stays bounded
        self.refused = 0
        self.subscribers: list[Subscriber] = []
        self.sent = 0
        self.dropped = 0
        self.closed = False
        self.handlers: set[asyncio.Task[object]] = set()  # of connected clients

    def subscribe(self, flt: TailFilter) -> Subscriber:
        sub = Subscriber(flt, self.max_queue, closed=self.closed)  # none after close()
        self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.closed = True
        sub.wake.set()
        if sub in self.subscribers:
            self.subscribers.remove(sub)

    def publish(self, item: AnyEvent | Alert) -> None:
        """Queue item for every subscriber whose filter takes it (encoded once, if at all)."""
        frame: bytes | None = None
        for sub in self.subscribers:
            if sub.closed or not sub.filter.matches(item):
                continue
            if frame is None:
                frame = encode(item)
            if not sub.offer(frame):
                self.dropped += 1

    def close(self) -> None:
        """Every subscriber gets what is queued for it, then its stream ends."""
        self.closed = True
        for sub in self.subscribers:
            sub.closed = True
            sub.wake.set()

    async def aclose(self, grace: float = 2.0) -> None:
        """close(), then wait (at most grace seconds) for the clients' handlers to finish."""
        self.close()
        if self.handlers:
            await asyncio.wait(set(self.handlers), timeout=grace)


class TailMetrics(Collector):
    """The hub's gauge and counters as Prometheus metric families, read at each scrape."""

    def __init__(self, hub: TailHub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        yield GaugeMetricFamily(
            "sandtrace_tail_subscribers", "Live tail clients connected", value=len(hub.subscribers)
        )
        yield CounterMetricFamily(
            "sandtrace_tail_sent", "Events and alerts sent to live tail clients", value=hub.sent
        )
        yield CounterMetricFamily(
            "sandtrace_tail_dropped",
            "Events and alerts not sent to a live tail client that read too slowly (each was "
            "told how many)",
            value=hub.dropped,
        )
        yield CounterMetricFamily(
            "sandtrace_tail_refused",
            "Tail clients refused: as many as allowed were connected",
            value=hub.refused,
        )


# --- the WebSocket endpoint ----------------------------------------------------------------


def _refuse(status: int, reason: str, message: str) -> web.Response:
    log.info("tail refused", status=status, reason=reason, message=message)
    return web.json_response({"error": reason, "message": message}, status=status)


def add_tail_routes(app: web.Application, hub: TailHub, token: str | None) -> None:
    """GET /v1/tail on app; with a token, it wants 'Authorization: Bearer <token>'."""
    expected = f"Bearer {token}".encode() if token is not None else None

    async def tail(request: web.Request) -> web.StreamResponse:
        if expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _refuse(401, "unauthorized", "missing or wrong bearer token")
        try:
            flt = TailFilter.parse(request.query.items())
        except BadFilter as exc:
            return _refuse(400, "bad_filter", str(exc))
        if len(hub.subscribers) >= hub.max_clients:
            hub.refused += 1
            return _refuse(
                503,
                "too_many_clients",
                f"{hub.max_clients} tail clients are connected already; try again when one "
                "has gone",
            )
        ws = web.WebSocketResponse(heartbeat=20.0)
        if not ws.can_prepare(request).ok:
            return _refuse(400, "not_websocket", f"{TAIL_PATH} speaks WebSocket only")
        await ws.prepare(request)
        # Subscribed before the hello goes, so what is published once the client has it
        # reaches it; the sender starts after the hello, so the hello comes first.
        sub = hub.subscribe(flt)
        log.info("tail client connected", peer=request.remote, filter=flt.query())
        task = asyncio.current_task()
        if task is not None:
            hub.handlers.add(task)
        tasks: list[asyncio.Task[None]] = []
        try:
            await ws.send_str(hello_message(flt, hub.notice))
            tasks = [
                asyncio.create_task(_send(ws, hub, sub)),
                asyncio.create_task(_read_until_closed(ws)),
            ]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await t
            hub.unsubscribe(sub)
            if task is not None:
                hub.handlers.discard(task)
            log.info("tail client gone", peer=request.remote, dropped=sub.dropped)
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
        return ws

    async def on_shutdown(_app: web.Application) -> None:
        await hub.aclose()

    app.router.add_get(TAIL_PATH, tail)
    app.on_shutdown.append(on_shutdown)


async def _send(ws: web.WebSocketResponse, hub: TailHub, sub: Subscriber) -> None:
    while (item := await sub.next()) is not None:
        if isinstance(item, Dropped):
            await ws.send_str(dropped_message(item.count, sub.dropped))
        else:
            await ws.send_bytes(item)
            hub.sent += 1


async def _read_until_closed(ws: web.WebSocketResponse) -> None:
    """Reads (and so answers pings and sees the close) until the client goes."""
    async for _msg in ws:
        pass  # a client has nothing to say


# --- the local socket of `sandtrace watch` -------------------------------------------------


class TailSocketError(OSError):
    """The tail socket cannot be served; the message says why and what to do."""


class TailSocketBusy(TailSocketError):
    """Another process serves the tail socket."""


def _bind_private(path: Path) -> socket.socket:
    """A Unix socket bound at path, mode 0600 before it listens (so before anyone connects)."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except FileExistsError:
        raise TailSocketError(f"cannot create {path.parent}: a file is in the way") from None
    except OSError as exc:
        raise TailSocketError(f"cannot create {path.parent}: {exc.strerror or exc}") from None
    with contextlib.suppress(FileNotFoundError):
        mode = path.lstat().st_mode
        if not stat.S_ISSOCK(mode):
            raise TailSocketError(f"{path} exists and is not a socket; choose --tail-socket PATH")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()  # left behind by a watch that was killed
        except OSError as exc:
            raise TailSocketError(f"cannot check {path}: {exc.strerror or exc}") from None
        else:
            raise TailSocketBusy(
                f"{path} is in use (another sandtrace watch?); choose --tail-socket PATH"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        path.chmod(0o600)
    except OSError as exc:
        sock.close()
        if isinstance(exc, FileExistsError) or exc.errno == errno.EADDRINUSE:  # bound meanwhile
            raise TailSocketBusy(f"{path} is in use; choose --tail-socket PATH") from None
        raise TailSocketError(f"cannot bind {path}: {exc.strerror or exc}") from None
    return sock


class LocalTail:
    """/v1/tail served on a Unix socket readable by its owner only (root, for watch)."""

    def __init__(self, hub: TailHub, path: Path) -> None:
        self.hub = hub
        self.path = path
        self._runner: web.AppRunner | None = None
        self._inode = 0

    async def start(self) -> None:
        """Listen on path; TailSocketError when that cannot be done."""
        sock = _bind_private(self.path)
        try:
            self._inode = self.path.stat().st_ino
            app = web.Application()
            add_tail_routes(app, self.hub, None)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            sock.close()
            await self.close()
            raise

    async def close(self) -> None:
        """Clients get what is queued for them, then the socket goes."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self._inode:  # still ours
                self.path.unlink()
