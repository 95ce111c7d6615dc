"""HTTP outputs: Splunk HTTP Event Collector and Elasticsearch _bulk.

Batches are POSTed with one aiohttp session per output (outputs differ in TLS settings),
made when the output starts. Connection errors, 429 and 5xx are retried; any other 4xx is a
refusal for good: the items are dropped as "rejected" with the receiver's reason logged.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import ClassVar

import aiohttp

from service.outputs.base import (
    RESPONSE_TEXT_LIMIT,
    Output,
    OutputConfigError,
    OutputSection,
    Pending,
    RetryableError,
    dumps,
)
from service.schemas.common import Doc, Item


def read_secret(path: str, key: str, out: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise OutputConfigError(f"output {out}: {key}: cannot read {path}: {exc}") from exc


class HttpOutput(Output):
    """Batches POSTed with one aiohttp session; retries on connection errors, 429 and 5xx."""

    content_type: ClassVar[str] = "application/json"
    default_batch = 100

    def __init__(self, section: OutputSection, index: int) -> None:
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

    def _check_status(self, status: int, body: str, pending: list[Pending]) -> bool:
        """True when the request as a whole succeeded; raises when it must be retried;
        False (items counted as rejected) when the receiver refused it for good."""
        if status == 429 or status >= 500:
            raise RetryableError(f"http_{status}", body[:RESPONSE_TEXT_LIMIT])
        if 200 <= status < 300:
            return True
        self._reject(pending, f"HTTP {status}: {body}")
        return False

    async def _close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class SplunkHecOutput(HttpOutput):
    """Splunk HTTP Event Collector: concatenated event objects POSTed to .../event."""

    output_type = "splunk_hec"

    def __init__(self, section: OutputSection, index: int) -> None:
        super().__init__(section, index)
        token = read_secret(section["token_file"], "token_file", f"{index} ({self.name})")
        self.headers["Authorization"] = f"Splunk {token}"
        self.index: str | None = section.get("index")
        self.sourcetype: str = section.get("sourcetype", "sandtrace")

    def _payload(self, item: Item, doc: Doc) -> bytes:
        event: Doc = {
            "time": (item.time_ns // 1000) / 1_000_000,
            "host": item.host,
            "source": "sandtrace",
            "sourcetype": self.sourcetype,
        }
        if self.index:
            event["index"] = self.index
        event["event"] = doc
        return dumps(event).encode("ascii")

    async def _deliver(self, pending: list[Pending]) -> list[Pending]:
        status, body = await self._post(b"".join(p.payload for p in pending))
        if self._check_status(status, body, pending):
            self.stats.sent += len(pending)
        return []


class ElasticsearchOutput(HttpOutput):
    """Elasticsearch _bulk: a create action per document; only items the response marks
    429 or 5xx are sent again, other failed items are dropped as rejected."""

    output_type = "elasticsearch"
    content_type = "application/x-ndjson"

    def __init__(self, section: OutputSection, index: int) -> None:
        super().__init__(section, index)
        if not self.url.rstrip("/").endswith("/_bulk"):
            self.url = self.url.rstrip("/") + "/_bulk"
        self.index: str = section["index"]
        out = f"{index} ({self.name})"
        keys = (
            ("api_key_file", section.get("api_key_file")),
            ("token_file", section.get("token_file")),
        )
        for key, path in keys:
            if path is not None:
                self.headers["Authorization"] = f"ApiKey {read_secret(path, key, out)}"
                break
        self._action = dumps({"create": {"_index": self.index}}).encode("ascii") + b"\n"

    def _payload(self, item: Item, doc: Doc) -> bytes:
        return self._action + dumps(doc).encode("ascii") + b"\n"

    async def _deliver(self, pending: list[Pending]) -> list[Pending]:
        status, body = await self._post(b"".join(p.payload for p in pending))
        if not self._check_status(status, body, pending):
            return []
        items = _bulk_results(body)
        if items is None or len(items) != len(pending):  # sent again whole: at least once
            raise RetryableError("bad_response", f"unreadable _bulk response: {body[:200]}")
        retry: list[Pending] = []
        rejected: list[tuple[Pending, str]] = []
        for p, result in zip(pending, items, strict=True):
            outcome = next(iter(result.values())) if isinstance(result, dict) and result else {}
            item_status = outcome.get("status", 0) if isinstance(outcome, dict) else 0
            if 200 <= item_status < 300:
                self.stats.sent += 1
            elif item_status == 429 or item_status >= 500:
                retry.append(p)
            else:
                rejected.append((p, dumps(outcome.get("error", outcome))))
        if rejected:
            self._reject([p for p, _ in rejected], f"_bulk items refused: {rejected[0][1]}")
        return retry


def _bulk_results(body: str) -> list[object] | None:
    """The items of a _bulk response (JSON from the receiver: anything may be in them)."""
    try:
        items = json.loads(body)["items"]
    except (ValueError, KeyError, TypeError):
        return None
    return items if isinstance(items, list) else None
