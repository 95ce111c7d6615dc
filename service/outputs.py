"""SIEM outputs of the detection service: JSON lines files, syslog, Splunk HEC, Elasticsearch.

    outputs = outputs_from_config(config["output"])  # the [[output]] tables, as dicts
    for o in outputs: await o.start()
    ...
    for o in outputs: o.submit(item)   # every event and alert; each output picks its own
    ...
    for o in outputs: await o.aclose(deadline=5.0)

Each output owns a bounded queue and one sender task. submit() never blocks and never waits
for the network or the disk: it enqueues, or, when the queue is full, counts the item as
dropped with cause "queue_full". The sender takes up to `batch` items at a time, renders
them in the output's schema (service/schemas/) and delivers them, retrying transient
failures (connection errors, disk full, HTTP 429/5xx) with exponential backoff for as long
as it takes: a slow or dead output only fills its own queue. What a receiver rejects for
good (HTTP 4xx other than 429, per item for Elasticsearch) is dropped with cause
"rejected" and logged with the reason. aclose() delivers what is queued within its deadline
and counts the rest as dropped with cause "shutdown". Nothing is lost without a count in
OutputStats, exported by prometheus_lines().

submit() must be called on the event loop's thread (the aiohttp handlers are). Each output
has its own aiohttp session (HTTP outputs differ in TLS settings), made in start().

Delivery is at least once: an item whose delivery failed midway is sent again whole (a
syslog connection that broke after a write, an HTTP request that timed out). A JSON-lines
file is exactly once with the service's help: mark() notes where each batch's items end,
the service saves that point with its replay state, and take_back() cuts the file back to
it at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import ssl
import sys
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import structlog

from api.events import Alert, Event, LostEvent
from service.schemas import SCHEMAS
from service.schemas.common import Item, Schema, rfc3339, text

log = structlog.get_logger("sandtrace.outputs")

WHAT = ("events", "alerts", "both")
DROP_CAUSES = ("queue_full", "rejected", "shutdown", "format_error")
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
_RESPONSE_TEXT_LIMIT = 500


_KeyType = type | tuple[type, ...]
Point = tuple[int, int, int]  # a file's device, inode, and a size within it


class OutputConfigError(ValueError):
    """An [[output]] table that cannot work; the message names the output and the key."""


class RetryableError(Exception):
    """A delivery that failed for now (connection lost, 5xx, disk full): try again later,
    with `rest` when only those items are left to send (the others got through)."""

    def __init__(self, cause: str, detail: str, rest: list[Any] | None = None) -> None:
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
class _Pending:
    item: Item
    payload: Any  # what the output sends for it, rendered once


def _item_host(item: Item) -> str:
    return item.host


def _item_pid(item: Item) -> int | None:
    if isinstance(item, Alert | Event):
        return item.process.pid
    return None


class Output:
    """One configured output: a bounded queue and a sender task (see module docstring)."""

    output_type: ClassVar[str] = ""
    keys: ClassVar[dict[str, _KeyType]] = {}  # type-specific config keys

    def __init__(self, section: dict[str, Any], index: int) -> None:
        self.name: str = section.get("name", f"{self.output_type}{index}")
        self.what: str = section.get("what", "both")
        self.schema_name: str = section.get("schema", "native")
        self.schema: Schema = SCHEMAS[self.schema_name]
        self.queue_size: int = section.get("queue", 10000)
        self.batch: int = section.get("batch", 1)
        self.backoff: float = float(section.get("backoff", 0.5))
        self.backoff_max: float = float(section.get("backoff_max", 30.0))
        self.stats = OutputStats()
        self._queue: asyncio.Queue[Item] = asyncio.Queue(maxsize=self.queue_size)
        self._inflight: list[_Pending] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # no more submits
        self._stopping = False  # the sender must end
        self._idle = asyncio.Event()
        self._idle.set()
        self.on_progress: Callable[[], None] = lambda: None
        # Batch marks (see mark()): items are numbered as they enter the queue
        self._accepted = 0  # items enqueued so far
        self._finished = 0  # of those, items written or dropped
        # [first ticket, last ticket, items before their end]: batches that brought this
        # output nothing share their predecessor's end, so a stuck output holds one entry
        self._marks: deque[list[int]] = deque()
        self.resolved = 0  # the last ticket whose items are all finished
        # (first ticket, last ticket, where their items end), oldest first
        self._points: deque[tuple[int, int, Point | None]] = deque()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} what={self.what} schema={self.schema_name}>"

    # --- the ingestion side ----------------------------------------------------------------

    def wants(self, item: Item) -> bool:
        """Whether this output takes item: alerts, events (LostEvent included) or both."""
        if self.what == "both":
            return True
        return (self.what == "alerts") == isinstance(item, Alert)

    def submit(self, item: Item) -> None:
        """Enqueue item if this output wants it; never blocks. A full queue (or a closed
        output) counts it as dropped."""
        if not self.wants(item):
            return
        if self._closing:
            self.stats.dropped["shutdown"] += 1
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.stats.dropped["queue_full"] += 1
            return
        self._accepted += 1
        self._idle.clear()
        self.stats.queued = self.depth()

    def mark(self, ticket: int) -> None:
        """Note that everything of batch `ticket` has been submitted. Once the output has
        finished those items (and all before them), `resolved` reaches ticket and, for a
        file, point_at(ticket) says where in which file they end. The sender never writes
        past a mark in one go, so that the point is exact."""
        marks = self._marks
        if marks and marks[-1][2] == self._accepted:
            marks[-1][1] = ticket
        else:
            marks.append([ticket, ticket, self._accepted])
        self._resolve_marks()

    def _resolve_marks(self) -> None:
        marks = self._marks
        while marks and marks[0][2] <= self._finished:
            first, last, _ = marks.popleft()
            self.resolved = last
            self._points.append((first, last, self.point()))

    def point_at(self, ticket: int) -> Point | None:
        """Where the items of batch `ticket` (and all before) end; None if not finished (or
        forgotten, or an output that cannot say)."""
        for first, last, point in reversed(self._points):
            if first <= ticket <= last:
                return point
            if last < ticket:
                break
        return None

    def point(self) -> Point | None:
        """Where this output's finished items end now, if it can take back what lies beyond
        (a file: its device, inode and size); None for stdout and the network."""
        return None

    @property
    def state_key(self) -> str | None:
        """How the replay state names this output's file (None: no file to take back)."""
        return None

    def forget_points(self, below: int) -> None:
        points = self._points
        while points and points[0][1] < below:
            points.popleft()

    def depth(self) -> int:
        """Items waiting in the queue or being delivered now."""
        return self._queue.qsize() + len(self._inflight)

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
        while not self._stopping:
            if self._queue.empty() and not self._inflight:
                self._idle.set()
            item = await self._queue.get()
            batch = [item]
            limit = self.batch  # never past the next batch mark: see mark()
            if self._marks:
                limit = min(limit, self._marks[0][2] - self._finished)
            while len(batch) < limit and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._inflight = self._render(batch)
            await self._deliver_inflight()
            if self._inflight:  # stopping with items undelivered
                return
            self._finished += len(batch)
            self._resolve_marks()
            self.stats.queued = self.depth()
            self.on_progress()  # sent or dropped moved: whoever waits on them looks again

    def _render(self, items: list[Item]) -> list[_Pending]:
        pending = []
        for item in items:
            try:
                pending.append(_Pending(item, self._payload(item, self.schema(item))))
            except Exception as exc:  # a bug in a schema must not stop the output
                self.stats.dropped["format_error"] += 1
                log.exception(
                    "output cannot render item",
                    output=self.name,
                    kind=getattr(item, "kind", "?"),
                    error=repr(exc),
                )
        return pending

    async def _deliver_inflight(self) -> None:
        delay = self.backoff
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
            log.warning(
                "output delivery failed, will retry",
                output=self.name,
                cause=cause,
                detail=detail,
                items=len(self._inflight),
                retry_in=delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
            if self._stopping:
                return

    def _reject(self, pending: list[_Pending], reason: str) -> None:
        self.stats.dropped["rejected"] += len(pending)
        log.error(
            "output receiver rejected items",
            output=self.name,
            items=len(pending),
            reason=reason[:_RESPONSE_TEXT_LIMIT],
        )

    # --- what a kind of output provides ----------------------------------------------------

    def _payload(self, item: Item, doc: dict[str, Any]) -> Any:
        """What is sent for one item, given its schema document."""
        raise NotImplementedError

    async def _deliver(self, pending: list[_Pending]) -> list[_Pending]:
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


def _dumps(doc: Any) -> str:
    return json.dumps(doc, ensure_ascii=True, separators=(",", ":"))


# --- JSON lines ----------------------------------------------------------------------------


class JsonlOutput(Output):
    """One JSON object per line, to a file (rotated by size) or to stdout (path "-").

    A file moved or removed by someone else (logrotate) is noticed at the next write, and the
    path is opened anew. Every write is of whole lines: a write that fails midway (disk full)
    is cut back to where it started, so a reader never sees a partial line, and is tried
    again later."""

    output_type = "jsonl"
    keys: ClassVar[dict[str, _KeyType]] = {
        "path": str, "max_bytes": int, "backups": int,
    }  # fmt: skip

    def __init__(self, section: dict[str, Any], index: int) -> None:
        section = {"batch": 100, **section}
        super().__init__(section, index)
        self.path: str = section["path"]
        self.max_bytes: int = section.get("max_bytes", 0)  # 0: never rotate
        self.backups: int = section.get("backups", 5)
        self._fd: int | None = None
        self._ident = (0, 0)  # the open file's device and inode
        self._size = 0

    def point(self) -> Point | None:
        if self.path == "-" or self._fd is None:
            return None
        return (*self._ident, self._size)

    @property
    def state_key(self) -> str | None:
        return None if self.path == "-" else str(Path(self.path).resolve())

    def take_back(self, point: Point) -> str | None:
        """Before the output opens: cut its file back to `point` (device, inode, size),
        where the items of the last acknowledged batch ended. Lines beyond it came from
        batches the service never acknowledged, which their collectors send again; keeping
        them would write those events and alerts twice. The file may have been rotated since
        (the point is then in a backup, and the newer files hold only lines to take back).
        Returns what was done, for the log; None when nothing was."""
        if self.path == "-":
            return None
        base = Path(self.path)
        files = [base, *(base.with_name(f"{base.name}.{i}") for i in range(1, self.backups + 1))]
        dev, ino, size = point
        for k, path in enumerate(files):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) != (dev, ino):
                continue
            if st.st_size < size:
                return f"{path} is shorter than when last acknowledged; left as it is"
            cut = st.st_size - size
            with path.open("r+b") as f:
                f.truncate(size)
            newer = sum(p.exists() for p in files[:k])
            for p in files[:k]:  # written after the point: nothing in them was acknowledged
                p.unlink(missing_ok=True)
            for i, p in enumerate(files[k:]):  # the point's file is the current one again
                if p.exists():
                    p.replace(files[i])
            if not cut and not newer:
                return None
            return (
                f"took back {cut} bytes"
                + (f" and {newer} newer files" if newer else "")
                + " written for batches never acknowledged; their collectors send them again"
            )
        return (
            f"the file of the last acknowledged batch is gone from {base} and its "
            f"backups; lines of unacknowledged batches may appear twice"
        )

    def _payload(self, item: Item, doc: dict[str, Any]) -> bytes:
        return (_dumps(doc) + "\n").encode("ascii")

    async def _open(self) -> None:
        if self.path != "-":
            await asyncio.to_thread(self._open_file)

    def _open_file(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        st = os.fstat(self._fd)
        self._ident, self._size = (st.st_dev, st.st_ino), st.st_size

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        base = Path(self.path)
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                older = base.with_name(f"{base.name}.{i}")
                if older.exists():
                    older.replace(base.with_name(f"{base.name}.{i + 1}"))
            base.replace(base.with_name(f"{base.name}.1"))
        else:
            base.unlink(missing_ok=True)
        self._open_file()

    def _moved(self) -> bool:
        """Whether the path no longer names the file this output has open."""
        if self._fd is None:
            return False
        try:
            st = Path(self.path).stat()
        except FileNotFoundError:
            return True
        mine = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)

    def _fd_or_raise(self) -> int:
        if self._fd is None:
            raise OSError(errno.EBADF, f"{self.path} is not open")
        return self._fd

    def _write_all(self, fd: int, data: bytes, truncate_to: int | None) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError:
            if truncate_to is not None:  # take back the part of the lines that got written
                os.ftruncate(fd, truncate_to)
            raise

    def _write(self, lines: list[bytes]) -> int:
        """Write lines, rotating as needed; the count written before an OSError is kept in
        the exception's args (the caller needs it to know what to send again)."""
        if self.path == "-":
            self._write_all(sys.stdout.fileno(), b"".join(lines), None)
            return len(lines)
        written = 0
        try:
            if self._fd is not None and self._moved():
                os.close(self._fd)  # logrotate (or a person) moved or removed the file
                self._fd = None
            if self._fd is None:
                self._open_file()
            while written < len(lines):
                chunk: list[bytes] = []
                size = self._size
                for line in lines[written:]:
                    if self.max_bytes and size + len(line) > self.max_bytes and (size or chunk):
                        break
                    chunk.append(line)
                    size += len(line)
                if not chunk:  # the file is full: start a new one
                    self._rotate()
                    continue
                self._write_all(self._fd_or_raise(), b"".join(chunk), self._size)
                self._size = size
                written += len(chunk)
        except OSError as exc:
            raise _PartialWrite(written, exc) from exc
        return written

    async def _deliver(self, pending: list[_Pending]) -> list[_Pending]:
        try:
            n = await asyncio.to_thread(self._write, [p.payload for p in pending])
        except _PartialWrite as exc:
            self.stats.sent += exc.written
            cause = errno.errorcode.get(exc.error.errno or 0, "OSError")
            raise RetryableError(cause, str(exc.error), rest=pending[exc.written :]) from exc
        self.stats.sent += n
        return []

    async def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _PartialWrite(Exception):
    def __init__(self, written: int, error: OSError) -> None:
        super().__init__(written, error)
        self.written = written
        self.error = error


