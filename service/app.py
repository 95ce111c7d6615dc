"""The detection service: collectors post batches of events, the engine raises alerts.

This is the ingestion core (the first part of the detection-service issue): an aiohttp
application that accepts msgpack batches, checks their wire version and the bearer token,
recognises replays, runs the detection engine per host, and reports health and Prometheus
metrics. It needs neither root nor BCC.

Batch wire format (msgpack map):
    {"v": WIRE_VERSION, "collector": "<id>", "seq": <int>, "events": [<event map>, ...]}
where each event map is collector.events.to_dict() of an event. The service answers
200 {"ack": seq} once the batch is handled; a batch already handled (same collector and a
seq it has seen) is acknowledged again without being processed twice.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from aiohttp import web

from collector.events import Alert, AnyEvent
from detect.engine import Engine
from detect.sigma import RuleSet
from service.tail import TailHub, add_tail_routes
from service.wire import CONTENT_TYPE, MAX_BATCH_BYTES, BadBatch, decode_batch

log = structlog.get_logger("sandtrace.service")


@dataclass(slots=True)
class Stats:
    events_in: Counter[str] = field(default_factory=Counter)  # per host
    batches: Counter[str] = field(default_factory=Counter)  # accepted, replayed, rejected
    alerts: Counter[str] = field(default_factory=Counter)  # per rule id
    rejected: Counter[str] = field(default_factory=Counter)  # per reason


class Ingest:
    """Per-host engines and per-collector replay state; the service's whole memory."""

    def __init__(
        self,
        rules: RuleSet,
        on_alert: Callable[[Alert], None] | None = None,
        engine_factory: Callable[[RuleSet], Engine] = Engine,
        on_batch: Callable[[str, int, list[AnyEvent]], None] | None = None,
    ) -> None:
        self.rules = rules
        self.on_alert = on_alert or (lambda _a: None)
        self.on_batch = on_batch or (lambda _c, _s, _e: None)
        self._engine_factory = engine_factory
        self.engines: dict[str, Engine] = {}
        self.last_seq: dict[str, int] = {}
        self.stats = Stats()

    def engine_for(self, host: str) -> Engine:
        engine = self.engines.get(host)
        if engine is None:
            engine = self.engines[host] = self._engine_factory(self.rules)
        return engine

    def handle(self, collector: str, seq: int, events: list[AnyEvent]) -> bool:
        """Process one batch; False when it is a replay of one already handled."""
        if seq <= self.last_seq.get(collector, -1):
            self.stats.batches["replayed"] += 1
            return False
        self.on_batch(collector, seq, events)
        for event in events:
            host = getattr(event, "host", "")
            self.stats.events_in[host] += 1
            for alert in self.engine_for(host).feed(event):
                self.stats.alerts[alert.rule_id] += 1
                self.on_alert(alert)
        self.last_seq[collector] = seq
        self.stats.batches["accepted"] += 1
        return True


def make_app(
    ingest: Ingest, token: str | None, read_timeout: float = 30.0, *, tail: TailHub | None = None
) -> web.Application:
    """The service; a request body that takes longer than read_timeout to arrive gets a 408
    (a client sending a byte a second holds one connection, never the service). With tail,
    GET /v1/tail streams what tail is given (service.tail)."""
    app = web.Application(client_max_size=MAX_BATCH_BYTES)
    started = time.monotonic()

    def authorized(request: web.Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def reject(status: int, reason: str, message: str) -> web.Response:
        ingest.stats.rejected[reason] += 1
        ingest.stats.batches["rejected"] += 1
        log.info("batch rejected", status=status, reason=reason, message=message)
        return web.json_response({"error": reason, "message": message}, status=status)

    async def batches(request: web.Request) -> web.Response:
        if not authorized(request):
            return reject(401, "unauthorized", "missing or wrong bearer token")
        if request.content_type != CONTENT_TYPE:
            return reject(415, "content_type", f"send {CONTENT_TYPE}, not {request.content_type}")
        try:
            body = await asyncio.wait_for(request.read(), read_timeout)
        except web.HTTPRequestEntityTooLarge:
            return reject(413, "too_large", f"batch over {MAX_BATCH_BYTES} bytes")
        except TimeoutError:
            return reject(408, "slow", f"body not received within {read_timeout:g} s")
        try:
            collector, seq, events = decode_batch(body)
        except BadBatch as exc:
            return reject(exc.status, exc.reason, str(exc))
        ingest.handle(collector, seq, events)
        return web.json_response({"ack": seq})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "uptime_s": round(time.monotonic() - started)})

    async def readyz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ready", "rules": len(ingest.rules.rules)})

    async def metrics(_request: web.Request) -> web.Response:
        text = prometheus_text(ingest.stats)
        if tail is not None:
            text += "\n".join(tail.prometheus_lines()) + "\n"
        return web.Response(text=text, content_type="text/plain")

    app.router.add_post("/v1/batches", batches)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if tail is not None:
        add_tail_routes(app, tail, token)
    return app


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(stats: Stats) -> str:
    """The Prometheus text exposition of the service's counters."""
    out: list[str] = []
    series: dict[str, tuple[str, str, Counter[str]]] = {
        "sandtrace_events_received_total": ("Events received, per host", "host", stats.events_in),
        "sandtrace_batches_total": ("Batches, per result", "result", stats.batches),
        "sandtrace_alerts_total": ("Alerts raised, per rule", "rule", stats.alerts),
        "sandtrace_rejected_total": ("Batches rejected, per reason", "reason", stats.rejected),
    }
    for name, (help_text, label, counter) in series.items():
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} counter")
        for key, value in sorted(counter.items()):
            out.append(f'{name}{{{label}="{_label(key)}"}} {value}')
    return "\n".join(out) + "\n"
