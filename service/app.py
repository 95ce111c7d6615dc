"""The detection service's HTTP side: collectors' batches in, the engine per host, metrics out.

An aiohttp application (service/main.py builds and runs it): POST /v1/batches takes one batch
per request, GET /v1/stream takes them as WebSocket frames (api/wire.py has the format),
GET /v1/tail streams events and alerts to live-tail clients (tail/hub.py), and /healthz,
/readyz and /metrics report. It needs neither root nor BCC.

The service answers {"ack": seq} once a batch is handled: the engine has seen it, the file
outputs have written it, and, with a state directory, the replay state says so. Set to
respond, it adds "orders" when the batch's alerts order a kill or a freeze (api/orders.py). A batch
already handled (same collector, a sequence number it has seen) is acknowledged again without
being handled twice. Bad input gets a 4xx with a reason, counted per reason.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import operator
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from api.events import Alert, AnyEvent, LostEvent
from api.orders import Order, order_to_json, orders_for
from api.wire import CONTENT_TYPES, MAX_BATCH_BYTES, BadBatch, decode_batch
from detect.engine import Engine
from detect.ruleset import RuleSet
from service.metrics import CollectorInfo, IngestMetrics, Stats
from tail.hub import TailHub, TailMetrics, add_tail_routes

if TYPE_CHECKING:
    from service.outputs.jsonl import Points

log = structlog.get_logger("sandtrace.service")


_time_ns = operator.attrgetter("time_ns")

EXPIRY_GRACE_NS = 2_000_000_000
"""Expiry takes a host's clock to be this much behind its estimate (its latest event's time
advanced by the wall-clock time since that event came): events still on their way (a
collector's linger, the network) may yet fall into a fold window that is about to end."""
ENGINE_IDLE_S = 600.0
"""A host's engine is dropped once the host has sent nothing for this long and the engine
holds nothing (a new one raises what it would have); 10 minutes, so a host that reports now
and then does not have its engine rebuilt each time."""


class SeqState:
    """Each collector's last acknowledged batch, kept in a file so that a restarted service
    still recognises replays of batches it handled (and does not raise their alerts twice);
    with it, where each output file's acknowledged lines end (see outputs.jsonl.OutputGate)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / "collectors.json"
        # as loaded (JSON, unchecked): output file -> [dev, inode, size], or None
        self.outputs: dict[str, Any] = {}

    def load(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning(
                "collector state unreadable; replays after the restart may be handled twice",
                path=str(self.path),
                error=str(exc),
            )
            return {}
        if not isinstance(data, dict):
            return {}
        outputs = data.get("outputs", {})
        self.outputs = outputs if isinstance(outputs, dict) else {}
        seqs = data.get("last_seq", {})
        return {str(k): int(v) for k, v in seqs.items() if isinstance(v, int)}

    def save(self, last_seq: dict[str, int], outputs: Points) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"last_seq": last_seq, "outputs": outputs}))
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot save collector state", path=str(self.path), error=str(exc))


class Ingest:
    """Per-host engines and per-collector replay state; the service's whole memory.

    Every batch handled gets a ticket (1, 2, ...). A batch is acknowledged once it is
    committed: commit(t) saves the replay state as of ticket t, a prefix of what was handled,
    never a batch whose outputs may not have it yet."""

    def __init__(
        self,
        rules: RuleSet,
        on_alert: Callable[[Alert], None] | None = None,
        engine_factory: Callable[[RuleSet], Engine] = Engine,
        on_batch: Callable[[str, int, list[AnyEvent]], None] | None = None,
        state_dir: Path | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        kill_on: str | None = None,
        freeze_on: str | None = None,
    ) -> None:
        """on_batch gets a batch's events and on_alert each alert in the order they
        happened: a batch in pieces, each alert right after the piece that ends with the
        event that raised it (a batch that raises none in one piece, the same list).
        `clock` is the wall clock expiry measures hosts' silences with (a bench runs an
        hour in seconds)."""
        self.clock = clock
        self.rules = rules
        self.on_alert = on_alert or (lambda _a: None)
        self.on_batch = on_batch or (lambda _c, _s, _e: None)
        self._engine_factory = engine_factory
        self.engines: dict[str, Engine] = {}
        # per host: its latest event's time, and time.monotonic() when that event came
        self.heard: dict[str, tuple[int, float]] = {}
        self.state = SeqState(state_dir) if state_dir is not None else None
        self.last_seq: dict[str, int] = self.state.load() if self.state is not None else {}
        self.committed_seq = dict(self.last_seq)  # as of ticket `committed`
        self.ticket = 0  # the last one given
        self.committed = 0
        self._uncommitted: deque[tuple[int, str, int]] = deque()  # (ticket, collector, seq)
        self.stats = Stats()
        self._failures: set[str] = set()
        # Response (api/orders.py): the orders the alerts of the batch just handled give,
        # for its acknowledgement (taken by take_orders right after handle)
        self.kill_on, self.freeze_on = kill_on, freeze_on
        self._orders: list[Order] = []

    def new_ticket(self) -> int:
        """A ticket for what is not a batch (the alerts flushed at shutdown)."""
        self.ticket += 1
        return self.ticket

    def commit(self, ticket: int, points: Callable[[int], Points] | None = None) -> None:
        """Persist that every batch up to `ticket` is handled and in the outputs (`points`
        says where each output file's lines of them end). Called just before acknowledging:
        a service that dies before this handles the batch again when it is replayed, and cuts
        its files back to the saved points (outputs.jsonl.take_back)."""
        if ticket <= self.committed:
            return  # a later ticket was committed first: this one with it
        while self._uncommitted and self._uncommitted[0][0] <= ticket:
            _, collector, seq = self._uncommitted.popleft()
            self.committed_seq[collector] = seq
        self.committed = ticket
        outputs: Points = points(ticket) if points is not None else {}
        if self.state is not None:
            self.state.save(self.committed_seq, outputs)

    def engine_for(self, host: str) -> Engine:
        engine = self.engines.get(host)
        if engine is None:
            engine = self.engines[host] = self._engine_factory(self.rules)
        return engine

    def note_collector(self, collector: str, spool_bytes: int, held_batches: int) -> None:
        info = self.stats.collectors.get(collector)
        if info is None:
            info = self.stats.collectors[collector] = CollectorInfo()
        info.spool_bytes, info.held_batches, info.last_seen = spool_bytes, held_batches, time.time()

    def handle(self, collector: str, seq: int, events: list[AnyEvent]) -> int:
        """Process one batch; the ticket to commit before acknowledging it, 0 when there is
        nothing to wait for. A replay of a batch already handled is not handled again; when
        that batch is not committed yet, the replay waits for the latest ticket."""
        if seq <= self.last_seq.get(collector, -1):
            self.stats.batches["replayed"] += 1
            return self.ticket if seq > self.committed_seq.get(collector, -1) else 0
        stats = self.stats
        host, run = "", 0
        feed = self.engine_for(events[0].host).feed if events else None
        raised: list[tuple[int, Alert]] = []  # (the index of the event that raised it, alert)
        for i, event in enumerate(events):  # the hot loop: per batch bookkeeping stays outside
            if event.host != host:
                if run:
                    stats.events_in[host] += run
                    self._heard_from(host, events[i - 1].time_ns)
                host, run = event.host, 0
                feed = self.engine_for(host).feed
            run += 1
            if event.__class__ is LostEvent:  # counted, and to the engine: a loss alerts
                self._count_losses(event)
            try:
                alerts = feed(event)  # type: ignore[misc]
            except Exception as exc:  # a bug the decoder's type checks did not keep out
                self._unprocessable(event, exc)
                continue
            if alerts:
                for alert in alerts:
                    stats.alerts[alert.rule_id] += 1
                    raised.append((i, alert))
        if run:
            stats.events_in[host] += run
            self._heard_from(host, events[-1].time_ns)
        self._publish(collector, seq, events, raised)
        if self.kill_on or self.freeze_on:
            now = time.time_ns()
            for _, alert in raised:
                self._orders += orders_for(alert, self.kill_on, self.freeze_on, now_ns=now)
        if events:  # how old the oldest event of the batch is by now
            oldest = min(map(_time_ns, events))
            stats.lag.observe(max(time.time_ns() - oldest, 0) / 1e9)
        self.last_seq[collector] = seq
        info = stats.collectors.get(collector)
        if info is None:
            info = stats.collectors[collector] = CollectorInfo()
        info.last_seq = seq
        info.host = host or info.host
        stats.batches["accepted"] += 1
        self.ticket += 1
        self._uncommitted.append((self.ticket, collector, seq))
        return self.ticket

    def take_orders(self) -> list[dict[str, Any]]:
        """The response orders of the batch handle() just took, as its acknowledgement
        carries them (api/orders.py), counted by action."""
        orders, self._orders = self._orders, []
        for order in orders:
            self.stats.orders[order.action] += 1
            log.info(
                "response ordered",
                action=order.action,
                host=order.host,
                sandbox=order.sandbox,
                pid=order.process.pid,
                alert=order.alert_id,
            )
        return [order_to_json(o) for o in orders]

    def _heard_from(self, host: str, time_ns: int) -> None:
        heard = self.heard.get(host)
        self.heard[host] = (time_ns if heard is None else max(heard[0], time_ns), self.clock())

    def _publish(
        self, collector: str, seq: int, events: list[AnyEvent], raised: list[tuple[int, Alert]]
    ) -> None:
        """The batch's events and alerts to on_batch and on_alert in the order they
        happened: each alert right after the event that raised it."""
        start = 0
        for at, alert in raised:
            if at >= start:
                self.on_batch(collector, seq, events[start : at + 1])
                start = at + 1
            self.on_alert(alert)
        if start < len(events) or not raised:
            self.on_batch(collector, seq, events[start:] if start else events)

    def expire(self, now: float | None = None) -> list[Alert]:
        """End what each host's engine holds that is over (the repeat summaries go to
        on_alert, and are returned), and drop the engines of hosts quiet for ENGINE_IDLE_S
        that hold nothing. Called every second by the service: without it a summary would
        wait for the host's next event past its fold window, and idle state would stay.

        Fold and correlation windows are in a host's own event time, whatever its clock
        says against the service's: a host's clock is taken to be its latest event's time
        advanced by the wall-clock time since that event came (`now`, by default the clock's),
        less EXPIRY_GRACE_NS."""
        now = self.clock() if now is None else now
        out: list[Alert] = []
        for host, engine in list(self.engines.items()):
            latest, at = self.heard.get(host, (0, now))
            alerts = engine.expire(latest + int((now - at) * 1e9) - EXPIRY_GRACE_NS)
            for alert in alerts:
                self.stats.alerts[alert.rule_id] += 1
                self.on_alert(alert)
            out += alerts
            if now - at >= ENGINE_IDLE_S and engine.idle():
                del self.engines[host]
                self.heard.pop(host, None)
        return out

    def flush(self) -> list[Alert]:
        """At shutdown: every host's pending repeat summaries, to on_alert (and returned)."""
        out: list[Alert] = []
        for engine in self.engines.values():
            for alert in engine.flush():
                self.stats.alerts[alert.rule_id] += 1
                self.on_alert(alert)
                out.append(alert)
        return out

    def _unprocessable(self, event: AnyEvent, exc: Exception) -> None:
        """Counted and logged (the first of each kind of failure with its traceback); the
        rest of the batch is still handled."""
        self.stats.rejected["unprocessable_event"] += 1
        key = f"{event.kind}:{type(exc).__name__}"
        if key not in self._failures:
            self._failures.add(key)
            log.error(
                "the engine failed on an event; it is counted and skipped",
                kind=event.kind,
                error=repr(exc),
                exc_info=exc,
            )

    def _count_losses(self, event: LostEvent) -> None:
        lost = self.stats.collector_lost
        host = event.host
        for cause, n in (
            ("kernel", sum(event.kernel.values())),
            ("user", event.user),
            ("map_error", sum(event.errors.values())),
            ("spool", event.spool),
        ):
            if n > 0:
                lost[host, cause] += n


class Gate(Protocol):
    """What stands between handling a batch and acknowledging it (the OutputGate of
    service/outputs/jsonl.py)."""

    def end_batch(self, ticket: int) -> None: ...
    async def settle(self, ticket: int) -> None: ...
    def points(self, ticket: int) -> Points: ...


def _int_header(request: web.Request, name: str) -> int:
    value = request.headers.get(name, "")
    return int(value) if value.isdigit() and len(value) < 20 else 0


def make_app(
    ingest: Ingest,
    token: str | None,
    read_timeout: float = 30.0,
    *,
    tail: TailHub | None = None,
    metrics: Sequence[Collector] = (),
    gate: Gate | None = None,
    failpoint: Callable[[int, int], None] | None = None,
) -> web.Application:
    """The service; a request body that takes longer than read_timeout to arrive gets a 408
    (a client sending a byte a second holds one connection, never the service). With tail,
    GET /v1/tail streams what tail is given (tail.hub). /metrics shows the ingest's
    counters, the tail's and those of the `metrics` collectors (the outputs'), in one
    registry. With gate, a batch is acknowledged once the gate's outputs have it.
    failpoint(ticket, alerts so far) runs between the outputs and the commit (tests crash
    the service there)."""
    app = web.Application(client_max_size=MAX_BATCH_BYTES)
    started = time.monotonic()
    registry = CollectorRegistry()
    registry.register(IngestMetrics(ingest.stats))
    if tail is not None:
        registry.register(TailMetrics(tail))
    for collector in metrics:
        registry.register(collector)

    async def accept(collector: str, seq: int, events: list[AnyEvent]) -> dict[str, Any]:
        """Handle a batch and return, once it may be acknowledged, its acknowledgement:
        {"ack": seq}, with "orders" when its alerts order a response (api/orders.py)."""
        fresh = ingest.ticket
        ticket = ingest.handle(collector, seq, events)
        answer: dict[str, Any] = {"ack": seq}
        orders = ingest.take_orders()
        if orders:
            answer["orders"] = orders
        if not ticket:
            return answer
        if gate is not None:
            if ticket > fresh:
                gate.end_batch(ticket)
            await gate.settle(ticket)
        if failpoint is not None:
            failpoint(ticket, sum(ingest.stats.alerts.values()))
        ingest.commit(ticket, gate.points if gate is not None else None)
        return answer

    def authorized(request: web.Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def rejected(status: int, reason: str, message: str) -> dict[str, object]:
        """Count and log a refused batch; the answer's body (HTTP or WebSocket)."""
        ingest.stats.rejected[reason] += 1
        ingest.stats.batches["rejected"] += 1
        log.info("batch rejected", status=status, reason=reason, message=message)
        return {"error": reason, "status": status, "message": message}

    def reject(status: int, reason: str, message: str) -> web.Response:
        return web.json_response(rejected(status, reason, message), status=status)

    async def batches(request: web.Request) -> web.Response:
        if not authorized(request):
            return reject(401, "unauthorized", "missing or wrong bearer token")
        if request.content_type not in CONTENT_TYPES:
            wanted = " or ".join(CONTENT_TYPES)
            return reject(415, "content_type", f"send {wanted}, not {request.content_type}")
        try:
            body = await asyncio.wait_for(request.read(), read_timeout)
        except web.HTTPRequestEntityTooLarge:
            return reject(413, "too_large", f"batch over {MAX_BATCH_BYTES} bytes")
        except TimeoutError:
            return reject(408, "slow", f"body not received within {read_timeout:g} s")
        try:
            collector, seq, events = decode_batch(body, request.content_type)
        except BadBatch as exc:
            return reject(exc.status, exc.reason, str(exc))
        answer = await accept(collector, seq, events)
        ingest.note_collector(
            collector,
            _int_header(request, "Sandtrace-Spool-Bytes"),
            _int_header(request, "Sandtrace-Held-Batches"),
        )
        return web.json_response(answer)

    async def stream(request: web.Request) -> web.StreamResponse:
        """The same batches over one WebSocket: binary frames are batches, each answered
        with a text frame {"ack": seq} or {"error", "status", "message"}; a text frame
        {"spool_bytes", "held_batches"} may come before a batch."""
        if not authorized(request):
            return reject(401, "unauthorized", "missing or wrong bearer token")
        ws = web.WebSocketResponse(max_msg_size=MAX_BATCH_BYTES, heartbeat=read_timeout)
        await ws.prepare(request)
        streams.add(ws)
        try:
            await _stream_batches(ws)
        finally:
            streams.discard(ws)
        return ws

    async def _stream_batches(ws: web.WebSocketResponse) -> None:
        spool_bytes = held = 0
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                try:
                    meta = json.loads(msg.data)
                    spool_bytes = int(meta.get("spool_bytes", 0))
                    held = int(meta.get("held_batches", 0))
                except (ValueError, TypeError, AttributeError):
                    await ws.send_json(
                        {
                            "error": "malformed",
                            "status": 400,
                            "message": "text frames are JSON maps of counters",
                        }
                    )
                continue
            if msg.type == WSMsgType.ERROR:  # a frame over the size limit, a broken frame
                exc = ws.exception()
                too_big = getattr(exc, "code", None) == WSCloseCode.MESSAGE_TOO_BIG
                rejected(
                    1009 if too_big else 400,
                    "too_large" if too_big else "malformed",
                    f"stream closed: {exc}",
                )
                break
            if msg.type != WSMsgType.BINARY:
                break
            try:
                collector, seq, events = decode_batch(msg.data)
            except BadBatch as exc:
                await ws.send_json(rejected(exc.status, exc.reason, str(exc)))
                continue
            answer = await accept(collector, seq, events)
            ingest.note_collector(collector, spool_bytes, held)
            await ws.send_json(answer)

    streams: set[web.WebSocketResponse] = set()

    async def close_streams(_app: web.Application) -> None:
        """At shutdown, collectors' streams end at once (they reconnect to the next service)."""
        for ws in list(streams):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"service stopping")

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "uptime_s": round(time.monotonic() - started)})

    async def readyz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ready", "rules": len(ingest.rules.rules)})

    async def metrics_page(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_post("/v1/batches", batches)
    app.router.add_get("/v1/stream", stream)
    app.on_shutdown.append(close_streams)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    if tail is not None:
        add_tail_routes(app, tail, token)
    return app
