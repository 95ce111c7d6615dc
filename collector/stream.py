"""Streaming events to the detection service: batched, acknowledged, retried, spooled, bounded.

A StreamSink is one more sink of the pipeline. Events are sealed into msgpack batches (by
size, or after a short linger), each with this collector's id and the next sequence number,
and sent in sequence order; a batch is forgotten only once the service has acknowledged it.
While the service is unreachable, slow or failing, the collector keeps working:

- sealed batches wait in memory, bounded in bytes (16 MiB; 1 MiB when there is a spool);
- beyond that they go to the disk spool (collector/spool.py), bounded in bytes, which a
  restarted collector replays under the same id;
- whatever has to be discarded (spool full, disk full, no spool and memory full, or a batch
  the service refuses for good) is counted by cause, and the count travels to the service in
  a LostEvent at the head of the next batch, like the kernel's losses.

When the service stops taking batches, the collector says so once (to `notify`, the
user's stderr, and in the log), naming the reason and where events now wait; when it takes
them again, it says what was held, spooled and discarded meanwhile.

Retries back off exponentially. A batch the service can never accept (400 malformed, 413 too
large) is discarded and counted; a refusal that configuration can fix (401 token, 409 wire
version, 415) is retried, with an error that says what to fix, and the spool fills meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import aiohttp
import structlog

from api.backoff import Backoff
from api.endpoints import check_url
from api.events import Alert, AnyEvent, LostEvent
from api.orders import Order, OrderError, order_from_json
from api.wire import CONTENT_TYPE, encode_batch
from collector.spool import Spool, SpoolCorrupt

log = structlog.get_logger("sandtrace.stream")

PERMANENT = {400: "the service cannot read this batch", 413: "the batch is too large"}
FIXABLE = {
    401: "the service refused the token: check --server-token-file against the service's",
    403: "the service refused the token: check --server-token-file against the service's",
    409: "the service reads another wire version: run the same sandtrace version on both",
    415: "the service does not take this content type: run the same sandtrace version on both",
}


@dataclass(slots=True)
class StreamStats:
    sent_batches: int = 0
    sent_events: int = 0
    retries: int = 0
    discarded: int = 0  # events that will never reach the service, all causes
    discarded_by: Counter[str] = field(default_factory=Counter)
    # memory_full (no spool), spool_full, spool_error (disk), rejected (by the service),
    # shutdown (no spool, service gone at exit)
    spooled_events: int = 0  # events written to the disk spool (the service was behind)
    outages: int = 0  # times the service stopped taking batches


@dataclass(slots=True)
class _Outage:
    """Since when the service has not taken a batch, and the counts at that moment."""

    since: float
    discarded: int
    spooled: int


@dataclass(slots=True)
class _Batch:
    seq: int
    events: int
    carried: int  # earlier discards reported by the LostEvent inside this batch
    body: bytes


class StreamSink:
    # what the user can fix when the receiver refuses batches with these statuses (a NATS
    # sink names its own credentials)
    fixable: ClassVar[dict[int, str]] = FIXABLE

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        batch_events: int = 500,
        linger: float = 0.05,
        memory_bytes: int | None = None,
        spool_dir: Path | None = None,
        spool_bytes: int = 256 << 20,
        max_backoff: float = 8.0,
        ca_file: str | None = None,
        insecure: bool = False,
        collector_id: str | None = None,
        transport: str = "http",
        notify: Callable[[str], None] | None = None,
    ) -> None:
        if transport not in ("http", "websocket"):
            raise ValueError(f"transport is http or websocket, not {transport!r}")
        self.transport = transport
        self.base_url = self._base_url(url, insecure)
        self.url = self.base_url + "/v1/batches"
        self.token = token
        self.batch_events = batch_events
        self.linger = linger
        # without a spool, memory is all there is; with one, the spool is the buffer
        self.memory_bytes = memory_bytes or ((1 << 20) if spool_dir is not None else (16 << 20))
        self.max_backoff = max_backoff
        self.ca_file = ca_file
        self.spool = Spool(spool_dir, spool_bytes) if spool_dir is not None else None
        if self.spool is not None:
            self.collector_id = self.spool.collector_id
        else:  # a new id per run: sequence numbers start again at 0 with it
            self.collector_id = collector_id or f"{socket.gethostname()}/{secrets.token_hex(4)}"
        self.stats = StreamStats()
        self._pending: list[AnyEvent] = []
        self._pending_since = 0.0
        self._memory: deque[_Batch] = deque()
        self._memory_size = 0
        self._seq = 0
        self._inflight: _Batch | None = None
        self._unreported = 0  # discards not yet carried by a LostEvent
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._last_warning = 0.0
        self._last_failure = -10.0
        self.notify = notify  # tells the user (stderr) when the service goes and comes back
        # the response orders of acknowledgements (collector.response.Responder's)
        self.on_order: Callable[[Order], None] | None = None
        self._outage: _Outage | None = None
        if self.spool is not None and len(self.spool):
            log.info("replaying spooled batches", batches=len(self.spool), bytes=self.spool.bytes)

    # -- Sink -------------------------------------------------------------------------------

    def emit(self, event: AnyEvent | Alert) -> None:
        if isinstance(event, Alert):
            return  # the service detects; alerts are its to raise
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(event)
        if len(self._pending) >= self.batch_events:
            self._seal()
        if self._task is None:
            self._start_sender()

    def flush(self) -> None:
        return None  # the sender keeps its own pace

    def _start_sender(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stream sender")
        self._task.add_done_callback(self._sender_done)

    def _sender_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        # a bug, not an outage (those are retried): say so loudly (at most every 5 s); what
        # is held stays held (and is spooled at exit); the next event starts a new sender
        now = time.monotonic()
        if now - self._last_failure >= 5.0:
            self._last_failure = now
            log.error(
                "stream sender failed; restarting it",
                error=repr(exc),
                exc_info=exc,
                held_batches=self.held_batches,
            )
        self._task = None

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    async def aclose(self, deadline: float | None = None) -> None:
        """Send what is held for at most `deadline` seconds (default: 2 with a spool, which
        keeps the rest for the next run; 10 without, after which the rest is discarded and
        counted), then stop."""
        if deadline is None:
            deadline = 2.0 if self.spool is not None else 10.0
        self.close()
        self._seal()
        if self._task is None and (self._memory or (self.spool is not None and len(self.spool))):
            self._start_sender()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), deadline)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        self._inflight = None
        while self._memory:
            batch = self._memory.popleft()
            self._memory_size -= len(batch.body)
            if self.spool is not None:
                self._spool_put(batch)
            else:
                self._discard(batch.events, batch.carried, "shutdown")
        left = len(self.spool) if self.spool is not None else 0
        if self.spool is not None:
            self.spool.close()
        if left:
            log.warning(
                "batches left in the spool for the next run",
                batches=left,
                bytes=self.spool.bytes if self.spool else 0,
            )

    def _base_url(self, url: str, insecure: bool) -> str:
        """The service's address, checked (a NATS sink checks its own: collector/natsstream)."""
        return check_url(url, insecure)

    def _open_transport(self, session: aiohttp.ClientSession) -> _Transport:
        """What sends the batches: HTTP or WebSocket here, NATS in collector/natsstream."""
        if self.transport == "websocket":
            return _WebSocket(session, self.base_url + "/v1/stream")
        return _Http(session, self.url)

    # -- state -------------------------------------------------------------------------------

    @property
    def spool_bytes(self) -> int:
        return self.spool.bytes if self.spool is not None else 0

    @property
    def spool_batches(self) -> int:
        return len(self.spool) if self.spool is not None else 0

    @property
    def held_batches(self) -> int:
        return len(self._memory) + self.spool_batches

    def _take_seq(self) -> int:
        if self.spool is not None:
            return self.spool.take_seq()
        seq, self._seq = self._seq, self._seq + 1
        return seq

    def _seal(self) -> None:
        if not self._pending and not self._unreported:
            return
        events: list[AnyEvent] = []
        carried = self._unreported
        if carried:
            host = getattr(self._pending[0], "host", "") if self._pending else ""
            events.append(
                LostEvent(
                    time_ns=time.time_ns(),
                    host=host or socket.gethostname(),
                    kernel={},
                    user=0,
                    errors={},
                    spool=carried,
                    collector=self.collector_id,
                )
            )
            self._unreported = 0
        events.extend(self._pending)
        self._pending = []
        seq = self._take_seq()
        body = encode_batch(self.collector_id, seq, events)
        self._store(_Batch(seq, len(events), carried, body))
        self._wake.set()

    def _store(self, batch: _Batch) -> None:
        size = len(batch.body)
        if self.spool is None:
            self._memory.append(batch)
            self._memory_size += size
            while self._memory_size > self.memory_bytes and len(self._memory) > 1:
                # the oldest batch not on its way goes (the one being sent may yet be acked)
                index = 1 if self._memory[0] is self._inflight else 0
                old = self._memory[index]
                del self._memory[index]
                self._memory_size -= len(old.body)
                self._discard(old.events, old.carried, "memory_full")
        elif not len(self.spool) and self._memory_size + size <= self.memory_bytes:
            self._memory.append(batch)
            self._memory_size += size
        else:
            self._spool_put(batch)

    def _spool_put(self, batch: _Batch) -> None:
        spool = self.spool
        if spool is None:
            raise RuntimeError("no spool")
        try:
            inflight = self._inflight.seq if self._inflight is not None else None
            dropped = spool.put(batch.seq, batch.events, batch.carried, batch.body, keep=inflight)
        except OSError as exc:
            self._discard(batch.events, batch.carried, "spool_error")
            self._warn(
                "spool write failed; batch discarded (free space in the spool "
                "directory, or give --spool-max less than it has)",
                error=str(exc),
                spool=str(spool.directory),
            )
            return
        self.stats.spooled_events += batch.events - (1 if batch.carried else 0)
        for old in dropped:
            self._discard(old.events, old.carried, "spool_full")
        if dropped:
            self._warn(
                "spool full; oldest batches discarded (a larger --spool-max keeps more)",
                batches=len(dropped),
                spool_bytes=spool.bytes,
            )

    @property
    def held_events(self) -> int:
        """Events sealed into batches the service has not acknowledged yet."""
        memory = sum(b.events - (1 if b.carried else 0) for b in self._memory)
        return memory + (self.spool.events if self.spool is not None else 0)

    def _outage_begins(self, reason: str) -> None:
        """Say once, when the service stops taking batches, why and where events wait."""
        if self._outage is not None:
            return
        self.stats.outages += 1
        self._outage = _Outage(time.monotonic(), self.stats.discarded, self.stats.spooled_events)
        if self.spool is not None:
            holding = f"holding events, spooling to {self.spool.directory}"
        else:
            holding = (
                f"holding events in memory ({self.memory_bytes / 2**20:g} MiB at most, then the "
                "oldest are discarded: no spool)"
            )
        # a warning in the log, or the user's line on stderr and the log's at info level
        # (with no second copy on the same stderr)
        say = log.info if self.notify is not None else log.warning
        what = "service refuses batches" if reason.startswith("refuses") else "service unreachable"
        say(what, url=self.base_url, reason=reason, holding=holding)
        if self.notify is not None:
            self.notify(f"service {self.base_url} {reason}; {holding}")

    def _outage_ends(self) -> None:
        """Say, once the service takes a batch again, what the outage cost."""
        outage, self._outage = self._outage, None
        if outage is None:
            return
        seconds = time.monotonic() - outage.since
        spooled = self.stats.spooled_events - outage.spooled
        discarded = self.stats.discarded - outage.discarded
        held = self.held_events
        say = log.info if self.notify is not None else log.warning
        say(
            "service reachable again",
            url=self.base_url,
            after_seconds=round(seconds, 1),
            held_events=held,
            spooled_events=spooled,
            discarded_events=discarded,
        )
        if self.notify is not None:
            self.notify(
                f"service {self.base_url} reachable again after {seconds:.1f} s; sending "
                f"{held} held events ({spooled} were spooled); {discarded} events discarded "
                "meanwhile"
            )

    def _discard(self, events: int, carried: int, cause: str) -> None:
        lost = events - (1 if carried else 0)  # the batch's own LostEvent is not an event
        self.stats.discarded += lost
        self.stats.discarded_by[cause] += lost
        if not self._pending and not self._unreported:
            self._pending_since = time.monotonic()
        self._unreported += lost + carried  # reported again in the next batch

    def _warn(self, message: str, **kw: object) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 5.0:
            self._last_warning = now
            log.warning(message, discarded=self.stats.discarded, **kw)

    def _until_sealed(self) -> float:
        """Seconds the sender may sleep: until the batch being filled is `linger` old (its
        first event waits no longer than that), or a whole linger when none is."""
        if self._pending or self._unreported:
            return max(0.0, self._pending_since + self.linger - time.monotonic())
        return self.linger

    def _next(self) -> tuple[_Batch, bool] | None:
        """The oldest held batch, and whether it is from the spool."""
        if self._memory:
            return self._memory[0], False
        if self.spool is None:
            return None
        while True:
            try:
                head = self.spool.head()
            except SpoolCorrupt as exc:
                self._discard(exc.item.events, exc.item.carried, "spool_error")
                log.warning(str(exc))
                continue
            if head is None:
                return None
            item, body = head
            return _Batch(item.seq, item.events, item.carried, body), True

    def _done(self, batch: _Batch, spooled: bool) -> None:
        if spooled and self.spool is not None:
            self.spool.pop(batch.seq)
        else:
            self._memory.popleft()
            self._memory_size -= len(batch.body)

    # -- sender -----------------------------------------------------------------------------

    async def _run(self) -> None:
        headers = {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        ssl_ctx: ssl.SSLContext | bool = True
        if self.base_url.startswith("https:"):
            ssl_ctx = ssl.create_default_context(cafile=self.ca_file)
        backoff = Backoff(0.25, self.max_backoff)
        connector = aiohttp.TCPConnector(ssl=ssl_ctx)
        async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
            transport = self._open_transport(session)
            try:
                while True:
                    # a count of discards alone waits until nothing else is held: it must
                    # not push events out of a full memory
                    if (self._pending or (self._unreported and not self.held_batches)) and (
                        self._closing or time.monotonic() - self._pending_since >= self.linger
                    ):
                        self._seal()
                    nxt = self._next()
                    if nxt is None:
                        if self._closing and not self._pending and not self._unreported:
                            return
                        self._wake.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), self._until_sealed())
                        continue
                    batch, spooled = nxt
                    self._inflight = batch
                    result = await self._send(transport, batch, spooled)
                    self._inflight = None
                    if result == "ok":
                        self._done(batch, spooled)
                        backoff.reset()
                        continue
                    if result == "rejected":
                        self._done(batch, spooled)
                        self._discard(batch.events, batch.carried, "rejected")
                        continue
                    self.stats.retries += 1  # at close, aclose's deadline ends the retries
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):  # a close cuts the wait short
                        await asyncio.wait_for(self._wake.wait(), backoff.next())
            finally:
                await transport.close()

    async def _send(self, transport: _Transport, batch: _Batch, spooled: bool) -> str:
        """Send one batch: "ok", "rejected" (never acceptable: discard) or "retry"."""
        # what this collector still holds once this batch is taken
        behind_bytes = self.spool_bytes - (len(batch.body) if spooled else 0)
        try:
            status, text = await transport.send(batch.body, behind_bytes, self.held_batches - 1)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLError):
                self._warn(
                    "the service's TLS certificate is not trusted: give its CA with "
                    "--server-ca-file",
                    url=self.base_url,
                    error=str(exc),
                )
            else:
                log.debug("service unreachable", url=self.base_url, error=str(exc))
            self._outage_begins(f"unreachable ({_reason(exc)})")
            await transport.reset()
            return "retry"
        if status == 200:
            self._outage_ends()  # before counting this batch: it was held too
            self.stats.sent_batches += 1
            self.stats.sent_events += batch.events
            self._take_orders(text)
            return "ok"
        text = text[:300]
        if status in PERMANENT:
            self._outage_ends()  # it answers: reachable, even if it cannot take this one
            log.error(
                "service refused a batch for good; discarded",
                status=status,
                why=PERMANENT[status],
                seq=batch.seq,
                events=batch.events,
                answer=text,
            )
            return "rejected"
        if status in self.fixable:
            self._warn(self.fixable[status], status=status, answer=text)
            self._outage_begins(f"refuses batches ({status}: {self.fixable[status]})")
        else:
            log.info("service did not take a batch; retrying", status=status, answer=text)
            self._outage_begins(f"does not take batches (HTTP {status})")
        return "retry"

    def _take_orders(self, answer: str) -> None:
        """The response orders an acknowledgement carries (api/orders.py), to on_order; one
        this build cannot read is logged and left."""
        if self.on_order is None or '"orders"' not in answer:
            return
        try:
            orders = json.loads(answer).get("orders", [])
        except (ValueError, AttributeError):
            return
        for raw in orders if isinstance(orders, list) else []:
            try:
                order = order_from_json(raw)
            except OrderError as exc:
                log.warning("service order not taken", error=str(exc))
                continue
            self.on_order(order)