# --- syslog --------------------------------------------------------------------------------


def sd_escape(value: str) -> str:
    """An SD-PARAM value escaped as RFC 5424 §6.3.3 asks: ``"``, ``\\`` and ``]``."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_field(value: str, limit: int) -> str:
    """A HOSTNAME/APP-NAME/PROCID/MSGID: printable US-ASCII without spaces, or "-"."""
    cleaned = "".join(ch if 33 <= ord(ch) <= 126 else "_" for ch in value)[:limit]
    return cleaned or "-"


def _sd_params(item: Item) -> dict[str, str]:
    params: dict[str, str] = {"kind": item.kind}
    if isinstance(item, Alert):
        params |= {
            "alert_id": item.alert_id,
            "rule_id": item.rule_id,
            "level": item.level,
            "sandbox": item.sandbox,
            "pid": str(item.process.pid),
            "exe": text(item.process.exe),
        }
    elif isinstance(item, LostEvent):
        params |= {
            "kernel": str(sum(item.kernel.values())),
            "user": str(item.user),
            "spool": str(item.spool),
        }
    else:
        params |= {
            "sandbox": item.sandbox,
            "pid": str(item.process.pid),
            "comm": text(item.process.comm),
            "exe": text(item.process.exe),
        }
    return params


def syslog_message(item: Item, doc: dict[str, Any], *, facility: int, app_name: str) -> bytes:
    """One RFC 5424 message (without framing) carrying doc, the item in its schema, as MSG."""
    if isinstance(item, Alert):
        severity = SYSLOG_SEVERITY.get(item.level, 4)
    elif isinstance(item, LostEvent):
        severity = 4
    else:
        severity = 6
    pid = _item_pid(item)
    header = " ".join(
        (
            f"<{facility * 8 + severity}>1",
            rfc3339(item.time_ns, digits=6),
            _header_field(_item_host(item), 255),
            _header_field(app_name, 48),
            str(pid) if pid is not None else "-",
            _header_field(item.kind, 32),
        )
    )
    params = " ".join(f'{k}="{sd_escape(v)}"' for k, v in _sd_params(item).items())
    return f"{header} [{SD_ID} {params}] {_dumps(doc)}".encode()


class SyslogOutput(Output):
    """RFC 5424 over TCP or TLS, framed by octet counting (RFC 6587 §3.4.1)."""

    output_type = "syslog"
    keys: ClassVar[dict[str, _KeyType]] = {
        "address": str, "tls": bool, "ca_file": str, "app_name": str,
        "facility": (str, int), "connect_timeout": (int, float),
    }  # fmt: skip

    def __init__(self, section: dict[str, Any], index: int) -> None:
        section = {"batch": 100, **section}
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

    def _payload(self, item: Item, doc: dict[str, Any]) -> bytes:
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

    async def _deliver(self, pending: list[_Pending]) -> list[_Pending]:
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


# --- HTTP (Splunk HEC, Elasticsearch) ------------------------------------------------------


def _read_secret(path: str, key: str, out: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise OutputConfigError(f"output {out}: {key}: cannot read {path}: {exc}") from exc


class _HttpOutput(Output):
    """Batches POSTed with one aiohttp session; retries on connection errors, 429 and 5xx."""

    content_type: ClassVar[str] = "application/json"

    def __init__(self, section: dict[str, Any], index: int) -> None:
        section = {"batch": 100, **section}
        super().__init__(section, index)
        self.url: str = section["url"]
        self.timeout = float(section.get("timeout", 10.0))
        self.headers: dict[str, str] = {"Content-Type": self.content_type}
        self.ssl: ssl.SSLContext | bool = True
        if section.get("insecure", False):
            self.ssl = False
        elif "ca_file" in section:
            self.ssl = ssl.create_default_context(cafile=section["ca_file"])
        self._session: aiohttp.ClientSession | None = None

    async def _open(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(ssl=self.ssl, limit=1),
        )

    async def _post(self, body: bytes) -> tuple[int, str]:
        if self._session is None:
            raise RuntimeError(f"output {self.name} was not started")
        async with self._session.post(self.url, data=body, headers=self.headers) as response:
            return response.status, await response.text(errors="replace")

    def _check_status(self, status: int, body: str, pending: list[_Pending]) -> bool:
        """True when the request as a whole succeeded; raises when it must be retried;
        False (items counted as rejected) when the receiver refused it for good."""
        if status == 429 or status >= 500:
            raise RetryableError(f"http_{status}", body[:_RESPONSE_TEXT_LIMIT])
        if 200 <= status < 300:
            return True
        self._reject(pending, f"HTTP {status}: {body}")
        return False

    async def _close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class SplunkHecOutput(_HttpOutput):
    """Splunk HTTP Event Collector: concatenated event objects POSTed to .../event."""

    output_type = "splunk_hec"
    keys: ClassVar[dict[str, _KeyType]] = {
        "url": str, "token_file": str, "index": str, "sourcetype": str, "ca_file": str,
        "insecure": bool, "timeout": (int, float),
    }  # fmt: skip

    def __init__(self, section: dict[str, Any], index: int) -> None:
        super().__init__(section, index)
        token = _read_secret(section["token_file"], "token_file", f"{index} ({self.name})")
        self.headers["Authorization"] = f"Splunk {token}"
        self.index: str | None = section.get("index")
        self.sourcetype: str = section.get("sourcetype", "sandtrace")

    def _payload(self, item: Item, doc: dict[str, Any]) -> bytes:
        event: dict[str, Any] = {
            "time": (item.time_ns // 1000) / 1_000_000,
            "host": _item_host(item),
            "source": "sandtrace",
            "sourcetype": self.sourcetype,
        }
        if self.index:
            event["index"] = self.index
        event["event"] = doc
        return _dumps(event).encode("ascii")

    async def _deliver(self, pending: list[_Pending]) -> list[_Pending]:
        status, body = await self._post(b"".join(p.payload for p in pending))
        if self._check_status(status, body, pending):
            self.stats.sent += len(pending)
        return []


class ElasticsearchOutput(_HttpOutput):
    """Elasticsearch _bulk: a create action per document; only items the response marks
    429 or 5xx are sent again, other failed items are dropped as rejected."""

    output_type = "elasticsearch"
    content_type = "application/x-ndjson"
    keys: ClassVar[dict[str, _KeyType]] = {
        "url": str, "index": str, "token_file": str, "api_key_file": str, "ca_file": str,
        "insecure": bool, "timeout": (int, float),
    }  # fmt: skip

    def __init__(self, section: dict[str, Any], index: int) -> None:
        super().__init__(section, index)
        if not self.url.rstrip("/").endswith("/_bulk"):
            self.url = self.url.rstrip("/") + "/_bulk"
        self.index: str = section["index"]
        out = f"{index} ({self.name})"
        for key in ("api_key_file", "token_file"):
            if key in section:
                self.headers["Authorization"] = f"ApiKey {_read_secret(section[key], key, out)}"
                break
        self._action = _dumps({"create": {"_index": self.index}}).encode("ascii") + b"\n"

    def _payload(self, item: Item, doc: dict[str, Any]) -> bytes:
        return self._action + _dumps(doc).encode("ascii") + b"\n"

    async def _deliver(self, pending: list[_Pending]) -> list[_Pending]:
        status, body = await self._post(b"".join(p.payload for p in pending))
        if not self._check_status(status, body, pending):
            return []
        items = _bulk_results(body)
        if items is None or len(items) != len(pending):  # sent again whole: at least once
            raise RetryableError("bad_response", f"unreadable _bulk response: {body[:200]}")
        retry: list[_Pending] = []
        rejected: list[tuple[_Pending, str]] = []
        for p, result in zip(pending, items, strict=True):
            outcome = next(iter(result.values())) if isinstance(result, dict) and result else {}
            item_status = outcome.get("status", 0) if isinstance(outcome, dict) else 0
            if 200 <= item_status < 300:
                self.stats.sent += 1
            elif item_status == 429 or item_status >= 500:
                retry.append(p)
            else:
                rejected.append((p, _dumps(outcome.get("error", outcome))))
        if rejected:
            self._reject([p for p, _ in rejected], f"_bulk items refused: {rejected[0][1]}")
        return retry


def _bulk_results(body: str) -> list[Any] | None:
    try:
        items = json.loads(body)["items"]
    except (ValueError, KeyError, TypeError):
        return None
    return items if isinstance(items, list) else None


# --- configuration -------------------------------------------------------------------------

OUTPUT_TYPES: dict[str, type[Output]] = {
    t.output_type: t for t in (JsonlOutput, SyslogOutput, SplunkHecOutput, ElasticsearchOutput)
}
_COMMON_KEYS: dict[str, _KeyType] = {
    "type": str, "name": str, "what": str, "schema": str, "queue": int, "batch": int,
    "backoff": (int, float), "backoff_max": (int, float),
}  # fmt: skip
_REQUIRED = {
    "jsonl": ("path",),
    "syslog": ("address",),
    "splunk_hec": ("url", "token_file"),
    "elasticsearch": ("url", "index"),
}


def _check_section(section: dict[str, Any], index: int) -> None:
    label = f"output {index}"
    if "name" in section and isinstance(section["name"], str):
        label += f" ({section['name']})"
    kind = section.get("type")
    if kind not in OUTPUT_TYPES:
        raise OutputConfigError(
            f"{label}: type: {kind!r} is not one of {', '.join(sorted(OUTPUT_TYPES))}"
        )
    allowed = _COMMON_KEYS | OUTPUT_TYPES[kind].keys
    for key, value in section.items():
        if key not in allowed:
            raise OutputConfigError(f"{label}: {key}: unknown key for a {kind} output")
        want = allowed[key]
        if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
            raise OutputConfigError(f"{label}: {key}: {value!r} has the wrong type")
    for key in _REQUIRED[kind]:
        if key not in section:
            raise OutputConfigError(f"{label}: {key}: missing (required for a {kind} output)")
    checks: list[tuple[str, bool, str]] = [
        ("what", section.get("what", "both") in WHAT, f"must be one of {', '.join(WHAT)}"),
        ("schema", section.get("schema", "native") in SCHEMAS,
         f"must be one of {', '.join(SCHEMAS)}"),
        ("queue", section.get("queue", 1) >= 1, "must be at least 1"),
        ("batch", section.get("batch", 1) >= 1, "must be at least 1"),
        ("backoff", section.get("backoff", 1) > 0, "must be positive"),
        ("backoff_max", section.get("backoff_max", 1) > 0, "must be positive"),
        ("max_bytes", section.get("max_bytes", 0) >= 0, "must not be negative"),
        ("backups", section.get("backups", 0) >= 0, "must not be negative"),
    ]  # fmt: skip
    if kind == "syslog":
        host, sep, port = section["address"].rpartition(":")
        good = bool(sep and host and port.isdigit() and 0 < int(port) < 65536)
        checks.append(("address", good, "must be HOST:PORT"))
        facility = section.get("facility", "user")
        good = facility in SYSLOG_FACILITIES if isinstance(facility, str) else 0 <= facility < 24
        checks.append(("facility", good, "must be a facility name (e.g. local0) or 0-23"))
        if "ca_file" in section and not section.get("tls", False):
            checks.append(("ca_file", False, "needs tls = true"))
    if kind in ("splunk_hec", "elasticsearch"):
        url = section["url"]
        checks.append(("url", url.startswith(("http://", "https://")), "must be http(s)://..."))
        if section.get("insecure") and "ca_file" in section:
            checks.append(("insecure", False, "contradicts ca_file"))
    for key, ok, why in checks:
        if not ok:
            raise OutputConfigError(f"{label}: {key}: {section.get(key)!r} {why}")
    for key in ("ca_file", "token_file", "api_key_file"):
        if key in section and not Path(section[key]).is_file():
            raise OutputConfigError(f"{label}: {key}: {section[key]} is not a readable file")
    if kind == "jsonl" and section["path"] != "-":
        parent = Path(section["path"]).parent
        if not parent.is_dir():
            raise OutputConfigError(f"{label}: path: directory {parent} does not exist")


def outputs_from_config(sections: list[dict[str, Any]]) -> list[Output]:
    """The outputs the [[output]] tables describe, checked whole before any is made (no
    sender starts before start()). Raises OutputConfigError naming the output and key."""
    for index, section in enumerate(sections):
        if not isinstance(section, dict):
            raise OutputConfigError(f"output {index}: is not a table")
        _check_section(section, index)
    outputs = [OUTPUT_TYPES[s["type"]](s, i) for i, s in enumerate(sections)]
    seen: set[str] = set()
    for index, o in enumerate(outputs):
        if o.name in seen:
            raise OutputConfigError(f"output {index} ({o.name}): name: used by another output")
        seen.add(o.name)
    return outputs


# --- metrics -------------------------------------------------------------------------------


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_lines(outputs: list[Output]) -> list[str]:
    """Prometheus text exposition lines (HELP, TYPE and samples) of every output's stats."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    family("sandtrace_output_sent_total", "counter", "Items delivered, per output")
    for o in outputs:
        lines.append(f'sandtrace_output_sent_total{{output="{_label(o.name)}"}} {o.stats.sent}')
    family("sandtrace_output_dropped_total", "counter", "Items lost, per output and cause")
    for o in outputs:
        for cause in sorted(set(DROP_CAUSES) | set(o.stats.dropped)):
            lines.append(
                f'sandtrace_output_dropped_total{{output="{_label(o.name)}",'
                f'cause="{_label(cause)}"}} {o.stats.dropped[cause]}'
            )
    family("sandtrace_output_retries_total", "counter", "Failed deliveries retried, per output")
    for o in outputs:
        lines.append(
            f'sandtrace_output_retries_total{{output="{_label(o.name)}"}} {o.stats.retries}'
        )
    family("sandtrace_output_queue", "gauge", "Items waiting or in delivery, per output")
    for o in outputs:
        lines.append(f'sandtrace_output_queue{{output="{_label(o.name)}"}} {o.depth()}')
    return lines
