"""``sandtrace tail``: follow the live events and alerts of a ``sandtrace watch`` (over its
Unix socket) or of the detection service (``--server``), filtered by the server.

Lines look like the local output of watch: compact text, every string a traced process
controls escaped (api.render), or JSON lines with ``-o json``. When the server goes
away, tail says so on stderr and reconnects with backoff; Ctrl-C or SIGTERM ends it (0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import ssl
import sys
from dataclasses import dataclass
from typing import IO

import aiohttp
import structlog
from yarl import URL

from api.backoff import Backoff
from api.endpoints import InsecureURL, check_url, read_token_file
from api.events import WIRE_VERSION, EventFormatError, WireVersionError, decode
from api.render import TerminalSink, TextRenderer, escape, line_width, use_color
from api.tail import (
    TAIL_PATH,
    TAIL_PROTOCOL,
    BadFilter,
    TailFilter,
    parse_control,
)
from fleet.connect import is_nats_url

log = structlog.get_logger("sandtrace.tail")

MAX_BACKOFF = 8.0


class TailError(Exception):
    """Following cannot go on (refused, incompatible): the message says why; exit 2."""


class OutputClosed(Exception):
    """Whoever read stdout went away (e.g. `| head`); not an OSError, so never retried."""


@dataclass(slots=True)
class Target:
    """Where to connect: a URL, and the connector options that reach it."""

    url: URL
    label: str  # what the user is told
    unix: str | None = None
    ssl_context: ssl.SSLContext | None = None
    token: str | None = None


def target_of(args: argparse.Namespace) -> Target:
    if not args.server:
        if args.token_file or args.ca_file or args.insecure:
            raise TailError("--token-file, --ca-file and --insecure go with --server")
        return Target(URL("http://localhost" + TAIL_PATH), args.socket, unix=args.socket)
    try:
        url = URL(check_url(args.server, args.insecure))
    except InsecureURL:
        host = URL(args.server).host
        raise TailError(
            f"refusing to send the token and read events in clear text from {host}: use "
            "https:// (with --ca-file if its certificate is private), or --insecure on a "
            "trusted network"
        ) from None
    except ValueError:
        raise TailError(f"--server wants an http:// or https:// URL, not {args.server!r}") from None
    token = None
    if args.token_file:
        try:
            token = read_token_file(args.token_file)
        except ValueError as exc:
            raise TailError(f"--token-file: {exc}") from None
    context = None
    if args.ca_file:
        if url.scheme != "https":
            raise TailError("--ca-file goes with an https:// --server")
        try:
            context = ssl.create_default_context(cafile=args.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TailError(f"cannot load --ca-file {args.ca_file}: {exc}") from None
    base = str(url)
    return Target(URL(base + TAIL_PATH), base, ssl_context=context, token=token)


def _say(message: str) -> None:
    print(f"sandtrace: {message}", file=sys.stderr, flush=True)


class Follower:
    """One tail session: connect, render, reconnect, until stopped."""

    def __init__(
        self, target: Target, flt: TailFilter, stream: IO[str], renderer: TextRenderer | None
    ) -> None:
        self.target = target
        self.filter = flt
        self.stream = stream
        self.renderer = renderer
        self.out: TerminalSink | None = None  # made (header printed) once connected
        self.connected_once = False
        self.last_problem = ""  # told once, until the next connection
        self.noticed = ""  # the server's notice, told once

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(0.5, MAX_BACKOFF)
        connector: aiohttp.BaseConnector
        if self.target.unix is not None:
            connector = aiohttp.UnixConnector(path=self.target.unix)
        else:
            connector = aiohttp.TCPConnector(ssl=self.target.ssl_context or True)
        headers = {"Authorization": f"Bearer {self.target.token}"} if self.target.token else {}
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            while not stop.is_set():
                try:
                    await self._follow(session)
                    problem = f"{self.target.label} closed the stream; reconnecting, Ctrl-C stops"
                    backoff.reset()
                except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
                    raise TailError(
                        f"TLS with {self.target.label} failed ({exc}): give its CA with --ca-file"
                    ) from None
                except (aiohttp.ClientConnectionError, OSError, TimeoutError) as exc:
                    problem = self._unreachable(exc)
                if problem != self.last_problem:
                    _say(problem)
                    self.last_problem = problem
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff.next())

    def _unreachable(self, exc: BaseException) -> str:
        cause = getattr(exc, "os_error", None) or exc
        what = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        if self.target.unix is not None:
            if isinstance(cause, PermissionError):
                raise TailError(
                    f"permission denied on {self.target.unix}: the local tail is root's "
                    "only; run sandtrace tail as root (sudo)"
                ) from None
            hint = "is `sandtrace watch` running (without --no-tail)?"
        else:
            hint = "is `sandtrace serve` running there?"
        return f"cannot reach {self.target.label} ({what}); retrying, Ctrl-C stops. {hint}"

    async def _follow(self, session: aiohttp.ClientSession) -> None:
        try:
            ws = await session.ws_connect(
                self.target.url, params=self.filter.query(), heartbeat=20.0, autoclose=True
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise TailError(self._refusal(exc)) from None
        async with ws:
            hello = await ws.receive(timeout=10)
            if hello.type in {
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
            }:
                return  # going away already
            if hello.type != aiohttp.WSMsgType.TEXT:
                raise TailError(f"{self.target.label} did not greet as a sandtrace tail server")
            greeting = parse_control(hello.data)
            self._check_hello(greeting)
            self._sink()
            if not self.connected_once:
                _say(f"following {self.target.label} ({self._describe()}); Ctrl-C stops")
            else:
                _say(f"reconnected to {self.target.label}")
            self.connected_once = True
            self.last_problem = ""
            notice = greeting.get("notice")
            if isinstance(notice, str) and notice and notice != self.noticed:
                _say(escape(notice))  # the server's words: shown escaped, like all it sends
                self.noticed = notice
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    self._show(msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    self._notice(parse_control(msg.data))
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    raise aiohttp.ClientConnectionError(str(ws.exception()))

    def _refusal(self, exc: aiohttp.WSServerHandshakeError) -> str:
        label = self.target.label
        if exc.status == 401:
            return f"{label} refused the token (401): check --token-file"
        if exc.status == 404:
            return f"{label} has no live tail ({TAIL_PATH} not found): is it sandtrace serve?"
        return f"{label} refused to stream ({exc.status}): {exc.message}"

    def _check_hello(self, hello: dict[str, object]) -> None:
        if hello.get("type") != "hello":
            raise TailError(f"{self.target.label} did not greet as a sandtrace tail server")
        wire, proto = hello.get("wire_version"), hello.get("tail_version")
        if wire != WIRE_VERSION:
            raise TailError(
                f"{self.target.label} sends event wire version {wire}; this sandtrace reads "
                f"version {WIRE_VERSION}: run the same sandtrace version on both sides"
            )
        if proto != TAIL_PROTOCOL:
            raise TailError(
                f"{self.target.label} speaks tail protocol {proto}; this sandtrace speaks "
                f"{TAIL_PROTOCOL}: run the same sandtrace version on both sides"
            )

    def _show(self, data: bytes) -> None:
        try:
            item = decode(data)
        except WireVersionError as exc:
            raise TailError(f"{self.target.label}: {exc}") from None
        except EventFormatError as exc:
            log.warning("undecodable tail frame", error=str(exc))
            return
        out = self._sink()
        try:
            out.emit(item)
            out.flush()
        except BrokenPipeError:
            raise OutputClosed from None

    def _sink(self) -> TerminalSink:
        if self.out is None:
            try:
                self.out = TerminalSink(self.stream, self.renderer)  # prints the header
            except BrokenPipeError:
                raise OutputClosed from None
        return self.out

    def _notice(self, message: dict[str, object]) -> None:
        if message.get("type") == "dropped":
            _say(
                f"missed {message.get('count')} events/alerts (this tail read too slowly; "
                f"{message.get('total')} missed in all)"
            )
        else:
            log.debug("control message", message=message)

    def _describe(self) -> str:
        parts = [f"{k}={escape(v)}" for k, v in self.filter.query().items()]
        return ", ".join(parts) or "everything"


async def follow(args: argparse.Namespace) -> int:
    try:
        flt = TailFilter.parse(
            [("kind", k) for k in args.kind]
            + [("sandbox", s) for s in args.sandbox]
            + [("host", h) for h in args.host]
            + ([("alerts_only", "1")] if args.alerts_only else [])
        )
        if _fleet(args):  # a fleet on NATS JetStream: tail/natsfollow.py
            from tail.natsfollow import follow_fleet  # noqa: PLC0415

            return await follow_fleet(args, flt, _renderer(args, len(flt.hosts) != 1))
        target = target_of(args)
    except (BadFilter, TailError) as exc:
        _say(str(exc))
        return 2
    renderer = None
    if args.output == "compact":
        show_host = target.unix is None and len(flt.hosts) != 1
        width = line_width(args.width, sys.stdout)
        renderer = TextRenderer(use_color(args.color, sys.stdout), width, show_host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    follower = Follower(target, flt, sys.stdout, renderer)
    task = asyncio.create_task(follower.run(stop))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # its error, if any
    except TailError as exc:
        _say(str(exc))
        return 2
    except OutputClosed:
        # The reader of stdout went away (e.g. `| head`): no more output, not even the
        # interpreter's last flush.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        for t in (task, stopped):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, TailError, OutputClosed):
                await t
        if follower.out is not None:
            with contextlib.suppress(BrokenPipeError):
                follower.out.close()
    return 0


def _fleet(args: argparse.Namespace) -> bool:
    """Whether --server is a fleet's NATS cluster; TailError for options that need one."""
    if not is_nats_url(args.server):
        if args.from_start:
            raise TailError("--from-start goes with a nats:// --server (the fleet's alert stream)")
        return False
    return True


def _renderer(args: argparse.Namespace, show_host: bool) -> TextRenderer | None:
    if args.output != "compact":
        return None
    width = line_width(args.width, sys.stdout)  # --width, else the terminal's, else whole
    return TextRenderer(use_color(args.color, sys.stdout), width, show_host)


def main(args: argparse.Namespace) -> int:
    """Run `sandtrace tail` with parsed arguments."""
    return asyncio.run(follow(args))
