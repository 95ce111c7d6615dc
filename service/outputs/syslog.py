"""Syslog output: RFC 5424 messages over TCP or TLS, framed by octet counting (RFC 6587).

Each message carries the item in the output's schema as MSG, and a few fields a syslog
server can filter on without parsing it as structured data (SD-ID sandtrace@32473). Bytes a
traced process controls (comm, exe) are escaped text there as in MSG (api.events.bytes_text:
a backslash doubled, an invalid byte ``\\xNN``), then escaped as RFC 5424 asks for
SD-PARAM values (a backslash before each backslash, ``"`` and ``]``): undo that, then the
escaped text, for the exact bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any

import structlog

from api.events import EVENT_TYPES, Alert, Event, LostEvent
from service.outputs.base import Output, OutputSection, Pending, RetryableError, dumps
from service.schemas.common import Doc, Item, rfc3339, text

log = structlog.get_logger("sandtrace.outputs")

# RFC 5424 §6.2.1 facility codes (a table: one line per few codes reads better than 24 lines)
SYSLOG_FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "audit": 13,
    "alert": 14, "clock": 15, "local0": 16, "local1": 17, "local2": 18, "local3": 19,
    "local4": 20, "local5": 21, "local6": 22, "local7": 23,
}  # fmt: skip
# RFC 5424 severities: 2 critical, 3 error, 4 warning, 5 notice, 6 informational.
SYSLOG_SEVERITY = {"critical": 2, "high": 3, "medium": 4, "low": 5, "informational": 6}
# No IANA enterprise number of its own: 32473 is the one RFC 5612 reserves for examples.
SD_ID = "sandtrace@32473"


def sd_escape(value: str) -> str:
    """An SD-PARAM value escaped as RFC 5424 §6.3.3 asks: ``"``, ``\\`` and ``]``."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_field(value: str, limit: int) -> str:
    """A HOSTNAME/APP-NAME/PROCID/MSGID: printable US-ASCII without spaces, or "-"."""
    cleaned = "".join(ch if 33 <= ord(ch) <= 126 else "_" for ch in value)[:limit]
    return cleaned or "-"


# What the header and structured data say of an item: (severity, PROCID, SD-PARAMs).
_Fields = tuple[int, int | None, dict[str, str]]


def _alert(item: Alert) -> _Fields:
    return (
        SYSLOG_SEVERITY.get(item.level, 4),
        item.process.pid,
        {
            "kind": item.kind,
            "alert_id": item.alert_id,
            "rule_id": item.rule_id,
            "level": item.level,
            "sandbox": item.sandbox,
            "pid": str(item.process.pid),
            "exe": text(item.process.exe),
        },
    )


def _lost(item: LostEvent) -> _Fields:
    return (
        4,
        None,
        {
            "kind": item.kind,
            "kernel": str(sum(item.kernel.values())),
            "user": str(item.user),
            "spool": str(item.spool),
        },
    )


def _event(item: Event) -> _Fields:
    return (
        6,
        item.process.pid,
        {
            "kind": item.kind,
            "sandbox": item.sandbox,
            "pid": str(item.process.pid),
            "comm": text(item.process.comm),
            "exe": text(item.process.exe),
        },
    )


# The fields of each type of item. (The functions take the type they are filed under: Any
# stands for "that type" here.)
FIELDS: dict[type, Callable[[Any], _Fields]] = {
    Alert: _alert,
    LostEvent: _lost,
    **{cls: _event for cls in EVENT_TYPES.values() if issubclass(cls, Event)},
}


def syslog_message(item: Item, doc: Doc, *, facility: int, app_name: str) -> bytes:
    """One RFC 5424 message (without framing) carrying doc, the item in its schema, as MSG."""
    severity, pid, params = FIELDS[type(item)](item)
    header = " ".join(
        (
            f"<{facility * 8 + severity}>1",
            rfc3339(item.time_ns, digits=6),
            _header_field(item.host, 255),
            _header_field(app_name, 48),
            str(pid) if pid is not None else "-",
            _header_field(item.kind, 32),
        )
    )
    sd = " ".join(f'{k}="{sd_escape(v)}"' for k, v in params.items())
    return f"{header} [{SD_ID} {sd}] {dumps(doc)}".encode()


class SyslogOutput(Output):
    """RFC 5424 over TCP or TLS, framed by octet counting (RFC 6587 §3.4.1)."""

    output_type = "syslog"
    default_batch = 100

    def __init__(self, section: OutputSection, index: int) -> None:
        super().__init__(section, index)
        host, _, port = section["address"].rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.app_name: str = section.get("app_name", "sandtrace")
        facility = section.get("facility", "user")
        self.facility: int = SYSLOG_FACILITIES[facility] if isinstance(facility, str) else facility
        self.connect_timeout = float(section.get("connect_timeout", 10.0))
        self.ssl: ssl.SSLContext | None = None
        if section.get("tls", False):
            self.ssl = ssl.create_default_context(cafile=section.get("ca_file"))
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def _payload(self, item: Item, doc: Doc) -> bytes:
        msg = syslog_message(item, doc, facility=self.facility, app_name=self.app_name)
        return f"{len(msg)} ".encode() + msg

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except ssl.SSLCertVerificationError as exc:
            raise RetryableError("tls_verify", exc.verify_message or str(exc)) from exc
        except ssl.SSLError as exc:
            raise RetryableError("tls", str(exc)) from exc
        except (OSError, TimeoutError) as exc:
            raise RetryableError("connect", str(exc) or type(exc).__name__) from exc
        log.info(
            "syslog output connected",
            output=self.name,
            host=self.host,
            port=self.port,
            tls=self.ssl is not None,
        )
        return reader, writer

    async def _deliver(self, pending: list[Pending]) -> list[Pending]:
        # A syslog server never writes back: EOF on the reader means it closed the connection,
        # and whatever is written into a closed connection would be lost without an error.
        if self._reader is not None and self._reader.at_eof():
            await self._close()
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await self._connect()
        self._writer.write(b"".join(p.payload for p in pending))
        async with asyncio.timeout(self.connect_timeout):
            await self._writer.drain()
        self.stats.sent += len(pending)
        return []

    async def _reset(self) -> None:
        await self._close()

    async def _close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