def _reason(exc: BaseException) -> str:
    """What went wrong, in a few words: the OS's reason when there is one."""
    cause = getattr(exc, "os_error", None) or exc
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno)  # "Connection refused", not asyncio's wording
    if isinstance(cause, TimeoutError):
        return "timed out"
    return getattr(cause, "strerror", None) or str(cause) or type(cause).__name__


SEND_TIMEOUT = 10.0


class _Transport:
    """Sends one batch and returns the service's HTTP-style status and answer text."""

    async def send(self, body: bytes, spool_bytes: int, held: int) -> tuple[int, str]:
        raise NotImplementedError

    async def reset(self) -> None:
        """Forget the connection after an error; the next send opens a new one."""

    async def close(self) -> None:
        await self.reset()


class _Http(_Transport):
    """POST /v1/batches, one request per batch (on a kept-alive connection)."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def send(self, body: bytes, spool_bytes: int, held: int) -> tuple[int, str]:
        headers = {
            "Content-Type": CONTENT_TYPE,
            "Sandtrace-Spool-Bytes": str(spool_bytes),
            "Sandtrace-Held-Batches": str(held),
        }
        timeout = aiohttp.ClientTimeout(total=SEND_TIMEOUT)
        async with self.session.post(self.url, data=body, headers=headers, timeout=timeout) as resp:
            return resp.status, await resp.text()  # an ack may carry orders


class _WebSocket(_Transport):
    """GET /v1/stream upgraded to a WebSocket: a batch is a binary frame, its answer a text
    frame; the counters travel in a text frame before it."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def send(self, body: bytes, spool_bytes: int, held: int) -> tuple[int, str]:
        if self.ws is None or self.ws.closed:
            try:
                self.ws = await self.session.ws_connect(
                    self.url,
                    timeout=aiohttp.ClientWSTimeout(ws_close=SEND_TIMEOUT),
                    max_msg_size=1 << 20,
                    heartbeat=30.0,
                )
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status, exc.message
        ws = self.ws
        await ws.send_str(json.dumps({"spool_bytes": spool_bytes, "held_batches": held}))
        await ws.send_bytes(body)
        msg = await ws.receive(timeout=SEND_TIMEOUT)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise aiohttp.ClientError(f"service closed the stream ({msg.type.name}, {msg.extra})")
        answer = json.loads(msg.data)
        if "ack" in answer:
            return 200, msg.data  # it may carry orders
        return int(answer.get("status", 400)), str(answer.get("message", answer))

    async def reset(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
            self.ws = None
