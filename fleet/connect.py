"""Reaching a NATS cluster: its address list, TLS and authentication, checked before use.

A fleet address is `nats://HOST:PORT[,HOST:PORT...]` (or `tls://`, which requires TLS):
the client connects to any of them, learns the rest of the cluster from the server it
reaches, and reconnects to another one when that server goes away. Authentication is at
most one of a token (a file), an NKey seed (a file) or a credentials file (JWT and seed, as
`nsc` writes them). Every part of sandtrace that talks to NATS (the collector, the worker,
`sandtrace tail`) builds its connection here, so they accept the same addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from api.endpoints import is_loopback, read_token_file

SCHEMES = ("nats", "tls")


class NatsConfigError(ValueError):
    """A fleet address or its credentials cannot be used; the message says why."""


class NatsRefused(Exception):
    """The cluster refused this client's credentials (a wrong token, NKey or credentials
    file, or none where it wants one): trying again does not help, the operator must act."""


def refused(exc: BaseException) -> bool:
    """Whether a connection error is the cluster refusing the credentials."""
    text = str(exc).lower()
    return "authorization" in text or "authentication" in text


def is_nats_url(url: str | None) -> bool:
    """Whether `url` names NATS servers (by its scheme alone: whatever follows is checked
    where it is used, so a malformed rest is said there, not raised here)."""
    scheme, sep, _ = str(url or "").partition("://")
    return bool(sep) and scheme in SCHEMES


def parse_servers(url: str) -> list[str]:
    """`nats://a:4222,b:4222` -> ["nats://a:4222", "nats://b:4222"]; NatsConfigError when a
    part is not HOST:PORT."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise NatsConfigError(f"{url!r} is not nats://HOST:PORT[,HOST:PORT...] (or tls://)")
    servers = []
    for given in rest.split(","):
        part = given.strip().rstrip("/")
        parsed = urlsplit(f"{scheme}://{part}")
        try:
            port = parsed.port
        except ValueError:
            port = None
        if not parsed.hostname or port is None or parsed.path or parsed.username:
            raise NatsConfigError(
                f"{part!r} in {url!r} is not HOST:PORT (credentials go in files, not the URL)"
            )
        servers.append(f"{scheme}://{part}")
    return servers


@dataclass(slots=True)
class NatsTarget:
    """Where a NATS cluster is and how to prove who this client is to it."""

    servers: list[str]
    tls: ssl.SSLContext | None = None
    token: str | None = None
    nkey_seed_file: str | None = None
    creds_file: str | None = None

    @property
    def label(self) -> str:
        return ",".join(self.servers)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for nats.connect()."""
        opts: dict[str, Any] = {"servers": self.servers}
        if self.tls is not None:
            opts["tls"] = self.tls
        if self.token:
            opts["token"] = self.token
        if self.nkey_seed_file:
            opts["nkeys_seed"] = self.nkey_seed_file
        if self.creds_file:
            opts["user_credentials"] = self.creds_file
        return opts


def target(
    url: str,
    *,
    token_file: str | None = None,
    nkey_file: str | None = None,
    creds_file: str | None = None,
    ca_file: str | None = None,
    insecure: bool = False,
) -> NatsTarget:
    """A checked NatsTarget: the addresses parsed, the files readable, TLS set up (with
    `ca_file`, or for tls://), clear text refused off this host unless `insecure` (events
    carry command lines)."""
    servers = parse_servers(url)
    given = [name for name, v in (("token", token_file), ("nkey", nkey_file)) if v]
    given += ["credentials"] if creds_file else []
    if len(given) > 1:
        raise NatsConfigError(f"give one of token, nkey and credentials, not {' and '.join(given)}")
    token = None
    if token_file:
        try:
            token = read_token_file(token_file)
        except ValueError as exc:
            raise NatsConfigError(f"token file: {exc}") from None
    for what, path in (("nkey seed", nkey_file), ("credentials", creds_file)):
        if path:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise NatsConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None
            marker = "SU" if what == "nkey seed" else "-----BEGIN NATS USER JWT-----"
            if marker not in text:
                raise NatsConfigError(f"{path} is not a NATS {what} file")
    use_tls = ca_file is not None or url.startswith("tls://")
    context = None
    if use_tls:
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise NatsConfigError(f"cannot load the CA file {ca_file}: {exc}") from None
    elif not insecure:
        remote = [s for s in servers if not is_loopback(urlsplit(s).hostname or "")]
        if remote:
            raise NatsConfigError(
                f"refusing clear text to {urlsplit(remote[0]).hostname}: give the cluster's "
                "CA (tls:// or a CA file), or --insecure on a trusted network"
            )
    return NatsTarget(servers, context, token, nkey_file, creds_file)


async def connect(where: NatsTarget, name: str, attempts: int = -1, **callbacks: Any) -> Any:
    """A connected nats.aio.client.Client that reconnects (for ever, or `attempts` times per
    server, after which it closes and the caller connects again with its own backoff);
    raises what nats.connect raises when no server answers now, and NatsRefused as soon as
    a server refuses the credentials (nats-py would otherwise try again for ever, and a
    wrong key would look like a cluster that cannot be reached)."""
    import nats  # noqa: PLC0415

    if where.tls is not None:
        _quiet_tls_eof()
    # nats-py prints a traceback for every failed attempt unless told otherwise; the
    # callers say what failed in words of their own
    given = callbacks.pop("error_cb", _debug_error)
    refusal: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def error_cb(exc: Exception) -> None:
        if refused(exc) and not refusal.done():
            refusal.set_result(exc)
        await given(exc)

    connecting = asyncio.ensure_future(
        nats.connect(
            **where.options(),
            name=name,
            allow_reconnect=True,
            max_reconnect_attempts=attempts,
            reconnect_time_wait=0.5,
            connect_timeout=2,
            error_cb=error_cb,
            **callbacks,
        )
    )
    either: set[asyncio.Future[Any]] = {connecting, refusal}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
    if connecting.cancelled() and refusal.done():
        raise NatsRefused(f"{where.label} refused the credentials: {refusal.result()}")
    return connecting.result()


class _TlsEofNoise(logging.Filter):
    """asyncio warns "returning true from eof_received() has no effect when using ssl" each
    time a NATS server closes a TLS connection (nats-py's stream protocol says it would keep
    the connection half open); it says nothing an operator can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received" not in record.getMessage()


def _quiet_tls_eof() -> None:
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _TlsEofNoise) for f in logger.filters):
        logger.addFilter(_TlsEofNoise())


async def _debug_error(exc: Exception) -> None:
    structlog.get_logger("sandtrace.nats").debug("nats", error=repr(exc))
