"""The detection service's ingestion, against a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from api.events import WIRE_VERSION, Alert, to_dict, to_row
from api.wire import CONTENT_TYPE, MAX_BATCH_BYTES, encode_batch
from detect.loader import load_text
from detect.ruleset import RuleSet
from detect.testing import event_from_fields
from service.app import Ingest, make_app

TOKEN = "s3cret-token"  # noqa: S105 - a test token
RULE = """
title: miner flags
id: 00000000-0000-4000-8000-00000000f00d
logsource: {product: linux, category: process_creation}
detection: {s: {CommandLine|contains: 'stratum+tcp://'}, condition: s}
level: high
"""


def miner_event(pid: int = 7) -> dict[str, Any]:
    fields = {"Image": "/tmp/x", "CommandLine": "x -o stratum+tcp://h:3333", "ProcessId": pid}
    event = event_from_fields("process_creation", fields)
    return to_dict(event)


EXEC = event_from_fields("process_creation", {"Image": "/bin/x", "ProcessId": 9})
EXEC_ROW = to_row(EXEC)  # [kind, 7 fields, the process at 8, ...]


def batch(seq: int, events: list[Any], **over: Any) -> bytes:
    body = {"v": WIRE_VERSION, "collector": "host-a/1", "seq": seq, "events": events, **over}
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


@pytest.fixture
def alerts() -> list[Alert]:
    return []


@pytest_asyncio.fixture
async def client(alerts: list[Alert]) -> AsyncIterator[TestClient[Any, Any]]:
    rules = RuleSet()
    load_text(RULE, "t", rules)
    ingest = Ingest(rules, on_alert=alerts.append)
    async with TestClient(TestServer(make_app(ingest, TOKEN))) as c:
        yield c


async def post(
    client: TestClient[Any, Any],
    body: bytes,
    token: str | None = TOKEN,
    content_type: str = CONTENT_TYPE,
) -> tuple[int, Any]:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    resp = await client.post("/v1/batches", data=io.BytesIO(body), headers=headers)
    return resp.status, await resp.json()


@pytest.mark.asyncio
async def test_batch_is_handled_once_and_acknowledged(
    client: TestClient[Any, Any], alerts: list[Alert]
) -> None:
    assert await post(client, batch(1, [miner_event()])) == (200, {"ack": 1})
    assert [a.rule_id for a in alerts] == ["00000000-0000-4000-8000-00000000f00d"]
    assert alerts[0].process.pid == 7
    # the same batch again (a retry after a lost ack): acknowledged, not processed twice
    assert await post(client, batch(1, [miner_event(pid=8)])) == (200, {"ack": 1})
    assert len(alerts) == 1
    metrics = await (await client.get("/metrics")).text()
    assert 'sandtrace_batches_total{result="accepted"} 1.0' in metrics
    assert 'sandtrace_batches_total{result="replayed"} 1.0' in metrics
    assert 'sandtrace_alerts_total{rule="00000000-0000-4000-8000-00000000f00d"} 1.0' in metrics
    assert 'sandtrace_events_received_total{host="testhost"} 1.0' in metrics


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "status", "reason", "message"),
    [
        (b"\xc1\xc1", 400, "malformed", "not msgpack"),
        (batch(1, [miner_event()])[:-5], 400, "malformed", "not msgpack"),
        (msgpack.packb([1, 2]), 400, "malformed", "not a map"),
        (
            batch(1, [], v=6),
            409,
            "version",
            "version 6 is not supported; this service reads versions 1 to 5",
        ),
        (
            batch(1, [{**miner_event(), "argv": [b"x", 5]}]),
            400,
            "malformed",
            "event 0: exec event: argv[1]: Expected `bytes`, got `int`",
        ),
        (
            batch(1, [to_row(EXEC)[:5]], v=2),
            400,
            "malformed",
            "event 0: exec event row: Expected `array` of at least length",
        ),
        (
            batch(1, [to_row(EXEC), [*to_row(EXEC)[:8], [1] * 14, *to_row(EXEC)[9:]]], v=2),
            400,
            "malformed",
            "event 1: exec event: process.comm: Expected `bytes`, got `int`",
        ),
        (batch(1, [["alert"]], v=2), 400, "malformed", "unknown event kind 'alert'"),
        # version 3: each event's process is an index into the batch's processes
        (
            batch(
                1,
                [[*EXEC_ROW[:8], 0, *EXEC_ROW[9:]], [*EXEC_ROW[:8], 1, *EXEC_ROW[9:]]],
                v=3,
                processes=[EXEC_ROW[8]],
            ),
            400,
            "malformed",
            "event 1: process 1: the batch has 1 processes",
        ),
        (
            batch(1, [[*EXEC_ROW[:8], -1, *EXEC_ROW[9:]]], v=3, processes=[EXEC_ROW[8]]),
            400,
            "malformed",
            "event 0: process -1: the batch has 1 processes",
        ),
        (
            batch(1, [EXEC_ROW], v=3, processes=[]),
            400,
            "malformed",
            "event 0: process: in a version 5 batch, an index into the batch's processes",
        ),
        (
            batch(1, [[*EXEC_ROW[:8], 0, *EXEC_ROW[9:]]], v=3, processes=[[1, 2]]),
            400,
            "malformed",
            "batch processes: process 0: process row: Expected `array` of at least",
        ),
        (
            batch(1, [[*EXEC_ROW[:8], 0, *EXEC_ROW[9:]]], v=2),
            400,
            "malformed",
            "event 0: exec event: process: Expected `array`, got `int`",
        ),
        (batch(1, [], collector=""), 400, "malformed", "no collector id"),
        (batch(-1, []), 400, "malformed", "no sequence number"),
        (batch(1, [{"kind": "exec"}]), 400, "malformed", "event 0"),
        (batch(1, [{"kind": "nonsense"}]), 400, "malformed", "unknown event kind"),
    ],
)
async def test_bad_input_gets_a_clear_4xx(
    client: TestClient[Any, Any], body: bytes, status: int, reason: str, message: str
) -> None:
    got_status, got = await post(client, body)
    assert (got_status, got["error"]) == (status, reason)
    assert message in got["message"]
    # and the service goes on serving others
    assert await post(client, batch(5, [miner_event()])) == (200, {"ack": 5})


@pytest.mark.asyncio
async def test_token_is_required(client: TestClient[Any, Any]) -> None:
    assert (await post(client, batch(1, []), token=None))[0] == 401
    assert (await post(client, batch(1, []), token="wrong"))[0] == 401  # noqa: S106
    assert (await post(client, batch(1, [])))[0] == 200


@pytest.mark.asyncio
async def test_oversized_and_wrong_type(client: TestClient[Any, Any]) -> None:
    big = batch(1, [], pad=b"x" * (MAX_BATCH_BYTES + 1))
    assert (await post(client, big))[0] == 413
    assert (await post(client, batch(1, []), content_type="text/plain"))[0] == 415
    # JSON is accepted, and a msgpack body sent as JSON is malformed JSON
    assert (await post(client, batch(1, []), content_type="application/json"))[0] == 400
    json_batch = encode_batch("c1", 1, [], fmt="json")
    assert await post(client, json_batch, content_type="application/json") == (200, {"ack": 1})


@pytest.mark.asyncio
async def test_health_and_readiness(client: TestClient[Any, Any]) -> None:
    health = await client.get("/healthz")
    assert health.status == 200 and (await health.json())["status"] == "ok"
    ready = await client.get("/readyz")
    assert (await ready.json()) == {"status": "ready", "rules": 1}


@pytest.mark.asyncio
async def test_a_byte_a_second_client_gets_408_and_others_are_served() -> None:
    rules = RuleSet()
    load_text(RULE, "t", rules)
    async with TestClient(TestServer(make_app(Ingest(rules), TOKEN, read_timeout=0.5))) as c:
        body = batch(1, [miner_event()])
        reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
        writer.write(
            f"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: {CONTENT_TYPE}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        for byte in body[:3]:  # a trickle
            writer.write(bytes([byte]))
            await writer.drain()
            # meanwhile another client is served at once
            assert await post(c, batch(byte + 10, [])) == (200, {"ack": byte + 10})
            await asyncio.sleep(0.25)
        status_line = await asyncio.wait_for(reader.readline(), 5)
        assert status_line.startswith(b"HTTP/1.1 408")
        writer.close()
