"""Streaming batches to a fleet on NATS JetStream (`--server nats://HOST:PORT[,...]`).

The same sealed, versioned batches as collector/stream.py, with the same memory bound, disk
spool, backoff and loss accounting (NatsStreamSink is a StreamSink with another
transport): each batch is published to `sandtrace.events.<host>` (fleet/names.py) and is
forgotten once JetStream has stored it (its publish acknowledgement). The message id is
`<collector id>:<seq>`: a batch sent again after an acknowledgement was lost is stored once
(the stream's duplicate window replaces the service's replay check). While no server of the
cluster can be reached, batches wait in memory and then in the spool, as for the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any, ClassVar

import aiohttp
import structlog

from api.events import Alert, AnyEvent
from collector.stream import FIXABLE, SEND_TIMEOUT, StreamSink, _Batch, _Transport
from fleet import names
from fleet.connect import NatsConfigError, NatsRefused, NatsTarget, connect, refused, target

log = structlog.get_logger("sandtrace.stream")

NO_STREAM = (
    "no JetStream stream takes sandtrace.events.*: start a fleet worker "
    "(sandtrace serve --nats ...), which makes the streams"
)


class NatsStreamSink(StreamSink):
    """A StreamSink whose batches go to JetStream; `url` is nats://HOST:PORT[,HOST:PORT...]."""

    fixable: ClassVar[dict[int, str]] = {
        **FIXABLE,
        401: "the NATS cluster refused this collector's credentials: check "
        "--server-nkey-file, --server-creds-file or --server-token-file",
    }

    def __init__(
        self,
        url: str,
        token_file: str | None = None,
        *,
        nkey_file: str | None = None,
        creds_file: str | None = None,
        ca_file: str | None = None,
        insecure: bool = False,
        host: str | None = None,
        **kw: Any,
    ) -> None:
        self.target: NatsTarget = target(
            url,
            token_file=token_file,
            nkey_file=nkey_file,
            creds_file=creds_file,
            ca_file=ca_file,
            insecure=insecure,
        )
        self.host = host or socket.gethostname()
        self._host_fixed = host is not None
        super().__init__(url, None, insecure=insecure, **kw)

    def _base_url(self, url: str, insecure: bool) -> str:
        return self.target.label

    def _open_transport(self, session: aiohttp.ClientSession) -> _Transport:
        return _NatsTransport(self)

    def emit(self, event: AnyEvent | Alert) -> None:
        if not self._host_fixed and not isinstance(event, Alert) and event.host:
            self.host, self._host_fixed = event.host, True  # the subject is the events' host
        super().emit(event)

    async def _send(self, transport: _Transport, batch: _Batch, spooled: bool) -> str:
        if isinstance(transport, _NatsTransport):
            transport.seq = batch.seq
        return await super()._send(transport, batch, spooled)


class _NatsTransport(_Transport):
    """Publishes one batch to JetStream and waits for it to be stored."""

    def __init__(self, sink: NatsStreamSink) -> None:
        self.sink = sink
        self.seq = 0
        self.nc: Any = None
        self.js: Any = None
        self.last_error: BaseException | None = None

    async def _error(self, exc: Exception) -> None:
        # A refusal stays the reason: the server closes the connection after its
        # "Authorization Violation", and the broken pipe that follows must not hide it.
        if self.last_error is None or not _refusal(self.last_error):
            self.last_error = exc
        log.debug("nats", error=repr(exc))

    async def _connect(self) -> None:
        """Connect, trying each server a few times (a refusal must not spin: the sender's
        backoff paces the next try); _Refused when the cluster refused the credentials."""
        self.last_error = None
        await self.close()
        try:
            self.nc = await asyncio.wait_for(
                connect(
                    self.sink.target,
                    f"sandtrace-collector {self.sink.collector_id}",
                    attempts=2,
                    error_cb=self._error,
                ),
                SEND_TIMEOUT,
            )
        except Exception as exc:
            why = self.last_error or exc
            if _refusal(why):
                raise _Refused(401, f"the NATS cluster refused this collector: {why}") from None
            raise ConnectionError(
                f"no NATS server at {self.sink.target.label} answers ({why!r})"
            ) from None
        self.js = self.nc.jetstream(timeout=SEND_TIMEOUT)

    async def send(self, body: bytes, spool_bytes: int, held: int) -> tuple[int, str]:
        import nats.errors  # noqa: PLC0415
        import nats.js.errors  # noqa: PLC0415

        try:
            if self.nc is None or self.nc.is_closed:
                await self._connect()
            if len(body) > self.nc.max_payload:
                return 413, f"batch of {len(body)} bytes over the cluster's max_payload"
            headers = {
                names.MSG_ID_HEADER: names.batch_msg_id(self.sink.collector_id, self.seq),
                names.SPOOL_BYTES_HEADER: str(spool_bytes),
                names.HELD_BATCHES_HEADER: str(held),
            }
            await self.js.publish(
                names.events_subject(self.sink.host), body, timeout=SEND_TIMEOUT, headers=headers
            )
        except _Refused as exc:
            return exc.status, str(exc)
        except nats.js.errors.NoStreamResponseError:
            self.sink._warn(NO_STREAM, server=self.sink.target.label)
            return 503, NO_STREAM
        except nats.js.errors.APIError as exc:  # e.g. 503 while a stream elects its leader
            return int(exc.code or 503), str(exc.description or exc)
        except nats.errors.MaxPayloadError as exc:
            return 413, str(exc)
        except nats.errors.Error as exc:  # timeouts, a connection that went away: retried
            raise ConnectionError(f"NATS: {exc!r}") from None
        return 200, ""

    async def reset(self) -> None:
        return None  # the client reconnects by itself, to any server of the cluster

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)
            self.nc = None


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


__all__ = ["NatsConfigError", "NatsStreamSink"]


def _refusal(exc: BaseException) -> bool:
    """Whether a connection error is the cluster refusing the credentials."""
    return isinstance(exc, NatsRefused) or refused(exc)
